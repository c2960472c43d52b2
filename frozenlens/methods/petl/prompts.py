"""VPT, Visual Prompt Tuning (Jia et al., ECCV 2022), shallow and deep.

Learnable prompt tokens are inserted after the class (and register) tokens,
before the patch tokens, through a ``block_input`` edit
(:mod:`frozenlens.backbones.hooks`). Shallow: once, at the input of block 0;
they then flow through the network like any token. Deep: every block gets its
own prompts, replacing the previous block's outputs at the prompt positions.
The patch tokens keep their count and order. The head reads the final normed
class token.

Training follows the VQT paper's VPT runs (Adam-style optimiser, the shared
PETL recipe and grid), not VPT's own SGD recipe, most of whose learning rates
diverge on DINOv2's features: docs/methods/petl.md has the measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from frozenlens.backbones.hooks import Edits
from frozenlens.errors import FrozenlensError
from frozenlens.methods.base import register
from frozenlens.methods.layers import patch_area
from frozenlens.methods.petl.common import InLoopMethod


@dataclass
class VPTConfig:
    """Prompt settings.

    Attributes:
        num_prompts: prompt tokens per layer (VPT searches {1, 5, 10, 50, 100, 200}
            per task; 10 here by default).
        dropout: dropout on the prompts while training (VPT: 0.1).
    """

    num_prompts: int = 10
    dropout: float = 0.1


class VPT(InLoopMethod):
    """Prompt tokens after the prefix tokens; subclasses set ``deep``."""

    config_class = VPTConfig
    deep: bool = False

    def __init__(self, config: VPTConfig, backbone: dict[str, Any], num_classes: int):
        if config.num_prompts < 1 or not 0 <= config.dropout < 1:
            raise FrozenlensError(f"{self.name}: num_prompts={config.num_prompts}, dropout={config.dropout}; "
                                  "num_prompts >= 1 and dropout in [0, 1)")
        super().__init__(config, backbone, num_classes)
        layers = backbone["depth"] if self.deep else 1
        self.prompts = nn.Parameter(torch.empty(layers, config.num_prompts, backbone["dim"]))
        self.dropout = nn.Dropout(config.dropout)
        self._init_prompts()

    def init_trainable(self) -> None:
        super().init_trainable()
        self._init_prompts()

    def _init_prompts(self) -> None:
        """Uniform in +-sqrt(6 / (3 * patch_area + D)), VPT's "xavier" initialisation."""
        bound = math.sqrt(6.0 / (3 * patch_area(self.backbone_info) + self.backbone_info["dim"]))
        nn.init.uniform_(self.prompts, -bound, bound)

    def edits(self, batch_size: int) -> Edits:
        """Insert (and, deep, replace) the prompts at block inputs."""
        prefix, count = self.backbone_info["num_prefix_tokens"], self.config.num_prompts

        def block_input(index: int, x: torch.Tensor) -> torch.Tensor:
            if index > 0 and not self.deep:
                return x
            prompts = self.dropout(self.prompts[index].expand(x.shape[0], -1, -1))
            rest = x[:, prefix:] if index == 0 else x[:, prefix + count:]
            return torch.cat([x[:, :prefix], prompts, rest], dim=1)

        return Edits(block_input=block_input)


@register
class VPTShallow(VPT):
    """VPT-Shallow: prompts enter once, at the input of the first block."""

    name = "vpt-shallow"
    summary = "10 prompt tokens inserted after CLS at the input only + linear head"


@register
class VPTDeep(VPT):
    """VPT-Deep: every block gets its own prompts, replacing the previous ones."""

    name = "vpt-deep"
    summary = "10 prompt tokens per block, inserted after CLS and replaced at every block + linear head"
    deep = True
