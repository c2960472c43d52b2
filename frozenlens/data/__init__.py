"""Image-classification data: tasks in VTAB-1k / ImageFolder / HF imagefolder layouts.

    >>> from frozenlens.data import load_task, load_image
    >>> task = load_task("../shared/data/cifar10")       # layout detected automatically
    >>> task.split("train")[0]                          # ImageItem(path=..., label=0)
    >>> load_image(task.split("train")[0].path)          # decoded, always RGB

Text tasks (CSV / JSONL / saved Hugging Face datasets) load with :func:`load_text_task`
(:mod:`frozenlens.data.text`). The demo's Fashion-MNIST builder lives in
``examples/fashion_mnist.py`` and the WordNet text task's in ``examples/text_data.py``, outside
the library.
"""

from __future__ import annotations

from frozenlens.data.images import IMAGE_EXTENSIONS, load_image, to_rgb
from frozenlens.data.tasks import ImageItem, Task, load_task, stratified_split
from frozenlens.data.text import TextItem, TextTask, load_text_task

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageItem",
    "Task",
    "TextItem",
    "TextTask",
    "load_image",
    "load_task",
    "load_text_task",
    "stratified_split",
    "to_rgb",
]
