"""Small building blocks shared by methods: standardisation, heads, group lasso, LoRA, padding masks."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from frozenlens.backbones.text import MASK_KEY
from frozenlens.errors import FrozenlensError
from frozenlens.train.stacked import StackedView, copy_back, stack_parameters


def concat_taps(features: dict[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    """Flatten each tap to ``(B, -1)`` and concatenate them in ``keys`` order."""
    return torch.cat([features[k].flatten(1) for k in keys], dim=1)


# -- padding masks (text backbones) --------------------------------------------------------
def token_mask(features: Mapping[str, Any]) -> torch.Tensor | None:
    """The padding mask of a text batch as bool ``(B, T)`` (True = real token), or None when
    ``features`` hold none (image backbones: every token is real).

    The mask arrives under :data:`~frozenlens.backbones.text.MASK_KEY` as bool (from
    ``forward_taps``) or as float 0./1. (from a store, cast to float32 per batch).
    """
    mask = features.get(MASK_KEY)
    if mask is None:
        return None
    return mask if mask.dtype == torch.bool else mask > 0.5


def mask_keys(features: Mapping[str, Any]) -> list[str]:
    """``[MASK_KEY]`` when ``features`` carry a padding mask, else ``[]``: for helpers that
    rebuild a method's data from some of its taps and must keep the mask beside them."""
    return [MASK_KEY] if MASK_KEY in features else []


def masked_token_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``tokens`` ``(B, T, D)`` over its real tokens (``mask`` ``(B, T)`` True), or over
    all of them when ``mask`` is None (exactly ``tokens.mean(1)``)."""
    if mask is None:
        return tokens.mean(1)
    keep = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * keep).sum(1) / keep.sum(1).clamp_min(1.0)


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


def strongest_features(weight: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (ascending) of the ``count`` input features whose weight columns have the
    largest L2 norm: the features a group-lasso head keeps (Head2Toe, VQT's compression)."""
    scores = weight.detach().square().sum(0)
    return scores.topk(count).indices.sort().values


class FeatureHead(nn.Module):
    """Training view of a linear head on precomputed features (``batch["features"]``).

    Optionally it reads only the columns ``selected``, and adds a group-lasso penalty
    of coefficient ``lasso`` on its weight (:func:`group_lasso`): the selection head of
    a group-lasso feature selection, or the head retrained on the kept features.
    """

    def __init__(self, linear: nn.Linear, lasso: float = 0.0, selected: torch.Tensor | None = None):
        super().__init__()
        self.linear, self.lasso, self.selected = linear, lasso, selected

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["features"]
        return self.linear(x if self.selected is None else x[:, self.selected])

    def regularization(self) -> torch.Tensor:
        if not self.lasso:
            return torch.zeros(())
        return self.lasso * group_lasso(self.linear.weight)

    @classmethod
    def stack(cls, views: Sequence["FeatureHead"]) -> "StackedFeatureHead | None":
        """Heads reading the same columns, stacked (:mod:`frozenlens.train.stacked`)."""
        if any(v.selected is not None for v in views):
            return None
        return StackedFeatureHead(views)


class StackedFeatureHead(StackedView):
    """``C`` linear heads on one shared feature matrix: one ``(B, F) @ (F, C*K)`` matmul."""

    def __init__(self, views: Sequence[FeatureHead]):
        super().__init__()
        self.views = list(views)
        self.weight = stack_parameters([v.linear.weight for v in views])   # (C, K, F)
        self.bias = stack_parameters([v.linear.bias for v in views])       # (C, K)
        self.register_buffer("lasso", torch.tensor([float(v.lasso) for v in views]))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        configs, classes, width = self.weight.shape
        x = batch["features"]
        logits = x @ self.weight.reshape(configs * classes, width).t()     # (B, C*K)
        return logits.view(-1, configs, classes).transpose(0, 1) + self.bias[:, None]

    def regularization(self) -> torch.Tensor:
        if not bool(self.lasso.any()):
            return torch.zeros(())
        return self.lasso * self.weight.square().sum(1).sqrt().sum(1)     # group lasso per head

    def unstack(self) -> None:
        copy_back(self.weight, [v.linear.weight for v in self.views])
        copy_back(self.bias, [v.linear.bias for v in self.views])


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


# -- LoRA: the one low-rank update ---------------------------------------------------------
def reset_lora(down: torch.Tensor, up: torch.Tensor) -> None:
    """LoRA's start: ``A`` (``down``, ``(r, in)``) Kaiming-uniform (a=sqrt(5), as loralib),
    ``B`` (``up``, ``(out, r)``) zero, so the update is exactly zero."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        nn.init.zeros_(up)


def lora_delta(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scaling: float) -> torch.Tensor:
    """LoRA's update of a linear map: ``scaling * x A^T B^T`` with ``A = down`` ``(r, in)``,
    ``B = up`` ``(out, r)`` and ``scaling = alpha / r``."""
    return (x @ down.T @ up.T) * scaling


class LoRALinear(nn.Linear):
    """A linear map whose ``weight`` is frozen and adapted by a low-rank product.

    ``y = x W^T + b + scaling * x A^T B^T`` (:func:`lora_delta`) with ``A`` (r, in),
    ``B`` (out, r) and ``scaling = alpha / r``; ``B`` starts at zero, so the start
    equals ``W`` (:func:`reset_lora`). ``weight`` keeps its name, so plain
    :class:`nn.Linear` state dicts (e.g. pre-tuned ones) load into it.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float = 1.0,
                 bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        if rank < 1:
            raise FrozenlensError(f"lora_rank={rank}: must be at least 1")
        self.rank, self.scaling = rank, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.reset_lora()

    def reset_lora(self) -> None:
        """``A`` Kaiming-uniform, ``B = 0``."""
        reset_lora(self.lora_a, self.lora_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + lora_delta(x, self.lora_a, self.lora_b, self.scaling)
