"""The VTAB-1k protocol on stored taps.

Tune on ``train`` (train800) / ``val`` (val200) over a grid of learning rate x
weight decay, retrain on ``trainval`` (all 1000) with the winner for each seed,
and report test accuracy as mean +- std. Nothing is ever selected on the test
split: it is only evaluated once per final model.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

from frozenlens.data import Task
from frozenlens.methods import Method, build_method
from frozenlens.store.store import ActivationStore
from frozenlens.train.data import TapData
from frozenlens.train.measure import Measure
from frozenlens.train.trainer import TrainConfig, count_trainable, evaluate


@dataclass
class MethodResult:
    """What one method achieved under the protocol."""

    method: str
    config: Any
    train_config: TrainConfig
    grid: list[dict[str, Any]] = field(default_factory=list)
    test_accuracies: list[float] = field(default_factory=list)
    trainable_params: int = 0
    train_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    model: Method | None = None

    @property
    def test_mean(self) -> float | None:
        """Mean test accuracy over seeds (None without a test split)."""
        return statistics.fmean(self.test_accuracies) if self.test_accuracies else None

    @property
    def test_std(self) -> float | None:
        """Population standard deviation of test accuracy over seeds."""
        return statistics.pstdev(self.test_accuracies) if self.test_accuracies else None


def split_data(store: ActivationStore, task: Task, split: str, keys: Sequence[str]) -> TapData:
    """Tap values and labels of one split of ``task``."""
    items = task.split(split)
    return TapData.from_store(store, keys, [str(i.path) for i in items], [i.label for i in items],
                              len(task.classes))


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, as dicts."""
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def run_protocol(
    method: str,
    config: Any,
    store: ActivationStore,
    task: Task,
    backbone: dict[str, Any],
    *,
    train_config: TrainConfig,
    grid: dict[str, list[Any]] | None = None,
    seeds: Sequence[int] = (0,),
    progress: bool = False,
) -> MethodResult:
    """Tune on train/val when ``grid`` is given, then train on trainval per seed, test once."""
    probe = build_method(method, config, backbone, len(task.classes))
    keys = probe.tap_keys()
    result = MethodResult(method, probe.config, train_config)
    if grid:
        result.grid, result.train_config = _search(probe, store, task, keys, train_config, grid, progress)
    trainval = split_data(store, task, "trainval", keys)
    test = split_data(store, task, "test", keys) if "test" in task.splits else None
    for seed in seeds:
        model = build_method(method, probe.config, backbone, len(task.classes))
        cfg = result.train_config.updated(seed=seed)
        with Measure(cfg.device) as measured:
            model.fit(trainval, cfg, progress=progress)
        result.train_seconds += measured.seconds / len(seeds)
        result.peak_memory_mb = max(result.peak_memory_mb, measured.peak_mb)
        if test is not None:
            result.test_accuracies.append(evaluate(model, test, cfg.device))
        if result.model is None:
            result.model = model
    result.trainable_params = count_trainable(result.model)
    return result


def _search(probe: Method, store: ActivationStore, task: Task, keys: list[str], base: TrainConfig,
            grid: dict[str, list[Any]], progress: bool) -> tuple[list[dict[str, Any]], TrainConfig]:
    train, val = split_data(store, task, "train", keys), split_data(store, task, "val", keys)
    rows, best, best_acc = [], base, -1.0
    for point in grid_points(grid):
        cfg = base.updated(**point)
        model = build_method(probe.name, probe.config, probe.backbone_info, len(task.classes))
        model.fit(train, cfg, progress=False)
        accuracy = evaluate(model, val, cfg.device)
        rows.append({**point, "val_accuracy": accuracy})
        if progress:
            print(f"  {probe.name} {point} val={accuracy:.4f}")
        if accuracy > best_acc:
            best, best_acc = cfg, accuracy
    return rows, best
