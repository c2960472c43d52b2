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

from pathlib import Path

from frozenlens.data.images import IMAGE_EXTENSIONS, load_image, to_rgb
from frozenlens.data.tasks import ImageItem, Task, load_task, stratified_split
from frozenlens.data.text import TextItem, TextTask, load_text_task, looks_like_text_task

AnyTask = Task | TextTask
"""An image task or a text task: what ``fit`` and ``bench`` take."""


def load_any_task(path: str | Path, *, text_column: str = "text", label_column: str = "label") -> AnyTask:
    """An image task (:func:`load_task`) or, for ``.csv``/``.jsonl`` data, a text task
    (:func:`load_text_task`, with these column names); see :func:`looks_like_text_task`."""
    if looks_like_text_task(path):
        return load_text_task(path, text_column=text_column, label_column=label_column)
    return load_task(path)


def item_id(item: ImageItem | TextItem) -> str:
    """The string an example is stored under: an image's path, a text's :attr:`TextItem.key`."""
    return item.key if isinstance(item, TextItem) else str(item.path)


__all__ = [
    "IMAGE_EXTENSIONS",
    "AnyTask",
    "ImageItem",
    "Task",
    "TextItem",
    "TextTask",
    "item_id",
    "load_any_task",
    "looks_like_text_task",
    "load_image",
    "load_task",
    "load_text_task",
    "stratified_split",
    "to_rgb",
]
