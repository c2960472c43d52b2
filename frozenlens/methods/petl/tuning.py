"""Baselines that tune backbone weights: full fine-tuning, partial-k and BitFit.

Full and partial-k train a deep copy of the weights they tune (held by the
method, so their adapter files are as big as those weights: ~85 MB in float32
for all of ViT-S, ~7 MB per ViT-S block); the shared :class:`FrozenBackbone`
is never touched. BitFit trains copies of every bias and passes them to the
frozen model as parameter edits (its adapter holds only the biases).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from frozenlens.backbones.base import FrozenBackbone
from frozenlens.backbones.hooks import Edits
from frozenlens.errors import FrozenlensError
from frozenlens.methods.base import register
from frozenlens.methods.petl.common import BATCH, WEIGHT_DECAYS, InLoopMethod
from frozenlens.train.images import IMAGES_KEY
from frozenlens.train.trainer import TrainConfig

FINETUNE_LRS = tuple(lr / 256 * BATCH for lr in (0.005, 0.001, 0.0005, 0.0001))
"""VPT's fine-tuning learning rates (for a batch of 256), scaled to batch 64 as its VTAB script does."""
FINETUNE_TRAINING = TrainConfig(optimizer="adamw", lr=0.0005 / 256 * BATCH, weight_decay=1e-4, epochs=100,
                                warmup_epochs=10, batch_size=BATCH)


@dataclass
class FullConfig:
    """Full fine-tuning: every backbone weight (a copy) and the head train. No settings."""


@register
class FullFineTune(InLoopMethod):
    """Full fine-tuning of a copy of the backbone, with a linear head on the final CLS token."""

    name = "full"
    config_class = FullConfig
    summary = "full fine-tuning of a copy of every backbone weight + linear head (big adapter files)"
    train_defaults = FINETUNE_TRAINING
    grid = {"lr": list(FINETUNE_LRS), "weight_decay": list(WEIGHT_DECAYS)}

    def bind(self, backbone: FrozenBackbone) -> None:
        """Bind the backbone and make the trainable copy of its weights."""
        super().bind(backbone)
        self.model = copy.deepcopy(backbone.model)
        self.model.requires_grad_(True)

    def init_trainable(self) -> None:
        """The copy back to the backbone's weights; a fresh head."""
        super().init_trainable()
        with torch.no_grad():
            self.model.load_state_dict(self.frozen_backbone.model.state_dict())

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.pooled(self.model.forward_features(batch[IMAGES_KEY])))


@dataclass
class PartialConfig:
    """Partial-k fine-tuning.

    Attributes:
        blocks: the last ``blocks`` transformer blocks (k; VPT's Partial-1 uses 1)
            train, with the final norm and the head.
    """

    blocks: int = 1


@register
class PartialFineTune(InLoopMethod):
    """Partial-k: copies of the last k blocks and the final norm train; the rest stays frozen."""

    name = "partial"
    config_class = PartialConfig
    summary = "fine-tune copies of the last k blocks (blocks=1) + final norm + linear head"
    train_defaults = FINETUNE_TRAINING
    grid = {"lr": list(FINETUNE_LRS), "weight_decay": list(WEIGHT_DECAYS)}

    def __init__(self, config: PartialConfig, backbone: dict[str, Any], num_classes: int):
        if not 1 <= config.blocks <= backbone["depth"]:
            raise FrozenlensError(f"partial: blocks={config.blocks}; use 1..{backbone['depth']} "
                                  f"(this backbone has {backbone['depth']} blocks)")
        super().__init__(config, backbone, num_classes)

    @property
    def first_tuned(self) -> int:
        """Index of the first tuned block."""
        return self.backbone_info["depth"] - self.config.blocks

    def bind(self, backbone: FrozenBackbone) -> None:
        """Bind the backbone and copy the blocks and norm that train."""
        super().bind(backbone)
        model = backbone.model
        self.blocks = nn.ModuleList(copy.deepcopy(model.blocks[i]) for i in range(self.first_tuned, backbone.depth))
        self.norm = copy.deepcopy(model.norm)
        self.blocks.requires_grad_(True)
        self.norm.requires_grad_(True)

    def init_trainable(self) -> None:
        """The copies back to the backbone's weights; a fresh head."""
        super().init_trainable()
        model = self.frozen_backbone.model
        with torch.no_grad():
            for offset, block in enumerate(self.blocks):
                block.load_state_dict(model.blocks[self.first_tuned + offset].state_dict())
            self.norm.load_state_dict(model.norm.state_dict())

    def edits(self, batch_size: int) -> Edits:
        """The tuned copies stand in for the last blocks and the final norm."""
        modules = {f"blocks.{self.first_tuned + i}": block for i, block in enumerate(self.blocks)}
        return Edits(modules={**modules, "norm": self.norm})


@dataclass
class BitFitConfig:
    """BitFit: every bias term of the backbone trains (LayerNorm biases included). No settings."""


@register
class BitFit(InLoopMethod):
    """BitFit (Ben Zaken et al., 2022): tune only the biases, plus the head."""

    name = "bitfit"
    config_class = BitFitConfig
    summary = "tune every bias of the backbone (copies, passed as parameter edits) + linear head"

    def bind(self, backbone: FrozenBackbone) -> None:
        """Bind the backbone and make trainable copies of its biases."""
        super().bind(backbone)
        self.bias_names = [n for n, _ in backbone.model.named_parameters() if n.endswith("bias")
                           and not n.startswith("head.")]
        if not self.bias_names:
            raise FrozenlensError(f"bitfit: backbone {backbone.name!r} has no bias terms to tune")
        biases = dict(backbone.model.named_parameters())
        self.biases = nn.ParameterDict({_key(n): nn.Parameter(biases[n].detach().clone())
                                        for n in self.bias_names})

    def init_trainable(self) -> None:
        """The biases back to the backbone's; a fresh head."""
        super().init_trainable()
        biases = dict(self.frozen_backbone.model.named_parameters())
        with torch.no_grad():
            for name in self.bias_names:
                self.biases[_key(name)].copy_(biases[name])

    def edits(self, batch_size: int) -> Edits:
        """Every bias replaced by its trainable copy."""
        return Edits(params={name: self.biases[_key(name)] for name in self.bias_names})


def _key(parameter_name: str) -> str:
    """A ParameterDict key for a dotted parameter name."""
    return parameter_name.replace(".", "__")
