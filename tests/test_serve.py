"""The feature server in process: gather taps, codecs, the HTTP contract, limits, batching, auth."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from frozenlens.backbones import Tap
from frozenlens.errors import FrozenlensError
from frozenlens.serve.app import Limits, create_app
from frozenlens.serve.batching import Admission, Batcher
from frozenlens.serve.codecs import CODECS, PayloadError, decode_payload, encode_payload, verify_payload
from frozenlens.serve.engine import DEFAULT_TAPS, FeatureEngine, Job, RequestError

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GATHER_K = [4, 8, 12]


def _png(size: tuple[int, int] = (40, 30), seed: int = 0, flat: bool = False) -> bytes:
    """A random-noise PNG (a flat grey one compresses to a few hundred bytes at any size)."""
    pixels = np.random.RandomState(seed).randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    (Image.new("RGB", size, (90, 90, 90)) if flat else Image.fromarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def client(tiny_backbone):
    app = create_app(tiny_backbone, token=TOKEN,
                     limits=Limits(max_body_bytes=100_000, max_batch_images=8, max_image_pixels=200 * 200,
                                   max_queued_images=16))
    with TestClient(app) as test_client:
        yield test_client


def test_gather_tap_is_the_sum_of_embed_and_block_outputs(tiny_backbone):
    images = torch.randn(3, 3, 32, 32)
    parts = [Tap("embed")] + [Tap(f"block.{i}") for i in range(12)]
    with torch.no_grad():
        values = tiny_backbone.forward_taps(images, [*parts, Tap("gather.4"), Tap("gather.12"),
                                                     Tap("gather.4", "cls")])
    total = values["embed:tokens"]
    for i in range(12):
        total = total + values[f"block.{i}:tokens"]
        if i == 3:
            assert torch.equal(values["gather.4:tokens"], total)
            assert torch.equal(values["gather.4:cls"], total[:, 0])
    assert torch.equal(values["gather.12:tokens"], total)
    with pytest.raises(FrozenlensError, match="gather"):
        Tap("gather.0")
    with pytest.raises(FrozenlensError, match="no single block"):
        Tap("gather.3").block


@pytest.mark.parametrize("codec, tolerance", [("float32", 0.0), ("float16", 1e-3), ("int8", 1 / 127)])
def test_codecs_round_trip_within_their_precision(codec, tolerance):
    values = np.random.RandomState(0).standard_normal((4, 7, 16)).astype(np.float32) * 5
    values[1, 2] = 0.0  # an all-zero token must not divide by zero
    spec = CODECS[codec]
    decoded = spec.decode(spec.encode(values))
    peak = np.abs(values).max(axis=-1, keepdims=True)
    assert decoded.dtype == np.float32
    assert np.all(np.abs(decoded - values) <= tolerance * np.maximum(peak, 1e-12) * 0.5 + 1e-7)
    wire = sum(a.nbytes for a in spec.encode(values).values())
    assert wire == 4 * spec.bytes_per_image((7, 16))
    assert CODECS["int8"].bytes_per_image((197, 768)) == 197 * 768 + 197 * 4
    assert CODECS["float32"].bytes_per_image((197, 768)) == 605_184  # the paper's 0.577 MB/img


def test_payload_verification_refuses_what_was_not_asked_for():
    values = {"gather.8:tokens": np.ones((2, 5, 8), np.float32)}
    backbone = {"name": "b", "weights_hash": "a" * 64}
    payload = decode_payload(encode_payload(values, CODECS["int8"], backbone))
    good = dict(codec="int8", weights_hash="a" * 64, count=2, shapes={"gather.8:tokens": (5, 8)})
    verify_payload(payload, **good)
    for change, message in [({"weights_hash": "b" * 64}, "weights"), ({"codec": "float16"}, "codec"),
                            ({"count": 3}, "3"), ({"shapes": {"gather.8:tokens": (6, 8)}}, "shape"),
                            ({"shapes": {"final:cls": (8,)}}, "missing")]:
        with pytest.raises(PayloadError, match=message):
            verify_payload(payload, **{**good, **change})
    with pytest.raises(PayloadError):
        decode_payload(b"\x00" * 4)
    with pytest.raises(PayloadError, match="truncated"):
        decode_payload(encode_payload(values, CODECS["int8"], backbone)[:40])


def test_info_health_and_openapi(client, tiny_backbone):
    assert client.get("/v1/health").json()["status"] == "ok"
    info = client.get("/v1/info", headers=AUTH).json()
    assert info["backbone"]["weights_hash"] == tiny_backbone.weights_hash
    assert list(info["features"]) == ["final:cls", "final:patch_mean", *(f"gather.{k}:tokens" for k in GATHER_K)]
    assert info["features"]["gather.8:tokens"] == [5, 192]
    assert info["codecs"]["int8"]["bytes_per_image"]["gather.8:tokens"] == 5 * 192 + 5 * 4
    assert client.get("/openapi.json").status_code == 401  # the description needs the token too
    assert client.get("/docs").status_code == 404  # the browsable page exists on an insecure server only
    spec = client.get("/openapi.json", headers=AUTH).json()
    body = spec["paths"]["/v1/features"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"images", "features", "codec"}
    assert "HTTPBearer" in json.dumps(spec["components"]["securitySchemes"])


@pytest.mark.parametrize("codec", ["float32", "float16", "int8"])
def test_features_match_a_direct_forward_pass(client, tiny_backbone, codec):
    images = [_png(seed=i) for i in range(3)]
    names = ["gather.8:tokens", "final:cls"]
    response = client.post("/v1/features", headers=AUTH, json={"images": [_b64(i) for i in images],
                                                               "features": names, "codec": codec})
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-safetensors"
    payload = decode_payload(response.content)
    verify_payload(payload, codec=codec, weights_hash=tiny_backbone.weights_hash, count=3,
                   shapes={"gather.8:tokens": (5, 192), "final:cls": (192,)})
    transform = tiny_backbone.transform()
    batch = torch.stack([transform(Image.open(io.BytesIO(i)).convert("RGB")) for i in images])
    with torch.no_grad():
        direct = tiny_backbone.forward_taps(batch, [Tap.parse(n) for n in names])
    for name in names:
        expected = direct[name].numpy()
        bound = {"float32": 1e-6, "float16": 2e-3, "int8": 1 / 127}[codec]
        peak = np.abs(expected).max(axis=-1, keepdims=True)
        assert np.all(np.abs(payload.features[name] - expected) <= bound * peak + 1e-6), name


def _bad_requests() -> list[tuple[str, dict, int, str]]:
    good = _b64(_png())
    return [
        ("no token", {"json": {"images": [good]}, "headers": {}}, 401, "bearer token"),
        ("wrong token", {"json": {"images": [good]}, "headers": {"Authorization": "Bearer nope"}}, 401, "token"),
        ("not json", {"content": b"{oops", "headers": {**AUTH, "content-type": "application/json"}}, 400, "JSON"),
        ("text body", {"content": b"{}", "headers": {**AUTH, "content-type": "text/plain"}}, 415, "application/json"),
        ("bad base64", {"json": {"images": ["***"]}}, 400, "base64"),
        ("not an image", {"json": {"images": [_b64(b"hello world")]}}, 400, "cannot be decoded"),
        ("truncated png", {"json": {"images": [_b64(_png()[:80])]}}, 400, "cannot be decoded"),
        ("unknown k", {"json": {"images": [good], "features": ["gather.5:tokens"]}}, 422,
         "feature 'gather.5:tokens' is not served; served: final:cls, final:patch_mean, gather.4:tokens"),
        ("unknown tap", {"json": {"images": [good], "features": ["block.3:tokens"]}}, 422, "not served"),
        ("bad tap", {"json": {"images": [good], "features": ["nonsense"]}}, 422, "tap site"),
        ("bad codec", {"json": {"images": [good], "codec": "bf16"}}, 422, "codec"),
        ("extra field", {"json": {"images": [good], "k": 4}}, 422, "k"),
        ("empty batch", {"json": {"images": []}}, 422, "at least one"),
        ("batch too big", {"json": {"images": [good] * 9}}, 413, "at most 8"),
        ("image too big", {"json": {"images": [_b64(_png((300, 300), flat=True))]}}, 413, "pixels"),
        ("body too big", {"json": {"images": [_b64(b"x" * 120_000)]}}, 413, "body"),
    ]


@pytest.mark.parametrize("name, request_kwargs, status, message", _bad_requests(),
                         ids=[case[0] for case in _bad_requests()])
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(client, name, request_kwargs, status,
                                                                   message):
    kwargs = {"headers": AUTH, **request_kwargs}
    response = client.post("/v1/features", **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    again = client.post("/v1/features", headers=AUTH, json={"images": [_b64(_png())]})
    assert again.status_code == 200


def test_a_token_is_required_unless_explicitly_insecure(tiny_backbone):
    with pytest.raises(FrozenlensError, match="insecure=True"):
        create_app(tiny_backbone)
    app = create_app(tiny_backbone, insecure=True)
    with TestClient(app, client=("127.0.0.1", 50000)) as open_client:
        assert open_client.post("/v1/features", json={"images": [_b64(_png())]}).status_code == 200
        assert open_client.get("/openapi.json").status_code == 200 and open_client.get("/docs").status_code == 200
    with TestClient(app, client=("192.0.2.7", 50000)) as remote_client:  # insecure: loopback clients only
        refused = remote_client.post("/v1/features", json={"images": [_b64(_png())]})
        assert refused.status_code == 403 and "loopback" in refused.json()["detail"]


def test_full_queue_answers_429_then_recovers(tiny_backbone):
    """A runner that blocks until released: the queue fills, the next request gets 429."""
    engine = FeatureEngine(tiny_backbone, taps=[*DEFAULT_TAPS, "gather.4:tokens"])
    release = asyncio.Event()

    async def blocked_runner(job: Job) -> dict[str, np.ndarray]:
        await release.wait()
        return engine.run([job])[0]

    app = create_app(engine, token=TOKEN, runner=blocked_runner,
                     limits=Limits(max_batch_images=4, max_queued_images=4))
    body = {"images": [_b64(_png())] * 2}

    async def scenario() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=AUTH) as http:
            waiting = [asyncio.create_task(http.post("/v1/features", json=body)) for _ in range(2)]
            while app.state.server.admission.pending < 4:
                await asyncio.sleep(0.01)
            refused = await http.post("/v1/features", json=body)
            assert refused.headers["retry-after"] == "1" and "busy" in refused.json()["detail"]
            release.set()
            answered = await asyncio.gather(*waiting)
            after = await http.post("/v1/features", json=body)
            return [refused.status_code, *(r.status_code for r in answered), after.status_code]

    assert asyncio.run(scenario()) == [429, 200, 200, 200]
    with pytest.raises(RequestError, match="busy"):
        gate = Admission(3)
        gate.enter(2)
        gate.enter(2)


def test_batcher_merges_concurrent_jobs_and_drains_on_stop():
    calls: list[list[int]] = []

    def run(jobs):
        calls.append([len(j) for j in jobs])
        return [int(j.images.sum()) for j in jobs]

    async def scenario():
        batcher = Batcher(run, max_batch_images=8, max_wait_s=0.05)
        await batcher.start()
        jobs = [Job(torch.full((n, 1), float(i)), ()) for i, n in enumerate([3, 3, 2, 4])]
        results = await asyncio.gather(*(batcher.submit(j) for j in jobs))
        late = asyncio.create_task(batcher.submit(Job(torch.ones(1, 1), ())))
        await asyncio.sleep(0)
        await batcher.stop()
        with pytest.raises(RequestError, match="shutting down"):
            await batcher.submit(Job(torch.ones(1, 1), ()))
        return results, await late

    results, late = asyncio.run(scenario())
    assert results == [0, 3, 4, 12] and late == 1
    assert calls[0] == [3, 3, 2] and calls[1] == [4]  # merged up to 8 images, never split


def test_each_codec_on_the_wire_is_the_codec_applied_to_the_float32_answer(client):
    """What the benchmark relies on to score codecs from one float32 fetch."""
    body = {"images": [_b64(_png(seed=i)) for i in range(3)], "features": ["gather.12:tokens", "final:cls"]}
    exact = decode_payload(client.post("/v1/features", headers=AUTH, json={**body, "codec": "float32"}).content)
    for name in ("float16", "int8"):
        sent = decode_payload(client.post("/v1/features", headers=AUTH, json={**body, "codec": name}).content)
        for key, values in exact.features.items():
            assert np.array_equal(sent.features[key], CODECS[name].decode(CODECS[name].encode(values)))


def test_serve_command_teaches_and_refuses_insecure_off_loopback(capsys):
    from frozenlens.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    assert "--insecure" in text and "--remote http://SERVER:8765" in text and "--ray" in text
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "--remote URL" in capsys.readouterr().out
    assert main(["serve", "--insecure", "--host", "0.0.0.0"]) == 2
    assert "loopback" in capsys.readouterr().err


def test_the_engine_refuses_taps_the_backbone_cannot_compute_at_start(tiny_backbone):
    for taps, message in [(["block.12:tokens"], "block.0 to block.11"), (["gather.13:tokens"], "k from 1 to 12"),
                          (["final:cls", "gather.0:tokens"], "unknown tap site")]:
        with pytest.raises(FrozenlensError, match=message):
            FeatureEngine(tiny_backbone, taps)


def test_the_serve_cli_serves_declared_taps_only(tiny_backbone):
    from frozenlens.cli import build_parser

    args = build_parser().parse_args(["serve", "--tap", "gather.8:tokens", "--tap", "final:cls"])
    assert args.taps == ["gather.8:tokens", "final:cls"] and not hasattr(args, "gather_k")
    assert list(FeatureEngine(tiny_backbone, args.taps).served) == ["gather.8:tokens", "final:cls"]
    assert build_parser().parse_args(["serve"]).taps is None  # None: DEFAULT_TAPS and the methods' taps
