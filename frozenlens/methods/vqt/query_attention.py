"""Query-only tokens through a frozen timm ViT block: the mechanism behind VQT.

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

The attention itself is :func:`frozenlens.backbones.attention.query_attention`,
beside the other re-implementation of timm's ``Attention.forward`` (TOAST's value
input) and the check that timm's ``Attention`` is still the one both re-do.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from frozenlens.backbones.attention import check_attention, query_attention
from frozenlens.backbones.base import FrozenBackbone
from frozenlens.backbones.taps import Tap, reduce_tokens
from frozenlens.errors import FrozenlensError


def check_block(block: nn.Module) -> None:
    """Raise unless ``block`` is a timm pre-norm ``Block`` with timm's standard ``Attention``
    (:func:`frozenlens.backbones.attention.check_attention`)."""
    needed = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
    if not all(hasattr(block, n) for n in needed):
        raise FrozenlensError(
            f"query tokens need a timm pre-norm Block with a fused-qkv Attention, not "
            f"{type(block).__name__}/{type(getattr(block, 'attn', None)).__name__}"
        )
    check_attention(block.attn)


def query_block(block: nn.Module, queries: torch.Tensor, tokens: torch.Tensor, *,
                normed: bool = False) -> torch.Tensor:
    """Outputs ``(B, T, D)`` of query tokens passed through ``block``; ``tokens`` stay untouched.

    Args:
        block: a frozen timm ``Block`` (eval mode: dropout and drop-path are off).
        queries: query tokens ``(T, D)``, ``(1, T, D)`` or per image ``(B, T, D)``.
        tokens: the block's input tokens ``(B, N, D)``, or ``norm1`` of them when
            ``normed`` is True (``norm1`` depends on nothing learned, so it can be cached).
    """
    if queries.dim() == 2:
        queries = queries.unsqueeze(0)
    y = tokens if normed else block.norm1(tokens)
    h = queries + block.drop_path1(block.ls1(query_attention(block.attn, block.norm1(queries), y)))
    return h + block.drop_path2(block.ls2(block.mlp(block.norm2(h))))


def input_taps(depth: int) -> list[Tap]:
    """Taps holding each block's input: ``embed:tokens`` for block 0, else ``block.{i-1}:tokens``."""
    return [Tap("embed", "tokens")] + [Tap(f"block.{i}", "tokens") for i in range(depth - 1)]


@torch.no_grad()
def forward_with_queries(backbone: FrozenBackbone, images: torch.Tensor,
                         queries: Sequence[torch.Tensor | None], taps: Iterable[Tap] = (),
                         ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor | None]]:
    """One backbone pass with query tokens inserted at every block (``None`` skips a block).

    Returns the requested taps of the *original* tokens and each block's query
    outputs. The original stream runs through timm's unchanged blocks, so its
    activations equal :meth:`FrozenBackbone.forward_taps` bit for bit.
    """
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
