"""Training data made of texts, for methods that run a text backbone in the training loop.

:class:`TextData` is the text counterpart of :class:`frozenlens.train.images.ImageData`,
with the same interface (``from_task``, ``len``, ``labels``, ``num_classes``, ``rows``,
``select_paths``, ``holdout``, ``batches``, ``nbytes``), so the protocol and the shared
trainer use either. The texts of a split are tokenized once by the backbone's own
tokenizer (:meth:`TextBackbone.tokenize`: truncated to its ``max_length``, right-padded)
and kept as token ids; each minibatch is cut to its own longest text, so a batch of
short texts never carries the padding of a long one. A batch is::

    ({"input_ids": (B, T) int64, "attention_mask": (B, T) bool[, "token_type_ids": (B, T) int64]}, labels)

with ``T`` the longest text of the batch: exactly what :func:`text_batch` gives for the
same texts (what ``predict`` feeds a method), checked by the tests. Examples are named
by :attr:`frozenlens.data.text.TextItem.key` (``select_paths`` takes those keys).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from frozenlens.backbones.text import MASK_KEY, TextBackbone
from frozenlens.data.text import TextTask
from frozenlens.errors import FrozenlensError
from frozenlens.train.data import ExampleRows

TOKENIZE_CHUNK = 1024
"""Texts tokenized per call when building :class:`TextData` (bounds the tokenizer's padding)."""


def text_batch(backbone: TextBackbone, texts: Sequence[str], device: str | torch.device = "cpu",
               ) -> dict[str, torch.Tensor]:
    """The feature dict an in-loop method reads for raw ``texts`` (one batch, padded to its longest).

    ``{"input_ids": (B, T) int64, "attention_mask": (B, T) bool[, "token_type_ids"]}`` on ``device``.
    """
    return _as_features(backbone.tokenize(list(texts)), device)


def _as_features(encoded: dict[str, torch.Tensor], device: str | torch.device) -> dict[str, torch.Tensor]:
    """Token tensors as a batch: ids as int64, the mask as bool, on ``device``."""
    return {key: value.to(device=device, dtype=torch.bool if key == MASK_KEY else torch.long)
            for key, value in encoded.items()}


class TextData(ExampleRows):
    """Tokenized texts of one split with their labels, kept in memory.

    Attributes:
        tokens: ``"input_ids"``, ``"attention_mask"`` (bool) and, when the tokenizer gives
            them, ``"token_type_ids"``: ``(N, L)`` each, right-padded to the longest text ``L``.
        lengths: tokens per text (special tokens included), ``(N,)``.
        labels: class index per example.
        num_classes: size of the label space.
        keys: each example's identity (:attr:`TextItem.key`), for building subsets.
    """

    def __init__(self, tokens: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int,
                 keys: Sequence[str]):
        if MASK_KEY not in tokens or "input_ids" not in tokens:
            raise FrozenlensError(f"TextData needs 'input_ids' and '{MASK_KEY}'; got {sorted(tokens)}")
        self.tokens = tokens
        self.lengths = tokens[MASK_KEY].sum(dim=1)
        self.labels = labels
        self.num_classes = num_classes
        self.keys = list(keys)

    @classmethod
    def from_texts(cls, texts: Sequence[str], labels: Sequence[int], num_classes: int, backbone: TextBackbone,
                   *, keys: Sequence[str] | None = None, progress: bool = False, desc: str = "texts",
                   ) -> "TextData":
        """Tokenize ``texts`` for ``backbone`` (keys default to ``"#<index>"``)."""
        texts = list(texts)
        chunks = [_as_features(backbone.tokenize(texts[start:start + TOKENIZE_CHUNK]), "cpu")
                  for start in tqdm(range(0, len(texts), TOKENIZE_CHUNK), desc=desc, unit="chunk",
                                    disable=not progress, leave=False)]
        tokens = _concat_padded(chunks, _pad_values(backbone))
        names = list(keys) if keys is not None else [f"#{i}" for i in range(len(texts))]
        if len(names) != len(texts):
            raise FrozenlensError(f"{len(names)} keys for {len(texts)} texts")
        return cls(tokens, torch.as_tensor(list(labels), dtype=torch.long), num_classes, names)

    @classmethod
    def from_task(cls, task: TextTask, split: str, backbone: TextBackbone, *,
                  progress: bool = False) -> "TextData":
        """The texts of one split of ``task``, tokenized once."""
        items = task.split(split)
        return cls.from_texts([i.text for i in items], [i.label for i in items], task.num_classes, backbone,
                              keys=[i.key for i in items], progress=progress, desc=f"tokenizing {split}")

    @property
    def nbytes(self) -> int:
        """Memory held by the token tensors."""
        return sum(t.numel() * t.element_size() for t in (*self.tokens.values(), self.lengths))

    def rows(self, index: torch.Tensor) -> "TextData":
        """The examples at ``index`` (padded to their own longest text)."""
        index = torch.as_tensor(index, dtype=torch.long)
        width = max(int(self.lengths[index].max()), 1) if len(index) else 1
        return TextData({k: v[index, :width] for k, v in self.tokens.items()}, self.labels[index],
                        self.num_classes, [self.keys[int(i)] for i in index])

    def ids(self) -> list[str]:
        """The :attr:`TextItem.key` of each example."""
        return self.keys

    def batch(self, index: torch.Tensor, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The examples at ``index`` as one feature dict, cut to their longest text, on ``device``."""
        width = int(self.lengths[index].max())
        return _as_features({k: v[index, :width] for k, v in self.tokens.items()}, device)



def _pad_values(backbone: TextBackbone) -> dict[str, int]:
    """What the tokenizer pads each tensor with (so chunks join as one tokenization would pad them)."""
    tokenizer = backbone.tokenizer
    return {"input_ids": int(tokenizer.pad_token_id or 0), MASK_KEY: 0,
            "token_type_ids": int(getattr(tokenizer, "pad_token_type_id", 0) or 0)}


def _concat_padded(chunks: list[dict[str, torch.Tensor]], pad: dict[str, int]) -> dict[str, torch.Tensor]:
    """Chunks of ``(n_i, L_i)`` token tensors as ``(sum n_i, max L_i)``, right-padded with ``pad``."""
    if not chunks:
        return {"input_ids": torch.zeros(0, 1, dtype=torch.long), MASK_KEY: torch.zeros(0, 1, dtype=torch.bool)}
    width = max(chunk["input_ids"].shape[1] for chunk in chunks)
    return {key: torch.cat([F.pad(chunk[key], (0, width - chunk[key].shape[1]), value=pad.get(key, 0))
                            for chunk in chunks]) for key in chunks[0]}


__all__ = ["TextData", "text_batch"]
