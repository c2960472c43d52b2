"""Adapter files: only what a method learned, plus the JSON needed to rebuild it.

An adapter is a folder with ``adapter.safetensors`` (the method's state dict)
and ``adapter.json`` (method name and config, class names, the taps it reads,
and the identity of the backbone it was trained on, weights hash included).
Nothing in it can execute code when loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from frozenlens import __version__
from frozenlens.backbones.base import FrozenBackbone
from frozenlens.errors import AdapterError
from frozenlens.methods import Method, build_method, config_to_dict

WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter.json"


def save_adapter(out_dir: Path | str, method: Method, classes: list[str],
                 extra: dict[str, Any] | None = None) -> Path:
    """Write ``method``'s learned state and description into ``out_dir``; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    meta = {
        "frozenlens_version": __version__,
        "method": method.name,
        "config": config_to_dict(method.config),
        "classes": list(classes),
        "taps": method.tap_keys(),
        "backbone": method.backbone_info,
        **(extra or {}),
    }
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return out


def read_adapter_meta(adapter_dir: Path | str) -> dict[str, Any]:
    """The JSON description of an adapter, checked for the fields frozenlens needs."""
    folder = Path(adapter_dir)
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise AdapterError(f"{folder}: not an adapter folder (no {CONFIG_FILE}); "
                           "pass the --out folder of `frozenlens fit`, e.g. runs/NAME/linear")
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{config_file}: not valid JSON ({err})") from err
    missing = [k for k in ("method", "config", "classes", "backbone") if k not in meta]
    if missing:
        raise AdapterError(f"{config_file}: missing fields {', '.join(missing)}")
    return meta


def load_adapter(adapter_dir: Path | str, backbone: FrozenBackbone | dict[str, Any] | None = None,
                 ) -> tuple[Method, dict[str, Any]]:
    """Rebuild the method of an adapter folder.

    Args:
        adapter_dir: folder written by :func:`save_adapter`.
        backbone: the backbone it will run on (or its description); refused when
            its weights hash differs from the one the adapter was trained on.
            Methods that reuse backbone modules need the backbone itself.
    """
    folder = Path(adapter_dir)
    meta = read_adapter_meta(folder)
    trained_on = meta["backbone"]
    info = backbone.describe() if isinstance(backbone, FrozenBackbone) else backbone
    if info is not None and info["weights_hash"] != trained_on["weights_hash"]:
        raise AdapterError(
            f"{folder} was trained on backbone {trained_on['name']!r} (weights "
            f"{trained_on['weights_hash'][:12]}), not on {info['name']!r} (weights "
            f"{info['weights_hash'][:12]}); use --backbone {trained_on['name']}"
        )
    source = backbone if isinstance(backbone, FrozenBackbone) else trained_on
    method = build_method(meta["method"], meta["config"], source, len(meta["classes"]))
    try:
        method.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    except (OSError, RuntimeError) as err:
        raise AdapterError(f"{folder / WEIGHTS_FILE}: cannot load ({err})") from err
    return method.eval(), meta
