"""What the feature server computes: decoded images in, the served taps out, many requests per pass.

The engine knows the backbone, which features it serves (declared taps such as
``final:cls`` and MIST's gather ``gather.<k>:tokens`` for the allowed k), and
how to run one backbone pass for a batch of jobs from several requests. The
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
from frozenlens.backbones.taps import Tap
from frozenlens.data.images import open_raster, to_rgb
from frozenlens.errors import FrozenlensError, ImageError
from frozenlens.serve.codecs import CODECS, WIRE_FORMAT

DEFAULT_TAPS = ("final:cls", "final:patch_mean")
"""Declared taps a server offers besides MIST's gathers, unless told otherwise."""

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


def default_gather_depths(depth: int) -> list[int]:
    """MIST's candidate gather depths for a backbone of ``depth`` blocks ({N/3, 2N/3, N})."""
    from frozenlens.methods.mist import gather_candidates

    return list(gather_candidates(depth))


class FeatureEngine:
    """Runs the frozen backbone for batches of jobs and returns each job's served taps.

    Args:
        backbone: the frozen backbone.
        taps: declared taps served besides the gathers (tap keys or :class:`Tap`).
        gather_depths: the k of ``gather.<k>:tokens`` served (default: MIST's candidates).
    """

    def __init__(self, backbone: FrozenBackbone, taps: Sequence[str | Tap] = DEFAULT_TAPS,
                 gather_depths: Sequence[int] | None = None):
        self.backbone = backbone
        depths = default_gather_depths(backbone.depth) if gather_depths is None else list(gather_depths)
        bad = [k for k in depths if not 1 <= k <= backbone.depth]
        if bad:
            raise FrozenlensError(f"gather depths {bad}: this backbone has {backbone.depth} blocks, "
                                  f"so k is 1..{backbone.depth}")
        self.gather_depths = sorted(set(depths))
        declared = [t if isinstance(t, Tap) else Tap.parse(t) for t in taps]
        for tap in declared:  # a tap this backbone cannot compute fails at start, not per request
            backbone.tap_shape(tap)
            deepest = tap.gather_depth - 1 if tap.gather_depth is not None else tap.block
            if deepest is not None and deepest >= backbone.depth:
                raise FrozenlensError(f"tap {tap.key}: this backbone has blocks 0..{backbone.depth - 1}")
        gathers = [Tap(f"gather.{k}", "tokens") for k in self.gather_depths]
        self.served: dict[str, Tap] = {t.key: t for t in [*declared, *gathers]}
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
            "gather_k": self.gather_depths,
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
            if len(name) > MAX_FEATURE_NAME:  # also keeps int() off a 5000-digit gather depth
                raise RequestError(422, f"feature name of {len(name)} characters ({name[:40]!r}...); served "
                                        f"names are short, e.g. 'gather.8:tokens' (GET /v1/info lists them)")
            try:
                tap = Tap.parse(name)
                refusal = None if tap.key in self.served else self._not_served(tap)
            except (FrozenlensError, ValueError) as err:
                raise RequestError(422, f"feature {name!r}: {err}") from None
            if refusal is not None:
                raise RequestError(422, refusal)
            taps.append(tap)
        return tuple(dict.fromkeys(taps))

    def _not_served(self, tap: Tap) -> str:
        if tap.gather_depth is not None:
            return (f"gather depth k={tap.gather_depth} ({tap.key}) is not served; available k: "
                    f"{', '.join(map(str, self.gather_depths)) or 'none'}")
        return f"feature {tap.key!r} is not served; served: {', '.join(self.served)}"

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
