"""Training data made of images, for methods that run the backbone in the training loop.

:class:`ImageData` decodes the images of a split once, applies the backbone's
evaluation preprocessing up to the pixel grid (resize, centre crop) and keeps
the result in memory as ``uint8`` ``(3, H, W)``: 147 KB per image at 224 px,
so the 1000 training images of a VTAB-1k task take 147 MB (float16 would
double that and round the normalised values; float32 would quadruple it).
Each batch is converted to float32 and normalised with the backbone's mean and
std, giving exactly what :meth:`FrozenBackbone.transform` gives for the same
image (checked by the tests).

It has the interface the shared trainer uses from :class:`TapData`
(``len``, ``labels``, ``num_classes``, ``batches``, ``rows``, ``holdout``);
batches are ``({"images": (B, 3, H, W) float32}, labels)``.

Training augmentation: none. The VTAB-1k protocol (VPT, VQT, AdaptFormer,
NOAH) trains on the resized, centre-cropped images as they are, and so does
frozenlens, for every method alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from frozenlens.backbones.base import FrozenBackbone
from frozenlens.data import Task, load_image, to_rgb
from frozenlens.errors import FrozenlensError
from frozenlens.train.data import ExampleRows

IMAGES_KEY = "images"


class PixelPipeline:
    """A backbone's evaluation transform split at the pixel grid.

    ``to_pixels`` (PIL image -> ``uint8`` ``(3, H, W)``) runs the PIL steps
    (resize, crop); :meth:`normalize` turns a batch of them into the float32
    tensor the full transform would give.
    """

    def __init__(self, transform: Any):
        steps = list(getattr(transform, "transforms", []))
        names = [type(step).__name__ for step in steps]
        if "Normalize" not in names or not any(n in ("ToTensor", "MaybeToTensor") for n in names):
            raise FrozenlensError(f"cannot split the backbone's transform {names}: expected PIL steps, "
                                  "ToTensor and Normalize (timm's evaluation transform)")
        to_tensor = next(i for i, n in enumerate(names) if n in ("ToTensor", "MaybeToTensor"))
        normalize = steps[names.index("Normalize")]
        self.pil_steps = steps[:to_tensor]
        self.mean = torch.as_tensor(normalize.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(normalize.std, dtype=torch.float32).view(1, -1, 1, 1)

    def to_pixels(self, image: Any) -> torch.Tensor:
        """``uint8`` ``(3, H, W)`` of a decoded RGB PIL image after resize and crop."""
        for step in self.pil_steps:
            image = step(image)
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Float32 normalised images ``(B, 3, H, W)`` from ``uint8`` pixels (on their device)."""
        mean, std = self.mean.to(pixels.device), self.std.to(pixels.device)
        return pixels.float().div(255).sub(mean).div(std)


class ImageData(ExampleRows):
    """Preprocessed images of one split with their labels, kept in memory as ``uint8``.

    Attributes:
        pixels: ``(N, 3, H, W)`` uint8, resized and cropped as the backbone expects.
        labels: class index per example.
        num_classes: size of the label space.
        paths: the image file of each example (for building subsets).
        pipeline: the backbone's preprocessing, split at the pixel grid.
    """

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 paths: Sequence[str], pipeline: PixelPipeline):
        self.pixels = pixels
        self.labels = labels
        self.num_classes = num_classes
        self.paths = list(paths)
        self.pipeline = pipeline

    @classmethod
    def from_paths(cls, paths: Sequence[str | Path], labels: Sequence[int], num_classes: int,
                   backbone: FrozenBackbone, *, progress: bool = False, desc: str = "images",
                   ) -> "ImageData":
        """Decode and preprocess ``paths`` for ``backbone``."""
        pipeline = PixelPipeline(backbone.transform())
        size = backbone.image_size
        pixels = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
        for row, path in enumerate(tqdm(paths, desc=desc, unit="img", disable=not progress,
                                        leave=False)):
            pixels[row] = pipeline.to_pixels(load_image(path))
        return cls(pixels, torch.as_tensor(list(labels), dtype=torch.long), num_classes,
                   [str(p) for p in paths], pipeline)

    @classmethod
    def from_task(cls, task: Task, split: str, backbone: FrozenBackbone, *,
                  progress: bool = False) -> "ImageData":
        """The images of one split of ``task``, decoded and preprocessed once."""
        items = task.split(split)
        return cls.from_paths([i.path for i in items], [i.label for i in items], len(task.classes),
                              backbone, progress=progress, desc=f"decoding {split}")

    @property
    def nbytes(self) -> int:
        """Memory held by the pixels."""
        return self.pixels.numel() * self.pixels.element_size()

    def rows(self, index: torch.Tensor) -> "ImageData":
        """The examples at ``index``."""
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageData(self.pixels[index], self.labels[index], self.num_classes,
                         [self.paths[int(i)] for i in index], self.pipeline)

    def ids(self) -> list[str]:
        """The image file of each example."""
        return self.paths

    def images(self, index: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
        """Normalised float32 images ``(B, 3, H, W)`` of the examples at ``index``."""
        return self.pipeline.normalize(self.pixels[index].to(device))

    def batch(self, index: torch.Tensor, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """``{"images": ...}`` of the examples at ``index``: what in-loop methods read."""
        return {IMAGES_KEY: self.images(index, device)}


def preprocess(backbone: FrozenBackbone, images: Sequence[str | Path | Image.Image],
               device: str | torch.device = "cpu") -> torch.Tensor:
    """Normalised float32 images for ``backbone`` (what :class:`ImageData` yields), from files or
    decoded images (:func:`as_pil` turns arrays and tensors into those)."""
    pipeline = PixelPipeline(backbone.transform())
    pixels = torch.stack([pipeline.to_pixels(to_rgb(p) if isinstance(p, Image.Image) else load_image(p))
                          for p in images])
    return pipeline.normalize(pixels.to(device))


def as_pil(image: "Image.Image | np.ndarray | torch.Tensor") -> Image.Image:
    """An in-memory image as a PIL image: ``HxW`` / ``HxWxC`` uint8 arrays, or ``CxHxW`` tensors
    (uint8, or float in [0, 1]) as torchvision's ``to_pil_image`` reads them."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise FrozenlensError(f"image array of dtype {image.dtype} and shape {image.shape}: give uint8 "
                                  "HxW or HxWxC (C = 1, 3 or 4)")
        return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if isinstance(image, torch.Tensor):
        from torchvision.transforms.functional import to_pil_image

        if image.ndim not in (2, 3):
            raise FrozenlensError(f"image tensor of shape {tuple(image.shape)}: give CxHxW or HxW")
        return to_pil_image(image.detach().cpu())
    raise FrozenlensError(f"cannot read {type(image).__name__} as an image: give a path, a PIL image, "
                          "a uint8 array or a CxHxW tensor")
