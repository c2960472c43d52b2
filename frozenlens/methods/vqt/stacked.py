"""Several VQT configurations trained as one (:mod:`frozenlens.train.stacked`).

Query tokens never attend to each other: each query row reads the block's
tokens on its own. So the queries of ``C`` configurations are simply more query
rows of one :func:`~frozenlens.methods.vqt.query_attention.query_block` call,
``C * T`` of them per block instead of ``T``: the scores become one
``(B, C*H*T, N)`` product over the stored tokens instead of ``C`` skinny ones,
and the frozen MLP runs on ``C`` times more rows at once. Each configuration
keeps its own queries and head. On text the batch's padding mask applies to
every configuration's queries alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch.nn import functional as F

from frozenlens.methods.vqt.query_attention import key_mask, query_block
from frozenlens.train.stacked import StackedView, copy_back, stack_parameters

if TYPE_CHECKING:
    from frozenlens.methods.vqt.model import VQT


def can_stack(methods: Sequence["VQT"]) -> bool:
    """Whether ``methods`` can train as one stack: same config, concatenated summaries, one backbone."""
    first = methods[0]
    return (first.config.aggregate == "concat"
            and all(m.config == first.config and m.frozen_backbone is first.frozen_backbone
                    and all(a is b for a, b in zip(m.query_blocks(), first.query_blocks())) for m in methods)
            and all(torch.equal(getattr(m, "selected", torch.zeros(0)), getattr(first, "selected", torch.zeros(0)))
                    for m in methods))


class StackedVQT(StackedView):
    """``C`` VQT models on stored ``norm1`` inputs (on text: the inputs and their padding mask):
    queries ``(C, L, T, D)``, heads ``(C, K, F)``."""

    def __init__(self, methods: Sequence["VQT"], cls_key: str, input_keys: Sequence[str]):
        super().__init__()
        self.methods = list(methods)
        first = methods[0]
        self.blocks = [first.query_blocks()]   # a list: frozen, not a submodule
        self.cls_key, self.input_keys = cls_key, list(input_keys)
        self.normalize = first.config.normalize
        self.dropout = first.config.query_dropout
        self.queries = stack_parameters([m.queries for m in methods])
        self.weight = stack_parameters([m.head.weight for m in methods])
        self.bias = stack_parameters([m.head.bias for m in methods])
        selected = first.selected if first.config.compress else None
        self.register_buffer("selected", selected.clone() if selected is not None else None)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        configs, _, tokens, dim = self.queries.shape
        cls_token, mask = batch[self.cls_key], key_mask(batch)
        size = cls_token.shape[0]
        parts = [(F.normalize(cls_token, dim=-1) if self.normalize else cls_token).unsqueeze(1).expand(-1, configs, -1)]
        for layer, (block, key) in enumerate(zip(self.blocks[0], self.input_keys)):
            queries = self.queries[:, layer]                                      # (C, T, D)
            if self.training and self.dropout > 0:                            # per image, as VQT.summaries
                dropped = self.per_config_dropout([q.unsqueeze(0).expand(size, -1, -1) for q in queries], self.dropout)
                queries = torch.stack(dropped, 1).reshape(size, configs * tokens, dim)
            else:
                queries = queries.reshape(1, configs * tokens, dim)             # shared by every image
            out = query_block(block, queries, batch[key], normed=True, key_mask=mask)
            out = out.reshape(size, configs, tokens * dim)
            parts.append(F.normalize(out, dim=-1) if self.normalize else out)
        features = torch.cat(parts, dim=-1).transpose(0, 1)                      # (C, B, F)
        if self.selected is not None:
            features = features[..., self.selected]
        return torch.bmm(features, self.weight.transpose(1, 2)) + self.bias[:, None]

    def unstack(self) -> None:
        copy_back(self.queries, [m.queries for m in self.methods])
        copy_back(self.weight, [m.head.weight for m in self.methods])
        copy_back(self.bias, [m.head.bias for m in self.methods])
