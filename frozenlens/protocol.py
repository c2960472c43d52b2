"""The VTAB-1k protocol, on stored taps or (for in-loop methods) on the images.

Tune on ``train`` (train800) / ``val`` (val200) over a grid of learning rate x
weight decay, retrain on ``trainval`` (all 1000) with the winner for each seed,
and report test accuracy as mean +- std. Nothing is ever selected on the test
split: it is only evaluated once per final model.

Methods that read taps get :class:`TapData` from the activation store; methods
that run the backbone in the loop (``Method.in_loop``) get :class:`ImageData`
(images decoded and preprocessed once, shared by every grid point and seed), or on a
text task :class:`~frozenlens.train.texts.TextData` (texts tokenized once).
When the store does not hold the test images (``fit`` stores training images
only), every seed's model is kept and :func:`score_test` scores them all in one
streaming backbone pass over the test split.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from frozenlens.backbones import LOCAL_BACKBONES, FrozenBackbone, TextBackbone
from frozenlens.backbones.taps import Tap
from frozenlens.backbones.text import MASK_KEY
from frozenlens.data import AnyTask, item_id
from frozenlens.errors import FrozenlensError
from frozenlens.methods import Method, build_method
from frozenlens.store.examples import examples_of
from frozenlens.store.store import ActivationStore, TapSource
from frozenlens.store.streaming import stream_taps
from frozenlens.train.data import TapData
from frozenlens.train.images import ImageData
from frozenlens.train.measure import Measure
from frozenlens.train.trainer import TrainConfig, count_trainable, evaluate

if TYPE_CHECKING:
    from frozenlens.train.texts import TextData

_log = logging.getLogger("frozenlens")

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
    models: list[Method] = field(default_factory=list)
    """Every seed's final model, in seed order (``model`` is the first)."""
    test_pending: bool = False
    """True when the test split is to be scored later, in one streaming pass (:func:`score_test`)."""
    train_losses: list[list[float]] = field(default_factory=list)
    """Every seed's mean training loss per epoch, in seed order (methods that train in phases,
    e.g. Head2Toe's selection then retraining, list the phases one after the other)."""

    @property
    def test_mean(self) -> float | None:
        """Mean test accuracy over seeds (None without a test split)."""
        return statistics.fmean(self.test_accuracies) if self.test_accuracies else None

    @property
    def test_std(self) -> float | None:
        """Population standard deviation of test accuracy over seeds."""
        return statistics.pstdev(self.test_accuracies) if self.test_accuracies else None


def split_data(store: ActivationStore, task: AnyTask, split: str, keys: Sequence[str],
               stream: bool = False) -> TapData:
    """Tap values and labels of one split of ``task`` (``stream``: read batch by batch from the store)."""
    items = task.split(split)
    return TapData.from_store(store, keys, [item_id(i) for i in items], [i.label for i in items],
                              len(task.classes), stream=stream)


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, as dicts."""
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


@dataclass
class SearchResult:
    """What a grid search on train/val found (:func:`search_grid`)."""

    rows: list[dict[str, Any]]
    """Every grid point with its ``val_accuracy``, in grid order."""
    point: dict[str, Any]
    """The selected point: highest val accuracy, the first in grid order on ties."""
    train_config: TrainConfig
    config: Any
    seconds: float = 0.0
    peak_memory_mb: float = 0.0


class PointMemo(Protocol):
    """Where a grid search keeps each point's outcome as it finishes (see :func:`search_grid`)."""

    def load(self, point: dict[str, Any]) -> dict[str, Any] | None:
        """The saved outcome of ``point``, or None when it has not finished."""

    def save(self, point: dict[str, Any], outcome: dict[str, Any]) -> None:
        """Keep the outcome of ``point`` (JSON-able) before the next point starts."""


def search_grid(method: str, config: Any, store: ActivationStore | None, task: AnyTask,
                backbone: FrozenBackbone | TextBackbone | dict[str, Any], *, train_config: TrainConfig,
                grid: dict[str, list[Any]], progress: bool = False, stream: bool = False,
                memo: PointMemo | None = None) -> SearchResult:
    """The first half of :func:`run_protocol` on its own: every point of ``grid`` trained on
    ``train`` (store methods: all points together, in one stacked pass) and ranked on ``val``.
    ``frozenlens bench`` saves it as one cell, so an interrupted bench never trains it twice.

    With a ``memo``, a method that does not train its configurations together
    (:attr:`Method.trains_together` false: MIST, LAST) fits its points one by one, saves each
    point's outcome (val accuracy, what its fit chose on val, seconds, peak memory) as it
    finishes, and skips every point the memo already holds: the rows are those of an
    uninterrupted search, since a point fitted alone trains exactly as it does beside the others."""
    probe = build_method(method, config, backbone, len(task.classes))
    return _tune(probe, _SplitCache(store, task, backbone, progress, stream), train_config, grid, progress, memo)


def _tune(probe: Method, data: "_SplitCache", train_config: TrainConfig, grid: dict[str, list[Any]],
          progress: bool, memo: PointMemo | None = None) -> SearchResult:
    rows, outcomes, best_train, best_config = _search(probe, data, train_config, grid, progress, memo)
    best = max(rows, key=lambda row: row["val_accuracy"])  # the first of equals, as _search keeps
    point = {k: v for k, v in best.items() if k != "val_accuracy"}
    return SearchResult(rows, point, best_train, best_config, sum(o["seconds"] for o in outcomes),
                        max(o["peak_memory_mb"] for o in outcomes))


def run_protocol(
    method: str,
    config: Any,
    store: ActivationStore | None,
    task: AnyTask,
    backbone: FrozenBackbone | TextBackbone | dict[str, Any],
    *,
    train_config: TrainConfig,
    grid: dict[str, list[Any]] | None = None,
    seeds: Sequence[int] = (0,),
    order_seed: int | None = None,
    progress: bool = False,
    stream: bool = False,
) -> MethodResult:
    """Tune on train/val when ``grid`` is given, then train on trainval per seed, test once.

    ``store`` may be None when the method runs the backbone in the loop (it then
    trains on the images; ``backbone`` must be the :class:`FrozenBackbone`).
    Grid keys name :class:`TrainConfig` fields (lr, weight_decay, ...) or fields
    of the method's config (e.g. MIST's gather depth); both kinds are searched
    together. During the search, ``fit`` also receives the val split, for
    methods that select something on validation data. ``stream`` leaves stored taps
    on disk and reads each minibatch from the store (memory: one batch, not the split).

    The final runs of a store method share one minibatch order, seeded by ``order_seed``
    (default: the first seed), so its seeds can train together in lockstep; a caller that
    trains them one call per seed passes the same ``order_seed`` to every call and gets the
    models lockstep would give. In-loop methods draw each seed's own order.
    """
    probe = build_method(method, config, backbone, len(task.classes))
    result = MethodResult(method, probe.config, train_config)
    data = _SplitCache(store, task, backbone, progress, stream)
    if grid:
        found = _tune(probe, data, train_config, grid, progress)
        result.grid, result.train_config, result.config = found.rows, found.train_config, found.config
    shared_order = None if probe.in_loop else (seeds[0] if order_seed is None else order_seed)
    cfgs = [result.train_config.updated(seed=seed, order_seed=shared_order) for seed in seeds]
    for group in ([[c] for c in cfgs] if probe.in_loop else [cfgs]):
        if progress:
            _log.info("%s: final run on train+val, seed%s %s%s", method, "s" * (len(group) > 1),
                      "+".join(str(c.seed) for c in group), " together" if len(group) > 1 else "")
        models = [build_method(method, result.config, backbone, len(task.classes)) for _ in group]
        with Measure(group[0].device) as measured:
            losses = type(models[0]).fit_many(models, data.get("trainval", models[0]), group, progress=progress)
        result.train_losses += [[float(v) for v in curve] for curve in losses]
        result.train_seconds += measured.seconds / len(seeds)
        result.peak_memory_mb = max(result.peak_memory_mb, measured.peak_mb)
        if "test" in task.splits and data.has("test", models[0]):  # each model reads its own taps: a
            # fit may choose them per seed (InCA's best layer on each seed's held-out part)
            result.test_accuracies += [evaluate(model, data.get("test", model), group[0].device) for model in models]
        else:
            result.test_pending = "test" in task.splits
        result.models += models
        if result.model is None:
            result.model = models[0]
    result.trainable_params = count_trainable(result.model)
    return result


def score_test(results: Sequence[MethodResult], task: AnyTask, backbone: FrozenBackbone | TextBackbone | TapSource, *,
               store_dtype: str = "float16", batch_size: int = 32, device: str = "cpu", progress: bool = False,
               num_workers: int | None = None) -> None:
    """Test accuracy of every seed's model of ``results``, from ONE backbone pass over the test images.

    The pass computes the union of the taps the models read (rounded to ``store_dtype``, as
    they were stored for training) and scores every model on each batch, so a ``fit`` of many
    methods costs one pass over its test split, however many methods and seeds. Fills
    ``test_accuracies`` and clears ``test_pending``.
    """
    pending = [r for r in results if r.test_pending]
    models = [m for r in pending for m in r.models]
    if not models:
        return
    items = task.split("test")
    labels = torch.as_tensor([i.label for i in items], dtype=torch.long)
    correct = torch.zeros(len(models), dtype=torch.long)
    taps = sorted({Tap.parse(key) for model in models for key in model.tap_keys() if key != MASK_KEY})
    dtype = getattr(torch, store_dtype)
    for model in models:
        model.to(device).eval()
    unit = "text" if isinstance(backbone, TextBackbone) else "img"
    bar = tqdm(total=len(items), desc=f"test ({len(models)} models)", unit=unit, disable=not progress,
               dynamic_ncols=True)
    with bar, torch.inference_mode():
        for rows, values in stream_taps(backbone, examples_of(items), taps, batch_size=batch_size,
                                        device=device, num_workers=num_workers):
            features = {key: value.to(device).to(dtype).float() for key, value in values.items()}
            truth = labels[rows]
            for index, model in enumerate(models):
                correct[index] += int((model(features).argmax(1).cpu() == truth).sum())
            bar.update(len(rows))
    accuracies = iter((correct.double() / max(len(items), 1)).tolist())
    for result in pending:
        result.test_accuracies = [next(accuracies) for _ in result.models]
        result.test_pending = False


class _SplitCache:
    """Data of each split: tap data loaded from the store once per set of taps, or images
    decoded once (train and val are taken from train+val's images when it holds them)."""

    def __init__(self, store: ActivationStore | None, task: AnyTask,
                 backbone: FrozenBackbone | TextBackbone | dict[str, Any], progress: bool = False,
                 stream: bool = False):
        self.store, self.task, self.backbone, self.progress = store, task, backbone, progress
        self.stream = stream
        self._loaded: dict[tuple[str, tuple[str, ...]], TapData] = {}
        self._images: dict[str, Any] = {}

    def has(self, split: str, method: Method) -> bool:
        """True when ``method``'s data for ``split`` is at hand (the store holds the split's images)."""
        if method.in_loop:
            return True
        return self.store is not None and self.store.has_images(item_id(i) for i in self.task.split(split))

    def get(self, split: str, method: Method) -> "TapData | ImageData | TextData":
        """What ``method`` trains or is evaluated on for ``split``."""
        if method.in_loop:
            return self.images(split)
        if self.store is None:
            raise FrozenlensError(f"method {method.name!r} reads stored taps, but no store was given")
        key = (split, tuple(method.tap_keys()))
        if key not in self._loaded:
            self._loaded[key] = split_data(self.store, self.task, split, key[1], self.stream)
        return self._loaded[key]

    def images(self, split: str) -> "ImageData | TextData":
        """Preprocessed images (or tokenized texts) of ``split``."""
        if split not in self._images:
            if not isinstance(self.backbone, LOCAL_BACKBONES):
                raise FrozenlensError("in-loop methods need the backbone itself, not its description")
            ids = [item_id(i) for i in self.task.split(split)]
            if split in ("train", "val") and "trainval" in self.task.splits:
                found = self.images("trainval").select_paths(ids)
                if found is not None:
                    self._images[split] = found
                    return found
            kind = ImageData
            if isinstance(self.backbone, TextBackbone):
                from frozenlens.train.texts import TextData  # the text counterpart of ImageData
                kind = TextData
            self._images[split] = kind.from_task(self.task, split, self.backbone, progress=self.progress)
        return self._images[split]


def split_point(point: dict[str, Any], config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A grid point as ``(TrainConfig changes, method-config changes)``.

    Raises:
        FrozenlensError: a name that is neither a training nor a method setting.
    """
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    method_fields = {f.name for f in dataclasses.fields(config)}
    unknown = set(point) - train_fields - method_fields
    if unknown:
        raise FrozenlensError(f"grid names {sorted(unknown)}: neither training nor method settings")
    return ({k: v for k, v in point.items() if k in train_fields},
            {k: v for k, v in point.items() if k not in train_fields})


def _search(probe: Method, data: _SplitCache, base: TrainConfig, grid: dict[str, list[Any]], progress: bool,
            memo: PointMemo | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]], TrainConfig, Any]:
    """Train every grid point on train, rank on val; what each point's fit chose on val
    (:attr:`Method.validation_choices`) joins its row, and the winner's config keeps it.

    Points that share the method config train in one stacked pass (:meth:`Method.fit_many`);
    methods that run the backbone in the loop train one point at a time (each holds
    its own copy of what it adapts, and its optimiser state), and so do the others when a
    ``memo`` keeps each point (see :func:`search_grid`). Returns the rows, each point's
    outcome (grid order: see :func:`_fit_points`) and the winner's train and method configs.
    """
    points = grid_points(grid)
    runs = []
    for point in points:
        train_changes, config_changes = split_point(point, probe.config)
        runs.append((base.updated(**train_changes), dataclasses.replace(probe.config, **config_changes)))
    one_by_one = probe.in_loop or (memo is not None and not type(probe).trains_together)
    groups: dict[str, list[int]] = {}
    for index, (_, config) in enumerate(runs):
        groups.setdefault(f"{index}" if one_by_one else repr(config), []).append(index)
    outcomes: dict[int, dict[str, Any]] = {}
    for members in groups.values():
        for index in members:
            saved = memo.load(points[index]) if memo is not None else None
            if saved is not None:
                outcomes[index] = saved
        todo = [i for i in members if i not in outcomes]
        for index, outcome in zip(todo, _fit_points(probe, data, [runs[i] for i in todo], progress) if todo else []):
            outcomes[index] = outcome
            if memo is not None:
                memo.save(points[index], outcome)
    rows, best, best_acc = [], (base, probe.config), -1.0
    for index, point in enumerate(points):
        accuracy, chosen = outcomes[index]["val_accuracy"], outcomes[index]["chosen"]
        rows.append({**point, **chosen, "val_accuracy": accuracy})
        if progress:
            _log.info("  %s %s val=%.4f", probe.name, {**point, **chosen}, accuracy)
        if accuracy > best_acc:
            best = (runs[index][0], dataclasses.replace(runs[index][1], **chosen))
            best_acc = accuracy
    return rows, [outcomes[i] for i in range(len(points))], best[0], best[1]


def _fit_points(probe: Method, data: _SplitCache, runs: Sequence[tuple[TrainConfig, Any]],
                progress: bool) -> list[dict[str, Any]]:
    """Fit ``runs`` (train and method configs) together on train and score each on val; returns
    each one's outcome: ``val_accuracy``, ``chosen`` (its :attr:`Method.validation_choices`),
    and its share of the wall ``seconds`` and the pass's ``peak_memory_mb``."""
    if progress:
        _log.info("%s: grid pass on train, %s, ranked on val", probe.name,
                  f"{len(runs)} configurations together" if len(runs) > 1 else "one configuration")
    with Measure(runs[0][0].device) as measured:
        models = [build_method(probe.name, config, probe.backbone_source(), probe.num_classes) for _, config in runs]
        val = data.get("val", models[0])
        type(models[0]).fit_many(models, data.get("train", models[0]), [cfg for cfg, _ in runs], val=val,
                                 progress=progress)
        accuracies = [evaluate(model, val, cfg.device) for model, (cfg, _) in zip(models, runs)]
    return [{"val_accuracy": accuracy,
             "chosen": {name: getattr(model.config, name) for name in type(probe).validation_choices},
             "seconds": measured.seconds / len(runs), "peak_memory_mb": measured.peak_mb}
            for model, accuracy in zip(models, accuracies)]
