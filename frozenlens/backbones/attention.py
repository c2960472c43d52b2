"""timm's ``Attention`` re-done in one place, with the two changes frozenlens needs.

Two methods need what happens *inside* a frozen block's self-attention, which
timm's ``Attention.forward`` does not expose:

* TOAST's top-down signal enters the values only: ``V = W_v (X + X_td) + b_v``
  with ``Q, K`` from ``X`` alone (:func:`attention` with ``value_input``); its
  explanations keep the attention probabilities (``keep_weights``);
* VQT's query tokens ``P`` produce queries only; keys and values come from the
  block's tokens ``X`` alone (:func:`query_attention`).

Both re-do timm's forward (fused ``qkv``, per-head split, ``q_norm`` / ``k_norm``,
scaled dot product, head merge, ``norm``, optional sigmoid ``gate``, ``proj``) and
so depend on its exact shape. This module is the only copy of that mechanism, and
:func:`check_attention` guards it: it refuses, with a message naming the installed
timm version and the supported range, an ``Attention`` whose attributes or forward
signature are not the ones re-done here. ``tests/test_attention.py`` compares both
uses with timm's own ``Attention.forward`` / ``Block.forward``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re

import torch
from torch import nn
from torch.nn import functional as F

from frozenlens.errors import FrozenlensError

TIMM_SUPPORTED = ">=1.0.16,<1.1"
"""The timm versions whose ``Attention`` this module re-does (pyproject.toml pins the same range).

1.0.16 is the first release with ``timm.layers.Attention`` and ``Block.forward(x, attn_mask)``."""
_LOWEST, _BELOW = (1, 0, 16), (1, 1)
ATTENTION_ATTRIBUTES = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop",
                        "num_heads", "head_dim", "scale", "fused_attn")
"""What :func:`attention` and :func:`query_attention` read from timm's ``Attention`` (``gate`` is optional)."""
_FORWARD_PARAMETERS = {"self", "x", "attn_mask", "is_causal"}

_log = logging.getLogger("frozenlens")


class AttentionMismatch(FrozenlensError):
    """timm's ``Attention`` is not the one :mod:`frozenlens.backbones.attention` re-does."""


def timm_version() -> str:
    """The installed timm's version string."""
    import timm

    return str(timm.__version__)


def _release(version: str) -> tuple[int, ...]:
    """``"1.0.31.dev0"`` -> ``(1, 0, 31)``."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    return tuple(int(n) for n in match.groups(default="0")) if match else ()


def timm_supported(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed timm) is in :data:`TIMM_SUPPORTED`."""
    release = _release(version or timm_version())
    return _LOWEST <= release < _BELOW


def _mismatch(what: str) -> AttentionMismatch:
    return AttentionMismatch(
        f"{what}: frozenlens re-does timm's Attention.forward (TOAST's value input, VQT's query "
        f"tokens) for timm{TIMM_SUPPORTED}, and this timm ({timm_version()}) has a different "
        f"Attention; install a supported version: pip install 'timm{TIMM_SUPPORTED}'")


@functools.lru_cache(maxsize=1)
def timm_attention() -> type:
    """timm's ``Attention`` class, once checked: its forward takes ``(x, attn_mask, is_causal)`` at most.

    A timm version outside :data:`TIMM_SUPPORTED` is logged (once).

    Raises:
        AttentionMismatch: timm has no ``timm.layers.Attention`` or its forward takes other arguments.
    """
    version = timm_version()
    if not timm_supported(version):
        _log.warning("timm %s is outside the tested range %s; frozenlens re-does timm's Attention "
                     "and checks its shape, but install timm%s to be safe", version, TIMM_SUPPORTED,
                     TIMM_SUPPORTED)
    try:
        from timm.layers import Attention
    except ImportError:
        raise _mismatch("timm.layers has no Attention") from None
    extra = set(inspect.signature(Attention.forward).parameters) - _FORWARD_PARAMETERS
    if extra:
        raise _mismatch(f"Attention.forward takes new arguments ({', '.join(sorted(extra))})")
    return Attention


def check_attention(attn: nn.Module) -> None:
    """Raise :class:`AttentionMismatch` unless ``attn`` is timm's ``Attention`` as re-done here.

    Checked: timm's class (:func:`timm_attention`); ``attn`` is an instance of it
    that does not override ``forward``; every attribute in
    :data:`ATTENTION_ATTRIBUTES` is there; a plain linear ``qkv`` maps onto
    ``3 * num_heads * head_dim`` features (an edited ``qkv``, e.g. with a LoRA
    branch, is taken as it is).
    """
    attention_class = timm_attention()
    name = type(attn).__name__
    if not isinstance(attn, attention_class):
        raise _mismatch(f"the block's attention is {name}, not timm.layers.Attention")
    if type(attn).forward is not attention_class.forward:
        raise _mismatch(f"{name} overrides Attention.forward")
    missing = [a for a in ATTENTION_ATTRIBUTES if not hasattr(attn, a)]
    if missing:
        raise _mismatch(f"Attention has no {', '.join(missing)}")
    qkv = attn.qkv
    if isinstance(qkv, nn.Linear) and qkv.out_features != 3 * attn.num_heads * attn.head_dim:
        raise _mismatch(f"Attention.qkv maps onto {qkv.out_features} features, not 3 x "
                        f"{attn.num_heads} heads x {attn.head_dim}")


# -- the shared pieces ------------------------------------------------------------------
def _width(attn: nn.Module) -> int:
    return attn.num_heads * attn.head_dim


def split_heads(attn: nn.Module, projected: torch.Tensor) -> torch.Tensor:
    """``qkv`` output ``(B, N, 3 * H * hd)`` as ``(3, B, H, N, hd)`` (timm's layout)."""
    batch, tokens = projected.shape[:2]
    return projected.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)


def attention_output(attn: nn.Module, mixed: torch.Tensor, gate_input: torch.Tensor) -> torch.Tensor:
    """Per-head outputs ``(B, H, T, hd)`` merged, normed, gated by ``gate_input`` and projected."""
    batch, _, tokens, _ = mixed.shape
    out = attn.norm(mixed.transpose(1, 2).reshape(batch, tokens, _width(attn)))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(gate_input).sigmoid()
    return attn.proj_drop(attn.proj(out))


def qkv_weights(attn: nn.Module) -> tuple[torch.Tensor, ...]:
    """(W_q, W_k, W_v) as ``(H, hd, D)`` and (b_q, b_k, b_v) as ``(H, hd)`` (zeros without bias)."""
    heads, head_dim = attn.num_heads, attn.head_dim
    weight = attn.qkv.weight.view(3, heads, head_dim, -1)
    bias = attn.qkv.bias
    if bias is None:
        bias = weight.new_zeros(3 * heads * head_dim)
    bias = bias.view(3, heads, head_dim)
    return weight[0], weight[1], weight[2], bias[0], bias[1], bias[2]


# -- TOAST: values with an extra input ----------------------------------------------------
def attention(attn: nn.Module, x: torch.Tensor, *, value_input: torch.Tensor | None = None,
              keep_weights: list[torch.Tensor] | None = None) -> torch.Tensor:
    """timm ``Attention`` on ``x``, with optionally an extra value input and kept weights.

    ``Q, K, V = W_q X + b_q, W_k X + b_k, W_v (X + value_input) + b_v``: the value
    projection of ``value_input`` (no bias) is added to timm's own ``V``, so with
    ``value_input`` None or zero the result equals ``attn(x)`` bit for bit.
    ``keep_weights``: the attention probabilities ``(B, heads, N, N)`` are appended
    to it (computed explicitly instead of by the fused kernel).
    """
    q, k, v = split_heads(attn, attn.qkv(x)).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if value_input is not None:
        extra = value_projection(attn.qkv, value_input, _width(attn))
        v = v + extra.reshape(*extra.shape[:2], attn.num_heads, attn.head_dim).transpose(1, 2)
    if keep_weights is None and attn.fused_attn:
        mixed = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        if keep_weights is not None:
            keep_weights.append(weights.detach())
        mixed = attn.attn_drop(weights) @ v
    return attention_output(attn, mixed, x)


def value_projection(qkv: nn.Module, x: torch.Tensor, width: int) -> torch.Tensor:
    """The value part of ``qkv``'s linear map applied to ``x``, without bias: ``(..., width)``.

    For an edited ``qkv`` (e.g. LoRA's :class:`~frozenlens.backbones.hooks.AddBranch`)
    the map is taken as ``qkv(x) - qkv(0)``, which is exact for any affine ``qkv``.
    """
    if isinstance(qkv, nn.Linear):
        return F.linear(x, qkv.weight[2 * width:])
    return (qkv(x) - qkv(torch.zeros_like(x)))[..., 2 * width:]


# -- VQT: query-only tokens ----------------------------------------------------------------
def folds_keys(attn: nn.Module) -> bool:
    """Whether ``attn``'s keys can be folded into the queries (``k_norm`` is the identity)."""
    return isinstance(attn.k_norm, nn.Identity)


def query_attention(attn: nn.Module, p_normed: torch.Tensor, x_normed: torch.Tensor) -> torch.Tensor:
    """Attention output ``(B, T, D)`` (after ``proj``) of query tokens over the tokens.

    The queries come from ``p_normed`` alone, keys and values from ``x_normed`` alone:
    the ``P`` rows of timm's attention over ``concat([P, X])`` when a mask forbids
    every row to attend to ``P``.

    Args:
        attn: the block's timm ``Attention``.
        p_normed: ``norm1`` of the query tokens, ``(B, T, D)`` or ``(1, T, D)`` when
            every image shares them.
        x_normed: ``norm1`` of the block's input tokens, ``(B, N, D)``.
    """
    w_q, _, _, b_q, _, _ = qkv_weights(attn)
    q = attn.q_norm(torch.einsum("btd,hed->bhte", p_normed, w_q) + b_q[None, :, None])
    mixed = _fold_keys(attn, q, x_normed) if folds_keys(attn) else _explicit(attn, q, x_normed)
    return attention_output(attn, mixed, p_normed)


def _fold_keys(attn: nn.Module, q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-head attention outputs ``(B, H, T, hd)`` without projecting keys or values.

    Per head: ``q . k_j = (W_k^T q) . y_j + q . b_k``, whose bias term is the same for
    every ``j`` and cancels in the softmax; and ``sum_j a_j v_j = W_v (sum_j a_j y_j) + b_v``.
    """
    _, w_k, w_v, _, _, b_v = qkv_weights(attn)
    heads, tokens = q.shape[1], q.shape[2]
    u = torch.einsum("bhte,hed->bhtd", q * attn.scale, w_k)        # queries in token space
    u = u.reshape(u.shape[0], heads * tokens, -1)                   # (Bq, H*T, D)
    scores = torch.matmul(u[0] if u.shape[0] == 1 else u, y.transpose(1, 2))  # (B, H*T, N)
    pooled = torch.matmul(scores.softmax(-1), y)                    # (B, H*T, D)
    pooled = pooled.view(y.shape[0], heads, tokens, -1)
    return torch.einsum("bhtd,hed->bhte", pooled, w_v) + b_v[None, :, None]


def _explicit(attn: nn.Module, q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-head attention outputs with keys and values projected (needed with ``k_norm``)."""
    _, k, v = split_heads(attn, F.linear(y, attn.qkv.weight, attn.qkv.bias)).unbind(0)
    q = q.expand(y.shape[0], -1, -1, -1)
    return F.scaled_dot_product_attention(q, attn.k_norm(k), v, scale=attn.scale)
