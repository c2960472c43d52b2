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
   they see what the block's own tokens see. The adapted model no longer
   changes, so it runs once per image (:meth:`VQTOnPETL.adapted_activations`)
   and stage 2 trains from those activations, as VQT trains from the store;
   :class:`QueryStage` is the same stage with the adapted model in the loop,
   which it reproduces. Stage 2 uses VQT's own recipe (Adam, VQT's learning
   rate scaled to the batch, its weight decay: ``query_lr`` and
   ``query_weight_decay`` change them) with the run's epochs, batch size and
   seed; the grid search tunes stage 1.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from frozenlens.backbones.base import FrozenBackbone
from frozenlens.backbones.hooks import edited_model
from frozenlens.backbones.taps import Tap
from frozenlens.errors import ConfigError
from frozenlens.methods.base import Method, get_method, register
from frozenlens.methods.petl.adapters import AdaptFormerConfig
from frozenlens.methods.petl.common import InLoopMethod, frozen
from frozenlens.methods.petl.prompts import VPTConfig
from frozenlens.methods.selection import best_on
from frozenlens.methods.vqt.model import CLS_KEY, VQT, VQTConfig
from frozenlens.methods.vqt.query_attention import input_taps
from frozenlens.train.data import TapData
from frozenlens.train.images import IMAGES_KEY
from frozenlens.train.trainer import TrainConfig

ACTIVATION_DTYPES = {"float16": torch.float16, "float32": torch.float32}

_log = logging.getLogger("frozenlens")


@dataclass
class QueryConfig:
    """VQT's settings in a combination (no compression: VQT reads all adapted summaries).

    Attributes:
        num_queries: query tokens per block (VQT: 1).
        aggregate: ``"concat"`` or ``"weighted_sum"`` (see VQT).
        normalize: L2-normalise the CLS token and each summary before the head (off by
            default, as the paper and VQT alone; the official code turns it on).
        query_dropout: dropout on the query tokens while training (VQT: 0.1).
        query_search: choose stage 2's learning rate and weight decay among VQT's own grid (its
            paper's 5 lrs, scaled to the batch, x 4 weight decays), trained together from the
            adapted activations and ranked on held-out data: the protocol's val split during its
            grid search, else a seeded ``holdout_fraction`` of the training data that both stages
            are first fitted without (stage 1 then trains twice), then refitted on all of it.
            False: ``query_lr`` and ``query_weight_decay`` as given.
        query_lr: stage 2's learning rate without the search; 0 takes VQT's own, 0.05 per 128
            images of the batch.
        query_weight_decay: stage 2's weight decay without the search (VQT's own: 1e-4).
        activations_dtype: precision in which the adapted activations that stage 2 trains from
            are kept: ``float16`` (as the store keeps taps) or ``float32`` (stage 2 then equals
            :class:`QueryStage`, the adapted model in the loop, to float rounding).
        holdout_fraction: share of the training data the search ranks on when no val split is given.
    """

    num_queries: int = 1
    aggregate: str = "concat"
    normalize: bool = False
    query_dropout: float = 0.1
    query_search: bool = True
    query_lr: float = 0.0
    query_weight_decay: float = 1e-4
    activations_dtype: str = "float16"
    holdout_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.activations_dtype not in ACTIVATION_DTYPES:
            raise ConfigError(f"activations_dtype={self.activations_dtype!r}: use one of "
                              f"{', '.join(ACTIVATION_DTYPES)}")
        if self.query_lr < 0:
            raise ConfigError(f"query_lr={self.query_lr}: must be positive (or 0 for VQT's own)")


class VQTOnPETL(InLoopMethod):
    """VQT reading the features of a PETL method (``petl_name``), trained in two stages."""

    petl_name: ClassVar[str]
    petl_config: ClassVar[type]

    def __init__(self, config: Any, backbone: dict[str, Any], num_classes: int):
        Method.__init__(self, config, backbone, num_classes)
        petl_class = get_method(self.petl_name)
        self.petl = petl_class(_part(config, self.petl_config), backbone, num_classes)
        vqt_fields = {f.name for f in dataclasses.fields(VQTConfig)}
        query_settings = {k: v for k, v in dataclasses.asdict(_part(config, QueryConfig)).items() if k in vqt_fields}
        self.vqt = VQT(VQTConfig(**query_settings, compress=False), backbone, num_classes)
        self.query_choice: dict[str, Any] = {}
        """What the last stage-2 search chose (see :meth:`choices`)."""

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
        with torch.no_grad():
            taps = self._adapted_taps(batch[IMAGES_KEY])
        return self.vqt.classify(self.vqt.features(taps, normed=False, blocks=self.adapted_blocks()))

    def _adapted_taps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """What VQT reads from the adapted backbone: every block's input and the final class token."""
        inputs: dict[int, torch.Tensor] = {}
        tokens = self.petl.tokens(images, inputs=inputs)
        taps = {tap.key: inputs[i] for i, tap in enumerate(input_taps(self.backbone_info["depth"]))}
        taps[CLS_KEY] = self.petl.pooled(tokens)
        return taps

    def adapted_blocks(self) -> list[nn.Module]:
        """The adapted model's blocks, which the queries pass through (they follow the PETL part's
        current weights)."""
        return list(edited_model(self.frozen_backbone.model, self.petl.edits(1)).blocks)

    @torch.no_grad()
    def adapted_activations(self, data: Any, cfg: TrainConfig) -> TapData:
        """:meth:`_adapted_taps` of every example of ``data`` (in its order), the PETL part in
        eval mode, in one pass; kept on the CPU in ``activations_dtype``."""
        dtype = ACTIVATION_DTYPES[self.config.activations_dtype]
        was_training = self.petl.training
        self.petl.eval()
        rows: dict[str, list[torch.Tensor]] = {}
        try:
            for batch, _ in data.batches(cfg.batch_size, device=cfg.device):
                for key, value in self._adapted_taps(batch[IMAGES_KEY]).items():
                    rows.setdefault(key, []).append(value.to("cpu", dtype))
        finally:
            self.petl.train(was_training)
        return TapData({k: torch.cat(v) for k, v in rows.items()}, data.labels, data.num_classes)

    def query_stage(self) -> "QueryStage":
        """Stage 2 with the adapted model in the loop: this combination's forward, with only VQT's
        parameters (keep the PETL part frozen while it trains). :meth:`fit` trains the same stage
        from :meth:`adapted_activations` instead."""
        return QueryStage(self)

    def query_config(self, cfg: TrainConfig) -> TrainConfig:
        """Stage 2's recipe without the search: VQT's optimiser, ``query_lr`` (else VQT's lr scaled
        to the batch) and ``query_weight_decay``, with the run's epochs, batch size and seed."""
        recipe = VQT.train_defaults
        lr = self.config.query_lr or recipe.lr / recipe.batch_size * cfg.batch_size
        return cfg.updated(optimizer=recipe.optimizer, lr=lr, weight_decay=self.config.query_weight_decay)

    def query_grid(self, cfg: TrainConfig) -> list[TrainConfig]:
        """Stage 2's candidate recipes: :meth:`query_config` at every point of VQT's grid, its
        learning rates scaled from VQT's batch to ``cfg``'s."""
        scale = cfg.batch_size / VQT.train_defaults.batch_size
        base = self.query_config(cfg)
        return [base.updated(lr=lr * scale, weight_decay=wd)
                for lr in VQT.grid["lr"] for wd in VQT.grid["weight_decay"]]

    def fit(self, data: Any, cfg: TrainConfig, *, val: Any = None, progress: bool = False) -> list[float]:
        """Stage 1: the PETL method alone. Stage 2: VQT's queries and head, trained from the
        adapted activations (computed once: the adapted model is frozen from here on), their
        recipe searched on held-out data unless ``query_search`` is off: on ``val`` when given,
        else on a holdout that neither stage saw (:meth:`_fit_searching_on_holdout`)."""
        self.query_choice = {}
        if not self.config.query_search:
            return self._fit_stages(data, cfg, lambda activations: self.vqt.fit(
                activations, self.query_config(cfg), progress=progress), progress)
        if val is None:
            return self._fit_searching_on_holdout(data, cfg, progress)
        return self._fit_stages(data, cfg, lambda activations: self._search_query_recipe(
            activations, self.adapted_activations(val, cfg), cfg, progress), progress)

    def _fit_stages(self, data: Any, cfg: TrainConfig, stage_two: Callable[[TapData], list[float]],
                    progress: bool) -> list[float]:
        """Stage 1 on ``data``, then ``stage_two`` on its adapted activations, the PETL part frozen."""
        losses = self.petl.fit(data, cfg, progress=progress)
        activations = self.adapted_activations(data, cfg)
        self.vqt.read_through(self.adapted_blocks())
        with frozen(self.petl):
            return losses + stage_two(activations)

    def _fit_searching_on_holdout(self, data: Any, cfg: TrainConfig, progress: bool) -> list[float]:
        """Without val: both stages fit on the rest of a seeded, stratified ``holdout_fraction`` of
        ``data``, stage 2's recipe is chosen on that holdout (unseen by stage 1 too), then both
        stages fit again on all of ``data``, stage 2 with the chosen recipe. Stage 1 trains twice."""
        rest, held_out = data.holdout(self.config.holdout_fraction, seed=cfg.seed)
        if progress:
            _log.info("%s: choosing stage 2's lr x wd on a %g holdout; both stages fit on the other %d images "
                      "first, then on all %d", self.name, self.config.holdout_fraction, len(rest), len(data))
        losses = self.fit(rest, cfg, val=held_out, progress=progress)
        choice = self.query_choice
        recipe = self.query_config(cfg).updated(lr=choice["query_lr"], weight_decay=choice["query_weight_decay"])
        losses += self._fit_stages(data, cfg, lambda activations: self.vqt.fit(
            activations, recipe, progress=progress), progress)
        self.query_choice = choice
        return losses

    def _search_query_recipe(self, activations: TapData, held_out: TapData, cfg: TrainConfig,
                             progress: bool) -> list[float]:
        """Every candidate of :meth:`query_grid` trained in one pass on ``activations``; the best on
        ``held_out`` is kept, and its recipe recorded in :attr:`query_choice`."""
        candidates = {(c.lr, c.weight_decay): c for c in self.query_grid(cfg)}
        siblings = {key: self._query_sibling() for key in candidates}
        runs = VQT.fit_many(list(siblings.values()), activations, list(candidates.values()), progress=progress)
        best, accuracy, _ = best_on(siblings, held_out, cfg, label=f"{self.name} queries (lr, wd)=",
                                    progress=progress)
        self.query_choice = {"query_lr": best[0], "query_weight_decay": best[1],
                             "held_out_accuracy": {f"lr={lr:g} wd={wd:g}": a for (lr, wd), a in accuracy.items()}}
        self.vqt.load_state_dict(siblings[best].state_dict())
        return [loss for run in runs for loss in run]

    def _query_sibling(self) -> VQT:
        """A fresh VQT like this combination's, reading through the same adapted blocks."""
        sibling = VQT(self.vqt.config, self.backbone_info, self.num_classes)
        sibling.bind(self.frozen_backbone)
        sibling.read_through(self.vqt.query_blocks())
        return sibling

    def choices(self) -> dict[str, Any]:
        """Stage 2's recipe as chosen by the last search, with every candidate's held-out accuracy
        (empty without a search)."""
        return dict(self.query_choice)


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
