"""What every PETL baseline shares: the backbone in the loop, edits, a linear head on CLS.

A baseline describes how it changes the frozen backbone as
:class:`~frozenlens.backbones.hooks.Edits` (:meth:`InLoopMethod.edits`); the
shared forward runs the backbone's edited view on the images and a linear head
reads the final normed class token (the mean patch token for backbones without
one), as VPT and the PETL papers that follow it do. The head starts at zero
(docs/methods/petl.md says why).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from frozenlens.backbones.hooks import Edits, forward_edited
from frozenlens.backbones.taps import Tap
from frozenlens.methods.base import Method
from frozenlens.methods.layers import init_zero_head
from frozenlens.train.images import IMAGES_KEY
from frozenlens.train.trainer import TrainConfig, seeded

PETL_LRS = (5e-3, 1e-3, 5e-4, 1e-4)
"""AdamW learning rates searched for BitFit, LoRA and AdaptFormer (batch 64)."""
WEIGHT_DECAYS = (1e-2, 1e-3, 1e-4, 0.0)
"""VPT's weight-decay grid, used by every baseline."""
BATCH = 64
PETL_TRAINING = TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=1e-4, epochs=100, warmup_epochs=10,
                            batch_size=BATCH)
"""NOAH's VTAB-1k recipe for LoRA / adapters / AdaptFormer: AdamW 1e-3, wd 1e-4, batch 64, 100 epochs."""
PETL_GRID = {"lr": list(PETL_LRS), "weight_decay": list(WEIGHT_DECAYS)}


class InLoopMethod(Method):
    """Base of the baselines that adapt the backbone's features (the backbone runs every step).

    Subclasses add their trainable modules and implement :meth:`edits`; the
    head and the forward pass are shared.
    """

    in_loop = True
    train_defaults = PETL_TRAINING
    grid = PETL_GRID

    def __init__(self, config: Any, backbone: dict[str, Any], num_classes: int):
        super().__init__(config, backbone, num_classes)
        self.head = nn.Linear(backbone["dim"], num_classes)
        init_zero_head(self.head)

    @classmethod
    def taps(cls, config: Any, backbone: dict[str, Any]) -> list[Tap]:
        """None: the method runs the backbone itself."""
        return []

    def edits(self, batch_size: int) -> Edits:
        """How this method changes the backbone for a batch of ``batch_size`` images."""
        return Edits()

    def tokens(self, images: torch.Tensor, *, inputs: dict[int, torch.Tensor] | None = None,
               ) -> torch.Tensor:
        """Final normed tokens of the adapted backbone (``inputs`` receives each block's input)."""
        return forward_edited(self.frozen_backbone, images, self.edits(images.shape[0]), inputs=inputs)

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """The class token, or the mean patch token for backbones without one."""
        prefix = self.backbone_info["num_prefix_tokens"]
        return tokens[:, 0] if prefix else tokens.mean(dim=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of ``batch["images"]``."""
        return self.head(self.pooled(self.tokens(batch[IMAGES_KEY])))

    def reset_trainable(self, seed: int) -> None:
        """Every trainable part back to its initial state, drawn from ``seed``."""
        with seeded(seed):
            self.init_trainable()

    def init_trainable(self) -> None:
        """Initialise the method's own modules (subclasses extend it); the head at zero."""
        init_zero_head(self.head)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily stop ``module``'s parameters from requiring gradients."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
