"""FLOPs per image, counted by torch's ``FlopCounterMode`` on a real batch.

Used by ``frozenlens bench`` (a column of its report) and by
``benchmarks/inloop_memory_flops.py``. FLOPs grow linearly with the batch, so a
couple of images are enough; the count is exact for the operators torch knows
(matmuls, convolutions, attention), which are nearly all of a ViT's work.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode


class _TotalsOnly:
    """Stands in for ``FlopCounterMode``'s module tracker, keeping totals only: the tracker's
    backward hooks fail on inputs that are views of parameters (VPT's expanded prompts)."""

    parents = {"Global"}

    def __enter__(self) -> "_TotalsOnly":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that counts the total only (no per-module table, no display)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _TotalsOnly()
    return counter


def flops_per_image(model: nn.Module, batch: Any, labels: torch.Tensor) -> tuple[float, float]:
    """``(forward, forward + backward)`` FLOPs per image of ``model`` on one batch.

    The backward pass of a cross-entropy loss is what one training step adds; gradients it
    leaves on ``model``'s parameters are cleared again, and the model is left in eval mode.
    """
    model.eval()
    with torch.no_grad(), flop_counter() as forward:
        model(batch)
    model.train()
    try:
        with flop_counter() as step:
            F.cross_entropy(model(batch), labels).backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    count = len(labels)
    return forward.get_total_flops() / count, step.get_total_flops() / count


def backbone_flops_per_image(backbone: Any, taps: Sequence[Any], images: int = 2,
                             texts: Sequence[str] | None = None) -> float:
    """FLOPs per image of the frozen backbone's forward pass up to the last of ``taps``
    (what extracting them costs once per image), on random pixels of its input size; for a text
    backbone, per text of ``texts`` (text FLOPs depend on the length)."""
    if texts is not None:
        inputs: Any = list(texts)
    else:
        size = backbone.image_size
        inputs = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(0)).to(backbone.device)
    with torch.no_grad(), flop_counter() as counter:
        backbone.forward_taps(inputs, list(taps))
    return counter.get_total_flops() / len(inputs)
