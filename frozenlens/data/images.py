"""Open any image file as a fully decoded RGB ``PIL.Image``.

Conversion rules (applied by :func:`load_image`):

* ``RGB`` is returned as decoded.
* Images with transparency (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, and ``P``/``L``/``RGB``
  images with a ``transparency`` entry) are **alpha-composited onto a white background**, so
  transparent regions come out white rather than whatever colour the invisible pixels hold.
* 16-bit and 32-bit integer modes (``I;16*``, ``I``) are scaled from 0..65535 to 0..255
  (values outside that range are clipped); float mode ``F`` is taken as 0..1 when its maximum is
  at most 1, else as 0..255 (clipped). The result is grey, replicated to three channels.
* Every other mode (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` ...) goes
  through Pillow's ``convert("RGB")``.
* Multi-frame files (GIF, TIFF) give their first frame. EXIF orientation is **not** applied
  (pixels as stored, like torchvision's and timm's loaders).

Only raster formats are opened (:data:`RASTER_FORMATS`, through :func:`open_raster`, which
the feature server's decoder uses too), whatever the file is called: PostScript/EPS, PDF and
every other format Pillow could hand to an external program (Ghostscript for EPS) are refused
with an :class:`~frozenlens.errors.ImageError` before any plugin but the allowed ones sees
the bytes.

Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone: a truncated file is an error.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError

from frozenlens.errors import ImageError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)
"""Lower-case file suffixes treated as images when scanning folders."""

_RASTER_PLUGINS = {"JPEG": "JpegImagePlugin", "PNG": "PngImagePlugin", "BMP": "BmpImagePlugin",
                   "GIF": "GifImagePlugin", "TIFF": "TiffImagePlugin", "WEBP": "WebPImagePlugin",
                   "PPM": "PpmImagePlugin"}


def _register_raster_plugins() -> tuple[str, ...]:
    """Import (register) exactly the allowed plugins; the formats this Pillow can open."""
    for module in _RASTER_PLUGINS.values():
        try:
            importlib.import_module(f"PIL.{module}")
        except ImportError:  # e.g. a Pillow built without WebP
            pass
    return tuple(name for name in _RASTER_PLUGINS if name in Image.OPEN)


RASTER_FORMATS: tuple[str, ...] = _register_raster_plugins()
"""Pillow formats :func:`open_raster` opens: the formats of :data:`IMAGE_EXTENSIONS` plus
PPM/PGM/PBM (JPEG includes the multi-picture JPEGs some cameras write, which Pillow opens as
MPO). Nothing else is ever tried."""

# Leading bytes of formats people send by mistake (or on purpose), to name them in the error.
_KNOWN_OTHER_FORMATS = (
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS (DOS binary header)"),
    (b"%PDF", "PDF"),
    (b"<?xml", "XML/SVG"),
    (b"<svg", "SVG"),
)

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WHITE = (255, 255, 255, 255)


def is_image_file(path: Path) -> bool:
    """True if ``path`` has an image extension (case-insensitive) and is not hidden."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def load_image(path: str | Path) -> Image.Image:
    """Decode the image at ``path`` completely and return it in mode ``RGB``.

    Raises:
        ImageError: the file is missing, not an image, corrupt or truncated. The message
            names the file and says what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(
            f"{path}: no such image file. Fix the path, or drop its line from the split file."
        )
    try:
        with open_raster(path) as img:
            img.load()
            return to_rgb(img)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}. Remove or replace the file, or drop its line from the "
                         "split file.") from None
    except Exception as exc:  # Pillow raises many types for bad files (OSError, SyntaxError, ...)
        reason = f"{type(exc).__name__}: {exc}"
        raise ImageError(
            f"{path}: cannot decode image ({reason}). Remove or replace the file, "
            "or drop its line from the split file."
        ) from exc


def open_raster(fp: str | Path | IO[bytes]) -> Image.Image:
    """``Image.open`` restricted to :data:`RASTER_FORMATS` (lazy: call ``load()`` to decode).

    Use it as a context manager like ``Image.open``. The format is decided by the
    file's bytes, never by its name, and only the allowed formats' plugins are
    tried, so EPS/PostScript data (which Pillow would render with Ghostscript) or
    a PDF named ``x.jpg`` never reaches another plugin or an external program.

    Raises:
        ImageError: the data is not one of the allowed formats; the message names
            the format when it is a well-known non-raster one (PostScript/EPS, PDF, SVG).
    """
    try:
        return Image.open(fp, formats=RASTER_FORMATS)
    except UnidentifiedImageError:
        raise ImageError(f"not a supported raster image ({_sniff(fp)}); accepted formats: "
                         f"{', '.join(RASTER_FORMATS)}") from None


def _sniff(fp: str | Path | IO[bytes]) -> str:
    """A short description of what the data looks like, for error messages."""
    try:
        if isinstance(fp, (str, Path)):
            with open(fp, "rb") as handle:
                head = handle.read(16)
        else:
            fp.seek(0)
            head = fp.read(16)
    except (OSError, ValueError, AttributeError):
        return "unreadable"
    if not head:
        return "empty data"
    stripped = head.lstrip()
    for magic, name in _KNOWN_OTHER_FORMATS:
        if stripped.startswith(magic):
            return f"looks like {name}, which is refused"
    return "unrecognised format"


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to ``RGB`` (see the module docstring for the rules)."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return _composite_on_white(img)
    if img.mode.startswith("I") or img.mode == "F":
        return _high_depth_to_grey(img).convert("RGB")
    return img.convert("RGB")


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Flatten an image with alpha (or a transparent palette entry) onto white."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_grey(img: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float single-channel image to 8-bit ``L``."""
    values = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0
    grey = np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
    return Image.fromarray(grey, "L")
