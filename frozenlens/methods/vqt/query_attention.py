"""Query-only tokens through a frozen block: the mechanism behind VQT.

Each architecture gives its blocks as :class:`BlockParts`: what keys read
(``key_input``, cacheable) and the pass of query rows through the rest of the
block (``query_pass``, with an optional key padding mask). :class:`TimmBlockParts`
is the pre-norm timm ViT block below; a post-norm BERT-style text layer is
:class:`frozenlens.backbones.text_blocks.BertLayerView`, whose padded tokens are
never attended to. :func:`query_block` is the one entry point for both.

Query tokens ``P`` (``T`` per block) are prepended to a block's input
*conceptually*: they produce queries, but keys and values come from the
original tokens ``X`` alone. Nothing the backbone computes for ``X`` changes.
The query rows then go through the rest of timm's block:

    q = q_norm(norm1(P) W_q + b_q)                         per head
    a = softmax(scale * q K^T),  K = k_norm(norm1(X) W_k + b_k)
    o = proj(gate * norm(a V)),  V = norm1(X) W_v + b_v
    h = P + ls1(o)
    out = h + ls2(mlp(norm2(h)))

which is exactly what ``block(concat([P, X]), attn_mask=...)`` returns for the
``P`` rows when the mask forbids every row to attend to ``P`` (the tests check
this against timm itself).

When ``k_norm`` is the identity (every ViT without qk-norm), keys and values
are never materialised. Per head ``h``, ``q_h . k_j = (W_k^h^T q_h) . y_j +
q_h . b_k^h``, where ``y = norm1(X)``; the bias term is the same for every
token ``j`` and cancels in the softmax. Because attention weights sum to one,
``sum_j a_j v_j = W_v^h (sum_j a_j y_j) + b_v^h``. So the pass costs
``O(N * D * H * T)`` per image instead of the ``O(N * D^2)`` of projecting
``N`` keys and values, and only reads ``norm1(X)`` (which is fixed, so it can
be computed once and cached).

The ViT attention itself is :func:`frozenlens.backbones.attention.query_attention`,
beside the other re-implementation of timm's ``Attention.forward`` (TOAST's value
input) and the check that timm's ``Attention`` is still the one both re-do.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Protocol, Sequence

import torch
from torch import nn

from frozenlens.backbones.attention import check_attention, query_attention
from frozenlens.backbones.base import FrozenBackbone
from frozenlens.backbones.taps import Tap, reduce_tokens
from frozenlens.backbones.text import MASK_KEY, TextBackbone
from frozenlens.backbones.text_blocks import BertLayerView, check_bert_layer, encoder_layers, is_bert_layer
from frozenlens.errors import FrozenlensError


class BlockParts(Protocol):
    """One frozen block as the query pass needs it (one implementation per architecture).

    :class:`TimmBlockParts` (pre-norm timm ViT block) and
    :class:`~frozenlens.backbones.text_blocks.BertLayerView` (post-norm BERT-style layer).
    """

    key_input_is_identity: bool
    """True when keys and values read the block input as it is (nothing worth caching)."""

    def key_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """What keys and values are computed from (``norm1`` of the tokens for a pre-norm block);
        depends on nothing learned, so it can be computed once and cached."""

    def query_pass(self, queries: torch.Tensor, keys: torch.Tensor,
                   key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs ``(B, T, D)`` of query tokens ``(B or 1, T, D)`` through the block, attending to
        ``keys`` (:meth:`key_input` of the tokens) where ``key_mask`` ``(B, N)`` is True."""


class TimmBlockParts:
    """A timm pre-norm ``Block`` as :class:`BlockParts` (the module docstring's equations)."""

    key_input_is_identity = False

    def __init__(self, block: nn.Module):
        self.block = block

    def key_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """``norm1`` of the tokens."""
        return self.block.norm1(tokens)

    def query_pass(self, queries: torch.Tensor, keys: torch.Tensor,
                   key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Query rows through the block; ``key_mask`` must be None (images have no padding)."""
        if key_mask is not None:
            raise FrozenlensError("a timm ViT block takes no key padding mask (images have no padding)")
        block = self.block
        h = queries + block.drop_path1(block.ls1(query_attention(block.attn, block.norm1(queries), keys)))
        return h + block.drop_path2(block.ls2(block.mlp(block.norm2(h))))


def block_parts(block: nn.Module) -> BlockParts:
    """``block`` (a timm ViT block or a BERT-style text layer) as :class:`BlockParts`
    (returned as it is when it already is one)."""
    if isinstance(block, (TimmBlockParts, BertLayerView)):
        return block
    return BertLayerView(block) if is_bert_layer(block) else TimmBlockParts(block)


def backbone_blocks(backbone: FrozenBackbone | TextBackbone) -> Sequence[nn.Module]:
    """The frozen blocks query tokens pass through: a ViT's ``model.blocks``, a text encoder's layers."""
    if isinstance(backbone, TextBackbone):
        return encoder_layers(backbone.model)
    return backbone.model.blocks


def check_block(block: nn.Module) -> None:
    """Raise unless ``block`` supports query-only tokens: a timm pre-norm ``Block`` with timm's
    standard ``Attention`` (:func:`frozenlens.backbones.attention.check_attention`), or a BERT-style
    text layer (:func:`frozenlens.backbones.text_blocks.check_bert_layer`)."""
    if hasattr(block, "attention") and not hasattr(block, "attn"):
        check_bert_layer(block)
        return
    needed = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
    if not all(hasattr(block, n) for n in needed):
        raise FrozenlensError(
            f"query tokens need a timm pre-norm Block with a fused-qkv Attention, not "
            f"{type(block).__name__}/{type(getattr(block, 'attn', None)).__name__}"
        )
    check_attention(block.attn)


def key_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The batch's padding mask (:data:`~frozenlens.backbones.text.MASK_KEY`) as bool, True = real
    token, or None (images). Stored masks come as float 0/1, live ones as bool."""
    mask = batch.get(MASK_KEY)
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask > 0.5


def query_block(block: nn.Module, queries: torch.Tensor, tokens: torch.Tensor, *,
                normed: bool = False, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Outputs ``(B, T, D)`` of query tokens passed through ``block``; ``tokens`` stay untouched.

    Args:
        block: a frozen timm ``Block`` or BERT-style text layer (eval mode: dropout and
            drop-path are off), or its :class:`BlockParts`.
        queries: query tokens ``(T, D)``, ``(1, T, D)`` or per example ``(B, T, D)``.
        tokens: the block's input tokens ``(B, N, D)``, or their :meth:`BlockParts.key_input`
            (``norm1`` of them for a ViT) when ``normed`` is True (it depends on nothing learned,
            so it can be cached).
        key_mask: ``(B, N)`` bool, True = real token (text); padded tokens are never attended to.
    """
    parts = block_parts(block)
    if queries.dim() == 2:
        queries = queries.unsqueeze(0)
    keys = tokens if normed else parts.key_input(tokens)
    return parts.query_pass(queries, keys, key_mask)


def input_taps(depth: int) -> list[Tap]:
    """Taps holding each block's input: ``embed:tokens`` for block 0, else ``block.{i-1}:tokens``."""
    return [Tap("embed", "tokens")] + [Tap(f"block.{i}", "tokens") for i in range(depth - 1)]


@torch.no_grad()
def forward_with_queries(backbone: FrozenBackbone | TextBackbone, images: object,
                         queries: Sequence[torch.Tensor | None], taps: Iterable[Tap] = (),
                         ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor | None]]:
    """One backbone pass with query tokens inserted at every block (``None`` skips a block).

    ``images``: a batch of images, or for a :class:`TextBackbone` a list of texts or a
    tokenized batch. Returns the requested taps of the *original* tokens (for text, with
    the mask under :data:`~frozenlens.backbones.text.MASK_KEY`) and each block's query
    outputs. The original stream runs through the unchanged blocks, so its activations
    equal the backbone's ``forward_taps`` bit for bit.
    """
    if isinstance(backbone, TextBackbone):
        return _text_forward_with_queries(backbone, images, queries, taps)
    wanted: dict[int, list[Tap]] = {}
    for tap in taps:
        wanted.setdefault(backbone.depth if tap.block is None else tap.block, []).append(tap)
    out: dict[str, torch.Tensor] = {}
    outputs: list[torch.Tensor | None] = []

    def record(position: int, x: torch.Tensor) -> None:
        for tap in wanted.get(position, ()):
            out[tap.key] = reduce_tokens(x, tap.reduce, backbone.num_prefix_tokens, backbone.grid_size)

    x = backbone.embed(images)
    record(-1, x)
    for index, block in enumerate(backbone.model.blocks):
        outputs.append(None if queries[index] is None else query_block(block, queries[index], x))
        x = block(x)
        record(index, x)
    if backbone.depth in wanted:
        record(backbone.depth, backbone.model.norm(x))
    return out, outputs


def _text_forward_with_queries(backbone: TextBackbone, texts: object, queries: Sequence[torch.Tensor | None],
                               taps: Iterable[Tap]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor | None]]:
    """:func:`forward_with_queries` on text: the backbone's own ``forward_taps``, with a pre-hook on
    every layer that passes that layer's queries over its input (the live states, whose padded
    rows are not zero: the mask keeps them out)."""
    batch = texts if isinstance(texts, Mapping) else backbone.tokenize(texts)  # type: ignore[arg-type]
    mask = torch.as_tensor(batch[MASK_KEY]).bool().to(backbone.device)
    layers = encoder_layers(backbone.model)
    outputs: list[torch.Tensor | None] = [None] * len(layers)

    def hook_for(index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if queries[index] is not None:
                outputs[index] = query_block(module, queries[index], args[0], key_mask=mask)
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        out = backbone.forward_taps(batch, taps)
    finally:
        for handle in handles:
            handle.remove()
    return out, outputs
