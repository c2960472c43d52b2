"""Decode and preprocess images in worker processes while the backbone runs.

:func:`extract` reads the images of a store through a torch ``DataLoader``
over :class:`ImageFiles`: each worker opens a file with
:func:`frozenlens.data.load_image` (the raster allow-list applies) and runs the
backbone's own evaluation transform (:meth:`FrozenBackbone.transform`) on it, so
a batch holds exactly the tensor the main thread would have made (the stored
values are byte-identical for any number of workers; tested). A worker never
raises: a file that cannot be read or preprocessed comes back as the error, and
the main process raises it, so the message names the file as it does without
workers. ``num_workers=0`` decodes on the main thread, between backbone passes.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from frozenlens.data.images import load_image
from frozenlens.errors import FrozenlensError, ImageError

MAX_AUTO_WORKERS = 4
"""Most worker processes chosen when ``num_workers`` is None (see :func:`resolve_workers`)."""


class ImageFiles(Dataset):
    """Item ``i``: ``(i, transform(load_image(paths[i])))``, or ``(i, error)`` naming the file."""

    def __init__(self, paths: Sequence[str], transform: Callable[[Any], torch.Tensor]):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | Exception]:
        path = Path(self.paths[index])
        try:
            return index, self.transform(load_image(path))
        except FrozenlensError as err:  # ImageError / DataError: already names the file
            return index, err
        except Exception as err:  # the transform failed on a decoded image
            return index, ImageError(f"{path}: cannot preprocess image ({type(err).__name__}: {err}). "
                                     "Remove or replace the file, or drop its line from the split file.")


def collate(items: list[tuple[int, Any]]) -> tuple[torch.Tensor, torch.Tensor | list[str]] | Exception:
    """``(rows, images)`` of a batch (``images`` stacked; texts stay a list), or the first error
    among its items."""
    for _, value in items:
        if isinstance(value, Exception):
            return value
    rows = torch.tensor([row for row, _ in items], dtype=torch.long)
    values = [value for _, value in items]
    return rows, torch.stack(values) if isinstance(values[0], torch.Tensor) else values


def available_cpus() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_workers(num_workers: int | None, num_batches: int, device: str | torch.device = "cpu") -> int:
    """Worker processes to decode with: ``num_workers`` as given, or (None) the default.

    The default is none for a single batch or inside a daemonic process (which may not
    start children). With the backbone on a GPU, it is one worker per available core, up
    to :data:`MAX_AUTO_WORKERS`: the cores are otherwise idle while the GPU computes. On
    the CPU, the backbone's forward already uses ``torch.get_num_threads()`` cores, so
    only the cores left over get workers. On a 2-core machine that is none, and measured
    alone, a worker there costs more than it saves: ``benchmarks/extraction_speed.py``
    gave 87% of the bare forward with decoding on the main thread, against 76% with 1 or
    2 workers.
    """
    if num_workers is not None:
        return num_workers
    if num_batches <= 1 or multiprocessing.current_process().daemon:
        return 0
    spare = available_cpus()
    if torch.device(device).type == "cpu":
        spare -= torch.get_num_threads()
    return max(0, min(MAX_AUTO_WORKERS, spare))


class _Plan:
    """Batch sampler whose batches come from a generator set before each pass (runs in the
    main process, lazily: the loader asks for a batch only when it has room to prefetch it)."""

    def __init__(self, batches: Iterable[list[int]]):
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)


def preprocessed_batches(dataset: Dataset, batches: Iterable[list[int]], *, num_workers: int,
                         pin_memory: bool = False, prefetch_factor: int = 2,
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(rows, images)`` for each list of rows of ``batches``, in order, preprocessed by
    ``num_workers`` processes (0: here) while the caller works on the previous batches.

    ``batches`` is consumed lazily, up to ``prefetch_factor * num_workers`` batches ahead.

    Raises:
        FrozenlensError: an image could not be read or preprocessed (the message names it).
    """
    loader = DataLoader(dataset, batch_sampler=_Plan(batches), num_workers=num_workers,
                        collate_fn=collate, pin_memory=pin_memory,
                        prefetch_factor=prefetch_factor if num_workers else None)
    iterator = iter(loader)
    try:
        for batch in iterator:
            if isinstance(batch, Exception):
                raise batch
            yield batch
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:  # stop the workers now, not when the iterator is collected
            shutdown()
