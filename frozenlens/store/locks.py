"""Advisory file locks (``fcntl.flock``) that let several processes fill one store.

A lock is released by the kernel when its holder exits, however it exits, so a
lock that can be taken proves that its previous holder is gone.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from frozenlens.errors import StoreError

LOCKS_DIR = "locks"


def store_lock_file(store: Path) -> Path:
    """The lock guarding a store's ``meta.json``, ``complete.json`` and quarantine moves."""
    return store / LOCKS_DIR / "store.lock"


def shard_lock_file(store: Path, shard: int) -> Path:
    """The lock held by the one process writing (or repairing) shard ``shard``."""
    return store / LOCKS_DIR / f"shard-{shard:06d}.lock"


@contextmanager
def file_lock(path: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (created if needed) for the ``with`` block.

    Yields True when the lock is held; with ``blocking=False`` it yields False at
    once when another process holds it.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise StoreError(f"{path}: cannot create the store's lock file ({err.strerror}); "
                         "is the store folder writable?") from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            # Unlock explicitly: a child forked meanwhile (a DataLoader worker) holds a copy of
            # this descriptor, and closing ours alone would leave the lock held until it exits.
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
