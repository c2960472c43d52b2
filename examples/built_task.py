"""Build a demo task folder once, atomically, and reuse it: shared by the example data builders.

A task is written into a per-writer temporary sibling of its folder and renamed into
place with a marker file (``.complete``) holding the settings it was built with. A
folder with the same marker is reused as it is; one with other settings, or without a
marker, is refused with a message saying what to do; a concurrent identical build that
wins the rename is accepted.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from frozenlens.atomic import fsync_dir, temp_name
from frozenlens.errors import DataError

MARKER = ".complete"
"""File written last into a finished task folder: the settings it was built with, as JSON."""


def read_marker(out_dir: Path) -> dict[str, Any] | None:
    """The settings a complete task in ``out_dir`` was built with, or None (missing or unreadable)."""
    try:
        return json.loads((out_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def build_once(out_dir: Path, settings: dict[str, Any], what: str, write: Callable[[Path], None]) -> Path:
    """``out_dir`` holding the task ``write(folder)`` builds with ``settings`` (built now if needed).

    Raises:
        DataError: ``out_dir`` holds a ``what`` built with other settings, or something that
            is not a complete one.
    """
    expected = json.loads(json.dumps(settings))  # as read back from the marker
    if _reusable(out_dir, expected, what):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(out_dir)  # frozenlens.atomic's per-writer sibling name, as for files
    tmp.mkdir()  # not mkdtemp: that would leave the finished task mode 0700
    try:
        write(tmp)
        (tmp / MARKER).write_text(json.dumps(expected) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if read_marker(out_dir) != expected:  # not a concurrent identical build
                raise
            return out_dir
        fsync_dir(out_dir.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _reusable(out_dir: Path, expected: dict[str, Any], what: str) -> bool:
    """True if ``out_dir`` already holds this task; False if it is absent (or an empty folder)."""
    if not out_dir.exists():
        return False
    marker = read_marker(out_dir)
    if marker == expected:
        return True
    if marker is not None:
        raise DataError(f"{out_dir}: holds a {what} built with other settings ({marker}); delete it or choose "
                        f"another folder to build one with {expected}.")
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
        return False
    raise DataError(f"{out_dir}: exists but is not a complete {what} (no {MARKER} marker); delete it or "
                    "choose another folder.")
