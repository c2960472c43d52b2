"""Separated tuning on loopback: a feature server process, edge clients, MIST trained at the edge.

Measures, with the default backbone (DINOv2 ViT-S/14) served by ``frozenlens serve``
in its own process on 127.0.0.1:

1. **bytes per image** on the wire for each codec (float32, float16, int8 with a
   per-token scale): the payload of real requests for MIST's g_k divided by the
   images, next to the paper's 0.577 MB/img (ViT-B/16, float32) and the same
   codecs' size for ViT-B;
2. **accuracy per codec** on a real task: g_4, g_8, g_12 of the training and test
   images are fetched once in float32; k is chosen on val200 (MIST trained on
   train800 for each candidate); then MIST with that k is trained on
   train800val200 and tested, once per codec, on the features the codec delivers
   (the codec's encode/decode applied to the float32 features - exactly what the
   server sends, ``tests/test_serve.py`` checks it byte for byte). This part runs
   at ``--acc-img-size`` (default 112 px: 65 tokens instead of 257) so that it
   fits the time budget; CIFAR-10's images are 32 px, so both sizes upsample;
3. **edge peak memory** of training and of prediction, each in a process of its
   own (``benchmarks/edge_memory.py``), at ``--img-size`` (224 px, the paper's
   setting): training fits MIST on the fetched g_k (float16 store, int8 on the
   wire) of ``--mem-train`` images, read from the store batch by batch (batch 32
   and 16) and, for comparison, loaded whole (batch 32); prediction classifies ``--predict-images``
   test images through the server;
4. **server throughput** (images/s) with 1, 4 and 16 concurrent clients, each
   sending requests of ``--request-images`` images for g_k in int8, at ``--img-size``.

Run from the repository root (about 10 minutes on a 2-core CPU with the defaults)::

    FROZENLENS_CACHE=/tmp/flcache .venv/bin/python benchmarks/separated_tuning.py
    .venv/bin/python benchmarks/separated_tuning.py --smoke     # tiny random backbone, a minute

Writes ``separated_tuning.{json,md}`` into ``--out`` (``--smoke`` writes nothing
unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import httpx
import torch
from common import REPO_ROOT, RESULTS, command_line, machine_context, machine_line, open_task
from loadtest import LoadTest

from frozenlens.backbones import DEFAULT_BACKBONE, Tap
from frozenlens.data import Task
from frozenlens.methods import build_method
from frozenlens.methods.mist import gather_depths_in, gather_key
from frozenlens.methods.selection import fit_selecting
from frozenlens.serve.client import RemoteTaps
from frozenlens.serve.codecs import CODECS, decode_payload
from frozenlens.store import ActivationStore, extract
from frozenlens.train.data import TapData
from frozenlens.train.trainer import evaluate

PAPER_MB_PER_IMAGE = 0.577
"""MIST's transfer per image (ViT-B/16, float32: 197 x 768 x 4 bytes = 0.577 MiB)."""
VIT_B_TOKENS, VIT_B_DIM = 197, 768
SMOKE_BACKBONE = "random:vit_tiny_patch16_224"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="cifar10", help="task folder or name in ../shared/data")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--img-size", type=int, default=224, help="server size for bytes, memory, throughput")
    parser.add_argument("--acc-img-size", type=int, default=112, help="server size for accuracy per codec")
    parser.add_argument("--train", type=int, default=1000, help="training images (of train800val200)")
    parser.add_argument("--test", type=int, default=1000, help="test images (stratified subset of test)")
    parser.add_argument("--epochs", type=int, default=10, help="MIST epochs per run (accuracy part)")
    parser.add_argument("--mem-train", type=int, default=1000, help="training images of the memory run")
    parser.add_argument("--mem-epochs", type=int, default=1, help="epochs of the memory run")
    parser.add_argument("--predict-images", type=int, default=128, help="images of the prediction memory run")
    parser.add_argument("--request-images", type=int, default=4, help="images per request (throughput)")
    parser.add_argument("--throughput-images", type=int, default=96, help="images per concurrency level")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels")
    parser.add_argument("--load-requests", type=int, default=60, help="requests of the load/fault test")
    parser.add_argument("--accuracy-from", type=Path,
                        help="take the accuracy-per-codec section from an earlier result JSON (said so in the report)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny random backbone at 32 px and a few images: checks the script, not numbers")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default: {RESULTS})")
    args = parser.parse_args(argv)
    if args.smoke:
        args.backbone, args.img_size, args.acc_img_size = SMOKE_BACKBONE, 32, 32
        args.train, args.test, args.epochs, args.mem_train = 60, 30, 2, 60
        args.predict_images, args.throughput_images, args.load_requests = 16, 16, 40
    elif args.out is None:
        args.out = RESULTS
    return args


# -- the server process -----------------------------------------------------------------------


class ServerProcess:
    """``frozenlens serve`` in a child process on a free loopback port; SIGTERM stops it gracefully."""

    def __init__(self, backbone: str, img_size: int, token: str, taps: Sequence[str] = (),
                 extra: Sequence[str] = ()):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url, self.token = f"http://127.0.0.1:{self.port}", token
        command = [sys.executable, "-m", "frozenlens.cli", "serve", "--backbone", backbone, "--img-size",
                   str(img_size), "--port", str(self.port), "--token", token, *extra]
        for tap in taps:  # none: the server's defaults, MIST's candidate gathers among them
            command += ["--tap", tap]
        self.log = tempfile.TemporaryFile(mode="w+")  # a pipe nobody drains would stall the server when full
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                                        stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def output(self) -> str:
        """What the server has printed so far."""
        self.log.seek(0)
        return self.log.read()

    def __enter__(self) -> "ServerProcess":
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start in 300 s")
            time.sleep(0.5)

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()

    def info(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/v1/info", headers={"Authorization": f"Bearer {self.token}"}).json()


# -- the measurements -----------------------------------------------------------------------


def paths_of(task: Task, split: str, count: int) -> list[str]:
    """``count`` images of a split, stratified: round-robin over classes in split order."""
    by_class: dict[int, list[str]] = {}
    for item in task.split(split):
        by_class.setdefault(item.label, []).append(str(item.path))
    picked: list[str] = []
    while len(picked) < min(count, len(task.split(split))):
        for label in sorted(by_class):
            if by_class[label] and len(picked) < count:
                picked.append(by_class[label].pop(0))
    return picked


def bytes_per_image(server: ServerProcess, images: list[str], key: str) -> dict[str, Any]:
    """Payload bytes per image of real requests for ``key``, per codec."""
    source = RemoteTaps.connect(server.url, server.token)
    shape = tuple(server.info()["features"][key])
    rows = {}
    for name, codec in CODECS.items():
        payload = source.client.features(images, [key], codec=name)
        vit_b = codec.bytes_per_image((VIT_B_TOKENS, VIT_B_DIM))
        rows[name] = {"wire_bytes_per_image": payload.num_bytes / len(images),
                      "array_bytes_per_image": codec.bytes_per_image(shape),
                      "mb_per_image": payload.num_bytes / len(images) / 2**20,
                      "vit_b_mb_per_image": vit_b / 2**20}
    source.close()
    return {"feature": key, "shape": list(shape), "images_per_request": len(images), "codecs": rows}


def throughput(server: ServerProcess, images: list[str], key: str, levels: list[int],
               request_images: int) -> list[dict[str, Any]]:
    """Images/s the server delivers with ``level`` concurrent clients, ``len(images)`` images per level."""
    bodies = [{"images": [base64.b64encode(Path(p).read_bytes()).decode() for p in images[i:i + request_images]],
               "features": [key], "codec": "int8"} for i in range(0, len(images), request_images)]
    rows = []
    for level in levels:
        clients = [httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"},
                                timeout=600) for _ in range(level)]
        for http in clients:  # connect before the clock starts
            http.get("/v1/health").raise_for_status()
        start = threading.Barrier(level + 1)

        def client(http: httpx.Client, share: list[dict]) -> int:
            start.wait()
            for body in share:
                response = http.post("/v1/features", json=body)
                response.raise_for_status()
                decode_payload(response.content)
            return sum(len(b["images"]) for b in share)

        with ThreadPoolExecutor(level) as pool:
            running = [pool.submit(client, http, bodies[i::level]) for i, http in enumerate(clients)]
            start.wait()
            started = time.perf_counter()
            done = sum(f.result() for f in running)
            seconds = time.perf_counter() - started
        for http in clients:
            http.close()
        rows.append({"clients": level, "images": done, "seconds": round(seconds, 2),
                     "images_per_second": round(done / seconds, 2)})
        print(f"  {level} client(s): {done / seconds:.1f} images/s", flush=True)
    return rows


def fetch(server: ServerProcess, images: list[str], taps: list[Tap], root: Path, codec: str,
          dtype: str) -> tuple[ActivationStore, float]:
    source = RemoteTaps.connect(server.url, server.token, codec)
    started = time.perf_counter()
    store = extract(source, images, taps, root=root, dtype=dtype, batch_size=16, shard_size=16, progress=True)
    seconds = time.perf_counter() - started
    source.close()
    return store, seconds


def codec_view(values: torch.Tensor, codec: str, chunk: int = 128) -> torch.Tensor:
    """What ``codec`` delivers for float32 ``values`` (encode, then decode), chunk by chunk."""
    spec, out = CODECS[codec], torch.empty_like(values)
    for start in range(0, len(values), chunk):
        part = values[start:start + chunk].numpy()
        out[start:start + chunk] = torch.from_numpy(spec.decode(spec.encode(part)))
    return out


def split(store: ActivationStore, task: Task, paths: list[str], keys: list[str]) -> TapData:
    labels = {str(i.path): i.label for i in task.all_images()}
    return TapData.from_store(store, keys, paths, [labels[p] for p in paths], len(task.classes))


def accuracy_per_codec(args: argparse.Namespace, task: Task, work: Path, server: ServerProcess) -> dict[str, Any]:
    """k chosen on val200 from float32 features, then MIST per codec on train800val200, tested."""
    train = paths_of(task, "trainval", args.train)
    train800 = [p for p in train if p in {str(i.path) for i in task.split("train")}]
    val200 = [p for p in train if p in {str(i.path) for i in task.split("val")}]
    test = paths_of(task, "test", args.test)
    ks = gather_depths_in(server.info()["features"])
    taps = [Tap.parse(gather_key(k)) for k in ks]
    print(f"accuracy: fetching g_k for k in {ks} of {len(train)} + {len(test)} images "
          f"({args.acc_img_size} px, float32)", flush=True)
    store, fetch_s = fetch(server, train + test, taps, work / "acc", "float32", "float32")
    classes, keys = len(task.classes), [t.key for t in taps]
    backbone = store.meta["backbone"]
    probe = build_method("mist", {"gather_depth": 0, "gathered": True}, backbone, classes)
    cfg = probe.train_defaults.updated(epochs=args.epochs, warmup_epochs=max(1, args.epochs // 10))
    started = time.perf_counter()
    chosen = fit_selecting(probe, "gather_depth", ks, split(store, task, train800, keys), cfg,
                           val=split(store, task, val200, keys))
    select_s = time.perf_counter() - started
    k = chosen.chosen
    key = f"gather.{k}:tokens"
    print(f"  k chosen on val200: {k} ({chosen.accuracy})", flush=True)
    train_data, test_data = split(store, task, train, [key]), split(store, task, test, [key])
    rows = {}
    for name in CODECS:
        model = build_method("mist", {"gather_depth": k, "gathered": True}, backbone, classes)
        view = lambda data: TapData({key: codec_view(data.features[key], name)}, data.labels, classes)  # noqa: E731
        started = time.perf_counter()
        model.fit(view(train_data), cfg)
        rows[name] = {"test_accuracy": evaluate(model, view(test_data)),
                      "train_seconds": round(time.perf_counter() - started, 1),
                      "bytes_per_image": CODECS[name].bytes_per_image(store.shape(key))}
        print(f"  {name}: test accuracy {rows[name]['test_accuracy']:.4f}", flush=True)
    return {"img_size": args.acc_img_size, "train_images": len(train), "test_images": len(test),
            "epochs": args.epochs, "train_config": cfg.to_dict(), "gather_k": k,
            "val_accuracy_per_k": {str(c): a for c, a in chosen.accuracy.items()},
            "fetch_seconds": round(fetch_s, 1), "select_seconds": round(select_s, 1), "codecs": rows}


def edge_process(arguments: list[str]) -> dict[str, Any]:
    """Run ``benchmarks/edge_memory.py`` in a fresh interpreter and return its JSON line."""
    script = REPO_ROOT / "benchmarks" / "edge_memory.py"
    done = subprocess.run([sys.executable, str(script), *arguments], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"edge process failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def served_parts(args: argparse.Namespace, task: Task, work: Path, server: ServerProcess) -> dict[str, Any]:
    """Bytes, throughput, the load test and edge memory, against the server at ``--img-size``."""
    train, test = paths_of(task, "trainval", args.mem_train), paths_of(task, "test", args.predict_images)
    info = server.info()
    k = gather_depths_in(info["features"])[-1]
    key = gather_key(k)
    out: dict[str, Any] = {"img_size": args.img_size, "backbone": info["backbone"]["name"],
                           "weights_hash": info["backbone"]["weights_hash"]}
    print("bytes per image per codec", flush=True)
    out["bytes"] = bytes_per_image(server, test[:8], key)
    print("throughput", flush=True)
    levels = [int(c) for c in args.clients.split(",")]
    out["throughput"] = {"feature": key, "codec": "int8", "request_images": args.request_images,
                         "rows": throughput(server, paths_of(task, "test", args.throughput_images), key,
                                            levels, args.request_images)}
    print("load/fault test", flush=True)
    report = LoadTest(server.url, server.token, requests=args.load_requests, clients=8, bad_fraction=0.3).run()
    out["load_test"] = report.to_dict()
    print(f"edge memory: fetching {key} of {len(train)} training images (int8 on the wire)", flush=True)
    store, fetch_s = fetch(server, train, [Tap.parse(key)], work / "edge", "int8", "float16")
    adapter = work / "edge-adapter"
    trained = [edge_process(["train", str(store.path), str(task.root), str(k), str(adapter), "--epochs",
                             str(args.mem_epochs), "--batch-size", str(batch), stream])
               for batch, stream in ((32, "--stream"), (16, "--stream"), (32, "--no-stream"))]
    predicted = edge_process(["predict", str(adapter), server.url, server.token, *test])
    out["edge_memory"] = {"fetch_seconds": round(fetch_s, 1), "train": trained, "predict": predicted}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    task = open_task(args.task)
    started, load_before = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="separated-tuning-") as scratch:
        work = Path(scratch)
        with ServerProcess(args.backbone, args.img_size, secrets.token_urlsafe(12)) as server:
            served = served_parts(args, task, work, server)
            if args.accuracy_from:
                accuracy = {**json.loads(args.accuracy_from.read_text())["accuracy"],
                            "reused_from": str(args.accuracy_from)}
            elif args.acc_img_size == args.img_size:
                accuracy = accuracy_per_codec(args, task, work, server)
        if args.acc_img_size != args.img_size and not args.accuracy_from:
            with ServerProcess(args.backbone, args.acc_img_size, secrets.token_urlsafe(12)) as server:
                accuracy = accuracy_per_codec(args, task, work, server)
    result = {"command": command_line(__file__), "task": task.name, "smoke": args.smoke,
              "context": machine_context(), "paper_mb_per_image": PAPER_MB_PER_IMAGE, **served,
              "accuracy": accuracy, "total_seconds": round(time.perf_counter() - started, 1),
              "load_average": {"start": [round(v, 1) for v in load_before],
                               "end": [round(v, 1) for v in os.getloadavg()]}}
    markdown = report(result)
    print(markdown)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "separated_tuning.json").write_text(json.dumps(result, indent=2))
        (args.out / "separated_tuning.md").write_text(markdown)
    return 0


def report(r: dict[str, Any]) -> str:
    """The Markdown report."""
    b, acc, mem = r["bytes"], r["accuracy"], r["edge_memory"]
    lines = [f"# Separated tuning on loopback ({r['task']}, {r['backbone']})", ""]
    lines += ["## Bytes per image on the wire", "",
              f"MIST's g_k (`{b['feature']}`, {b['shape'][0]} tokens x {b['shape'][1]}) at {r['img_size']} px; "
              f"payload of requests of {b['images_per_request']} images (safetensors header included), "
              f"next to the paper's {r['paper_mb_per_image']} MB/img (ViT-B/16, float32).", "",
              "| codec | bytes/img (wire) | MB/img | arrays only (bytes/img) | same codec for ViT-B/16 (MB/img) |",
              "|---|---|---|---|---|"]
    for name, row in b["codecs"].items():
        lines.append(f"| {name} | {row['wire_bytes_per_image']:,.0f} | {row['mb_per_image']:.3f} | "
                     f"{row['array_bytes_per_image']:,} | {row['vit_b_mb_per_image']:.3f} |")
    reused = f" (this section is from an earlier run, {acc['reused_from']})" if acc.get("reused_from") else ""
    lines += ["", "## Accuracy per codec" + reused, "",
              f"MIST on {acc['train_images']} training / {acc['test_images']} test images at {acc['img_size']} px, "
              f"{acc['epochs']} epochs; k = {acc['gather_k']} chosen on val200 (val accuracy per k: "
              f"{', '.join(f'k={k}: {100 * v:.1f}' for k, v in acc['val_accuracy_per_k'].items())}).", "",
              "| codec | test accuracy (%) | vs float32 (points) | bytes/img |", "|---|---|---|---|"]
    base = acc["codecs"]["float32"]["test_accuracy"]
    for name, row in acc["codecs"].items():
        lines.append(f"| {name} | {100 * row['test_accuracy']:.2f} | {100 * (row['test_accuracy'] - base):+.2f} | "
                     f"{row['bytes_per_image']:,} |")
    trains = mem["train"] if isinstance(mem["train"], list) else [mem["train"]]
    predict = mem["predict"]
    lines += ["", "## Edge peak memory (each in a fresh process; VmRSS / VmHWM)", "",
              "Baselines: interpreter + `import torch`; and torch warmed up on a 2x3x8 tensor (training: "
              "forward, backward and an Adam step; prediction: forward only), since kernels, thread pools and "
              "the autograd engine load on first use, whatever the model.", "",
              "| phase | import torch (MB) | torch warmed up (MB) | peak (MB) | beyond import (MB) | "
              "beyond warm torch (MB) | target | detail |", "|---|---|---|---|---|---|---|---|"]

    def memory_row(name: str, row: dict[str, Any], target: str, detail: str) -> str:
        return (f"| {name} | {row['baseline_mb']:.0f} | {row.get('warm_baseline_mb', float('nan')):.0f} | "
                f"{row['marks_mb']['peak']:.0f} | {row['beyond_baseline_mb']:.0f} | "
                f"{row.get('beyond_warm_mb', float('nan')):.0f} | {target} | {detail} |")

    for train in trains:
        lines.append(memory_row(f"training, batch {train['batch_size']}", train, "≤ 400",
                                f"{train['images']} images, g_k {train['feature_shape']} {train['feature_dtype']} "
                                f"({train['features_mb']} MB) {train.get('features_held', 'in memory')}, "
                                f"{train['epochs']} epoch(s), "
                                f"{train['train_seconds']} s"))
    lines += [memory_row("prediction", predict, "≤ 200",
                         f"{predict['images']} images through the server, {predict['codec']}, batch "
                         f"{predict['batch_size']}, {predict['predict_seconds']} s"),
              "", "Paper (Raspberry Pi 4, ViT-B): 663 MB fine-tuning, 255 MB inference (whole process).", "",
              "## Server throughput", "",
              f"`{r['throughput']['feature']}` in {r['throughput']['codec']}, requests of "
              f"{r['throughput']['request_images']} images, server and clients on the same 2-core machine.", "",
              "| concurrent clients | images | seconds | images/s |", "|---|---|---|---|"]
    for row in r["throughput"]["rows"]:
        lines.append(f"| {row['clients']} | {row['images']} | {row['seconds']} | {row['images_per_second']} |")
    load = r["load_test"]
    lines += ["", "## Load and fault test", "",
              f"{load['requests']} requests from 8 concurrent clients, {sum(load['bad'].values())} bad on purpose "
              f"({', '.join(sorted(load['bad']))}): statuses {load['statuses']}, 5xx: {load['server_errors']}, "
              f"good answered correctly: {load['good_correct']}/{load['good']}, passed: {load['passed']}.", "",
              machine_line(r["context"]) + f" Total {r['total_seconds']} s. Load average (1, 5, 15 min) "
              f"{r['load_average']['start']} at the start, {r['load_average']['end']} at the end (other "
              "processes share the machine: timings are of a shared 2-core CPU).", "", "## Reproduce", "",
              "```", r["command"], "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
