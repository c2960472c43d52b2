"""Backbone in the loop: taps computed from the images every time a batch is drawn.

:class:`LiveTaps` has the interface the trainer uses from :class:`TapData`
(``batches``, ``len``, ``labels``, ``num_classes``), so the same ``train`` and
``evaluate`` run either from the activation store or the way reference
implementations do: decode, preprocess and run the frozen backbone for every
image of every epoch. With the same seed the batches come in the same order as
from a :class:`TapData` of the same images, and ``cast="float16"`` rounds the
taps through the store's precision, so both ways see the same numbers.

It exists to measure what the store saves; train from the store in practice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch

from frozenlens.backbones.base import FrozenBackbone
from frozenlens.backbones.taps import Tap
from frozenlens.data import Task, load_image
from frozenlens.train.data import minibatch_indices


class LiveTaps:
    """Labelled images whose taps the frozen backbone computes on demand.

    Attributes:
        backbone: the frozen backbone.
        paths: image files, one per example.
        labels: class index per example.
        num_classes: size of the label space.
        keys: tap keys every batch holds.
        cast: ``"float16"`` / ``"float32"`` to round taps through that precision
            (as a store of that dtype does), or None to keep the backbone's output.
        forward_batch: images per backbone pass (default: the training batch).
    """

    def __init__(self, backbone: FrozenBackbone, paths: Sequence[str | Path], labels: Sequence[int],
                 num_classes: int, keys: Sequence[str], *, cast: str | None = None,
                 forward_batch: int | None = None):
        self.backbone = backbone
        self.paths = [Path(p) for p in paths]
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.num_classes = num_classes
        self.keys = list(keys)
        self.taps = [Tap.parse(k) for k in self.keys]
        self.cast = getattr(torch, cast) if cast else None
        self.forward_batch = forward_batch
        self._transform = backbone.transform()

    @classmethod
    def from_task(cls, backbone: FrozenBackbone, task: Task, split: str, keys: Sequence[str],
                  **kwargs) -> "LiveTaps":
        """The images of one split of ``task``."""
        items = task.split(split)
        return cls(backbone, [i.path for i in items], [i.label for i in items], len(task.classes),
                   keys, **kwargs)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def rows(self, index: torch.Tensor) -> "LiveTaps":
        """The examples at ``index``."""
        picked = [self.paths[int(i)] for i in index]
        cast = str(self.cast).removeprefix("torch.") if self.cast else None
        return LiveTaps(self.backbone, picked, self.labels[index].tolist(), self.num_classes,
                        self.keys, cast=cast, forward_batch=self.forward_batch)

    def images(self, index: torch.Tensor) -> torch.Tensor:
        """Decoded, preprocessed images ``(B, 3, H, W)`` of the examples at ``index``."""
        return torch.stack([self._transform(load_image(self.paths[int(i)])) for i in index])

    @torch.no_grad()
    def taps_of(self, index: torch.Tensor, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Tap values (float32) of the examples at ``index``, from the backbone."""
        step = self.forward_batch or max(len(index), 1)
        parts = [self.backbone.forward_taps(self.images(index[s:s + step]).to(device), self.taps)
                 for s in range(0, len(index), step)]
        values = {k: torch.cat([p[k] for p in parts]) for k in self.keys}
        if self.cast is not None:
            values = {k: v.to(self.cast) for k, v in values.items()}
        return {k: v.float() for k, v in values.items()}

    def batches(self, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None,
                device: str | torch.device = "cpu") -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """Minibatches ``(features, labels)`` in :meth:`TapData.batches` order, taps computed now."""
        for idx in minibatch_indices(len(self), batch_size, shuffle=shuffle, generator=generator):
            yield self.taps_of(idx, device), self.labels[idx].to(device)
