"""What the feature server computes: decoded images in, the served taps out, many requests per pass.

The engine knows the backbone, which features it serves (declared taps, by
default :data:`DEFAULT_TAPS` plus the taps registered methods offer remote
clients, such as MIST's gathers ``gather.<k>:tokens``), and how to run one
backbone pass for a batch of jobs from several requests. The
HTTP app (:mod:`frozenlens.serve.app`) and the Ray Serve deployment
(:mod:`frozenlens.serve.ray_app`) share it.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from frozenlens.backbones.base import FrozenBackbone
from frozenlens.backbones.taps import Tap, check_taps
from frozenlens.data.images import open_raster, to_rgb
from frozenlens.errors import FrozenlensError, ImageError
from frozenlens.serve.codecs import CODECS, WIRE_FORMAT

DEFAULT_TAPS = ("final:cls", "final:patch_mean")
"""Taps a server offers, with the methods' :meth:`~frozenlens.methods.base.Method.served_taps`,
unless told otherwise."""

MAX_FEATURE_NAME = 64
"""Longest feature name a request may carry (served names are like ``gather.12:tokens``)."""
MAX_FEATURES = 32
"""Most feature names in one request."""


class RequestError(FrozenlensError):
    """A request the server refuses; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    """One request's preprocessed images and the taps it asked for."""

    images: torch.Tensor
    taps: tuple[Tap, ...]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def default_taps(backbone: dict[str, Any]) -> list[Tap]:
    """:data:`DEFAULT_TAPS` plus every registered method's
    :meth:`~frozenlens.methods.base.Method.served_taps` for ``backbone`` (its description)."""
    from frozenlens.methods import get_method, method_names

    offered = [Tap.parse(key) for key in DEFAULT_TAPS]
    offered += [tap for name in method_names() for tap in get_method(name).served_taps(backbone)]
    return list(dict.fromkeys(offered))


class FeatureEngine:
    """Runs the frozen backbone for batches of jobs and returns each job's served taps.

    Args:
        backbone: the frozen backbone.
        taps: the taps served (tap keys or :class:`Tap`); default :func:`default_taps`.
    """

    def __init__(self, backbone: FrozenBackbone, taps: Sequence[str | Tap] | None = None):
        self.backbone = backbone
        declared = default_taps(backbone.describe()) if taps is None else [
            t if isinstance(t, Tap) else Tap.parse(t) for t in taps]
        check_taps(declared, backbone.depth, backbone.name)  # fail at start, not per request
        self.served: dict[str, Tap] = {t.key: t for t in declared}
        self._transform = backbone.transform()

    # -- describing ---------------------------------------------------------------------
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-image shape of every served feature."""
        return {key: self.backbone.tap_shape(tap) for key, tap in self.served.items()}

    def info(self) -> dict[str, Any]:
        """What ``GET /v1/info`` returns (limits and batching are added by the app)."""
        shapes = self.shapes()
        return {
            "format": WIRE_FORMAT,
            "backbone": self.backbone.describe(),
            "image_size": self.backbone.image_size,
            "num_tokens": self.backbone.num_tokens,
            "features": {key: list(shape) for key, shape in shapes.items()},
            "codecs": {name: {"wire_dtype": codec.wire_dtype,
                              "bytes_per_image": {k: codec.bytes_per_image(s) for k, s in shapes.items()}}
                       for name, codec in CODECS.items()},
        }

    # -- validating ---------------------------------------------------------------------
    def resolve(self, names: Sequence[str]) -> tuple[Tap, ...]:
        """The served taps named ``names``; a 422 :class:`RequestError` for anything else."""
        if not names:
            raise RequestError(422, "ask for at least one feature, e.g. \"features\": [\"final:cls\"]")
        if len(names) > MAX_FEATURES:
            raise RequestError(422, f"{len(names)} features asked for; at most {MAX_FEATURES} per request")
        taps = []
        for name in names:
            if len(name) > MAX_FEATURE_NAME:  # also keeps int() off a 5000-digit site number
                raise RequestError(422, f"feature name of {len(name)} characters ({name[:40]!r}...); served "
                                        f"names are short, e.g. 'final:cls' (GET /v1/info lists them)")
            try:
                tap = Tap.parse(name)
            except (FrozenlensError, ValueError) as err:
                raise RequestError(422, f"feature {name!r}: {err}") from None
            if tap.key not in self.served:
                raise RequestError(422, f"feature {tap.key!r} is not served; served: {', '.join(self.served)}")
            taps.append(tap)
        return tuple(dict.fromkeys(taps))

    def preprocess(self, encoded: Sequence[str], max_pixels: int) -> torch.Tensor:
        """Decode base64 image files and apply the backbone's evaluation transform.

        Raises :class:`RequestError`: 400 for bad base64 or an undecodable image,
        413 for an image with more than ``max_pixels`` pixels.
        """
        tensors = []
        for index, text in enumerate(encoded):
            image = decode_image(text, index, max_pixels)
            tensors.append(self._transform(image))
        return torch.stack(tensors)

    # -- computing ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the backbone's weights are (inputs are moved there; results come back on CPU)."""
        return module_device(self.backbone)

    @torch.inference_mode()
    def run(self, jobs: Sequence[Job]) -> list[dict[str, np.ndarray]]:
        """One backbone pass for all ``jobs``; each gets its own taps as float32 arrays.

        The decoded images (CPU tensors) are moved to the backbone's device, and
        every result is brought back to the CPU before it becomes a NumPy array,
        so a CUDA backbone serves exactly like a CPU one.
        """
        taps = sorted({tap for job in jobs for tap in job.taps})
        batch = torch.cat([job.images for job in jobs]).to(self.device, non_blocking=False)
        values = self.backbone.forward_taps(batch, taps)
        host = {t.key: values[t.key].float().cpu() for t in taps}
        results, start = [], 0
        for job in jobs:
            stop = start + len(job)
            results.append({t.key: host[t.key][start:stop].numpy() for t in job.taps})
            start = stop
        return results


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for a module without either)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def decode_image(text: str, index: int, max_pixels: int) -> Image.Image:
    """One base64-encoded image file, fully decoded to RGB, or a :class:`RequestError`."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"images[{index}] is not valid base64") from None
    try:
        with open_raster(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise RequestError(413, f"images[{index}] is {width}x{height} = {width * height} pixels; "
                                        f"this server accepts at most {max_pixels}")
            image.load()
            return to_rgb(image)
    except RequestError:
        raise
    except ImageError as err:  # not an allowed raster format: never handed to another plugin
        raise RequestError(400, f"images[{index}] cannot be decoded: {err}") from None
    except Image.DecompressionBombError as err:
        raise RequestError(413, f"images[{index}] is too large to decode safely ({err})") from None
    except Exception as err:  # Pillow raises many types for undecodable data
        raise RequestError(400, f"images[{index}] cannot be decoded as an image "
                                f"({type(err).__name__}: {err})") from None
