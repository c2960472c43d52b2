"""Views of a task that the bench's protocols train on.

A view is a :class:`~frozenlens.data.Task` over the same images (so one
activation store serves every view of a task) with other splits:

* :func:`selection_view`: one grid point of a method that runs the backbone in the
  loop is trained on ``train`` and scored on ``val``; the view calls them
  ``trainval`` and ``test``, so :func:`frozenlens.protocol.run_protocol` trains and
  scores it exactly as its own grid search does (train800 -> val200).
* :func:`fewshot_view`: ``k`` images per class drawn from the training split
  (``trainval``) with a fixed seed; a stratified part of the shots is held out
  for selection (``val``), the rest is ``train``, all shots are ``trainval``, and
  the task's own ``test`` split is kept.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from frozenlens.data import AnyTask, item_id
from frozenlens.data.split import class_permutations, stratified_indices
from frozenlens.errors import DataError

FEWSHOT_SHOTS = (1, 2, 4, 8, 16)
"""Images per class of the fine-grained few-shot setting (MIST Sec. 4.2, after FacT)."""

FEWSHOT_HOLDOUT = 0.2
"""Share of each class's shots held out for selection (as val200 is of train800val200);
at least one shot, never all of them, so 1-shot draws have nothing to select on."""


def selection_view(task: AnyTask) -> AnyTask:
    """``task`` with ``trainval`` = its ``train`` split and ``test`` = its ``val`` split."""
    return dataclasses.replace(task, splits={"trainval": task.split("train"), "test": task.split("val")})


def draw_shots(task: AnyTask, shots: int, draw: int) -> list[int]:
    """Indices into ``task.split("trainval")`` of ``shots`` images per class, drawn with seed ``draw``.

    Every class's images are permuted with :func:`frozenlens.data.split.class_permutations`
    (the library's one stratified draw) and the first ``shots`` are taken; the result is
    sorted, so it is the same set whatever order the caller asks in.

    Raises:
        DataError: a class has fewer than ``shots`` training images (naming it).
    """
    items = task.split("trainval")
    permutations = class_permutations([i.label for i in items], draw)
    for label in range(task.num_classes):
        have = len(permutations.get(label, ()))
        if have < shots:
            raise DataError(f"task {task.name!r}: class {task.classes[label]!r} has {have} training "
                            f"image(s), fewer than {shots} shots; drop {shots} from the shots or this task")
    return sorted(int(i) for perm in permutations.values() for i in perm[:shots])


def fewshot_view(task: AnyTask, shots: int, draw: int) -> AnyTask:
    """The ``shots``-per-class training set of draw ``draw``, with its held-out selection part.

    ``train`` / ``val``: the shots split by :func:`frozenlens.data.split.stratified_indices`
    (:data:`FEWSHOT_HOLDOUT` of each class held out, seed ``draw``); with one shot there is
    nothing to hold out and the view has no ``val`` (no selection: defaults are used).
    ``trainval``: all the shots. ``test``: the task's test split (evaluated once per model).
    """
    items = task.split("trainval")
    chosen = [items[i] for i in draw_shots(task, shots, draw)]
    splits = {"trainval": chosen}
    kept, held = stratified_indices(np.array([i.label for i in chosen]), FEWSHOT_HOLDOUT, draw)
    if len(held):
        splits["train"] = [chosen[i] for i in kept]
        splits["val"] = [chosen[i] for i in held]
    if "test" in task.splits:
        splits["test"] = task.split("test")
    return dataclasses.replace(task, splits=splits)


def split_signature(task: AnyTask) -> dict[str, list[str]]:
    """Every split's ``id label`` lines (an image's path, a text's key): what a view's results
    depend on (hashed into cell keys)."""
    return {name: [f"{item_id(i)} {i.label}" for i in items] for name, items in sorted(task.splits.items())}
