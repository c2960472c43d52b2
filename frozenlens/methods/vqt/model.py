"""VQT, Visual Query Tuning (Tu et al., CVPR 2023), trained from the activation store.

It reads ViTs (timm) and BERT-family text encoders alike: each block is seen
through its :class:`~frozenlens.methods.vqt.query_attention.BlockParts`. On text
the batches carry the padding mask (``attention_mask``) and the queries never
attend to a padded token, so nothing depends on how much padding a batch has.

Every block ``l`` gets ``T`` learnable query tokens. They produce only
queries: keys and values come from the block's original input tokens, so the
backbone's activations stay exactly what they were (see
:mod:`frozenlens.methods.vqt.query_attention`). The query rows go through the rest
of the frozen block, and their outputs summarise block ``l``. A linear head
reads the final CLS token plus every block's summary, concatenated as in the
paper (or, with ``aggregate="weighted_sum"``, summed with learned weights);
``normalize=true`` L2-normalises each part first, as the official code does.
Optionally the features are compressed afterwards with Head2Toe's
group-lasso selection: the queries are frozen, a head with a group-lasso
penalty ranks the features, and a fresh head is trained on the top
``keep_fraction``.

Blocks are independent given their inputs, so all of them train at once from
the stored inputs of every block (``embed:tokens``, ``block.{i}:tokens``). A
fit first computes ``norm1`` of those inputs once (it depends on nothing
learned) and then trains on that; with streamed taps (``--low-memory``) it
applies ``norm1`` per minibatch instead, holding no copy. A post-norm text
layer has no ``norm1``: its keys read the stored inputs as they are, and nothing
is copied. ``docs/methods/vqt.md`` has the defaults, the measured costs and
where this differs from the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from frozenlens.backbones.base import FrozenBackbone
from frozenlens.backbones.taps import Tap
from frozenlens.backbones.text import MASK_KEY, TextBackbone
from frozenlens.errors import ConfigError
from frozenlens.methods.base import Method, register
from frozenlens.methods.layers import FeatureHead as _FeatureHead
from frozenlens.methods.layers import init_kaiming_head as _init_head
from frozenlens.methods.layers import patch_area as _patch_area
from frozenlens.methods.layers import strongest_features
from frozenlens.methods.vqt.query_attention import (
    BlockParts,
    backbone_blocks,
    block_parts,
    check_block,
    input_taps,
    key_mask,
    query_block,
)
from frozenlens.methods.vqt.stacked import StackedVQT, can_stack
from frozenlens.train.data import TapData
from frozenlens.train.stacked import train_many
from frozenlens.train.trainer import TrainConfig, seeded, train

AGGREGATES = ("concat", "weighted_sum")
POOLINGS = ("cls", "patch_mean")
CLS_KEY = "final:cls"
NORMED_PREFIX = "norm1."
PAPER_LRS = (1.0, 0.5, 0.25, 0.1, 0.05)
"""The paper's learning rates for a batch of 256; the grid scales them to the batch (lr/256*b)."""


@dataclass
class VQTConfig:
    """VQT settings.

    Attributes:
        num_queries: query tokens per block, T (paper: 1 for natural and specialised
            tasks; 10-20 helps structured ones).
        aggregate: ``"concat"`` (paper default) or ``"weighted_sum"``: one learned
            weight per summary vector and for the CLS token, summed into a D-vector.
        normalize: L2-normalise the CLS token and each block's summary before the head
            (official code: on by default; the paper does not mention it, and a shortened
            CIFAR-10 run showed no clear difference, ``benchmarks/results/vqt_normalize.md``).
        query_dropout: dropout on the query tokens while training (official scripts: 0.1).
        compress: after training, select features with group lasso and retrain the head.
        keep_fraction: fraction of the features kept when compressing (paper: 0.7).
        group_lasso: group-lasso coefficient of the selection head (official code: 1e-4).
        pooled: the final token the head reads beside the summaries: ``"cls"`` (the paper's
            CLS) or ``"patch_mean"`` (the mean token; on text the masked mean, the pooling a
            sentence encoder such as all-MiniLM-L6-v2 was trained with).
    """

    num_queries: int = 1
    aggregate: str = "concat"
    normalize: bool = False
    query_dropout: float = 0.1
    compress: bool = False
    keep_fraction: float = 0.7
    group_lasso: float = 1e-4
    pooled: str = "cls"

    def __post_init__(self) -> None:
        """Refuse settings VQT cannot train with, when the spec is parsed (before any extraction)."""
        try:
            _check_config(self)
        except ValueError as err:
            raise ConfigError(str(err)) from None


@register
class VQT(Method):
    """Visual Query Tuning: learned query tokens summarise every block; a linear head reads them."""

    name = "vqt"
    config_class = VQTConfig
    modalities = ("image", "text")
    needs_backbone_modules = True
    trains_together = True
    summary = ("query-only tokens summarise every block (activations untouched); linear head on "
               "final CLS + summaries")
    train_defaults = TrainConfig(optimizer="adam", lr=0.05, weight_decay=1e-4, epochs=100,
                                 warmup_epochs=10, batch_size=128)
    grid = {"lr": [lr / 256 * 128 for lr in PAPER_LRS], "weight_decay": [1e-2, 1e-3, 1e-4, 0.0]}

    def __init__(self, config: VQTConfig, backbone: dict[str, Any], num_classes: int):
        _check_config(config)
        super().__init__(config, backbone, num_classes)
        depth, dim = backbone["depth"], backbone["dim"]
        self.queries = nn.Parameter(torch.zeros(depth, config.num_queries, dim))
        if config.aggregate == "weighted_sum":
            self.summary_weights = nn.Parameter(torch.ones(depth * config.num_queries + 1))
        self.dropout = nn.Dropout(config.query_dropout)
        width = self.feature_count()
        self.num_kept = max(1, round(config.keep_fraction * width)) if config.compress else width
        if config.compress:
            self.register_buffer("selected", torch.arange(self.num_kept))
        self.head = nn.Linear(self.num_kept, num_classes)
        self._read_through: list[nn.Module] | None = None     # a plain list: not submodules
        self._init_trainable()

    # -- description ------------------------------------------------------------------
    @classmethod
    def taps(cls, config: VQTConfig, backbone: dict[str, Any]) -> list[Tap]:
        """Every block's input tokens and the final CLS token (on text, ``[CLS]``/``<s>``), or the
        final mean token with ``pooled="patch_mean"`` (the padding mask is added by
        :meth:`~frozenlens.methods.base.Method.tap_keys`)."""
        return input_taps(backbone["depth"]) + [Tap("final", config.pooled)]

    @property
    def pooled_key(self) -> str:
        """Key of the final token the head reads (``final:cls`` unless ``pooled`` says otherwise)."""
        return f"final:{self.config.pooled}"

    def feature_count(self) -> int:
        """Width of the head's input before any compression."""
        dim = self.backbone_info["dim"]
        if self.config.aggregate == "weighted_sum":
            return dim
        return dim * (1 + self.backbone_info["depth"] * self.config.num_queries)

    def reset_trainable(self, seed: int) -> None:
        """Re-initialise queries, summary weights and head from ``seed``."""
        with seeded(seed):
            self._init_trainable()

    def _init_trainable(self) -> None:
        """Queries uniform in +-sqrt(6 / (3 * patch_area + D)) as in VPT/VQT; head as the official code."""
        bound = math.sqrt(6.0 / (3 * _patch_area(self.backbone_info) + self.backbone_info["dim"]))
        nn.init.uniform_(self.queries, -bound, bound)
        if self.config.aggregate == "weighted_sum":
            nn.init.ones_(self.summary_weights)
        _init_head(self.head)
        if self.config.compress:
            self.selected.copy_(torch.arange(self.num_kept))

    # -- forward ----------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits from raw taps: each block's input tokens and the final CLS token."""
        return self.classify(self.features(batch, normed=False))

    def read_through(self, blocks: Sequence[nn.Module] | None) -> None:
        """Pass the queries through ``blocks`` from now on, in training and by default in
        :meth:`summaries` (an adapted model's blocks, when VQT reads the features a PETL method
        adapts); None: the frozen backbone's own."""
        self._read_through = None if blocks is None else list(blocks)

    def query_blocks(self) -> Sequence[nn.Module]:
        """The blocks the queries pass through (see :meth:`read_through`)."""
        return backbone_blocks(self.frozen_backbone) if self._read_through is None else self._read_through

    def summaries(self, batch: dict[str, torch.Tensor], *, normed: bool,
                  blocks: Sequence[nn.Module] | None = None) -> list[torch.Tensor]:
        """Each block's query outputs ``(B, T, D)``.

        ``batch`` holds the block inputs under their tap keys, or (``normed``) their
        ``norm1`` under ``norm1.<l>`` as made by :meth:`normed_inputs`; on text also the
        padding mask under ``attention_mask`` (bool or float 0/1). ``blocks``: the
        blocks the queries pass through (default: :meth:`query_blocks`).
        """
        blocks = self.query_blocks() if blocks is None else blocks
        keys, mask = self._input_keys(normed), key_mask(batch)
        batch_size = batch[keys[0]].shape[0]
        outputs = []
        for layer, (block, key) in enumerate(zip(blocks, keys)):
            queries = self.queries[layer].unsqueeze(0)
            if self.training and self.dropout.p > 0:
                queries = self.dropout(queries.expand(batch_size, -1, -1))
            outputs.append(query_block(block, queries, batch[key], normed=normed, key_mask=mask))
        return outputs

    def features(self, batch: dict[str, torch.Tensor], *, normed: bool,
                 blocks: Sequence[nn.Module] | None = None) -> torch.Tensor:
        """Head input ``(B, F)``: final CLS and every block's summary, aggregated
        (``blocks`` as in :meth:`summaries`)."""
        cls_token, outputs = batch[self.pooled_key], self.summaries(batch, normed=normed, blocks=blocks)
        if self.config.aggregate == "weighted_sum":
            vectors = torch.cat([cls_token.unsqueeze(1)] + outputs, dim=1)       # (B, 1+L*T, D)
            vectors = F.normalize(vectors, dim=-1) if self.config.normalize else vectors
            return torch.einsum("bkd,k->bd", vectors, self.summary_weights)
        parts = [cls_token] + [o.flatten(1) for o in outputs]
        if self.config.normalize:
            parts = [F.normalize(p, dim=-1) for p in parts]
        return torch.cat(parts, dim=1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from head inputs (the kept ones when compressed)."""
        if self.config.compress:
            features = features[:, self.selected]
        return self.head(features)

    # -- training -----------------------------------------------------------------------
    def fit(self, data: Any, cfg: TrainConfig, *, val: Any = None,
            progress: bool = False) -> list[float]:
        """Train queries and head together; then, with ``compress``, select and retrain the head.

        ``data`` is a :class:`TapData` (from the store: ``norm1`` of every block input
        is computed once, then every epoch reads it) or any source with the same
        ``batches`` interface, e.g. :class:`benchmarks.live_taps.LiveTaps`. Streamed
        tap data (``TapData.streamed``) stays on disk: ``norm1`` is then applied per
        minibatch, as in the backbone, instead of to an in-memory copy of every input.
        """
        return self.fit_many([self], data, [cfg], val=val, progress=progress)[0]

    @classmethod
    def fit_many(cls, models: Sequence["VQT"], data: Any, cfgs: Sequence[TrainConfig], *,
                 val: Any = None, progress: bool = False) -> list[list[float]]:
        """:meth:`fit` for every model: ``norm1`` of the stored inputs computed once, and the
        models trained as one stack (:class:`~frozenlens.methods.vqt.stacked.StackedVQT`)
        when their configs match, else in lockstep on the same minibatches."""
        for model, cfg in zip(models, cfgs):
            model.reset_trainable(cfg.seed)
        if isinstance(data, TapData) and not data.streamed:
            source, views = models[0].normed_inputs(data), [NormedInputs(m) for m in models]
        else:
            source, views = data, list(models)
        losses = train_many(views, source, cfgs, progress=progress, desc=cls.name)
        for model, view, cfg, run in zip(models, views, cfgs, losses):
            if model.config.compress:
                run += model._compress(source, view, cfg, progress)
        return losses

    @torch.no_grad()
    def normed_inputs(self, data: TapData, chunk: int = 64) -> TapData:
        """``norm1`` of every block's input (``norm1.<l>``) plus the final CLS token (and on
        text the padding mask): what keys read (:meth:`BlockParts.key_input`).

        Kept in the precision of the stored taps (float16 by default: the same memory
        as the raw inputs, and faster to gather per batch than float32); computed in float32.
        A block whose keys read its input as it is (a post-norm text layer) shares the
        stored tensor instead of copying it.
        """
        features = {k: data.features[k] for k in (self.pooled_key, MASK_KEY) if k in data.features}
        for layer, (block, key) in enumerate(zip(self.query_blocks(), self._input_keys(False))):
            parts, raw = block_parts(block), data.features[key]
            features[NORMED_PREFIX + str(layer)] = raw if parts.key_input_is_identity else self._key_input(
                parts, raw, chunk)
        return TapData(features, data.labels, data.num_classes)

    def _key_input(self, parts: BlockParts, raw: torch.Tensor, chunk: int) -> torch.Tensor:
        """``parts.key_input`` of ``raw``, chunk by chunk in float32 on the backbone's device,
        kept in ``raw``'s precision on the CPU."""
        device = self.frozen_backbone.device
        out = torch.empty(raw.shape, dtype=raw.dtype)
        for start in range(0, raw.shape[0], chunk):
            normed = parts.key_input(raw[start:start + chunk].to(device).float())
            out[start:start + chunk] = normed.to(out.dtype).cpu()
        return out

    def _compress(self, source: Any, model: nn.Module, cfg: TrainConfig, progress: bool) -> list[float]:
        """Head2Toe's two stages on the frozen summaries (official code: lr halved in both)."""
        features = TapData({"features": self._feature_matrix(source, model, cfg)}, source.labels,
                           source.num_classes)
        head_cfg = cfg.updated(lr=cfg.lr * 0.5)
        selector = _FeatureHead(nn.Linear(self.feature_count(), self.num_classes), self.config.group_lasso)
        with seeded(cfg.seed):
            _init_head(selector.linear)
        losses = train(selector, features, head_cfg, progress=progress, desc=f"{self.name} select")
        self.selected.copy_(strongest_features(selector.linear.weight, self.num_kept))
        _init_head(self.head)
        retrain = _FeatureHead(self.head, 0.0, self.selected)
        return losses + train(retrain, features, head_cfg, progress=progress, desc=f"{self.name} retrain")

    @torch.no_grad()
    def _feature_matrix(self, source: Any, model: nn.Module, cfg: TrainConfig) -> torch.Tensor:
        """Head inputs of every example (eval mode: no query dropout)."""
        model.eval()
        normed = isinstance(model, NormedInputs)
        rows = [self.features(batch, normed=normed).cpu()
                for batch, _ in source.batches(cfg.batch_size, device=cfg.device)]
        return torch.cat(rows)

    def _input_keys(self, normed: bool) -> list[str]:
        depth = self.backbone_info["depth"]
        if normed:
            return [NORMED_PREFIX + str(layer) for layer in range(depth)]
        return [t.key for t in input_taps(depth)]

    def bind(self, backbone: FrozenBackbone | TextBackbone) -> None:
        """Bind the frozen backbone (a ViT or a BERT-family text encoder); its blocks must support
        query-only tokens."""
        for block in backbone_blocks(backbone):
            check_block(block)
        super().bind(backbone)


class NormedInputs(nn.Module):
    """Training view of VQT on precomputed ``norm1`` of the block inputs (see :meth:`VQT.normed_inputs`)."""

    def __init__(self, method: VQT):
        super().__init__()
        self.method = method

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.method.classify(self.method.features(batch, normed=True))

    @classmethod
    def stack(cls, views: Sequence["NormedInputs"]) -> StackedVQT | None:
        """The models of ``views`` as one :class:`StackedVQT`, when their configs match."""
        methods = [v.method for v in views]
        if not can_stack(methods):
            return None
        return StackedVQT(methods, methods[0].pooled_key, methods[0]._input_keys(True))


def _check_config(config: VQTConfig) -> None:
    if config.num_queries < 1:
        raise ValueError(f"num_queries={config.num_queries}: must be at least 1")
    if config.pooled not in POOLINGS:
        raise ValueError(f"pooled={config.pooled!r}: use one of {', '.join(POOLINGS)}")
    if config.aggregate not in AGGREGATES:
        raise ValueError(f"aggregate={config.aggregate!r}: use one of {', '.join(AGGREGATES)}")
    if not 0 < config.keep_fraction <= 1:
        raise ValueError(f"keep_fraction={config.keep_fraction}: must be in (0, 1]")
    if not 0 <= config.query_dropout < 1:
        raise ValueError(f"query_dropout={config.query_dropout}: must be in [0, 1)")
