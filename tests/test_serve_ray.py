"""The feature server as a Ray Serve deployment on a local Ray answers like the plain server."""

from __future__ import annotations

import base64
import io
import socket

import numpy as np
import pytest
from PIL import Image

from frozenlens.serve.app import Limits, create_app
from frozenlens.serve.codecs import decode_payload
from frozenlens.serve.engine import DEFAULT_TAPS
from tests.conftest import TINY_BACKBONE
from tests.test_serve_remote import LiveServer

TOKEN = "ray-token"
SERVED = [*DEFAULT_TAPS, "gather.4:tokens", "gather.8:tokens"]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ray's own pydantic warnings


def _png(seed: int) -> str:
    pixels = np.random.RandomState(seed).randint(0, 255, (36, 28, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'frozenlens[ray]')")
    from ray import serve

    from frozenlens.serve.ray_app import deployment

    port = _free_port()
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    except Exception as err:  # no shared memory, no sockets, ... on some CI boxes
        pytest.skip(f"a local Ray cannot start on this machine: {type(err).__name__}: {err}")
    try:
        app = deployment(backbone=TINY_BACKBONE, img_size=32, token=TOKEN, taps=SERVED, replicas=1,
                         cpus_per_replica=1, limits=Limits(max_batch_images=8))
        serve.run(app, name="frozenlens-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _ask(url: str, body: dict | None = None, headers: dict | None = None, path: str = "/v1/features"):
    import httpx

    headers = {"Authorization": f"Bearer {TOKEN}", **(headers or {})}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        return http.post(path, json=body) if body is not None else http.get(path)


def test_ray_deployment_answers_like_the_plain_server(ray_url, tiny_backbone):
    images = [_png(i) for i in range(5)]
    good = {"images": images, "features": ["gather.8:tokens", "final:cls"], "codec": "float32"}
    bad = [({"images": images[:1], "features": ["gather.5:tokens"]}, {}),
           ({"images": images[:1]}, {"Authorization": "Bearer wrong"}),
           ({"images": ["***"]}, {}),
           ({"images": images[:1] * 9}, {})]
    with LiveServer(create_app(tiny_backbone, token=TOKEN, taps=SERVED,
                               limits=Limits(max_batch_images=8))) as plain:
        answers = {}
        for name, url in (("plain", plain.url), ("ray", ray_url)):
            info = _ask(url, path="/v1/info").json()
            payload = decode_payload(_ask(url, good).content)
            refusals = [(_ask(url, body, headers).status_code, _ask(url, body, headers).json()["detail"])
                        for body, headers in bad]
            answers[name] = (info, payload, refusals)
    (plain_info, plain_payload, plain_refusals), (ray_info, ray_payload, ray_refusals) = answers.values()
    assert ray_info == plain_info
    assert ray_payload.header == plain_payload.header
    for key, values in plain_payload.features.items():
        np.testing.assert_allclose(ray_payload.features[key], values, rtol=1e-5, atol=1e-5)
    assert ray_refusals == plain_refusals and [s for s, _ in ray_refusals] == [422, 401, 400, 413]
