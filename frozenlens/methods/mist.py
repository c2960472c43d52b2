"""MIST (Minimal Interaction Separated Tuning) and its baseline LAST, trained from stored taps.

MIST reads one token map per image, the gather

    g_k = embed + block_1 + ... + block_k        (paper's numbering; ours is block.0 .. block.{k-1})

summed in float32 from the stored outputs of every block, and trains a
low-rank attention edge network (LAE) on it: ``lae_blocks`` blocks of
``x + W_o Attn(W_q LN(x), W_k LN(x), W_v LN(x))`` whose query/key/value width is
``qkv_dim`` (16), then a final LayerNorm and a linear head on the class token.
The depth ``k`` is chosen on validation data among ``{N/3, 2N/3, N}``
(:func:`gather_candidates`) when ``gather_depth`` is 0 (the default): the store
holds every block once, so every candidate reads the same stored pass. g_k does
not depend on anything learned, so a fit computes it once and trains on it.

LAST (low-rank attention side-tuning) is the side network MIST is measured
against: one such block per backbone block, side block ``i`` taking the previous
side output plus block ``i``'s output tokens (MIST's Eq. 2), starting from the
embedding output; the same head reads the last side output.

On a text backbone (``modalities`` includes ``"text"``) every batch also holds the padding
mask (:func:`~frozenlens.methods.layers.token_mask`): padded tokens are never keys of an
attention block and never enter a mean-pooled head, so logits do not depend on how much a
text was padded. The gather itself needs no mask: padded rows of the stored maps are zero.

``docs/methods/mist.md`` gives the defaults, the parameter counts next to the
paper's, the measured costs, and where this differs from the papers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from frozenlens.backbones.taps import MethodSite, Tap, block_tap, register_site
from frozenlens.errors import FrozenlensError
from frozenlens.methods.base import Method, register
from frozenlens.methods.layers import mask_keys, masked_token_mean, token_mask
from frozenlens.methods.selection import fit_selecting
from frozenlens.train.data import TapData
from frozenlens.train.stacked import train_many
from frozenlens.train.trainer import TrainConfig, count_trainable, seeded

EMBED_KEY = "embed:tokens"
POOLS = ("cls", "mean")
SIDE_TRAIN_DEFAULTS = TrainConfig(optimizer="adam", lr=1e-3, weight_decay=1e-4, epochs=100,
                                  warmup_epochs=10, batch_size=32)
"""The paper's recipe: Adam, batch 32, cosine schedule (epochs and warm-up: the usual VTAB 100/10)."""
SIDE_GRID = {"lr": [3e-3, 1e-3, 3e-4], "weight_decay": [1e-4, 0.0]}
"""VTAB search space: the paper selects the learning rate on val; we add weight decay on/off."""
VIT_B16 = {"name": "vit-b/16 (description only)", "weights_hash": "-", "dim": 768, "depth": 12,
           "num_heads": 12, "num_prefix_tokens": 1, "grid_size": [14, 14]}
"""ViT-B/16 at 224 px (197 tokens), the paper's backbone: for parameter counts without weights."""


# -- the gather ---------------------------------------------------------------------------


def gather_candidates(depth: int) -> list[int]:
    """The paper's candidate gather depths ``{N/3, 2N/3, N}``, rounded (12 -> [4, 8, 12])."""
    if depth < 1:
        raise FrozenlensError(f"depth={depth}: a backbone has at least one block")
    return sorted({max(1, round(depth / 3)), max(1, round(2 * depth / 3)), depth})


def allowed_gather_depths(depth: int) -> range:
    """The k a backbone of ``depth`` blocks allows: 1..depth."""
    return range(1, depth + 1)


def gather_taps(depth: int, k: int) -> list[Tap]:
    """Stored taps that g_k sums: ``embed:tokens`` and ``block.{i}:tokens`` for i in 0..k-1."""
    if k not in allowed_gather_depths(depth):
        raise FrozenlensError(f"gather depth k={k}: this backbone has {depth} blocks, so k must be "
                              f"in 1..{depth} (or 0 to choose among {gather_candidates(depth)})")
    return [Tap("embed", "tokens")] + [block_tap(i, "tokens") for i in range(k)]


def gather_key(k: int) -> str:
    """Tap key of g_k itself (a ``gather.<k>`` tap, :data:`GATHER_SITE`), as stores and servers name it."""
    return f"gather.{k}:tokens"


def gather(features: Mapping[str, torch.Tensor], k: int) -> torch.Tensor:
    """g_k = embedding output + outputs of blocks 0..k-1, ``(B, T, D)`` float32.

    Summed in float32 in block order, whatever dtype the taps are stored in; the
    same function computes the ``gather.<k>`` tap in
    :meth:`FrozenBackbone.forward_taps` (:data:`GATHER_SITE`). A precomputed
    ``gather.<k>:tokens`` entry is used as it is.
    """
    if gather_key(k) in features:
        return features[gather_key(k)].float()
    keys = [EMBED_KEY] + [block_tap(i).key for i in range(k)]
    missing = [key for key in keys if key not in features]
    if missing:
        raise FrozenlensError(f"gather g_{k} needs taps {', '.join(missing)}: extract them with "
                              f"gather_taps(depth, {k}) or pass {gather_key(k)}")
    total = features[keys[0]].float()
    for key in keys[1:]:
        total = total + features[key].float()
    return total


GATHER_SITE = register_site(MethodSite(
    prefix="gather", method="mist", valid_k=allowed_gather_depths, inputs=gather_taps, combine=gather,
    meaning="MIST's gather g_k, embed plus the outputs of blocks 0..k-1 summed in float32"))
"""The ``gather.<k>`` tap site: any tap key ``gather.<k>:<reduce>`` is MIST's g_k, computed in
the backbone pass from :func:`gather_taps` by :func:`gather` (so stores, adapters and the feature
server all name it ``gather.<k>:tokens``)."""


def gather_depths_in(keys: Iterable[str]) -> list[int]:
    """The k of every g_k (``gather.<k>:tokens``) among tap ``keys``, e.g. a feature server's
    ``info()["features"]``, ascending."""
    sites = [(tap.reduce, tap.method_site) for tap in map(Tap.parse, keys)]
    return sorted(site[1] for reduce, site in sites if reduce == "tokens" and site and site[0] is GATHER_SITE)


def gathered_data(data: TapData, k: int, chunk: int = 128) -> TapData:
    """``data`` with g_k computed once (key ``gather.<k>:tokens``, float32) instead of its block taps,
    and the padding mask (text backbones) kept beside it."""
    first = gather({key: value[:1] for key, value in data.features.items()}, k)
    out = torch.empty((len(data), *first.shape[1:]), dtype=torch.float32)
    for start in range(0, len(data), chunk):
        part = {key: value[start:start + chunk] for key, value in data.features.items()}
        out[start:start + chunk] = gather(part, k)
    mask = {key: data.features[key] for key in mask_keys(data.features)}
    return TapData({gather_key(k): out, **mask}, data.labels, data.num_classes)


# -- the edge network -----------------------------------------------------------------------


class LowRankAttentionBlock(nn.Module):
    """``x + W_o MHA(W_q LN(x), W_k LN(x), W_v LN(x))`` with query/key/value width ``qkv_dim``.

    The low-rank attention block of LAST and of MIST's LAE: D -> ``qkv_dim`` for
    queries, keys and values, scaled dot-product attention over all tokens in
    ``num_heads`` heads of ``qkv_dim / num_heads``, ``qkv_dim`` -> D, residual.
    With a padding mask ``(B, T)`` (True = real token) padded tokens are no query's keys;
    their own rows are still computed, but nothing downstream reads them.
    """

    def __init__(self, dim: int, qkv_dim: int = 16, num_heads: int = 1, eps: float = 1e-6):
        super().__init__()
        if qkv_dim < 1 or num_heads < 1 or qkv_dim % num_heads:
            raise FrozenlensError(f"qkv_dim={qkv_dim}, heads={num_heads}: the heads must divide "
                                  "the query/key/value width")
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * qkv_dim)
        self.proj = nn.Linear(qkv_dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        keys = None if mask is None else mask[:, None, None, :]   # (B, 1, 1, T): keys only
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=keys)
        return x + self.proj(attended.transpose(1, 2).reshape(batch, tokens, -1))


class TokenHead(nn.Module):
    """Final LayerNorm, then a linear classifier on the class token (or the mean token: the
    mean over real tokens when a padding mask is given)."""

    def __init__(self, dim: int, num_classes: int, pool: str, eps: float = 1e-6):
        super().__init__()
        self.pool = pool
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        normed = self.norm(tokens)
        return self.fc(normed[:, 0] if self.pool == "cls" else masked_token_mean(normed, mask))


def init_side_network(module: nn.Module) -> None:
    """timm ViT initialisation: linear weights truncated normal (std 0.02), biases 0, LayerNorms identity."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.trunc_normal_(sub.weight, std=0.02)
            nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


# -- the methods ----------------------------------------------------------------------------


@dataclass
class SideConfig:
    """Settings of the low-rank attention blocks and the head (shared by MIST and LAST).

    Attributes:
        qkv_dim: query/key/value width of every attention block (paper: 16 for D=768).
        heads: attention heads sharing that width.
        pool: what the head reads after the final LayerNorm: ``"cls"`` (class token,
            ``[CLS]`` on a text backbone) or ``"mean"`` (mean of all tokens, padding excluded,
            for backbones without a class token).
    """

    qkv_dim: int = 16
    heads: int = 1
    pool: str = "cls"


@dataclass
class MISTConfig(SideConfig):
    """MIST settings (see :class:`SideConfig` for the block and head ones).

    Attributes:
        gather_depth: k, the number of blocks summed into g_k; 0 chooses it on
            validation data among :func:`gather_candidates` (after fitting it holds
            the chosen k).
        lae_blocks: low-rank attention blocks of the edge network (paper: 4).
        holdout_fraction: share of the training data held out to choose k when
            ``fit`` gets no validation data (the protocol's final runs).
        refit: after choosing k on a holdout, retrain on all the data.
        gathered: read g_k as one precomputed tap, ``gather.<k>:tokens`` (what the
            feature server sends), instead of summing the stored block taps.
    """

    gather_depth: int = 0
    lae_blocks: int = 4
    holdout_fraction: float = 0.2
    refit: bool = True
    gathered: bool = False


class SideNetwork(Method):
    """Low-rank attention blocks on stored token maps, then :class:`TokenHead` (MIST, LAST).

    Works on ViTs and on text encoders; :meth:`classify` masks padding (see the module docstring).
    """

    modalities = ("image", "text")
    config_class = SideConfig
    train_defaults = SIDE_TRAIN_DEFAULTS
    grid = SIDE_GRID

    def __init__(self, config: SideConfig, backbone: dict[str, Any], num_classes: int, blocks: int):
        super().__init__(config, backbone, num_classes)
        if config.pool not in POOLS:
            raise FrozenlensError(f"pool={config.pool!r}: use one of {', '.join(POOLS)}")
        if config.pool == "cls" and backbone.get("num_prefix_tokens", 1) < 1:
            raise FrozenlensError("pool='cls': this backbone has no class token; use pool=mean")
        dim = int(backbone["dim"])
        self.blocks = nn.ModuleList(LowRankAttentionBlock(dim, config.qkv_dim, config.heads)
                                    for _ in range(blocks))
        self.head = TokenHead(dim, num_classes, config.pool)
        init_side_network(self)

    def side_blocks(self, x: torch.Tensor, mask: torch.Tensor | None,
                    inputs: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Run the attention blocks on ``x`` ``(B, T, D)``, block ``i`` reading its input plus
        ``inputs[i]`` when given (LAST's Eq. 2), padded keys masked; returns the last output."""
        for index, block in enumerate(self.blocks):
            x = block(x + inputs[index] if inputs else x, mask)
        return x

    def classify(self, x: torch.Tensor, features: dict[str, torch.Tensor],
                 inputs: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Logits: :meth:`side_blocks` on ``x`` then the head, with the padding mask of ``features``
        (None on images)."""
        mask = token_mask(features)
        return self.head(self.side_blocks(x, mask, inputs), mask)

    def reset_trainable(self, seed: int) -> None:
        """Re-initialise every block and the head from ``seed`` (see :func:`init_side_network`)."""
        with seeded(seed):
            init_side_network(self)

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters of the attention blocks, of the head (LayerNorm + linear), and in all."""
        side, head = count_trainable(self.blocks), count_trainable(self.head)
        return {"blocks": side, "head": head, "total": side + head}


NOT_MEASURED = -1.0
"""Accuracy buffer value of a candidate that was not evaluated (adapters hold no NaN)."""

@register
class MIST(SideNetwork):
    """MIST: a 4-block low-rank attention edge network on g_k, k chosen on validation."""

    name = "mist"
    config_class = MISTConfig
    summary = ("low-rank attention edge network (LAE) on g_k = embed + sum of the first k block "
               "outputs; k chosen on validation among N/3, 2N/3, N")
    validation_choices = ("gather_depth",)
    remote_settings: ClassVar[dict[str, Any]] = {"gathered": True}
    """With a feature server (``fit --remote``) MIST asks for g_k itself: one token map per image."""

    def __init__(self, config: MISTConfig, backbone: dict[str, Any], num_classes: int):
        if config.lae_blocks < 1:
            raise FrozenlensError(f"lae_blocks={config.lae_blocks}: must be at least 1")
        if config.gather_depth:
            gather_taps(backbone["depth"], config.gather_depth)  # validates k
        super().__init__(config, backbone, num_classes, config.lae_blocks)
        self.register_buffer("gather_accuracy", torch.full((backbone["depth"],), NOT_MEASURED))

    @classmethod
    def taps(cls, config: MISTConfig, backbone: dict[str, Any]) -> list[Tap]:
        """What g_k sums (or g_k itself when ``gathered``); every candidate's while k is to be chosen."""
        depth = backbone["depth"]
        if config.gathered:
            return [Tap.parse(gather_key(k)) for k in ([config.gather_depth] if config.gather_depth
                                                         else gather_candidates(depth))]
        return gather_taps(depth, config.gather_depth or max(gather_candidates(depth)))

    @classmethod
    def served_taps(cls, backbone: dict[str, Any]) -> list[Tap]:
        """The candidate gathers g_k, k in {N/3, 2N/3, N}: what ``fit --remote`` asks a server for."""
        return [Tap.parse(gather_key(k)) for k in gather_candidates(backbone["depth"])]

    @property
    def gather_accuracies(self) -> dict[int, float]:
        """Held-out accuracy of each candidate k from the last selection (k -> accuracy)."""
        return {k + 1: float(v) for k, v in enumerate(self.gather_accuracy.tolist()) if v != NOT_MEASURED}

    def choices(self) -> dict[str, Any]:
        """The k chosen on held-out data and every candidate's accuracy (empty when k was fixed)."""
        accuracies = self.gather_accuracies
        return {"gather_depth": self.config.gather_depth, "held_out_accuracy": accuracies} if accuracies else {}

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.config.gather_depth:
            raise FrozenlensError("mist: gather_depth is still 0 (to be chosen): fit the model first, "
                                  "or build it with gather_depth=k")
        return self.classify(gather(features, self.config.gather_depth), features)

    def fit(self, data: TapData, cfg: TrainConfig, *, val: TapData | None = None,
            progress: bool = False) -> list[float]:
        """Train the LAE on g_k, computed once (or read as it is); with ``gather_depth=0`` choose k first.

        k is chosen by :func:`~frozenlens.methods.selection.fit_selecting`: one fit per
        candidate, ranked on ``val`` (else on a seeded holdout, then refitted on all of
        ``data``). The candidates' accuracies are kept in ``gather_accuracy``.
        """
        if self.config.gather_depth:
            return self.fit_many([self], data, [cfg], progress=progress)[0]
        depth = self.backbone_info["depth"]
        chosen = fit_selecting(self, "gather_depth", gather_candidates(depth), data, cfg, val=val,
                               holdout_fraction=self.config.holdout_fraction,
                               refit=self.config.refit, progress=progress)
        for candidate, accuracy in chosen.accuracy.items():
            self.gather_accuracy[candidate - 1] = accuracy
        return chosen.losses

    @classmethod
    def fit_many(cls, models: Sequence["MIST"], data: TapData, cfgs: Sequence[TrainConfig], *,
                 val: TapData | None = None, progress: bool = False) -> list[list[float]]:
        """Models with a fixed gather depth train in lockstep, each g_k computed once and shared
        by every model of that k (candidate depths are configurations too); models that choose
        k themselves (``gather_depth=0``) fit one at a time."""
        if any(not m.config.gather_depth for m in models):
            return [m.fit(data, c, val=val, progress=progress) for m, c in zip(models, cfgs)]
        ready: dict[int, TapData] = {}
        for model in models:
            k = model.config.gather_depth
            if k not in ready:
                ready[k] = (data.subset([gather_key(k), *mask_keys(data.features)]) if gather_key(k) in data.features
                            else gathered_data(data, k))
        for model, cfg in zip(models, cfgs):
            model.reset_trainable(cfg.seed)
        inputs = [ready[m.config.gather_depth] for m in models]
        shared = inputs[0] if len(ready) == 1 else inputs
        return train_many(models, shared, cfgs, progress=progress, desc=cls.name)


@register
class LAST(SideNetwork):
    """LAST: one low-rank attention side block per backbone block, fed with that block's output."""

    name = "last"
    config_class = SideConfig
    summary = ("low-rank attention side network, one block per backbone block: "
               "y_i = S_i(y_{i-1} + block_i output), y_0 = embedding; head on y_N")

    def __init__(self, config: SideConfig, backbone: dict[str, Any], num_classes: int):
        super().__init__(config, backbone, num_classes, backbone["depth"])

    @classmethod
    def taps(cls, config: SideConfig, backbone: dict[str, Any]) -> list[Tap]:
        """The embedding output and every block's output tokens."""
        return gather_taps(backbone["depth"], backbone["depth"])

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        outputs = [features[block_tap(index).key].float() for index in range(len(self.blocks))]
        return self.classify(features[EMBED_KEY].float(), features, outputs)
