"""Where TOAST looks: attention maps of its two passes, saved as PNG like the paper's figures.

For one image, :func:`toast_attention_maps` returns three maps over the patch grid:

* ``pass1``: the class token's attention to every patch in the last block pass 1
  runs (the last block; the middle block with early feedback), averaged over heads,
* ``selection``: the feature selection's token weights ``clamp(cos(z_i, xi), 0, 1)``,
* ``pass2``: the same attention as ``pass1`` in the last block of pass 2.

:func:`explain` draws them over the image the backbone saw (the preprocessed crop)
and writes ``<stem>_pass1.png``, ``<stem>_pass2.png`` and ``<stem>_steps.png``
(image, pass 1, selection, pass 2 side by side, as the paper's Figure 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from frozenlens.errors import FrozenlensError
from frozenlens.extras import require

TOAST_METHODS = ("toast", "toast-lite")
PLOTS_PURPOSE = "frozenlens explain (TOAST's attention maps as PNG)"


@dataclass
class AttentionMaps:
    """Maps over the patch grid ``(rows, cols)`` for one image, plus the prediction.

    Attributes:
        pass1, selection, pass2: see the module docstring.
        pass1_block, pass2_block: the blocks whose attention ``pass1``/``pass2`` show.
        probabilities: class probabilities of pass 2.
    """

    pass1: np.ndarray
    selection: np.ndarray
    pass2: np.ndarray
    pass1_block: int
    pass2_block: int
    probabilities: np.ndarray


@torch.no_grad()
def toast_attention_maps(method, image: torch.Tensor) -> AttentionMaps:
    """Attention maps of a TOAST method for one preprocessed image ``(3, H, W)``."""
    net = method.frozen_backbone
    prefix, grid = net.num_prefix_tokens, net.grid_size
    was_training = method.training
    method.eval()
    passes = method.passes(image.unsqueeze(0), keep_attention=True)
    method.train(was_training)

    def cls_to_patches(weights: torch.Tensor) -> np.ndarray:
        row = weights[0, :, 0, prefix:] if prefix else weights[0].mean(dim=1)[:, prefix:]
        return row.mean(dim=0).reshape(grid).cpu().numpy()

    return AttentionMaps(
        pass1=cls_to_patches(passes.attention["pass1"]),
        selection=passes.token_weights[0, prefix:].reshape(grid).cpu().numpy(),
        pass2=cls_to_patches(passes.attention["pass2"]),
        pass1_block=method.plan.source,
        pass2_block=net.depth - 1,
        probabilities=passes.logits.softmax(-1)[0].cpu().numpy(),
    )


def explain(adapter: str | Path, images: Sequence[str | Path], out: str | Path, *,
            backbone: str | None = None, device: str = "cpu") -> list[Path]:
    """Save pass-1 / pass-2 attention maps of a TOAST adapter for each image; returns the PNGs."""
    from frozenlens.adapter import load_adapter, read_adapter_meta
    from frozenlens.api import _backbone_for
    from frozenlens.data import load_image

    meta = read_adapter_meta(adapter)
    if meta["method"] not in TOAST_METHODS:
        raise FrozenlensError(f"{adapter} holds a {meta['method']!r} adapter; explain draws the two "
                              f"attention passes of {' or '.join(TOAST_METHODS)} adapters")
    require("matplotlib.figure", PLOTS_PURPOSE)  # before the backbone loads: say now if it is missing
    net = _backbone_for(meta, backbone, device)
    method = load_adapter(adapter, net).method
    method.to(device)
    transform = net.transform()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for path in map(Path, images):
        tensor = transform(load_image(path)).to(device)
        maps = toast_attention_maps(method, tensor)
        picture = _displayable(tensor, net.data_config)
        top = int(maps.probabilities.argmax())
        label = f"{meta['classes'][top]} ({maps.probabilities[top]:.2f})"
        written += _save_figures(out_dir / path.stem, picture, maps, label)
    return written


def _displayable(image: torch.Tensor, data_config: dict) -> np.ndarray:
    """The preprocessed image back in [0, 1], ``(H, W, 3)``: what the backbone saw."""
    mean = torch.tensor(data_config["mean"], device=image.device).view(3, 1, 1)
    std = torch.tensor(data_config["std"], device=image.device).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _upsampled(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A patch-grid map resized (bilinear) to the image and scaled to [0, 1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(grid_map, dtype=np.float32))[None, None]
    resized = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    span = resized.max() - resized.min()
    return (resized - resized.min()) / span if span > 0 else np.zeros_like(resized)


def _save_figures(stem: Path, picture: np.ndarray, maps: AttentionMaps, label: str) -> list[Path]:
    # no pyplot: no global backend or figure registry is touched
    Figure = require("matplotlib.figure", PLOTS_PURPOSE).Figure

    size = picture.shape[:2]
    panels = [("pass 1 attention (block %d)" % maps.pass1_block, maps.pass1),
              ("feature selection", maps.selection),
              ("pass 2 attention (block %d)" % maps.pass2_block, maps.pass2)]
    written = []
    for suffix, (title, grid_map) in (("pass1", panels[0]), ("pass2", panels[2])):
        figure = Figure(figsize=(4, 4))
        axis = figure.subplots()
        _overlay(axis, picture, _upsampled(grid_map, size), title)
        written.append(_write(figure, stem.with_name(f"{stem.name}_{suffix}.png")))
    figure = Figure(figsize=(16, 4.4))
    axes = figure.subplots(1, 4)
    axes[0].imshow(picture)
    axes[0].set_title("image")
    axes[0].axis("off")
    for axis, (title, grid_map) in zip(axes[1:], panels):
        _overlay(axis, picture, _upsampled(grid_map, size), title)
    figure.suptitle(f"TOAST: {label}")
    written.append(_write(figure, stem.with_name(f"{stem.name}_steps.png")))
    return written


def _overlay(axis, picture: np.ndarray, heat: np.ndarray, title: str) -> None:
    axis.imshow(picture)
    axis.imshow(heat, cmap="jet", alpha=0.5)
    axis.set_title(title)
    axis.axis("off")


def _write(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path
