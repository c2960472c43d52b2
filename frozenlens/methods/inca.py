"""InCA and Open-InCA (Dukler et al., 2023): cross-attention adapters on stored layer tokens.

An InCA adapter reads one activation map (the tokens of one block): learned
query tokens cross-attend to the layer-normed tokens with multi-head attention,
the query outputs are layer-normed and a head maps them to logits. One adapter
per tapped layer is trained *in parallel* from the same stored pass: every
adapter's parameters are stacked along a leading *slot* axis and all slots run
in the same batched tensor operations. The loss is the sum of the per-slot
cross-entropies, so each adapter trains as if it were alone. The top-scoring
slot on validation data is kept (or the top few, whose logits are averaged).

Open-InCA has one query per class and reads the logit of class c from query
c's output alone, so classes can be added later (:meth:`OpenInCA.add_classes`)
without changing the logits of the old ones.

On a text backbone every batch also holds the padding mask
(:func:`~frozenlens.methods.layers.token_mask`): padded tokens get zero attention weight in
every adapter, so logits do not depend on how much a text was padded.

``docs/methods/inca.md`` describes how this reads the paper and where it deviates.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from frozenlens.backbones.taps import Tap, block_tap
from frozenlens.errors import FrozenlensError
from frozenlens.methods.base import Method, register
from frozenlens.methods.layers import token_mask
from frozenlens.train.data import TapData
from frozenlens.train.stacked import train_many
from frozenlens.train.trainer import TrainConfig, train

LayerSpec = str | tuple[int, ...]

INCA_GRID = {"lr": [3e-3, 1e-3, 3e-4], "weight_decay": [1e-2, 1e-4]}
"""Search space of the cross-attention adapters (AdamW)."""


# -- configuration ------------------------------------------------------------------------


@dataclass
class ParallelAdapterConfig:
    """Settings shared by InCA and Open-InCA.

    Attributes:
        layers: blocks whose output tokens get an adapter: ``"all"``, or block
            indices (a tuple, or a string such as ``"3+7+11"``; negative counts
            from the last block). After fitting it holds the kept blocks, best first.
        num_heads: attention heads of each adapter; 0 takes the backbone's.
        ensemble_top_k: adapters kept after selection; their logits are averaged.
        holdout_fraction: share of the training data held out for selection when
            ``fit`` gets no validation data (the protocol's final runs).
        refit: after selecting on a holdout, retrain the kept adapters on all the data.
    """

    layers: LayerSpec = "all"
    num_heads: int = 0
    ensemble_top_k: int = 1
    holdout_fraction: float = 0.2
    refit: bool = True


@dataclass
class InCAConfig(ParallelAdapterConfig):
    """InCA settings (see :class:`ParallelAdapterConfig` for the shared ones).

    Attributes:
        num_queries: learned query tokens per adapter; their outputs are concatenated.
        head_hidden: 0 for a linear head, else the hidden width of a GELU MLP head.
    """

    num_queries: int = 1
    head_hidden: int = 0


@dataclass
class OpenInCAConfig(ParallelAdapterConfig):
    """Open-InCA settings (see :class:`ParallelAdapterConfig` for the shared ones).

    Attributes:
        frozen_classes: the first classes whose queries and readouts, and the shared
            attention, no longer train; set by :meth:`OpenInCA.add_classes`.
    """

    frozen_classes: int = 0


def resolve_layers(spec: LayerSpec | Sequence[int], depth: int) -> tuple[int, ...]:
    """Block indices named by ``spec`` (``"all"``, ``"3+7"``, ``"-1"``, or a sequence of ints)."""
    if isinstance(spec, str):
        if spec.strip().lower() == "all":
            return tuple(range(depth))
        try:
            values = [int(part) for part in re.split(r"[+,\s]+", spec.strip()) if part]
        except ValueError as err:
            raise FrozenlensError(f"layers={spec!r}: use 'all' or block indices like '3+7+11'") from err
    else:
        values = [int(v) for v in spec]
    layers = tuple(v % depth if -depth <= v < 0 else v for v in values)
    if not layers or len(set(layers)) != len(layers) or not all(0 <= v < depth for v in layers):
        raise FrozenlensError(f"layers={spec!r}: need distinct block indices in 0..{depth - 1}")
    return layers


# -- stacked modules: every parameter has a leading slot axis (one slot per adapter) -------


class StackedCrossAttention(nn.Module):
    """Multi-head cross-attention of ``slots`` independent adapters, batched over slots.

    Slot ``l`` computes, for learned queries ``q`` and the tokens ``x`` of its layer,
    ``LN_out(W_o MHA(W_q q, W_k LN(x), W_v LN(x)) + b_o)``: a standard multi-head
    attention with its own LayerNorms. Because the queries are few, the key
    projection is applied to the queries (``(W_k^T q) . x`` instead of ``q . (W_k x)``)
    and the value projection after attention-pooling (``W_v (sum_t a_t x_t)``):
    the same result, without projecting every token. A padding mask ``(B, T)`` (text
    backbones; True = real token) gives padded tokens zero attention weight.
    """

    def __init__(self, slots: int, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise FrozenlensError(f"num_heads={num_heads} must divide the token width {dim}")
        self.num_heads, self.eps = num_heads, eps
        self.norm_weight, self.norm_bias = _param(slots, dim), _param(slots, dim)
        self.q_weight, self.q_bias = _param(slots, dim, dim), _param(slots, dim)
        self.k_weight = _param(slots, dim, dim)  # a key bias would cancel in the softmax
        self.v_weight, self.v_bias = _param(slots, dim, dim), _param(slots, dim)
        self.out_weight, self.out_bias = _param(slots, dim, dim), _param(slots, dim)
        self.out_norm_weight, self.out_norm_bias = _param(slots, dim), _param(slots, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LayerNorms to identity, projections Xavier-uniform, biases zero."""
        bound = math.sqrt(3.0 / self.q_weight.shape[-1])
        for weight in (self.q_weight, self.k_weight, self.v_weight, self.out_weight):
            nn.init.uniform_(weight, -bound, bound)
        for ones in (self.norm_weight, self.out_norm_weight):
            nn.init.ones_(ones)
        for zeros in (self.norm_bias, self.q_bias, self.v_bias, self.out_bias, self.out_norm_bias):
            nn.init.zeros_(zeros)

    def normalize(self, tokens: torch.Tensor) -> torch.Tensor:
        """The parameter-free part of the input LayerNorm, ``(L, B, T, D)``; shared by query groups."""
        return F.layer_norm(tokens, tokens.shape[-1:], eps=self.eps)

    def attend(self, normed: torch.Tensor, queries: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs ``(L, B, M, D)`` of queries ``(L, M, D)`` attending to ``normed`` tokens, only to
        the real ones when a padding ``mask`` ``(B, T)`` is given."""
        slots, _, _, dim = normed.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = torch.baddbmm(self.q_bias.unsqueeze(1), queries, self.q_weight.transpose(1, 2))
        q = q.view(slots, -1, heads, head_dim)
        keys = torch.einsum("lmhe,lhed->lmhd", q, self.k_weight.view(slots, heads, head_dim, dim))
        keys = keys * (self.norm_weight[:, None, None, :] / math.sqrt(head_dim))
        scores = torch.einsum("lbtd,lmhd->lbmht", normed, keys)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))   # (B, 1, 1, T)
        weights = scores.softmax(dim=-1)
        pooled = torch.einsum("lbmht,lbtd->lbmhd", weights, normed)
        pooled = pooled * self.norm_weight[:, None, None, None] + self.norm_bias[:, None, None, None]
        values = torch.einsum("lbmhd,lhed->lbmhe", pooled, self.v_weight.view(slots, heads, head_dim, dim))
        values = values.flatten(-2) + self.v_bias[:, None, None]
        out = torch.einsum("lbmf,lef->lbme", values, self.out_weight) + self.out_bias[:, None, None]
        out = F.layer_norm(out, (dim,), eps=self.eps)
        return out * self.out_norm_weight[:, None, None] + self.out_norm_bias[:, None, None]


class QueryTokens(nn.Module):
    """``count`` learned query tokens per slot, ``(L, M, D)``."""

    def __init__(self, slots: int, count: int, dim: int):
        super().__init__()
        self.weight = _param(slots, count, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated normal, std 0.02 (as ViT class tokens)."""
        nn.init.trunc_normal_(self.weight, std=0.02)


class StackedLinear(nn.Module):
    """One linear map per slot: ``(L, B, F) -> (L, B, out)``."""

    def __init__(self, slots: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = _param(slots, out_features, in_features)
        self.bias = _param(slots, out_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform in +-1/sqrt(in_features), as ``nn.Linear``."""
        bound = 1.0 / math.sqrt(self.weight.shape[-1])
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


class ClassSlots(nn.Module):
    """Open-InCA's per-class parameters: a query and a readout ``(w_c, b_c)`` per class and slot.

    The logit of class ``c`` is ``w_c . y_c + b_c`` with ``y_c`` the output of query ``c`` alone.
    """

    def __init__(self, slots: int, classes: int, dim: int):
        super().__init__()
        self.queries = _param(slots, classes, dim)
        self.weight = _param(slots, classes, dim)
        self.bias = _param(slots, classes)
        self.reset_parameters()

    @property
    def count(self) -> int:
        """Number of classes held."""
        return int(self.queries.shape[1])

    def reset_parameters(self) -> None:
        """Queries truncated normal (std 0.02), readouts uniform in +-1/sqrt(D)."""
        nn.init.trunc_normal_(self.queries, std=0.02)
        bound = 1.0 / math.sqrt(self.weight.shape[-1])
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def readout(self, outputs: torch.Tensor) -> torch.Tensor:
        """Logits ``(L, B, C)`` from the class queries' outputs ``(L, B, C, D)``."""
        return torch.einsum("lbcd,lcd->lbc", outputs, self.weight) + self.bias[:, None]

    @classmethod
    def join(cls, first: "ClassSlots", second: "ClassSlots") -> "ClassSlots":
        """The classes of ``first`` followed by those of ``second``."""
        if first.count == 0:
            return second
        joined = cls(first.queries.shape[0], 0, first.queries.shape[-1])
        for name in ("queries", "weight", "bias"):
            value = torch.cat([getattr(first, name).detach(), getattr(second, name).detach()], dim=1)
            setattr(joined, name, nn.Parameter(value))
        return joined.to(first.queries.device)


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape))


def keep_slots(module: nn.Module, index: Sequence[int]) -> None:
    """Keep only slots ``index`` (in that order) of every parameter of ``module``, in place."""
    rows = torch.as_tensor(list(index), dtype=torch.long)
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            kept = param.detach()[rows.to(param.device)].clone()
            setattr(sub, name, nn.Parameter(kept, requires_grad=param.requires_grad))


# -- training every slot at once ------------------------------------------------------------


def slot_losses(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of each slot, ``(L,)``, from logits ``(L, B, C)``."""
    target = labels[:, None].expand(-1, logits.shape[0])
    per_example = F.cross_entropy(logits.permute(1, 2, 0), target, reduction="none",
                                  label_smoothing=label_smoothing)
    return per_example.mean(0)


def slot_objective(model: "ParallelAdapters", features: dict[str, torch.Tensor], labels: torch.Tensor,
                   label_smoothing: float) -> tuple[torch.Tensor, float]:
    """The sum of the slots' losses (to minimise) and their mean (to report)."""
    per_slot = slot_losses(model.slot_logits(features), labels, label_smoothing)
    return per_slot.sum(), float(per_slot.detach().mean())


def train_parallel(model: "ParallelAdapters", data: TapData, cfg: TrainConfig, *,
                   progress: bool = False, desc: str = "training") -> list[float]:
    """Train every slot of ``model`` on ``data`` with the shared trainer; the loss is the sum of
    the slot losses.

    Adam(W) updates each parameter from its own gradient, and no slot's loss
    reaches another slot's parameters, so each slot follows exactly the path it
    would follow alone (same batches, same schedule). Returns the mean slot loss
    of each epoch.
    """
    return train(model, data, cfg, progress=progress, desc=desc, objective=slot_objective)


@torch.no_grad()
def slot_scores(model: "ParallelAdapters", data: TapData, batch_size: int = 128,
                device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy and mean cross-entropy of every slot on ``data``, each ``(L,)``."""
    model.to(device).eval()
    correct, loss = 0.0, 0.0
    for features, labels in data.batches(batch_size, device=device):
        logits = model.slot_logits(features)
        correct = correct + (logits.argmax(-1) == labels).sum(-1).double().cpu()
        loss = loss + slot_losses(logits, labels).double().cpu() * len(labels)
    return correct / len(data), loss / len(data)


# -- the methods ----------------------------------------------------------------------------


QueryGroup = tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


class ParallelAdapters(Method):
    """Cross-attention adapters on the tokens of several blocks, trained together, then selected.

    Subclasses provide :meth:`query_groups`: query tokens ``(L, M, D)`` and the readout
    turning their outputs ``(L, B, M, D)`` into logits ``(L, B, C)``. Groups are
    computed separately and their logits concatenated along the class axis. Works on ViTs and
    on text encoders (padded tokens masked in every adapter's attention).
    """

    modalities = ("image", "text")
    config_class = ParallelAdapterConfig
    trains_together = True
    train_defaults = TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=1e-4, epochs=50,
                                 warmup_epochs=5, batch_size=64)
    grid = INCA_GRID

    def __init__(self, config: ParallelAdapterConfig, backbone: dict[str, Any], num_classes: int):
        super().__init__(config, backbone, num_classes)
        if config.ensemble_top_k < 1:
            raise FrozenlensError(f"ensemble_top_k={config.ensemble_top_k}: must be at least 1")
        if not 0 < config.holdout_fraction < 1:
            raise FrozenlensError(f"holdout_fraction={config.holdout_fraction}: must be in (0, 1)")
        self.dim = int(backbone["dim"])
        self.attn = StackedCrossAttention(self.num_slots, self.dim, config.num_heads or backbone["num_heads"])
        self.register_buffer("layer_accuracy", torch.full((backbone["depth"],), NOT_MEASURED))

    # -- what is read -----------------------------------------------------------------------
    @classmethod
    def taps(cls, config: ParallelAdapterConfig, backbone: dict[str, Any]) -> list[Tap]:
        return [block_tap(i, "tokens") for i in resolve_layers(config.layers, backbone["depth"])]

    @property
    def layers(self) -> tuple[int, ...]:
        """Block read by each slot, in slot order."""
        return resolve_layers(self.config.layers, self.backbone_info["depth"])

    @property
    def token_keys(self) -> list[str]:
        """Keys of the token maps read, in slot order (:meth:`tap_keys` without the padding mask)."""
        return [tap.key for tap in self.taps(self.config, self.backbone_info)]

    @property
    def num_slots(self) -> int:
        """Adapters held."""
        return len(self.layers)

    @property
    def layer_accuracies(self) -> dict[int, float]:
        """Validation accuracy of each block's adapter from the last selection (block -> accuracy)."""
        return {i: float(v) for i, v in enumerate(self.layer_accuracy.tolist()) if v != NOT_MEASURED}

    def choices(self) -> dict[str, Any]:
        """The blocks kept by the last selection, best first (empty when nothing was selected)."""
        return {"layers": list(self.layers)} if self.layer_accuracies else {}

    # -- forward ------------------------------------------------------------------------------
    def query_groups(self) -> list[QueryGroup]:
        """(queries, readout) pairs; see the class docstring."""
        raise NotImplementedError

    def slot_logits(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of every slot, ``(L, B, C)``."""
        normed = self.attn.normalize(torch.stack([features[k] for k in self.token_keys]))
        mask = token_mask(features)
        return torch.cat([readout(self.attn.attend(normed, queries, mask))
                          for queries, readout in self.query_groups()], dim=-1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean of the slots' logits (one slot after a top-1 selection)."""
        return self.slot_logits(features).mean(0)

    # -- fitting ------------------------------------------------------------------------------
    def selects(self) -> bool:
        """Whether fitting chooses among slots (more slots than ``ensemble_top_k``)."""
        return self.num_slots > self.config.ensemble_top_k

    def fit(self, data: TapData, cfg: TrainConfig, *, val: TapData | None = None,
            progress: bool = False) -> list[float]:
        """Train all slots in parallel, keep the best on ``val`` (else on a holdout), refit.

        Without ``val`` the slots train on ``1 - holdout_fraction`` of ``data``, are
        ranked on the rest, and the kept ones are retrained on all of ``data`` when
        ``refit`` is set.
        """
        keys = self.tap_keys()
        data = data.subset(keys)
        if not self.selects():
            self.reset_trainable(cfg.seed)
            return train_parallel(self, data, cfg, progress=progress, desc=self.name)
        train_on, rank_on = ((data, val.subset(keys)) if val is not None
                             else data.holdout(self.config.holdout_fraction, seed=cfg.seed))
        self.reset_trainable(cfg.seed)
        losses = train_parallel(self, train_on, cfg, progress=progress, desc=f"{self.name} parallel")
        self.select(rank_on, cfg)
        if val is None and self.config.refit:
            self.reset_trainable(cfg.seed)
            losses += train_parallel(self, data, cfg, progress=progress, desc=f"{self.name} refit")
        return losses

    @classmethod
    def fit_many(cls, models: Sequence["ParallelAdapters"], data: TapData, cfgs: Sequence[TrainConfig], *,
                 val: TapData | None = None, progress: bool = False) -> list[list[float]]:
        """Models that train on all of ``data`` (no selection, or selection on ``val``) train in
        lockstep: each minibatch of block tokens read once for all. Models that rank on a seeded
        holdout of ``data`` (its split differs per seed) fit one at a time."""
        if any(m.selects() for m in models) and val is None:
            return [m.fit(data, c, val=val, progress=progress) for m, c in zip(models, cfgs)]
        keys = models[0].tap_keys()
        shared = data.subset(keys)
        for model, cfg in zip(models, cfgs):
            model.reset_trainable(cfg.seed)
        losses = train_many(models, shared, cfgs, progress=progress, desc=cls.name, objective=slot_objective)
        for model, cfg in zip(models, cfgs):
            if model.selects():
                model.select(val.subset(keys), cfg)
        return losses

    def select(self, data: TapData, cfg: TrainConfig) -> list[int]:
        """Rank slots on ``data`` (accuracy, then lower loss), keep the top ``ensemble_top_k``.

        Records every slot's accuracy in ``layer_accuracy`` and rewrites
        ``config.layers`` to the kept blocks, best first; returns them.
        """
        accuracy, loss = slot_scores(self, data, cfg.batch_size, cfg.device)
        order = sorted(range(self.num_slots), key=lambda i: (-float(accuracy[i]), float(loss[i])))
        self.layer_accuracy[list(self.layers)] = accuracy.to(self.layer_accuracy)
        self.keep(order[: self.config.ensemble_top_k])
        return list(self.config.layers)

    def keep(self, slots: Sequence[int]) -> None:
        """Keep only adapters ``slots`` (in that order); ``config.layers`` becomes their blocks."""
        layers = self.layers
        keep_slots(self, slots)
        self.config = dataclasses.replace(self.config, layers=tuple(layers[i] for i in slots))


NOT_MEASURED = -1.0
"""Accuracy buffer value of a candidate that was not evaluated (adapters hold no NaN)."""

@register
class InCA(ParallelAdapters):
    """InCA: learned queries cross-attend to one block's tokens; LayerNorm; linear (or MLP) head."""

    name = "inca"
    config_class = InCAConfig
    summary = ("cross-attention adapter per block (learned queries over its tokens), "
               "all trained in parallel, best block kept on validation")

    def __init__(self, config: InCAConfig, backbone: dict[str, Any], num_classes: int):
        super().__init__(config, backbone, num_classes)
        if config.num_queries < 1:
            raise FrozenlensError(f"num_queries={config.num_queries}: must be at least 1")
        self.queries = QueryTokens(self.num_slots, config.num_queries, self.dim)
        self.head = _make_head(self.num_slots, config.num_queries * self.dim, config.head_hidden,
                               num_classes)

    def query_groups(self) -> list[QueryGroup]:
        return [(self.queries.weight, lambda outputs: self.head(outputs.flatten(2)))]


def _make_head(slots: int, in_features: int, hidden: int, classes: int) -> nn.Module:
    if hidden <= 0:
        return StackedLinear(slots, in_features, classes)
    return nn.Sequential(StackedLinear(slots, in_features, hidden), nn.GELU(),
                         StackedLinear(slots, hidden, classes))


@register
class OpenInCA(ParallelAdapters):
    """Open-InCA: one query per class, each class's logit read from its own query's output."""

    name = "open-inca"
    config_class = OpenInCAConfig
    summary = ("InCA with one query and readout per class; add_classes() extends it "
               "without changing old classes' logits")

    def __init__(self, config: OpenInCAConfig, backbone: dict[str, Any], num_classes: int):
        super().__init__(config, backbone, num_classes)
        if not 0 <= config.frozen_classes <= num_classes:
            raise FrozenlensError(f"frozen_classes={config.frozen_classes}: must be in 0..{num_classes}")
        self.old = ClassSlots(self.num_slots, config.frozen_classes, self.dim)
        self.new = ClassSlots(self.num_slots, num_classes - config.frozen_classes, self.dim)
        if config.frozen_classes:
            self._freeze_all_but_new()

    def query_groups(self) -> list[QueryGroup]:
        return [(group.queries, group.readout) for group in (self.old, self.new) if group.count]

    def selects(self) -> bool:
        """No selection once classes are frozen: the shared attention (and its block) is fixed."""
        return self.config.frozen_classes == 0 and super().selects()

    def add_classes(self, n_new: int) -> None:
        """Append ``n_new`` classes; freeze every existing parameter.

        The old classes keep their queries and readouts, computed by the same
        operations as before, so their logits do not change (bit for bit). A
        following :meth:`fit` trains only the new classes' queries and readouts.
        """
        if n_new < 1:
            raise FrozenlensError(f"add_classes({n_new}): add at least one class")
        self.old = ClassSlots.join(self.old, self.new)
        self.new = ClassSlots(self.num_slots, n_new, self.dim).to(self.old.queries.device)
        self.num_classes += n_new
        self.config = dataclasses.replace(self.config, frozen_classes=self.old.count)
        self._freeze_all_but_new()

    def _freeze_all_but_new(self) -> None:
        for module in (self.attn, self.old):
            for param in module.parameters():
                param.requires_grad_(False)
