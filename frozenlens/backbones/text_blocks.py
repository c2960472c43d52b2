"""A frozen BERT-family layer seen as query-only attention plus the rest of the layer (VQT on text).

VQT's query tokens ``P`` produce queries only; keys and values come from the
layer's input tokens ``X`` (see :mod:`frozenlens.methods.vqt.query_attention`).
A ``transformers`` ``BertLayer`` (BERT, RoBERTa, ELECTRA, XLM-R, all-MiniLM, ...)
is **post-norm**, so the query rows go through it as

    q = P W_q + b_q                                          per head
    a = softmax(scale * q K^T + m),  K = X W_k + b_k          m = -inf on padded keys
    o = concat_h(a V),                V = X W_v + b_v
    h = LayerNorm_1(P + dropout(o W_o + b_o))                 attention.output
    out = LayerNorm_2(h + dropout(FFN(h)))                    intermediate + output

which is exactly what the layer returns for a real token whose state is ``P``
(``tests/test_vqt_text.py`` checks it against ``BertLayer`` itself). There is no
pre-attention norm, so keys read the stored layer input as it is and nothing
needs caching.

Keys and values are never projected: per head ``q . k_j = (W_k^T q) . x_j + q . b_k``,
whose bias term is the same for every ``j`` and cancels in the softmax, and
``sum_j a_j v_j = W_v (sum_j a_j x_j) + b_v`` because the weights sum to one
(the fold :func:`frozenlens.backbones.attention.query_attention` does for timm).
Padded keys get ``-inf`` scores (the float's lowest value, so a row with no real key
gives zeros, not NaN); their weight is then exactly zero and the result does not depend
on how much padding a batch has.
"""

from __future__ import annotations

import torch
from torch import nn

from frozenlens.errors import FrozenlensError

_LAYER_PARTS = ("attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense", "attention.output.LayerNorm", "intermediate", "output.dense",
                "output.LayerNorm")
"""Submodules of a BERT-style layer that :class:`BertLayerView` reads."""


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a ``transformers`` BERT-family encoder (``model.encoder.layer``).

    Raises:
        FrozenlensError: the model keeps its layers elsewhere (DistilBERT, ...).
    """
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise FrozenlensError(f"query tokens on text need a BERT-style encoder (model.encoder.layer), not "
                              f"{type(model).__name__}; supported: BERT, RoBERTa, ELECTRA, XLM-R, MiniLM")
    return layers


def is_bert_layer(layer: nn.Module) -> bool:
    """Whether ``layer`` has the submodules of a ``transformers`` BERT-style layer."""
    return all(_submodule(layer, path) is not None for path in _LAYER_PARTS)


def check_bert_layer(layer: nn.Module) -> None:
    """Raise unless ``layer`` is a BERT-style encoder layer :class:`BertLayerView` re-does exactly.

    Checked: the submodules (self-attention ``query/key/value`` Linears, ``attention.output``,
    ``intermediate``, ``output``), absolute position embeddings (relative ones add a score
    term the view lacks) and an encoder (no cross-attention).
    """
    name = type(layer).__name__
    if not is_bert_layer(layer):
        missing = [p for p in _LAYER_PARTS if _submodule(layer, p) is None]
        raise FrozenlensError(f"query tokens need a BERT-style encoder layer; {name} has no {', '.join(missing)} "
                              "(supported: BERT, RoBERTa, ELECTRA, XLM-R, MiniLM)")
    attention = layer.attention.self
    if not all(isinstance(getattr(attention, n), nn.Linear) for n in ("query", "key", "value")):
        raise FrozenlensError(f"{name}: the self-attention's query/key/value are not plain Linear layers")
    position = getattr(attention, "position_embedding_type", "absolute")
    if position != "absolute":
        raise FrozenlensError(f"{name}: position_embedding_type={position!r}; query tokens support absolute "
                              "position embeddings only")
    if getattr(layer, "is_decoder", False) or getattr(attention, "is_causal", False):
        raise FrozenlensError(f"{name} is a decoder layer; query tokens need an encoder")


class BertLayerView:
    """A frozen BERT-style layer (``transformers``) as VQT's block parts.

    Implements :class:`frozenlens.methods.vqt.query_attention.BlockParts`: keys read the
    layer input unchanged (:attr:`key_input_is_identity`), and :meth:`query_pass` sends
    query rows through the layer's own frozen modules, attending only to unmasked tokens.
    """

    key_input_is_identity = True

    def __init__(self, layer: nn.Module):
        self.layer = layer
        attention = layer.attention.self
        self.heads = int(attention.num_attention_heads)
        self.head_dim = int(attention.attention_head_size)
        self.scale = float(getattr(attention, "scaling", self.head_dim ** -0.5))

    def key_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """What keys and values read: the layer input itself (post-norm: no ``norm1``)."""
        return tokens

    def query_pass(self, queries: torch.Tensor, keys: torch.Tensor,
                   key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs ``(B, T, D)`` of ``queries`` through the layer; ``keys`` stay untouched.

        Args:
            queries: ``(B, T, D)``, or ``(1, T, D)`` shared by every example.
            keys: the layer's input tokens ``(B, N, D)``.
            key_mask: ``(B, N)`` bool, True = real token; None = every token is real.
        """
        mixed = self.attention(queries, keys, key_mask)
        hidden = self.layer.attention.output(mixed, queries)      # LayerNorm(P + dense(o))
        return self.layer.output(self.layer.intermediate(hidden), hidden)

    def attention(self, queries: torch.Tensor, keys: torch.Tensor,
                  key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Merged per-head attention outputs ``(B, T, H * hd)`` of ``queries`` over ``keys``
        (before ``attention.output``), keys and values folded into the queries."""
        w_q, b_q = self._heads("query")
        w_k, _ = self._heads("key")
        w_v, b_v = self._heads("value")
        q = torch.einsum("btd,hed->bhte", queries, w_q) + b_q[None, :, None]
        mixed = masked_folded_attention(q * self.scale, w_k, w_v, b_v, keys, key_mask)
        return mixed.transpose(1, 2).reshape(mixed.shape[0], mixed.shape[2], self.heads * self.head_dim)

    def _heads(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``name``'s projection as weight ``(H, hd, D)`` and bias ``(H, hd)`` (zeros without bias)."""
        linear = getattr(self.layer.attention.self, name)
        weight = linear.weight.view(self.heads, self.head_dim, -1)
        bias = linear.bias if linear.bias is not None else weight.new_zeros(self.heads * self.head_dim)
        return weight, bias.view(self.heads, self.head_dim)


def masked_folded_attention(q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, b_v: torch.Tensor,
                            y: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head attention outputs ``(B, H, T, hd)`` of scaled queries over tokens, keys and values folded.

    Args:
        q: scaled queries ``(B, H, T, hd)``, or ``(1, H, T, hd)`` shared by every example.
        w_k, w_v: key and value weights ``(H, hd, D)``; b_v: value bias ``(H, hd)`` (the key
            bias cancels in the softmax).
        y: what keys and values read, ``(B, N, D)``.
        key_mask: ``(B, N)`` bool, True = real token; padded tokens get no weight.
    """
    heads, tokens = q.shape[1], q.shape[2]
    u = torch.einsum("bhte,hed->bhtd", q, w_k)                      # queries in token space
    u = u.reshape(u.shape[0], heads * tokens, -1)                   # (Bq, H*T, D)
    scores = torch.matmul(u[0] if u.shape[0] == 1 else u, y.transpose(1, 2))  # (B, H*T, N)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, :], torch.finfo(scores.dtype).min)
    pooled = torch.matmul(scores.softmax(-1), y).view(y.shape[0], heads, tokens, -1)
    return torch.einsum("bhtd,hed->bhte", pooled, w_v) + b_v[None, :, None]


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name, None)
        if not isinstance(module, nn.Module):
            return None
    return module
