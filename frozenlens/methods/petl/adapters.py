"""Baselines that add small modules next to frozen weights: LoRA and AdaptFormer.

Both start exactly at the backbone (their last map is zero-initialised) and
enter the frozen model through :mod:`frozenlens.backbones.hooks` module edits:
LoRA as a branch added to every block's fused ``attn.qkv``, AdaptFormer as a
bottleneck parallel to every block's MLP sub-layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from frozenlens.backbones.hooks import Edits, add_branch, mlp_branch
from frozenlens.errors import FrozenlensError
from frozenlens.methods.base import register
from frozenlens.methods.layers import lora_delta, reset_lora
from frozenlens.methods.petl.common import InLoopMethod

QKV = "qkv"


class LoRAUpdate(nn.Module):
    """Low-rank updates of the q, k and/or v parts of a fused ``qkv`` map.

    For each target ``t``: ``delta_t(x) = (alpha / r) * x A_t^T B_t^T``
    (:func:`frozenlens.methods.layers.lora_delta`, the LoRA of every method) with
    ``A_t`` ``(r, D)`` Kaiming-uniform and ``B_t`` ``(D, r)`` zero
    (:func:`~frozenlens.methods.layers.reset_lora`), so the update starts at exactly
    zero. The output has the fused ``(..., 3D)`` layout, zero for parts that are not targets.
    """

    def __init__(self, dim: int, rank: int, alpha: float, targets: str):
        super().__init__()
        self.dim, self.targets, self.scaling = dim, targets, alpha / rank
        self.down = nn.Parameter(torch.empty(len(targets), rank, dim))
        self.up = nn.Parameter(torch.empty(len(targets), dim, rank))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``A`` Kaiming-uniform, ``B`` zero."""
        for down, up in zip(self.down, self.up):
            reset_lora(down, up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [lora_delta(x, self.down[i], self.up[i], self.scaling) for i in range(len(self.targets))]
        return torch.cat([parts[self.targets.index(part)] if part in self.targets
                          else x.new_zeros(*x.shape[:-1], self.dim) for part in QKV], dim=-1)


@dataclass
class LoRAConfig:
    """LoRA on the attention's query/key/value maps of every block.

    Attributes:
        rank: r of every update (issue 5 and DESIGN.md: 4).
        alpha: the update is scaled by ``alpha / rank``; the LoRA paper sets alpha to the
            first r tried and does not tune it, so the default alpha = r = 4 (scaling 1).
        targets: which of W_q, W_k, W_v get an update ("qkv": all three, each its own
            rank-r pair; the LoRA paper's own choice for GPT-3 was "qv").
    """

    rank: int = 4
    alpha: float = 4.0
    targets: str = "qkv"


@register
class LoRA(InLoopMethod):
    """LoRA (Hu et al., 2022): rank-r updates of every block's q/k/v maps, plus the head."""

    name = "lora"
    config_class = LoRAConfig
    summary = "rank-4 updates of every block's q, k, v maps (zero at the start) + linear head"

    def __init__(self, config: LoRAConfig, backbone: dict[str, Any], num_classes: int):
        if config.rank < 1 or not config.targets or set(config.targets) - set(QKV) \
                or len(set(config.targets)) != len(config.targets):
            raise FrozenlensError(f"lora: rank={config.rank}, targets={config.targets!r}; rank >= 1 and "
                                  "targets a subset of the letters q, k, v (e.g. qkv or qv)")
        super().__init__(config, backbone, num_classes)
        targets = "".join(p for p in QKV if p in config.targets)
        self.updates = nn.ModuleList(LoRAUpdate(backbone["dim"], config.rank, config.alpha, targets)
                                     for _ in range(backbone["depth"]))

    def init_trainable(self) -> None:
        super().init_trainable()
        for update in self.updates:
            update.reset_parameters()

    def edits(self, batch_size: int) -> Edits:
        """Every block's ``attn.qkv`` gets its low-rank branch."""
        return Edits(modules={f"blocks.{i}.attn.qkv": add_branch(update) for i, update in enumerate(self.updates)})


class Bottleneck(nn.Module):
    """AdaptFormer's adapter: ``scale * up(dropout(relu(down(x))))``.

    Initialised as the official code's ``init_option="lora"``: ``down``
    Kaiming-uniform (a=sqrt(5)), ``up`` and both biases zero, so it outputs zero
    at the start.
    """

    def __init__(self, dim: int, width: int, scale: float, dropout: float):
        super().__init__()
        self.down = nn.Linear(dim, width)
        self.up = nn.Linear(width, dim)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``down`` Kaiming-uniform, the rest zero."""
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(torch.relu(self.down(x)))) * self.scale


@dataclass
class AdaptFormerConfig:
    """AdaptFormer's parallel adapter in every block.

    Attributes:
        bottleneck: hidden width of the adapter (paper: 64).
        scale: factor on the adapter's output (paper: 0.1).
        dropout: dropout inside the adapter (official code: 0.1).
    """

    bottleneck: int = 64
    scale: float = 0.1
    dropout: float = 0.1


@register
class AdaptFormer(InLoopMethod):
    """AdaptFormer (Chen et al., 2022): a bottleneck parallel to every block's MLP, plus the head."""

    name = "adaptformer"
    config_class = AdaptFormerConfig
    summary = "bottleneck-64 adapter (ReLU, scale 0.1, zero up-projection) parallel to every MLP + head"

    def __init__(self, config: AdaptFormerConfig, backbone: dict[str, Any], num_classes: int):
        if config.bottleneck < 1 or not 0 <= config.dropout < 1:
            raise FrozenlensError(f"adaptformer: bottleneck={config.bottleneck}, dropout={config.dropout}; "
                                  "bottleneck >= 1 and dropout in [0, 1)")
        super().__init__(config, backbone, num_classes)
        self.adapters = nn.ModuleList(Bottleneck(backbone["dim"], config.bottleneck, config.scale, config.dropout)
                                      for _ in range(backbone["depth"]))

    def init_trainable(self) -> None:
        super().init_trainable()
        for adapter in self.adapters:
            adapter.reset_parameters()

    def edits(self, batch_size: int) -> Edits:
        """Every block's MLP sub-layer gets its adapter in parallel."""
        modules: dict[str, Any] = {}
        for index, adapter in enumerate(self.adapters):
            modules.update(mlp_branch(index, adapter))
        return Edits(modules=modules)
