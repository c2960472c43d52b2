"""Server and edge client over real loopback HTTP: remote fit/predict, resume after kills, shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from frozenlens.backbones import Tap
from frozenlens.cli import main
from frozenlens.data import load_task
from frozenlens.serve.app import ConnectionLimits, create_app, uvicorn_config
from frozenlens.serve.client import FeatureClient, RemoteError, RemoteTaps
from frozenlens.serve.engine import DEFAULT_TAPS, FeatureEngine
from frozenlens.store import extract
from tests.conftest import adapter_folder

TOKEN = "edge-token"
SERVED = [*DEFAULT_TAPS, "gather.4:tokens", "gather.8:tokens"]
TAPS = [Tap("final", "cls"), Tap("gather.4", "tokens")]


class LiveServer:
    """uvicorn serving an app on a free loopback port, in a thread."""

    def __init__(self, app, port: int | None = None, connections: ConnectionLimits | None = None):
        self.app = app
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # the very uvicorn settings `frozenlens serve` runs with (connection guard included)
        self.server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    graceful_shutdown_s=20, connections=connections))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def state(self):
        return self.app.state.server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slow_app(backbone, seconds: float):
    """An app whose every backbone pass takes at least ``seconds`` (to interrupt fetches mid-way)."""
    engine = FeatureEngine(backbone, taps=SERVED)

    async def slow(job):
        await asyncio.sleep(seconds)
        return engine.run([job])[0]

    return create_app(engine, token=TOKEN, runner=slow)


@pytest.fixture(scope="module")
def server(tiny_backbone):
    with LiveServer(create_app(tiny_backbone, token=TOKEN)) as live:  # MIST's gathers: k = 4, 8, 12
        yield live


def _images(task: Path, split: str | None = None) -> list[str]:
    loaded = load_task(task)
    return [str(i.path) for i in (loaded.split(split) if split else loaded.all_images())]


def test_remote_fit_then_predict_matches_the_local_path(server, tiny_task, tiny_backbone, tmp_path, capsys):
    out = tmp_path / "edge"
    code = main(["fit", str(tiny_task), "--remote", server.url, "--token", TOKEN, "--codec", "float32",
                 "--store-dtype", "float32", "--method", "linear", "--epochs", "10", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["context"]["features_from"] == "remote:float32"
    assert results["context"]["weights_hash"] == tiny_backbone.weights_hash
    assert results["results"][0]["test_accuracy_mean"] > 0.6

    from frozenlens.store import ActivationStore

    remote_store = Path(results["context"]["store"])
    fetched = ActivationStore(remote_store)  # the training images; the test split is scored, never stored
    assert sorted(fetched.image_paths) == sorted(_images(tiny_task, "trainval"))
    local = extract(tiny_backbone, fetched.image_paths, [Tap("final", "cls")], root=tmp_path / "local",
                    dtype="float32", progress=False)
    assert remote_store != local.path  # remote features never mix with local ones
    assert fetched.meta["origin"] == "remote:float32" and fetched.meta["shard_size"] == 32
    np.testing.assert_allclose(fetched.array("final:cls"), local.array("final:cls"), atol=1e-5)

    images = sorted((tiny_task / "images" / "green").glob("test_*.png"))[:4]
    capsys.readouterr()
    assert main(["predict", str(out / "linear"), *map(str, images), "--json", "--remote", server.url,
                 "--token", TOKEN]) == 0
    remote = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["predict", str(out / "linear"), *map(str, images), "--json"]) == 0
    here = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["top"][0][0] for r in remote] == [h["top"][0][0] for h in here]
    for r, h in zip(remote, here):
        assert dict(r["top"]) == pytest.approx(dict(h["top"]), abs=1e-4)


def test_mist_on_the_edge_fetches_only_the_gathers_and_predicts_through_the_server(server, tiny_task,
                                                                                     tiny_backbone, tmp_path,
                                                                                     capsys):
    out = tmp_path / "mist"
    served_before = server.state.images_served
    assert main(["fit", str(tiny_task), "--remote", server.url, "--token", TOKEN, "--codec", "int8",
                 "--method", "mist:lae_blocks=1,epochs=3", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    from frozenlens.store import ActivationStore

    store = ActivationStore(Path(results["context"]["store"]))
    assert store.taps == ["gather.12:tokens", "gather.4:tokens", "gather.8:tokens"]  # not 13 block maps
    assert store.meta["origin"] == "remote:int8" and store.num_images == len(_images(tiny_task, "trainval"))
    assert server.state.images_served - served_before == 81  # every image fetched once (test: scored, not stored)
    adapter = json.loads((adapter_folder(out, "mist:lae_blocks=1,epochs=3") / "adapter.json").read_text())
    chosen = adapter["config"]["gather_depth"]
    assert adapter["config"]["gathered"] is True and chosen in (4, 8, 12)
    assert adapter["taps"] == [f"gather.{chosen}:tokens"] and adapter["features_from"] == "remote:int8"

    images = sorted((tiny_task / "images" / "red").glob("test_*.png"))[:3]
    capsys.readouterr()
    assert main(["predict", str(adapter_folder(out, "mist:lae_blocks=1,epochs=3")), *map(str, images), "--json",
                 "--remote", server.url, "--token", TOKEN]) == 0
    remote = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(remote) == 3 and all(abs(sum(p for _, p in r["top"]) - 1) < 1e-5 for r in remote)
    assert main(["predict", str(adapter_folder(out, "mist:lae_blocks=1,epochs=3")), *map(str, images), "--json"]) == 0
    local = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # g_k computed here
    for r, h in zip(remote, local):
        assert dict(r["top"]) == pytest.approx(dict(h["top"]), abs=0.05)  # int8 on the wire vs float here


def test_client_refuses_a_wrong_token_and_a_different_backbone(server, tiny_task, tmp_path, capsys):
    with pytest.raises(RemoteError, match="401.*--token"):
        FeatureClient(server.url, "wrong", retries=1).info()
    with pytest.raises(RemoteError, match="not the expected"):
        FeatureClient(server.url, TOKEN, expect_weights_hash="0" * 64).info()
    with pytest.raises(RemoteError, match="does not serve 'block.2:tokens'.*--tap"):
        RemoteTaps.connect(server.url, TOKEN).tap_shape(Tap("block.2"))
    code = main(["fit", str(tiny_task), "--remote", server.url, "--token", TOKEN, "--method", "vqt",
                 "--epochs", "1", "--out", str(tmp_path / "x")])
    assert code == 2 and "need the backbone on this machine" in capsys.readouterr().err  # before any fetch


_CLIENT = textwrap.dedent("""
    import sys
    from frozenlens.backbones import Tap
    from frozenlens.serve.client import RemoteTaps
    from frozenlens.store import extract
    url, token, root, images = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    source = RemoteTaps.connect(url, token, "float16")
    extract(source, images, [Tap("final", "cls"), Tap("gather.4", "tokens")], root=root,
            batch_size=6, shard_size=6, progress=False)
""")


def _done_shards(root: Path) -> int:
    return sum(1 for p in root.glob("*/shards/*") if p.name.isdigit())


def _served_after_quiet(live: LiveServer) -> int:
    deadline = time.monotonic() + 10
    while live.state.admission.pending and time.monotonic() < deadline:
        time.sleep(0.02)
    return live.state.images_served


def test_fetch_resumes_after_client_kill_and_server_stop_without_fetching_twice(tiny_backbone, tiny_task,
                                                                                tmp_path):
    images, root = _images(tiny_task), tmp_path / "stores"
    per_shard, total_shards = 6, -(-len(images) // 6)
    port = _free_port()

    # 1. kill the client mid-way
    with LiveServer(_slow_app(tiny_backbone, 0.15), port) as live:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        client = subprocess.Popen([sys.executable, "-c", _CLIENT, live.url, TOKEN, str(root), *images], env=env)
        deadline = time.monotonic() + 60
        while _done_shards(root) < 3:
            assert client.poll() is None and time.monotonic() < deadline, "client ended before it was killed"
            time.sleep(0.01)
        client.send_signal(signal.SIGKILL)
        client.wait()
        served_first = _served_after_quiet(live)
    done_first = _done_shards(root)
    assert 3 <= done_first < total_shards
    assert served_first <= (done_first + 1) * per_shard  # at most the one shard in flight is lost

    # 2. stop the server mid-way: the client gives up with a clear error, finished shards stay
    with LiveServer(_slow_app(tiny_backbone, 0.15), port) as live:
        source = RemoteTaps(FeatureClient(live.url, TOKEN, retries=2, backoff=0.1), "float16")
        threading.Timer(0.5, live.stop).start()
        with pytest.raises(RemoteError, match="run the same command again to resume"):
            extract(source, images, TAPS, root=root, batch_size=6, shard_size=6, progress=False)
        served_second = live.state.images_served
    done_second = _done_shards(root)
    assert done_first < done_second < total_shards
    assert served_second <= (done_second - done_first + 1) * per_shard

    # 3. run again: only the missing shards are fetched, and the store equals a local extraction
    with LiveServer(create_app(tiny_backbone, token=TOKEN, taps=SERVED), port) as live:
        store = extract(RemoteTaps.connect(live.url, TOKEN), images, TAPS, root=root, batch_size=6,
                        shard_size=6, progress=False)
        missing = len(images) - done_second * per_shard
        assert live.state.images_served == missing
    local = extract(tiny_backbone, images, TAPS, root=tmp_path / "local", dtype="float16", progress=False)
    for tap in TAPS:
        np.testing.assert_allclose(store.array(tap.key).astype(np.float32),
                                   local.array(tap.key).astype(np.float32), rtol=2e-3, atol=2e-3)


def test_shutdown_answers_requests_in_flight(tiny_backbone, tiny_task):
    images = _images(tiny_task)[:4]
    with LiveServer(_slow_app(tiny_backbone, 0.4)) as live:
        client = FeatureClient(live.url, TOKEN, retries=1)
        client.info()
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(client.features, images, ["final:cls"]) for _ in range(3)]
            while live.state.admission.pending < 12:
                time.sleep(0.01)
            live.stop()
            payloads = [f.result() for f in futures]
        assert [p.features["final:cls"].shape for p in payloads] == [(4, 192)] * 3
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{live.url}/v1/health", timeout=2)
