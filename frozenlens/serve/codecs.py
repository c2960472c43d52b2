"""Features on the wire: codecs (float32, float16, int8 with a per-token scale) and the payload.

A response of the feature server is one safetensors file: a tensor per feature
(``"gather.8:tokens"``, ``"final:cls"``; int8 adds ``"<feature>/scale"``) and a
JSON header under the ``frozenlens`` metadata key naming the format, the codec,
the backbone (name and weights hash), the image count and each feature's
per-image shape. safetensors holds plain arrays and JSON only: decoding never
executes code, and the client checks every field before it uses a value.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from frozenlens.errors import FrozenlensError

WIRE_FORMAT = "frozenlens-features/1"
"""Version tag of the payload; a client refuses any other."""

MEDIA_TYPE = "application/x-safetensors"
"""Content type of a feature payload."""

_SCALE_SUFFIX = "/scale"
_INT8_MAX = 127.0


class PayloadError(FrozenlensError):
    """A feature payload is malformed or does not match what was asked for."""


@dataclass(frozen=True)
class Codec:
    """How float features travel: the wire dtype, and for int8 a float32 scale per token.

    int8 quantises each token (each row along the last axis) symmetrically:
    ``scale = max|x| / 127``, ``q = round(x / scale)``; decoding is ``q * scale``.
    """

    name: str
    wire_dtype: str

    @property
    def scaled(self) -> bool:
        """Whether the codec sends a per-token scale next to the values."""
        return self.wire_dtype == "int8"

    def encode(self, values: np.ndarray) -> dict[str, np.ndarray]:
        """Wire arrays for ``values`` (``""``: the values, ``"/scale"``: int8 scales)."""
        values = np.ascontiguousarray(values, dtype=np.float32)
        if not self.scaled:
            return {"": values.astype(self.wire_dtype)}
        peak = np.abs(values).max(axis=-1, keepdims=True)
        scale = np.where(peak > 0, peak / _INT8_MAX, 1.0).astype(np.float32)
        quantised = np.clip(np.rint(values / scale), -_INT8_MAX, _INT8_MAX).astype(np.int8)
        return {"": quantised, _SCALE_SUFFIX: scale}

    def decode(self, parts: Mapping[str, np.ndarray]) -> np.ndarray:
        """Float32 values from the wire arrays of :meth:`encode`."""
        values = parts[""]
        if not self.scaled:
            return values.astype(np.float32)
        return values.astype(np.float32) * parts[_SCALE_SUFFIX]

    def bytes_per_image(self, shape: tuple[int, ...]) -> int:
        """Wire bytes of one image's value of per-image ``shape`` (scales included)."""
        count = int(np.prod(shape))
        tokens = count // shape[-1] if shape else 1
        return count * np.dtype(self.wire_dtype).itemsize + (4 * tokens if self.scaled else 0)


CODECS: dict[str, Codec] = {c.name: c for c in (
    Codec("float32", "float32"), Codec("float16", "float16"), Codec("int8", "int8"))}
"""Codecs by name."""


def get_codec(name: str) -> Codec:
    """The codec called ``name``; a clear error naming the choices otherwise."""
    if name not in CODECS:
        raise FrozenlensError(f"unknown codec {name!r}: choose from {', '.join(CODECS)}")
    return CODECS[name]


@dataclass
class FeaturePayload:
    """A decoded payload: its header, float32 features, and the dtypes they travelled in."""

    header: dict[str, Any]
    features: dict[str, np.ndarray]
    wire_dtypes: dict[str, str]
    num_bytes: int


def encode_payload(features: Mapping[str, np.ndarray], codec: Codec, backbone: Mapping[str, Any]) -> bytes:
    """One safetensors file holding ``features`` (float32, one row per image) in ``codec``."""
    counts = {len(v) for v in features.values()}
    if len(counts) != 1:
        raise PayloadError(f"features disagree on the number of images: {sorted(counts)}")
    tensors: dict[str, np.ndarray] = {}
    for key, values in features.items():
        for suffix, array in codec.encode(values).items():
            tensors[key + suffix] = array
    header = {
        "format": WIRE_FORMAT, "codec": codec.name, "count": counts.pop(),
        "backbone": backbone["name"], "weights_hash": backbone["weights_hash"],
        "features": {key: list(values.shape[1:]) for key, values in features.items()},
    }
    return save_safetensors(tensors, metadata={"frozenlens": json.dumps(header)})


def read_header(data: bytes) -> dict[str, Any]:
    """The frozenlens header of a payload, read without loading any tensor."""
    if len(data) < 8:
        raise PayloadError(f"feature payload of {len(data)} bytes is too short to be safetensors")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise PayloadError("feature payload is truncated (its safetensors header runs past the end)")
    try:
        meta = json.loads(data[8:8 + size])["__metadata__"]["frozenlens"]
        header = json.loads(meta)
    except (ValueError, KeyError, TypeError) as err:
        raise PayloadError(f"feature payload has no frozenlens header ({err})") from err
    if header.get("format") != WIRE_FORMAT:
        raise PayloadError(f"feature payload format {header.get('format')!r}; this client reads {WIRE_FORMAT}")
    return header


def decode_payload(data: bytes) -> FeaturePayload:
    """Decode a payload of :func:`encode_payload` (no verification beyond its own consistency)."""
    header = read_header(data)
    codec = get_codec(header["codec"])
    try:
        tensors = load_safetensors(data)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise PayloadError(f"feature payload is not a valid safetensors file ({err})") from err
    features, dtypes = {}, {}
    for key in header["features"]:
        parts = {suffix: tensors[key + suffix] for suffix in ("", _SCALE_SUFFIX) if key + suffix in tensors}
        if "" not in parts or (codec.scaled and _SCALE_SUFFIX not in parts):
            raise PayloadError(f"feature payload lacks the arrays of {key!r}")
        dtypes[key] = str(parts[""].dtype)
        features[key] = codec.decode(parts)
    return FeaturePayload(header, features, dtypes, len(data))


def verify_payload(payload: FeaturePayload, *, codec: str, weights_hash: str, count: int,
                   shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse a payload whose codec, backbone, image count, dtypes or shapes are not the ones asked for."""
    header = payload.header
    if header["weights_hash"] != weights_hash:
        raise PayloadError(f"features come from backbone weights {header['weights_hash'][:12]} "
                           f"({header['backbone']}), expected {weights_hash[:12]}")
    if header["codec"] != codec:
        raise PayloadError(f"features came in codec {header['codec']!r}, asked for {codec!r}")
    if header["count"] != count:
        raise PayloadError(f"features for {header['count']} images, sent {count}")
    wire = get_codec(codec).wire_dtype
    for key, shape in shapes.items():
        if key not in payload.features:
            raise PayloadError(f"feature {key!r} missing from the payload (has {sorted(payload.features)})")
        if payload.wire_dtypes[key] != wire:
            raise PayloadError(f"feature {key!r} travelled as {payload.wire_dtypes[key]}, codec {codec} is {wire}")
        got = payload.features[key].shape
        if got != (count, *shape):
            raise PayloadError(f"feature {key!r} has shape {got}, expected {(count, *shape)}")
