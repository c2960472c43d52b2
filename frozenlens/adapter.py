"""Adapter files: only what a method learned, plus the JSON needed to rebuild it.

An adapter is a folder with ``adapter.safetensors`` (the method's state dict)
and ``adapter.json`` (adapter format version, method name and config, class
names, the taps it reads, the identity of the backbone it was trained on,
weights hash included, and the SHA-256 of ``adapter.safetensors``). Both files
are written atomically. Nothing in it can execute code when loaded, and a
damaged or edited adapter (truncated or garbage weights, wrong JSON types,
NaN/inf weights, weights that do not match the JSON) is refused with an
:class:`AdapterError` naming the file.

Format versions: ``1`` is the current one. Adapters written before the
``format_version`` field existed have the same layout and are read as format 1;
an adapter with a newer format version is refused with the version of
frozenlens that wrote it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from frozenlens import __version__
from frozenlens.atomic import save_safetensors, write_json
from frozenlens.backbones import LOCAL_BACKBONES, FrozenBackbone, TextBackbone
from frozenlens.errors import AdapterError, FrozenlensError
from frozenlens.methods import Method, build_method, config_to_dict

WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter.json"
FORMAT_VERSION = 1
"""The adapter format this version of frozenlens writes (and the newest it reads)."""

_REQUIRED = {"method": str, "config": dict, "classes": list, "backbone": dict}


def save_adapter(out_dir: Path | str, method: Method, classes: list[str],
                 extra: dict[str, Any] | None = None) -> Path:
    """Write ``method``'s learned state and description into ``out_dir``; returns the folder.

    Each file is replaced atomically; ``adapter.json`` is written last and records
    the hash of the weights, so a save interrupted between the two files is
    detected when the adapter is loaded.

    Raises:
        AdapterError: a file cannot be written (e.g. the disk is full); the
            previous files, if any, are unchanged.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AdapterError(f"{out}: cannot create the adapter folder ({err.strerror or err})") from err
    state = {k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}
    weights = save_safetensors(out / WEIGHTS_FILE, state, error=AdapterError)
    meta = {
        "format_version": FORMAT_VERSION,
        "frozenlens_version": __version__,
        "method": method.name,
        "config": config_to_dict(method.config),
        "classes": list(classes),
        "taps": method.tap_keys(),
        "backbone": method.backbone_info,
        **(extra or {}),
    }
    meta.update(format_version=FORMAT_VERSION, weights_sha256=_sha256(weights))
    write_json(out / CONFIG_FILE, meta, error=AdapterError)
    return out


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def read_adapter_meta(adapter_dir: Path | str) -> dict[str, Any]:
    """The JSON description of an adapter, checked for the fields and types frozenlens needs.

    Raises:
        AdapterError: naming ``adapter.json`` when it is missing, unreadable, of
            a newer format version, or malformed.
    """
    folder = Path(adapter_dir)
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise AdapterError(f"{folder}: not an adapter folder (no {CONFIG_FILE}); "
                           "pass the --out folder of `frozenlens fit`, e.g. runs/NAME/linear")
    try:
        meta = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise AdapterError(f"{config_file}: not valid JSON ({err}); re-fit the adapter") from err
    if not isinstance(meta, dict):
        raise AdapterError(f"{config_file}: expected a JSON object, got {type(meta).__name__}; "
                           "re-fit the adapter")
    _check_version(config_file, meta)
    problem = _layout_problem(meta)
    if problem:
        raise AdapterError(f"{config_file}: {problem}{_legacy_hint(meta)}")
    return meta


def _check_version(config_file: Path, meta: dict[str, Any]) -> None:
    version = meta.get("format_version")
    if version is None:
        return  # written before format versions: read as format 1 if its layout is one
    writer = meta.get("frozenlens_version", "an unknown version")
    if type(version) is not int or version < 1:
        raise AdapterError(f"{config_file}: format_version {version!r} is not a positive integer "
                           f"(written by frozenlens {writer}); re-fit the adapter")
    if version > FORMAT_VERSION:
        raise AdapterError(
            f"{config_file}: adapter format {version}, written by frozenlens {writer}; this "
            f"frozenlens ({__version__}) reads formats up to {FORMAT_VERSION}. Upgrade frozenlens "
            "(pip install -U frozenlens) or re-fit the adapter with this version")


def _legacy_hint(meta: dict[str, Any]) -> str:
    if "format_version" in meta:
        return "; re-fit the adapter"
    writer = meta.get("frozenlens_version", "an unknown version")
    return (f". It has no format_version (written by frozenlens {writer}) and is not in a "
            f"layout frozenlens {__version__} reads: re-fit the adapter with this version")


def _layout_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with the fields of an adapter description (None if nothing)."""
    for key, kind in _REQUIRED.items():
        if key not in meta:
            return f"missing field {key!r}"
        if not isinstance(meta[key], kind):
            return f"field {key!r} is a {type(meta[key]).__name__}, expected a {kind.__name__}"
    classes = meta["classes"]
    if not classes or not all(isinstance(c, str) for c in classes):
        return "field 'classes' must be a non-empty list of class names (strings)"
    count = meta.get("num_classes", len(classes))
    if type(count) is not int or count != len(classes):
        return f"field 'num_classes' is {count!r}, expected {len(classes)} (the classes listed)"
    taps = meta.get("taps", [])
    if not isinstance(taps, list) or not all(isinstance(t, str) for t in taps):
        return "field 'taps' must be a list of tap names (strings)"
    backbone = meta["backbone"]
    if not all(isinstance(backbone.get(k), str) for k in ("name", "weights_hash")):
        return "field 'backbone' needs 'name' and 'weights_hash' strings"
    if "weights_sha256" in meta and not isinstance(meta["weights_sha256"], str):
        return "field 'weights_sha256' must be a string"
    return None


def read_adapter_weights(adapter_dir: Path | str, meta: dict[str, Any] | None = None,
                         ) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter.safetensors``, checked against ``adapter.json`` and for NaN/inf.

    Raises:
        AdapterError: naming the file when it is missing, empty, truncated, not
            safetensors, not the file ``adapter.json`` was saved with, or holds
            non-finite values.
    """
    folder = Path(adapter_dir)
    meta = read_adapter_meta(folder) if meta is None else meta
    file = folder / WEIGHTS_FILE
    if not file.is_file() or file.stat().st_size == 0:
        raise AdapterError(f"{file}: missing or empty; re-fit the adapter (or restore the file)")
    expected = meta.get("weights_sha256")
    if expected is not None and _sha256(file) != expected:
        raise AdapterError(f"{file}: does not match {CONFIG_FILE} (its SHA-256 differs from the one "
                           "recorded when the adapter was saved: damaged, replaced, or the save "
                           "was interrupted); re-fit the adapter")
    try:
        from safetensors.torch import load_file

        state = load_file(str(file))
    except Exception as err:  # safetensors raises its own error type for every kind of bad file
        raise AdapterError(f"{file}: not a readable safetensors file ({err}); it is truncated or "
                           "damaged: re-fit the adapter") from err
    _check_finite(file, state)
    return state


def _check_finite(file: Path, state: dict[str, torch.Tensor]) -> None:
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"{file}: tensor {name!r} holds NaN or infinite values; "
                               "re-fit the adapter (the training diverged or the file was edited)")


@dataclass
class Adapter:
    """An adapter folder, loaded: the trained method (in eval mode) and what ``adapter.json`` says."""

    path: Path
    method: Method
    meta: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        """Class names, in the order of the method's logits."""
        return list(self.meta["classes"])

    @property
    def spec(self) -> str:
        """The method spec it was fitted with (e.g. ``vqt:num_queries=2``)."""
        return str(self.meta.get("spec", self.meta["method"]))

    @property
    def seed(self) -> int | None:
        """The seed of the saved model (the first of the final runs), when recorded."""
        return self.meta.get("seed")

    @property
    def result(self) -> dict[str, Any] | None:
        """The results row of the fit that saved it (accuracy over all seeds), when recorded."""
        return self.meta.get("result")


def load_adapter(adapter_dir: Path | str, backbone: FrozenBackbone | TextBackbone | dict[str, Any] | None = None,
                 ) -> Adapter:
    """Rebuild the method of an adapter folder (like peft's ``PeftModel.from_pretrained``).

    Args:
        adapter_dir: folder written by :func:`save_adapter`.
        backbone: the backbone it will run on (or its description); refused when
            its weights hash differs from the one the adapter was trained on.
            Methods that reuse backbone modules need the backbone itself.

    Raises:
        AdapterError: the adapter is damaged, edited into something invalid, of a
            newer format, or was trained on another backbone; the message names
            the file.
    """
    folder = Path(adapter_dir)
    meta = read_adapter_meta(folder)
    trained_on = meta["backbone"]
    local = isinstance(backbone, LOCAL_BACKBONES)
    info = backbone.describe() if local else backbone
    if info is not None and info["weights_hash"] != trained_on["weights_hash"]:
        raise AdapterError(
            f"{folder} was trained on backbone {trained_on['name']!r} (weights "
            f"{trained_on['weights_hash'][:12]}), not on {info['name']!r} (weights "
            f"{info['weights_hash'][:12]}); use --backbone {trained_on['name']}"
        )
    if info is not None and info.get("tokenizer_hash") != trained_on.get("tokenizer_hash"):
        raise AdapterError(f"{folder} was trained with another tokenizer than {info['name']!r}'s "
                           f"(tokenizer {str(trained_on.get('tokenizer_hash'))[:12]}); use the backbone and "
                           "tokenizer it was trained with")
    state = read_adapter_weights(folder, meta)
    method = _build(folder, meta, backbone if local else trained_on)
    try:
        method.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, KeyError) as err:
        raise AdapterError(f"{folder / WEIGHTS_FILE}: does not fit method {meta['method']!r} as "
                           f"configured in {CONFIG_FILE} ({err}); re-fit the adapter") from err
    return Adapter(folder, method.eval(), meta)


def _build(folder: Path, meta: dict[str, Any], source: FrozenBackbone | TextBackbone | dict[str, Any]) -> Method:
    try:
        return build_method(meta["method"], meta["config"], source, len(meta["classes"]))
    except AdapterError:
        raise
    except FrozenlensError as err:
        raise AdapterError(f"{folder / CONFIG_FILE}: {err}") from err
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as err:
        raise AdapterError(f"{folder / CONFIG_FILE}: the config of method {meta['method']!r} is "
                           f"invalid ({type(err).__name__}: {err}); re-fit the adapter") from err
