"""Where frozenlens keeps what it downloads, converts and extracts."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the frozenlens cache.

    ``$FROZENLENS_CACHE`` if set, else ``$XDG_CACHE_HOME/frozenlens``, else
    ``~/.cache/frozenlens``. Holds converted weights (``weights/``), built
    datasets (``data/``) and activation stores (``stores/``).
    """
    env = os.environ.get("FROZENLENS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "frozenlens"


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed and return it."""
    path.mkdir(parents=True, exist_ok=True)
    return path
