"""What a store's rows are made of: image files, or texts with a stable identity.

A store keys each row by a string: an image's path, or a text's
:attr:`~frozenlens.data.text.TextItem.key`. This module turns either kind into what the
backbone reads (a :class:`~torch.utils.data.Dataset` the extraction and streaming loaders
iterate, and one forward pass per batch), so the store, the streaming test pass and the
protocol have one code path for both.

Texts are tokenized with the backbone's own tokenizer. A store of texts pads every row to
one length, the longest text of the store (:meth:`TextExamples.num_tokens`), so a row of a
token map is ``(T, D)`` as for images and the padding mask is stored beside the taps under
:data:`~frozenlens.backbones.text.MASK_KEY` (1 = real token). A streamed batch is padded to
its own longest text: the methods mask padding, so the amount of it changes nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from frozenlens.backbones.base import FrozenBackbone
from frozenlens.backbones.taps import Tap
from frozenlens.backbones.text import TextBackbone
from frozenlens.data import item_id
from frozenlens.data.text import TextItem
from frozenlens.errors import StoreError
from frozenlens.store.fingerprint import images_fingerprint
from frozenlens.store.loader import ImageFiles


@dataclass(frozen=True)
class TextExamples:
    """Texts to store or stream, one row each, identified by ``ids`` (``TextItem.key``)."""

    ids: tuple[str, ...]
    texts: tuple[str, ...]
    _lengths: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, items: Iterable[Any]) -> "TextExamples":
        """From :class:`~frozenlens.data.text.TextItem` objects (anything with ``key`` and ``text``)."""
        items = list(items)
        return cls(tuple(i.key for i in items), tuple(i.text for i in items))

    def __len__(self) -> int:
        return len(self.ids)

    def fingerprint(self) -> str:
        """Hash of every row's id and text: the examples part of a store key."""
        material = [[i, hashlib.sha256(t.encode("utf-8")).hexdigest()] for i, t in zip(self.ids, self.texts)]
        return hashlib.sha256(json.dumps(material).encode()).hexdigest()

    def num_tokens(self, backbone: TextBackbone) -> int:
        """Tokens of the longest text (special tokens included, after truncation): the padded
        length of every row of a store of these texts. Computed once per tokenizer."""
        if backbone.tokenizer_hash not in self._lengths:
            self._lengths[backbone.tokenizer_hash] = max(backbone.token_lengths(self.texts), default=1)
        return self._lengths[backbone.tokenizer_hash]


class TextRows(Dataset):
    """Item ``i``: ``(i, texts[i])`` (tokenized per batch, by :func:`forward_batch`)."""

    def __init__(self, texts: Sequence[str]):
        self.texts = list(texts)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[int, str]:
        return index, self.texts[index]


def examples_of(items: Sequence[Any]) -> "list[str] | TextExamples":
    """The rows of a store (or a streamed pass) for task items: image paths, or the texts."""
    if items and isinstance(items[0], TextItem):
        return TextExamples.of(items)
    return [str(i.path) for i in items]


def task_examples(task: Any, splits: Sequence[str] | None = None) -> "list[str] | TextExamples":
    """Every example of ``task``'s ``splits`` (default: all) once, in split order, as store rows."""
    seen: dict[str, Any] = {}
    for name, items in task.splits.items():
        if splits is None or name in splits:
            seen.update((item_id(i), i) for i in items)
    return examples_of(list(seen.values()))


def check_examples(backbone: Any, examples: Any) -> None:
    """Refuse texts for an image backbone and image files for a text backbone."""
    text_backbone = isinstance(backbone, TextBackbone) or (
        not isinstance(backbone, FrozenBackbone) and backbone.describe().get("modality") == "text")
    if text_backbone != isinstance(examples, TextExamples):
        kind = "a text encoder" if text_backbone else "an image backbone"
        given = "texts" if isinstance(examples, TextExamples) else "image files"
        raise StoreError(f"backbone {backbone.describe().get('name', '')!r} is {kind} but was given {given}: "
                         "use a text backbone (e.g. all-minilm-l6-v2) for text tasks and an image one for images")


def row_ids(examples: Any) -> list[str]:
    """The string each row is keyed by: an image's path, or a text's id."""
    if isinstance(examples, TextExamples):
        return list(examples.ids)
    return [str(Path(p)) for p in examples]


def examples_fingerprint(examples: Any) -> str:
    """Hash of the rows' identity and content (image bytes, or texts)."""
    if isinstance(examples, TextExamples):
        return examples.fingerprint()
    return images_fingerprint(row_ids(examples))


def input_rows(backbone: FrozenBackbone | TextBackbone, examples: Any) -> Dataset:
    """The dataset a loader reads ``examples`` through: decoded, preprocessed images, or texts."""
    if isinstance(examples, TextExamples):
        return TextRows(examples.texts)
    return ImageFiles(row_ids(examples), backbone.transform())


def forward_batch(backbone: FrozenBackbone | TextBackbone, batch: torch.Tensor | Sequence[str], taps: Sequence[Tap],
                  device: torch.device | str, *, num_tokens: int | None = None,
                  non_blocking: bool = False) -> Mapping[str, torch.Tensor]:
    """Tap values of one loader batch: images moved to ``device``, or texts tokenized (padded
    to ``num_tokens``, else to the batch's longest) with the mask under ``MASK_KEY``."""
    if isinstance(backbone, TextBackbone):
        return backbone.forward_taps(backbone.tokenize(list(batch), pad_to=num_tokens), taps)
    return backbone.forward_taps(batch.to(device, non_blocking=non_blocking), taps)
