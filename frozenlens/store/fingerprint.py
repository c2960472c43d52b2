"""The images part of a store key: a hash over image paths and contents, cached per file.

Hashing every image on every ``fit`` reads the whole dataset. The content hash
of each file is therefore cached (``<cache>/image-hashes.json``) under its
absolute path together with its size, modification and change times (ns) and
inode; a file whose signature changed, an image edited in place included, is
read and hashed again, and nothing else is. Files touched within the last two
seconds are not cached, so an edit in the same clock tick as the hash cannot
hide behind an unchanged signature.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import Sequence

from frozenlens.atomic import write_json
from frozenlens.errors import DataError, FrozenlensError
from frozenlens.paths import cache_dir

logger = logging.getLogger(__name__)

CACHE_FILE = "image-hashes.json"
_CACHE_VERSION = 1
_SETTLE_NS = 2_000_000_000


def default_cache_file() -> Path:
    """Where content hashes of images are cached: ``<cache>/image-hashes.json``."""
    return cache_dir() / CACHE_FILE


def _signature(path: Path) -> list[int]:
    """Size, mtime, ctime and inode of a regular file; DataError for anything else."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise DataError(f"{path}: cannot read the image file ({err.strerror}); fix or remove it, "
                        "or drop its line from the split file") from err
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{path}: not a regular file (a FIFO, socket, device or folder); "
                        "remove it or drop its line from the split file")
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(2**20):
                digest.update(chunk)
    except OSError as err:
        raise DataError(f"{path}: cannot read the image file ({err.strerror})") from err
    return digest.hexdigest()


def _load_cache(file: Path) -> dict[str, list]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        logger.warning("%s: unreadable image-hash cache, ignored and rebuilt (%s)", file, err)
        return {}
    ok = isinstance(data, dict) and data.get("version") == _CACHE_VERSION
    entries = data.get("files") if ok else None
    return entries if isinstance(entries, dict) else {}


def _save_cache(file: Path, entries: dict[str, list]) -> None:
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        write_json(file, {"version": _CACHE_VERSION, "files": entries}, indent=None)
    except (OSError, FrozenlensError) as err:  # a read-only cache only costs time
        logger.debug("image-hash cache not saved: %s", err)


def _cached_hash(path: Path, entries: dict[str, list], now_ns: int) -> tuple[str, bool]:
    """Content hash of ``path`` and whether ``entries`` gained or changed an entry."""
    key = os.path.abspath(path)
    sig = _signature(path)
    entry = entries.get(key)
    if isinstance(entry, list) and len(entry) == 2 and entry[0] == sig and isinstance(entry[1], str):
        return entry[1], False
    content = _hash_file(path)
    if now_ns - max(sig[1], sig[2]) < _SETTLE_NS:
        return content, False
    entries[key] = [sig, content]
    return content, True


def images_fingerprint(paths: Sequence[Path | str], cache_file: Path | None = None) -> str:
    """SHA-256 over the ordered image paths and the SHA-256 of each file's contents.

    Only files whose (size, mtime, ctime, inode) changed since they were last
    hashed are read; the others' hashes come from ``cache_file`` (default
    :func:`default_cache_file`).

    Raises:
        DataError: a path is not a readable regular file (missing, FIFO, symlink loop ...).
    """
    cache_file = cache_file or default_cache_file()
    entries = _load_cache(cache_file)
    digest, changed, now_ns = hashlib.sha256(), False, time.time_ns()
    for path in paths:
        content, added = _cached_hash(Path(path), entries, now_ns)
        changed |= added
        digest.update(str(path).encode() + b"\0")
        digest.update(bytes.fromhex(content))
    if changed:
        _save_cache(cache_file, entries)
    return digest.hexdigest()
