"""Image-classification data: tasks in VTAB-1k / ImageFolder / HF imagefolder layouts.

    >>> from frozenlens.data import load_task, load_image
    >>> task = load_task("../shared/data/cifar10")       # layout detected automatically
    >>> task.split("train")[0]                          # ImageItem(path=..., label=0)
    >>> load_image(task.split("train")[0].path)          # decoded, always RGB

The demo's Fashion-MNIST builder lives in ``examples/fashion_mnist.py``, outside the library.
"""

from __future__ import annotations

from frozenlens.data.images import IMAGE_EXTENSIONS, load_image, to_rgb
from frozenlens.data.tasks import ImageItem, Task, load_task, stratified_split

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageItem",
    "Task",
    "load_image",
    "load_task",
    "stratified_split",
    "to_rgb",
]
