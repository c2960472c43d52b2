"""Atomic file writes: a reader sees the old complete file or the new complete file, never half.

Every helper writes into a temporary file in the target's folder, flushes it to
disk (``fsync``), then renames it over the target (``os.replace``) and syncs the
folder. A crash, a kill or a full disk leaves the previous file untouched; an
``OSError`` (``ENOSPC`` included) becomes a :class:`FrozenlensError` naming the
file, and the temporary file is removed.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

from frozenlens.errors import FrozenlensError


def temp_name(path: Path) -> Path:
    """A hidden sibling of ``path`` no other writer uses (pid and a random suffix)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def write_error(path: Path, err: OSError, error: type[FrozenlensError] = FrozenlensError,
                ) -> FrozenlensError:
    """The user-facing error for a failed write of ``path``."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return error(f"{path}: no space left on the device while writing it; free some disk space "
                     "and run the same command again (the previous version of the file, if any, "
                     "is unchanged)")
    return error(f"{path}: cannot write it ({err.strerror or err}); the previous version of the "
                 "file, if any, is unchanged")


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path | str, write: Callable[[Path], None], *,
                 error: type[FrozenlensError] = FrozenlensError) -> Path:
    """Call ``write(tmp)`` to fill a temporary file, then move it over ``path`` atomically.

    Args:
        path: the file to create or replace.
        write: writes the complete new content to the path it is given.
        error: the :class:`FrozenlensError` subclass raised on failure.

    Raises:
        error: the write failed (e.g. the disk is full); ``path`` is unchanged.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_error(path, err, error) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path | str, data: bytes, *,
                error: type[FrozenlensError] = FrozenlensError) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), error=error)


def write_text(path: Path | str, text: str, *,
               error: type[FrozenlensError] = FrozenlensError) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"), error=error)


def write_json(path: Path | str, value: Any, *, indent: int | None = 2,
               error: type[FrozenlensError] = FrozenlensError) -> Path:
    """Write ``value`` as JSON (with a final newline) to ``path`` atomically."""
    return write_text(path, json.dumps(value, indent=indent) + "\n", error=error)


def save_safetensors(path: Path | str, tensors: Mapping[str, Any],
                     metadata: dict[str, str] | None = None, *,
                     error: type[FrozenlensError] = FrozenlensError) -> Path:
    """Save torch ``tensors`` as a safetensors file at ``path`` atomically."""
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(dict(tensors), str(tmp), metadata=metadata),
                        error=error)
