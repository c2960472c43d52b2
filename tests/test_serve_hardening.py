"""The feature server under hostile input: slow clients, non-raster images, fuzzed bodies, Ray's builder.

Every network test here stays on 127.0.0.1, opens a bounded number of sockets,
uses timeouts and closes what it opened.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from frozenlens.backbones import Tap
from frozenlens.data.images import RASTER_FORMATS, load_image, open_raster
from frozenlens.errors import FrozenlensError, ImageError
from frozenlens.serve.app import ConnectionLimits, Limits, check_insecure_host, create_app, is_loopback
from frozenlens.serve.engine import DEFAULT_TAPS, FeatureEngine, Job, module_device
from tests.conftest import TINY_BACKBONE

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hardening-token"
SERVED = [*DEFAULT_TAPS, "gather.4:tokens", "gather.8:tokens"]
AUTH = {"Authorization": f"Bearer {TOKEN}"}

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
       b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")
PDF = (b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n2 0 obj << /Type /Pages /Kids [] "
       b"/Count 0 >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")


def _png(size: tuple[int, int] = (24, 20), seed: int = 0) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def client(tiny_backbone):
    app = create_app(tiny_backbone, token=TOKEN, taps=SERVED,
                     limits=Limits(max_body_bytes=200_000, max_batch_images=4, max_image_pixels=100 * 100,
                                   max_queued_images=16))
    with TestClient(app) as test_client:  # raise_server_exceptions: an unhandled error fails the test
        yield test_client


# -- Pillow never reaches Ghostscript ---------------------------------------------------------------

@pytest.fixture
def no_external_programs(monkeypatch):
    """Fail loudly if anything tries to run Ghostscript, start a process, or parse EPS at all."""
    from PIL import EpsImagePlugin

    calls: list[str] = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called")
        return call

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", refuse("Ghostscript"))
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", refuse("EpsImageFile._open"))
    monkeypatch.setattr(subprocess, "Popen", refuse("subprocess.Popen"))
    monkeypatch.setattr(subprocess, "check_call", refuse("subprocess.check_call"))
    yield calls
    assert calls == [], f"an image decoder called out: {calls}"


def _other_formats() -> list[tuple[str, bytes, str]]:
    """Files that are not allowed raster formats, each with the name it travels under."""
    cases = [("eps.jpg", EPS, "PostScript"), ("eps.eps", EPS, "PostScript"),
             ("x.jpg", PDF, "PDF"), ("svg.png", b'<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG")]
    for fmt in ("ICO", "PCX", "TGA"):  # raster, and readable by Pillow, but not on the allow-list
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (1, 2, 3)).save(buffer, format=fmt)
        cases.append((f"{fmt.lower()}.png", buffer.getvalue(), "accepted formats"))
    return cases


@pytest.mark.parametrize("name, data, message", _other_formats(), ids=[c[0] for c in _other_formats()])
def test_the_local_loader_refuses_non_raster_files_without_calling_out(tmp_path, no_external_programs, name,
                                                                       data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ImageError, match=message) as caught:
        load_image(path)
    assert str(path) in str(caught.value) and "accepted formats: JPEG" in str(caught.value)


@pytest.mark.parametrize("name, data, message", _other_formats(), ids=[c[0] for c in _other_formats()])
def test_the_server_refuses_non_raster_images_with_a_json_400(client, no_external_programs, name, data,
                                                              message):
    response = client.post("/v1/features", headers=AUTH, json={"images": [_b64(_png()), _b64(data)]})
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert detail.startswith("images[1] cannot be decoded") and message in detail
    assert client.post("/v1/features", headers=AUTH, json={"images": [_b64(_png())]}).status_code == 200


def test_every_allowed_raster_format_still_opens(tmp_path, no_external_programs):
    assert {"JPEG", "PNG", "BMP", "GIF", "TIFF", "PPM"} <= set(RASTER_FORMATS)
    for fmt in RASTER_FORMATS:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 6), (200, 10, 10)).save(buffer, format=fmt)
        (tmp_path / f"a.{fmt.lower()}").write_bytes(buffer.getvalue())
        assert load_image(tmp_path / f"a.{fmt.lower()}").size == (8, 6)
        with open_raster(io.BytesIO(buffer.getvalue())) as image:
            assert image.format == fmt


# -- every refusal is a JSON 4xx: the two 500s and a fuzz of the request schema ---------------------

def test_a_5000_digit_gather_depth_and_deep_nesting_get_a_json_4xx(client):
    long_k = client.post("/v1/features", headers=AUTH,
                         json={"images": [_b64(_png())], "features": ["gather." + "9" * 5000 + ":tokens"]})
    assert long_k.status_code == 422 and "feature name of 5014 characters" in long_k.json()["detail"]
    for depth in (200, 5000, 100_000):
        body = "[" * depth + "]" * depth
        nested = client.post("/v1/features", content=body.encode(),
                             headers={**AUTH, "content-type": "application/json"})
        assert 400 <= nested.status_code < 500 and "detail" in nested.json(), (depth, nested.text)
    nested_in_field = client.post("/v1/features", headers={**AUTH, "content-type": "application/json"},
                                  content=('{"images": ' + "[" * 50_000 + "]" * 50_000 + "}").encode())
    assert nested_in_field.status_code == 400 and "nested too deeply" in nested_in_field.json()["detail"]
    assert client.post("/v1/features", headers=AUTH, json={"images": [_b64(_png())]}).status_code == 200


def _fuzz_bodies(rng: random.Random, count: int) -> list[tuple[bytes, str]]:
    """``count`` (body, content type) pairs: random bytes, wrong types, huge numbers, nesting, unicode."""
    good = _b64(_png())
    values = [None, True, 0, -1, 1.5, 10**400, "x", "", "\ud800", "é" * 50, "🦀", [], {}, [good], {"a": good},
              "gather.4:tokens", "gather.0:tokens", "gather.-1:tokens", "gather." + "7" * 4400 + ":tokens",
              "final:cls", "final:pool0", "block.99999999999999999999:tokens", ":", "\x00", good[:-3],
              _b64(b"\x00" * 64), _b64(EPS), _b64(PDF), _b64(_png()[:50]), "data:image/png;base64," + good]
    bodies: list[tuple[bytes, str]] = []
    for _ in range(count):
        kind = rng.randrange(8)
        if kind == 0:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
        elif kind == 1:
            depth = rng.choice([10, 500, 1000, 3000, 20_000])
            opener, closer = rng.choice([("[", "]"), ('{"a":', "}"), ('{"images":[', "]}")])
            body = (opener * depth + "1" + closer * depth).encode()
        elif kind == 2:
            body = rng.choice(["1" * 5000, "-" + "9" * 4301, "1e99999", "NaN", "Infinity", '"\\ud800"',
                               "[]", "null", '{"images": "abc"}', "{}", '{"images": [1e999]}']).encode()
        elif kind == 3:  # valid JSON of the wrong shape, fields picked from hostile values
            data = {rng.choice(["images", "features", "codec", "k", "", "🦀"]): rng.choice(values)
                    for _ in range(rng.randrange(0, 4))}
            body = json.dumps(data).encode()
        elif kind == 4:  # the right shape, hostile entries
            data = {"images": [rng.choice(values) for _ in range(rng.randrange(0, 6))]}
            if rng.random() < 0.7:
                data["features"] = [rng.choice(values) for _ in range(rng.randrange(0, 4))]
            if rng.random() < 0.5:
                data["codec"] = rng.choice(["int8", "float16", "float32", "bf16", 8, None])
            body = json.dumps(data).encode()
        elif kind == 5:  # a good body, mutated bytes
            raw = bytearray(json.dumps({"images": [good], "features": ["final:cls"]}).encode())
            for _ in range(rng.randrange(1, 6)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            body = bytes(raw)
        elif kind == 6:  # truncated good body
            raw = json.dumps({"images": [good, good], "codec": "int8"}).encode()
            body = raw[: rng.randrange(len(raw))]
        else:  # many features or images
            data = {"images": [good] * rng.choice([1, 4, 5, 40]),
                    "features": [rng.choice(values[15:24]) for _ in range(rng.choice([1, 3, 33, 200]))]}
            body = json.dumps(data).encode()
        content_type = rng.choice(["application/json"] * 6 + ["application/json; charset=utf-8", "text/plain",
                                                               "", "application/JSON"])
        bodies.append((body, content_type))
    return bodies


def test_fuzzed_request_bodies_never_get_a_5xx_or_a_traceback(client):
    rng = random.Random(20240613)
    statuses: dict[int, int] = {}
    for body, content_type in _fuzz_bodies(rng, 300):
        headers = {**AUTH, "content-type": content_type} if content_type else dict(AUTH)
        response = client.post("/v1/features", content=body, headers=headers)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (body[:200], response.text[:500])
        assert "Traceback" not in response.text
        if response.status_code != 200:
            detail = response.json()["detail"]
            assert isinstance(detail, str) and 0 < len(detail) < 2000, detail
    assert set(statuses) <= {200, 400, 413, 415, 422}, statuses
    assert statuses.get(400, 0) > 20 and statuses.get(422, 0) > 20, statuses
    assert client.post("/v1/features", headers=AUTH, json={"images": [_b64(_png())]}).status_code == 200


# -- Ray Serve builder: the same loopback check ---------------------------------------------------------

def test_one_loopback_check_for_serve_and_ray():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.2", "::", "example.com", ""))
    with pytest.raises(FrozenlensError, match="loopback"):
        check_insecure_host("0.0.0.0")
    ray_app = pytest.importorskip("frozenlens.serve.ray_app", reason="ray is not installed")
    for args in ({"insecure": "true", "host": "0.0.0.0"}, {"insecure": "true", "host": "10.1.2.3"}):
        with pytest.raises(FrozenlensError, match="loopback"):
            ray_app.build(args)
    with pytest.raises(FrozenlensError, match="token"):
        ray_app.build({})
    with pytest.raises(FrozenlensError, match="insecure='yes'"):
        ray_app.build({"insecure": "yes"})
    with pytest.raises(FrozenlensError, match="unknown build argument"):
        ray_app.build({"token": "t", "insecure_": "true"})
    ray_app.build({"insecure": "true", "host": "127.0.0.1", "backbone": TINY_BACKBONE})  # allowed


def test_openapi_and_docs_need_the_token(client):
    assert client.get("/openapi.json").status_code == 401
    assert client.get("/openapi.json", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/openapi.json", headers=AUTH).json()["info"]["title"] == "frozenlens feature server"
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert client.get(path, headers=AUTH).status_code == 404


# -- device-clean engine (the CUDA run is tests/test_cuda.py) -------------------------------------------

def test_the_engine_moves_inputs_to_the_backbone_and_answers_on_cpu(tiny_backbone, monkeypatch):
    engine = FeatureEngine(tiny_backbone, taps=[*DEFAULT_TAPS, "gather.4:tokens"])
    seen: list[torch.device] = []
    moves: list[str] = []
    forward = tiny_backbone.forward_taps
    real_to = torch.Tensor.to

    def spy_forward(images, taps):
        seen.append(images.device)
        return forward(images, taps)

    def spy_to(self, *args, **kwargs):
        moves.append(str(args[0]) if args else str(kwargs.get("device")))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(tiny_backbone, "forward_taps", spy_forward)
    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    result = engine.run([Job(torch.randn(2, 3, 32, 32), (Tap("final", "cls"),))])
    monkeypatch.undo()
    assert seen == [module_device(tiny_backbone)] == [torch.device("cpu")]
    assert "cpu" in moves  # the batch went through .to(<the backbone's device>)
    assert isinstance(result[0]["final:cls"], np.ndarray) and result[0]["final:cls"].dtype == np.float32
    assert module_device(torch.nn.Identity()) == torch.device("cpu")
    assert engine.device == torch.device("cpu")


# -- slow and half-open clients cannot lock out an authenticated one --------------------------------------

SERVER_SCRIPT = textwrap.dedent("""
    import logging, resource, sys
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(int(sys.argv[2]), hard), hard))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    from frozenlens.backbones import load_backbone
    from frozenlens.serve.app import ConnectionLimits, create_app, serve
    app = create_app(load_backbone(sys.argv[3], img_size=32), token=sys.argv[4],
                     taps=["final:cls", "gather.4:tokens"])
    serve(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
          connections=ConnectionLimits(header_timeout_s=float(sys.argv[5]), body_timeout_s=float(sys.argv[6]),
                                       max_connections=int(sys.argv[7])))
""")

FD_LIMIT = 256  # the server's open-file limit: 300 half-open connections would exhaust it without the cap


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory):
    """`serve()` in its own process (own open-file limit): header timeout 3 s, body 3 s, 100 connections."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, str(port), str(FD_LIMIT), TINY_BACKBONE,
                                    TOKEN, "3", "3", "100"], stdout=log_file, stderr=subprocess.STDOUT,
                                   env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start:\n" + log_path.read_text()
            time.sleep(0.2)
        yield url, port, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _half_open(port: int, count: int, line: bytes) -> list[socket.socket]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(line)
            sockets.append(sock)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1024) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def test_300_half_open_connections_do_not_lock_out_an_authenticated_client(guarded_server):
    url, port, log_path = guarded_server
    started = time.monotonic()
    attackers = _half_open(port, 300, b"POST /v1/features HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    try:
        opened_s = time.monotonic() - started
        body = {"images": [_b64(_png())], "features": ["gather.4:tokens"]}
        latencies = []
        for _ in range(3):
            sent = time.monotonic()
            response = httpx.post(f"{url}/v1/features", json=body, headers=AUTH, timeout=10)
            latencies.append(time.monotonic() - sent)
            assert response.status_code == 200, response.text
        assert max(latencies) < 5.0, latencies
        time.sleep(0.3)
        closed = sum(_closed_by_server(sock) for sock in attackers)
    finally:
        for sock in attackers:
            sock.close()
    print(f"300 half-open connections opened in {opened_s:.2f} s; authenticated requests answered in "
          f"{', '.join(f'{t:.2f}' for t in latencies)} s; {closed} half-open connections closed by the server")
    assert closed >= 150  # the cap (100) closes the oldest waiting connection as each new one arrives
    assert "connections open (limit 100)" in log_path.read_text()


def test_slow_headers_and_slow_bodies_are_cut_off(guarded_server):
    url, port, log_path = guarded_server
    slow_headers = _half_open(port, 20, b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1")
    slow_bodies = _half_open(port, 20, b"POST /v1/features HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                       b"Content-Type: application/json\r\nContent-Length: 100000\r\n"
                                       b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n{\"images\": [")
    try:
        deadline = time.monotonic() + 10  # header and body timeouts are 3 s
        while time.monotonic() < deadline:
            time.sleep(0.25)
            for sock in slow_headers + slow_bodies:
                sock.settimeout(0.01)
            if all(_closed_by_server(s) for s in slow_headers) and all(_closed_by_server(s) for s in slow_bodies):
                break
        waited = time.monotonic() - (deadline - 10)
        assert all(_closed_by_server(s) for s in slow_headers), "slow headers were not cut off"
        assert all(_closed_by_server(s) for s in slow_bodies), "slow bodies were not cut off"
    finally:
        for sock in slow_headers + slow_bodies:
            sock.close()
    assert 2.5 < waited < 8, waited
    text = log_path.read_text()
    assert "no complete request headers within 3.0 s" in text and "request body not complete within 3.0 s" in text
    assert "Traceback" not in text
    assert httpx.get(f"{url}/v1/info", headers=AUTH, timeout=10).status_code == 200


def test_connection_limits_are_validated():
    with pytest.raises(FrozenlensError, match="max_connections"):
        ConnectionLimits(max_connections=0)
    with pytest.raises(FrozenlensError, match="header_timeout_s"):
        ConnectionLimits(header_timeout_s=float("nan"))


def test_keep_alive_and_pipelined_requests_are_not_cut_off(guarded_server):
    """Requests on one kept-alive connection, two of them pipelined, all answered; none held as 'waiting'."""
    url, port, _ = guarded_server
    request = (b"GET /v1/info HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + TOKEN.encode() +
               b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        time.sleep(1.0)
        sock.sendall(request + request)  # pipelined
        received = b""
        deadline = time.monotonic() + 10
        while received.count(b"HTTP/1.1 200") < 3 and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    assert received.count(b"HTTP/1.1 200") == 3, received[:300]
