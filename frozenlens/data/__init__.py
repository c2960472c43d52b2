"""Image-classification data: tasks in VTAB-1k / ImageFolder / HF imagefolder layouts.

    >>> from frozenlens.data import load_task, load_image
    >>> task = load_task("../shared/data/cifar10")       # layout detected automatically
    >>> task.split("train")[0]                          # ImageItem(path=..., label=0)
    >>> load_image(task.split("train")[0].path)          # decoded, always RGB

:func:`build_fashion_mnist_task` builds a small offline demo task from Fashion-MNIST.
"""

from __future__ import annotations

from frozenlens.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    build_fashion_mnist_task,
    find_fashion_mnist_source,
    read_idx,
)
from frozenlens.data.images import IMAGE_EXTENSIONS, load_image, to_rgb
from frozenlens.data.tasks import ImageItem, Task, load_task, stratified_split

__all__ = [
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "ImageItem",
    "Task",
    "build_fashion_mnist_task",
    "find_fashion_mnist_source",
    "load_image",
    "load_task",
    "read_idx",
    "stratified_split",
    "to_rgb",
]
