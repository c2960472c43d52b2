"""Tap values of images that are not stored: one backbone pass, batch by batch.

What ``fit`` uses to score the test split (:func:`frozenlens.protocol.score_test`):
images are decoded and preprocessed by DataLoader workers while the backbone runs
(as extraction does), or a feature server (:class:`~frozenlens.store.TapSource`)
computes the taps, and nothing is written to disk.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from frozenlens.backbones.base import FrozenBackbone
from frozenlens.backbones.taps import Tap
from frozenlens.backbones.text import TextBackbone
from frozenlens.store.examples import TextExamples, check_examples, forward_batch, input_rows
from frozenlens.store.loader import preprocessed_batches, resolve_workers
from frozenlens.store.store import TapSource


def stream_taps(backbone: FrozenBackbone | TextBackbone | TapSource, paths: Sequence[str] | TextExamples,
                taps: Sequence[Tap], *, batch_size: int = 32, device: str | torch.device = "cpu",
                num_workers: int | None = None,
                ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """``(rows, {tap key: values})`` for consecutive batches of ``paths`` (image files, or
    :class:`~frozenlens.store.examples.TextExamples` for a text backbone), in order.

    Values are float32 tensors on CPU (local backbone: where it runs), one row per image. Texts
    are padded to each batch's longest, with the padding mask under ``attention_mask``.
    ``num_workers`` as in :func:`frozenlens.store.extract`.

    Raises:
        FrozenlensError: an image cannot be read or preprocessed (the message names it).
    """
    batches = [list(range(start, min(start + batch_size, len(paths)))) for start in range(0, len(paths), batch_size)]
    check_examples(backbone, paths)
    if not isinstance(backbone, (FrozenBackbone, TextBackbone)):
        for rows in batches:
            values = backbone.compute_taps([paths[r] for r in rows], taps)
            yield torch.tensor(rows), {k: torch.from_numpy(v).float() for k, v in values.items()}
        return
    text = isinstance(paths, TextExamples)
    workers = 0 if text else resolve_workers(num_workers, len(batches), device)  # tokenizing is fast
    pin = torch.device(device).type == "cuda" and not text
    with torch.inference_mode():
        for rows, batch in preprocessed_batches(input_rows(backbone, paths), batches, num_workers=workers,
                                                pin_memory=pin):
            yield rows, dict(forward_batch(backbone, batch, taps, device))
