"""Settings added to a config after results were saved under keys that hash the config.

A bench cell's key (:func:`frozenlens.bench.cells.cell_key`) hashes its method's config and its
training settings, so that a changed setting never reuses a result computed without it. A new
field changes that hash too, even at a default that reproduces the saved results, and a resumed
bench would recompute every saved cell of the method. A field declared with :func:`added_setting`
stays out of the key while it holds its default; any other value is keyed as usual.

Declare a new setting this way only when its default reproduces earlier results exactly (the
default is the old behaviour); a setting whose introduction changes results must change the keys,
so declare it as a plain field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

ADDED_SETTING = "frozenlens_added_setting"
"""Field metadata flag set by :func:`added_setting`."""


def added_setting(default: Any) -> Any:
    """A dataclass field for a setting added later whose ``default`` keeps earlier results.

    Example: ``clip_norm: float = added_setting(0.0)`` in a config dataclass, where 0.0 (no clipping)
    is how the method trained before the setting existed.
    """
    return dataclasses.field(default=default, metadata={ADDED_SETTING: True})


def _unkeyed(config: Any, field: dataclasses.Field) -> bool:
    """True for an added setting that holds its default (left out of keys)."""
    return bool(field.metadata.get(ADDED_SETTING)) and getattr(config, field.name) == field.default


def keyed_repr(config: Any) -> str:
    """``repr(config)`` of a config dataclass, without its added settings at their defaults.

    With no such setting it is exactly the dataclass' own ``repr``, so keys hashed from
    ``repr(config)`` before this function existed stay valid.
    """
    shown = [f for f in dataclasses.fields(config) if f.repr and not _unkeyed(config, f)]
    body = ", ".join(f"{f.name}={getattr(config, f.name)!r}" for f in shown)
    return f"{type(config).__qualname__}({body})"


def keyed_dict(config: Any) -> dict[str, Any]:
    """``dataclasses.asdict(config)`` without the config's added settings at their defaults."""
    unkeyed = {f.name for f in dataclasses.fields(config) if _unkeyed(config, f)}
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in unkeyed}
