"""The one stratified split: per class, a seeded permutation; the first few go to the other side.

Every stratified choice in frozenlens draws the same way: classes in label order,
one shared ``numpy.random.RandomState(seed)``, each class's indices (in input
order) permuted by it (:func:`class_permutations`). A split then takes the first
:func:`holdout_count` of each class (:func:`stratified_indices`); the
Fashion-MNIST builder takes a fixed number per class.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def class_permutations(labels: Sequence[int] | np.ndarray, seed: int) -> dict[int, np.ndarray]:
    """Label -> that class's indices into ``labels``, permuted with one shared
    ``numpy.random.RandomState(seed)`` drawn class by class in label order."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.RandomState(seed)
    out = {}
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        out[int(label)] = members[rng.permutation(len(members))]
    return out


def holdout_count(n: int, fraction: float) -> int:
    """How many of a class of ``n`` go to the held-out side: ``fraction * n`` rounded half
    up, at least 1 and at most ``n - 1`` (a class with one member is never held out)."""
    if n < 2:
        return 0
    return min(max(int(np.floor(n * fraction + 0.5)), 1), n - 1)


def stratified_indices(labels: Sequence[int] | np.ndarray, fraction: float, seed: int,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(kept, held out)``, both ascending: per class the first
    :func:`holdout_count` of its :func:`class_permutations` are held out."""
    permutations = class_permutations(labels, seed)
    held = [perm[:holdout_count(len(perm), fraction)] for perm in permutations.values()]
    held_index = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    keep = np.ones(len(labels), dtype=bool)
    keep[held_index] = False
    return np.flatnonzero(keep), held_index
