"""Small building blocks shared by methods."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


def concat_taps(features: dict[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    """Flatten each tap to ``(B, -1)`` and concatenate them in ``keys`` order."""
    return torch.cat([features[k].flatten(1) for k in keys], dim=1)


class Standardize(nn.Module):
    """Per-feature standardisation with statistics of the training set (buffers, saved)."""

    def __init__(self, num_features: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Set mean and standard deviation from ``x`` of shape ``(N, F)``."""
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0, unbiased=False).clamp_min(self.eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def group_lasso(weight: torch.Tensor) -> torch.Tensor:
    """Sum over input features of the L2 norm of their weights (``weight`` is ``(C, F)``).

    Written as sqrt(sum of squares): several times faster on CPU than
    ``norm(dim=0)``, which reduces across the strided axis.
    """
    return weight.square().sum(0).sqrt().sum()


def init_kaiming_head(linear: nn.Linear) -> None:
    """Kaiming-normal (fan out) weights and zero bias: the head of the VPT / VQT code bases."""
    nn.init.kaiming_normal_(linear.weight, a=0, mode="fan_out")
    nn.init.zeros_(linear.bias)


def init_zero_head(linear: nn.Linear) -> None:
    """Zero weights and bias: every class starts at the same logit (loss log C), whatever the
    scale of the features the head reads."""
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)


def patch_area(backbone: dict[str, Any]) -> int:
    """Pixels per patch, from the input size and the patch grid (16 x 16 when unknown)."""
    size = backbone.get("data_config", {}).get("input_size", [None])[-1]
    grid = backbone.get("grid_size", [None])[-1]
    return (size // grid) ** 2 if size and grid else 256
