"""VQT on top of a PETL method: the PETL method adapts the features, VQT's queries read them.

VQT paper, Section 4.3: "we update the pre-trained model with AdaptFormer or
VPT so that the model can generate relevant intermediate features for the
downstream task. Then we add query tokens to the input of every layer to
summarise the updated intermediate features." So a fit has two stages:

1. the PETL method trains as it does alone (its own head, the given recipe);
2. it is frozen, and VQT (:class:`frozenlens.methods.vqt.VQT`, unchanged) trains
   its query tokens and head on the adapted features: the inputs of every
   adapted block (prompts included for VPT) and the adapted final class token.
   The queries pass through the adapted blocks (with AdaptFormer's branch), so
   they see what the block's own tokens see. Stage 2 uses VQT's own recipe
   (Adam, VQT's learning rate and weight decay) with the run's epochs, batch
   size and seed; the grid search tunes stage 1.

The adapted pass in stage 2 needs no gradients: its memory is VQT's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from frozenlens.backbones.base import FrozenBackbone
from frozenlens.backbones.hooks import edited_model
from frozenlens.backbones.taps import Tap
from frozenlens.methods.base import Method, get_method, register
from frozenlens.methods.petl.adapters import AdaptFormerConfig
from frozenlens.methods.petl.common import InLoopMethod, frozen
from frozenlens.methods.petl.prompts import VPTConfig
from frozenlens.methods.vqt.model import CLS_KEY, VQT, VQTConfig
from frozenlens.methods.vqt.query_attention import input_taps
from frozenlens.train.images import IMAGES_KEY
from frozenlens.train.trainer import TrainConfig, train


@dataclass
class QueryConfig:
    """VQT's settings in a combination (no compression: VQT reads all adapted summaries).

    Attributes:
        num_queries: query tokens per block (VQT: 1).
        aggregate: ``"concat"`` or ``"weighted_sum"`` (see VQT).
        normalize: L2-normalise the CLS token and each summary before the head (off by
            default, as the paper and VQT alone; the official code turns it on).
        query_dropout: dropout on the query tokens while training (VQT: 0.1).
    """

    num_queries: int = 1
    aggregate: str = "concat"
    normalize: bool = False
    query_dropout: float = 0.1


class VQTOnPETL(InLoopMethod):
    """VQT reading the features of a PETL method (``petl_name``), trained in two stages."""

    petl_name: ClassVar[str]
    petl_config: ClassVar[type]

    def __init__(self, config: Any, backbone: dict[str, Any], num_classes: int):
        Method.__init__(self, config, backbone, num_classes)
        petl_class = get_method(self.petl_name)
        self.petl = petl_class(_part(config, self.petl_config), backbone, num_classes)
        query_settings = dataclasses.asdict(_part(config, QueryConfig))
        self.vqt = VQT(VQTConfig(**query_settings, compress=False), backbone, num_classes)

    @classmethod
    def taps(cls, config: Any, backbone: dict[str, Any]) -> list[Tap]:
        return []

    def bind(self, backbone: FrozenBackbone) -> None:
        """Bind the backbone to both parts."""
        super().bind(backbone)
        self.petl.bind(backbone)
        self.vqt.bind(backbone)

    def reset_trainable(self, seed: int) -> None:
        """Both parts back to their initial state from ``seed``."""
        self.petl.reset_trainable(seed)
        self.vqt.reset_trainable(seed)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """VQT's logits on the adapted features of ``batch["images"]``."""
        images = batch[IMAGES_KEY]
        inputs: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            tokens = self.petl.tokens(images, inputs=inputs)
        depth = self.backbone_info["depth"]
        taps = {tap.key: inputs[i] for i, tap in enumerate(input_taps(depth))}
        taps[CLS_KEY] = self.petl.pooled(tokens)
        blocks = edited_model(self.frozen_backbone.model, self.petl.edits(images.shape[0])).blocks
        return self.vqt.classify(self.vqt.features(taps, normed=False, blocks=blocks))

    def query_stage(self) -> "QueryStage":
        """The module stage 2 trains: this combination's forward, with only VQT's parameters
        (keep the PETL part frozen while it trains)."""
        return QueryStage(self)

    def fit(self, data: Any, cfg: TrainConfig, *, val: Any = None, progress: bool = False) -> list[float]:
        """Stage 1: the PETL method alone. Stage 2: VQT's queries and head on its features."""
        losses = self.petl.fit(data, cfg, progress=progress)
        self.vqt.reset_trainable(cfg.seed)
        recipe = VQT.train_defaults
        query_cfg = cfg.updated(optimizer=recipe.optimizer, lr=recipe.lr / recipe.batch_size * cfg.batch_size,
                                weight_decay=recipe.weight_decay)
        with frozen(self.petl):
            losses += train(self.query_stage(), data, query_cfg, progress=progress, desc=f"{self.name} queries")
        return losses


class QueryStage(nn.Module):
    """Training view of stage 2 (:meth:`VQTOnPETL.query_stage`): the combination's forward,
    only VQT's parameters."""

    def __init__(self, combo: VQTOnPETL):
        super().__init__()
        self.vqt = combo.vqt
        self._combo = [combo]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._combo[0](batch)


def _part(config: Any, part_class: type) -> Any:
    """The fields of ``config`` that belong to ``part_class``, as a ``part_class``."""
    return part_class(**{f.name: getattr(config, f.name) for f in dataclasses.fields(part_class)})


@dataclass
class VQTVPTConfig(QueryConfig, VPTConfig):
    """VPT-Deep's settings followed by VQT's (see :class:`VPTConfig`, :class:`QueryConfig`)."""


@dataclass
class VQTAdaptFormerConfig(QueryConfig, AdaptFormerConfig):
    """AdaptFormer's settings followed by VQT's (see :class:`AdaptFormerConfig`, :class:`QueryConfig`)."""


@register
class VQTPlusVPT(VQTOnPETL):
    """VPT-Deep adapts the features; VQT's queries summarise every adapted block."""

    name = "vqt+vpt"
    petl_name = "vpt-deep"
    petl_config = VPTConfig
    config_class = VQTVPTConfig
    summary = "VPT-Deep trains first, then VQT's queries + head read its adapted features"
    train_defaults = get_method("vpt-deep").train_defaults
    grid = get_method("vpt-deep").grid


@register
class VQTPlusAdaptFormer(VQTOnPETL):
    """AdaptFormer adapts the features; VQT's queries summarise every adapted block."""

    name = "vqt+adaptformer"
    petl_name = "adaptformer"
    petl_config = AdaptFormerConfig
    config_class = VQTAdaptFormerConfig
    summary = "AdaptFormer trains first, then VQT's queries + head read its adapted features"
    train_defaults = get_method("adaptformer").train_defaults
    grid = get_method("adaptformer").grid
