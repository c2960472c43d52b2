"""Training data made of stored taps: features by tap key, plus labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from frozenlens.data.split import stratified_indices
from frozenlens.store.store import ActivationStore


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(kept, held out)``: ``fraction`` of each class held out (at least one
    example, never a whole class), chosen with ``seed``; both sorted.

    The split is :func:`frozenlens.data.split.stratified_indices`, the one the task
    loader uses to derive a validation split.
    """
    kept, held = stratified_indices(labels.cpu().numpy(), fraction, seed)
    return torch.from_numpy(kept), torch.from_numpy(held)


def minibatch_indices(count: int, batch_size: int, *, shuffle: bool = False,
                      generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Row indices of each minibatch; every data source uses this, so the same seed gives the
    same batches whether taps come from the store, the live backbone or raw images."""
    order = torch.randperm(count, generator=generator) if shuffle else torch.arange(count)
    for start in range(0, count, batch_size):
        yield order[start:start + batch_size]


class ExampleRows:
    """What the in-loop training data (preprocessed images, tokenized texts) share: examples
    named by ids, subsets, a stratified holdout and minibatches in :func:`minibatch_indices` order.

    Subclasses set ``labels`` and implement :meth:`ids`, :meth:`rows` and :meth:`batch`.
    """

    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def ids(self) -> list[str]:
        """The id of each example: an image's path, a text's key."""
        raise NotImplementedError

    def rows(self, index: torch.Tensor) -> "ExampleRows":
        """The examples at ``index``."""
        raise NotImplementedError

    def batch(self, index: torch.Tensor, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The features of the examples at ``index``, on ``device``."""
        raise NotImplementedError

    def select_paths(self, ids: Sequence[str]) -> "ExampleRows | None":
        """The examples named by ``ids`` (paths or text keys), in that order; None if some are not here."""
        where = {key: i for i, key in enumerate(self.ids())}
        try:
            return self.rows(torch.as_tensor([where[str(k)] for k in ids], dtype=torch.long))
        except KeyError:
            return None

    def holdout(self, fraction: float = 0.2, seed: int = 0) -> tuple["ExampleRows", "ExampleRows"]:
        """Stratified split into (rest, held out), as :meth:`TapData.holdout`."""
        keep_index, held_index = stratified_holdout(self.labels, fraction, seed)
        return self.rows(keep_index), self.rows(held_index)

    def batches(self, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None,
                device: str | torch.device = "cpu") -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """Minibatches ``(features, labels)`` in :meth:`TapData.batches` order."""
        for idx in minibatch_indices(len(self), batch_size, shuffle=shuffle, generator=generator):
            yield self.batch(idx, device), self.labels[idx].to(device)


class StoredRows:
    """Rows of one stored tap that stay on disk until a minibatch asks for them.

    Supports what :class:`TapData` does with a feature tensor: ``len``, ``shape``,
    ``dtype``, indexing with a slice or an index tensor (reads those rows from the
    store's files and returns a tensor in the store's precision), :meth:`take`
    (a subset that still reads nothing) and :meth:`float` (reads every row). Memory
    then stays at one minibatch whatever the number of images: for edge devices.
    """

    def __init__(self, store: ActivationStore, key: str, rows: np.ndarray):
        self.store, self.key, self.rows = store, key, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        """``(rows, *per-image shape)``, as a tensor's."""
        return torch.Size((len(self.rows), *self.store.shape(self.key)))

    @property
    def dtype(self) -> torch.dtype:
        """The store's precision."""
        return getattr(torch, self.store.dtype)

    def take(self, index: torch.Tensor | np.ndarray) -> "StoredRows":
        """The rows at ``index``, still unread."""
        return StoredRows(self.store, self.key, self.rows[np.asarray(index)])

    def __getitem__(self, index: slice | torch.Tensor | np.ndarray) -> torch.Tensor:
        picked = self.rows[index] if isinstance(index, slice) else self.rows[np.asarray(index)]
        return torch.from_numpy(self.store.get(self.key, picked))

    def float(self) -> torch.Tensor:
        """Every row, read into memory as float32."""
        return self[:].float()


def _take(values: torch.Tensor | StoredRows, index: torch.Tensor) -> torch.Tensor | StoredRows:
    return values.take(index) if isinstance(values, StoredRows) else values[index]


@dataclass
class TapData:
    """Rows of a store (or of in-memory tensors) with their labels.

    Features keep the store's precision in memory (float16 by default: half the
    RAM for token taps), or stay in the store until a minibatch reads them
    (:class:`StoredRows`), and are cast to float32 batch by batch.

    Attributes:
        features: tap key -> tensor (or :class:`StoredRows`) with one row per example.
        labels: class index per example.
        num_classes: size of the label space.
    """

    features: dict[str, torch.Tensor | StoredRows]
    labels: torch.Tensor
    num_classes: int

    @classmethod
    def from_store(cls, store: ActivationStore, keys: Sequence[str], paths: Sequence[str],
                   labels: Sequence[int], num_classes: int, *, stream: bool = False) -> "TapData":
        """Taps ``keys`` of the images ``paths`` (any order) in ``store``: loaded into memory,
        or with ``stream=True`` read from the store minibatch by minibatch (:class:`StoredRows`)."""
        rows = store.index_of(paths)
        features = {k: StoredRows(store, k, rows) if stream else torch.from_numpy(store.get(k, rows))
                    for k in keys}
        return cls(features, torch.as_tensor(list(labels), dtype=torch.long), num_classes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def streamed(self) -> bool:
        """True when some tap stays in the store until a minibatch reads it."""
        return any(isinstance(v, StoredRows) for v in self.features.values())

    def float_features(self) -> dict[str, torch.Tensor]:
        """Every feature as float32 (a copy when stored in lower precision)."""
        return {k: v.float() for k, v in self.features.items()}

    def rows(self, index: torch.Tensor) -> "TapData":
        """The examples at ``index``."""
        return TapData({k: _take(v, index) for k, v in self.features.items()}, self.labels[index],
                       self.num_classes)

    def holdout(self, fraction: float = 0.2, seed: int = 0) -> tuple["TapData", "TapData"]:
        """Stratified split into (rest, held out): for methods that select on validation
        data when the protocol gives them none (the final runs on train+val)."""
        keep_index, held_index = stratified_holdout(self.labels, fraction, seed)
        return self.rows(keep_index), self.rows(held_index)

    def subset(self, keys: Sequence[str]) -> "TapData":
        """The same examples with only taps ``keys``."""
        return TapData({k: self.features[k] for k in keys}, self.labels, self.num_classes)

    def batches(self, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None,
                device: str | torch.device = "cpu") -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """Minibatches ``(features, labels)``; shuffled with ``generator`` when asked."""
        for idx in minibatch_indices(len(self), batch_size, shuffle=shuffle, generator=generator):
            yield self.batch(idx, device)

    def batch(self, idx: torch.Tensor, device: str | torch.device = "cpu",
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Rows ``idx`` as one batch ``(features in float32, labels)`` on ``device``."""
        return {k: v[idx].to(device).float() for k, v in self.features.items()}, self.labels[idx].to(device)
