"""Separated tuning as a service (MIST's paradigm): a feature server and an edge client.

The server (:func:`create_app`, ``frozenlens serve``) runs the frozen backbone and
answers batches of images with the taps it serves (by default ``final:cls``,
``final:patch_mean`` and the taps methods offer remote clients, such as MIST's
gather g_k, ``gather.<k>:tokens``), in float32, float16 or int8 on the wire. The edge
(:class:`RemoteTaps`, ``frozenlens fit/predict --remote URL``) fetches features
once into its activation store and trains and predicts with small methods
locally. ``docs/serve.md`` has the walk-through.

Imports are lazy: the edge never loads FastAPI, the server never loads httpx.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "create_app": "frozenlens.serve.app",
    "Limits": "frozenlens.serve.app",
    "FeatureEngine": "frozenlens.serve.engine",
    "FeatureClient": "frozenlens.serve.client",
    "RemoteTaps": "frozenlens.serve.client",
    "CODECS": "frozenlens.serve.codecs",
    "get_codec": "frozenlens.serve.codecs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'frozenlens.serve' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
