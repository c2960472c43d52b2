"""Smoke tests that run where a CUDA GPU exists (marker ``cuda``); skipped, saying why, elsewhere.

Run them alone with ``pytest -m cuda``.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY_BACKBONE

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine"),
]


def _png(seed: int) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 255, (30, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_serve_on_cuda_answers_like_the_cpu_backbone():
    """The feature server with a CUDA backbone: CPU images in, CPU arrays out, same features as on CPU."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient

    from frozenlens.backbones import Tap, load_backbone
    from frozenlens.serve.app import create_app
    from frozenlens.serve.codecs import decode_payload
    from frozenlens.serve.engine import module_device

    cpu = load_backbone(TINY_BACKBONE, img_size=32)
    gpu = load_backbone(TINY_BACKBONE, img_size=32, device="cuda")
    gpu.load_state_dict(cpu.state_dict())  # same weights: same features up to float rounding
    assert module_device(gpu).type == "cuda"
    images = [_png(i) for i in range(3)]
    names = ["gather.4:tokens", "final:cls"]
    with TestClient(create_app(gpu, token="t", taps=names)) as client:
        response = client.post("/v1/features", headers={"Authorization": "Bearer t"},
                               json={"images": [base64.b64encode(i).decode() for i in images],
                                     "features": names, "codec": "float32"})
    assert response.status_code == 200, response.text
    payload = decode_payload(response.content)
    transform = cpu.transform()
    batch = torch.stack([transform(Image.open(io.BytesIO(i)).convert("RGB")) for i in images])
    with torch.no_grad():
        expected = cpu.forward_taps(batch, [Tap.parse(n) for n in names])
    for name in names:
        np.testing.assert_allclose(payload.features[name], expected[name].numpy(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("spec", ["linear:epochs=2", "head2toe:epochs=2", "vqt:epochs=2", "mist:epochs=2",
                                  "inca:epochs=2,layers=10+11"])
def test_store_methods_fit_and_predict_on_cuda(tiny_task, tmp_path, spec):
    """Store-trained methods: stored (CPU) taps go to the GPU per batch; predictions come back on CPU."""
    import frozenlens
    from tests.conftest import adapter_folder

    report = frozenlens.fit(tiny_task, [spec], backbone=TINY_BACKBONE, img_size=32, device="cuda",
                            out=tmp_path / "r", progress=False)
    assert report.records[0]["test_accuracy_mean"] is not None
    image = sorted((tiny_task / "images" / "red").glob("test_*.png"))[0]
    (prediction,) = frozenlens.predict([adapter_folder(tmp_path / "r", spec)], [image], device="cuda")
    assert abs(sum(p for _, p in prediction.top) - 1) < 1e-4 or len(prediction.top) < 3


@pytest.mark.parametrize("spec", ["toast:epochs=1", "lora:epochs=1", "vpt-deep:epochs=1", "vqt+adaptformer:epochs=1"])
def test_in_loop_methods_fit_on_cuda(tiny_task, spec):
    """Methods that run the backbone in the loop train and evaluate on the GPU."""
    import frozenlens

    report = frozenlens.fit(tiny_task, [spec], backbone=TINY_BACKBONE, img_size=32, device="cuda", progress=False)
    assert report.records[0]["test_accuracy_mean"] is not None
