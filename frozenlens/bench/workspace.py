"""Everything a cell needs in one process, and the computation of a cell.

The same :meth:`Workspace.execute` runs a cell in the local engine and inside a
Ray task, so both engines compute the same numbers. Training goes through
:func:`frozenlens.protocol.run_protocol` (stacked grid points and seeds for
store-trained methods; one point or seed per call for in-loop methods).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from frozenlens.api import MethodSpec
from frozenlens.backbones import FrozenBackbone, Tap, load_backbone
from frozenlens.bench.cells import Cell, Ledger, PartFiles, cell_key
from frozenlens.bench.config import BenchConfig
from frozenlens.bench.flops import backbone_flops_per_image, flops_per_image
from frozenlens.bench.views import fewshot_view, selection_view, split_signature
from frozenlens.config_fields import keyed_dict, keyed_repr
from frozenlens.data import AnyTask, TextTask, item_id, load_any_task
from frozenlens.errors import FrozenlensError
from frozenlens.methods import Method, config_to_dict, get_method
from frozenlens.protocol import MethodResult, run_protocol, search_grid, split_data, split_point
from frozenlens.store import ActivationStore
from frozenlens.train.data import TapData
from frozenlens.train.images import ImageData
from frozenlens.train.measure import Measure
from frozenlens.train.texts import TextData
from frozenlens.train.trainer import TrainConfig

_log = logging.getLogger("frozenlens")

FLOP_IMAGES = 2
"""Images a FLOP count runs on (FLOPs grow linearly with the batch)."""


@dataclass
class WorkspaceSpec:
    """What rebuilds a :class:`Workspace` in another process (a Ray worker): plain data only."""

    config: BenchConfig
    task_paths: dict[str, str]
    store_paths: dict[str, str] = field(default_factory=dict)


def train_config_of(spec: MethodSpec, config: BenchConfig) -> TrainConfig:
    """The method's training settings: its defaults, then ``--epochs``, then the spec's own settings
    (as ``frozenlens fit`` does), with a warm-up shortened to fit a short run."""
    overrides = {**({"epochs": config.epochs} if config.epochs is not None else {}), **spec.train_overrides()}
    try:
        cfg = get_method(spec.name).train_defaults.updated(device=config.device, **overrides)
    except ValueError as err:
        raise FrozenlensError(f"method {spec.text!r}: {err}") from None
    return cfg.short_run_warmup()[0]


def grid_of(spec: MethodSpec, config: BenchConfig, view: AnyTask) -> dict[str, list[Any]] | None:
    """The grid ``spec`` is tuned over on ``view`` (None: no val split, or no search asked)."""
    if "val" not in view.splits or "train" not in view.splits:
        return None
    grid = get_method(spec.name).grid if config.grid is None else config.grid
    return {k: list(v) for k, v in grid.items()} or None


class Workspace:
    """Loaded backbone, tasks and stores of one process, and the computation of cells."""

    def __init__(self, spec: WorkspaceSpec, backbone: FrozenBackbone | None = None):
        self.spec = spec
        self.config = spec.config
        self._backbone = backbone
        self._tasks: dict[str, AnyTask] = {}
        self._stores: dict[str, ActivationStore] = {}
        self._extract_flops: dict[str, float] = {}

    # -- resources ----------------------------------------------------------------------
    @property
    def backbone(self) -> FrozenBackbone:
        """The frozen backbone (loaded on first use)."""
        if self._backbone is None:
            c = self.config
            self._backbone = load_backbone(c.backbone, arch=c.arch, img_size=c.img_size, device=c.device)
        return self._backbone

    def task(self, name: str) -> AnyTask:
        """The task named ``name``."""
        if name not in self._tasks:
            self._tasks[name] = load_any_task(self.spec.task_paths[name])
        return self._tasks[name]

    def store(self, name: str) -> ActivationStore:
        """The activation store of task ``name`` (extracted before any cell runs)."""
        if name not in self._stores:
            if name not in self.spec.store_paths:
                raise FrozenlensError(f"task {name!r}: no activation store was extracted for it")
            self._stores[name] = ActivationStore(self.spec.store_paths[name])
        return self._stores[name]

    def view(self, cell: Cell) -> AnyTask:
        """The task view ``cell`` trains on (VTAB splits, or a few-shot draw)."""
        task = self.task(cell.task)
        return task if cell.shots is None else fewshot_view(task, cell.shots, cell.draw)

    def material(self, cell: Cell) -> dict[str, Any]:
        """Everything besides the cell itself that its result depends on (hashed into its key)."""
        spec = MethodSpec.parse(cell.method)
        view = self.view(cell)
        cfg = keyed_dict(train_config_of(spec, self.config))
        cfg.pop("device")
        c = self.config
        material = {"backbone": [c.backbone, c.arch, c.img_size], "store_dtype": c.store_dtype,
                    "config": keyed_repr(spec.config()), "train": cfg, "grid": grid_of(spec, c, view),
                    "splits": split_signature(view)}
        carried = get_method(spec.name).validation_choices
        if carried:  # a search's point carries these choices into the finals (older searches did not)
            material["validation_choices"] = list(carried)
        return material

    # -- cells --------------------------------------------------------------------------
    def execute(self, cell: Cell, progress: bool = False) -> dict[str, Any]:
        """Compute ``cell``; returns its JSON-able result. ``progress`` shows its epoch bars."""
        if cell.stage == "final" and seed_by_seed(get_method(MethodSpec.parse(cell.method).name)):
            return self._final_by_seed(cell, progress)
        return self._compute(cell, progress)

    def _parts(self, cell: Cell) -> PartFiles:
        """Where ``cell``'s finished parts are saved (see :mod:`frozenlens.bench.cells`)."""
        return Ledger(Path(self.config.out)).parts(cell, cell_key(cell, self.material(cell)))

    def _compute(self, cell: Cell, progress: bool, order_seed: int | None = None) -> dict[str, Any]:
        """Compute ``cell`` in one go (``order_seed``: see :func:`~frozenlens.protocol.run_protocol`)."""
        spec = MethodSpec.parse(cell.method)
        view = self.view(cell)
        config = spec.config()
        cfg = train_config_of(spec, self.config)
        in_loop = get_method(spec.name).in_loop
        store = None if in_loop else self.store(cell.task)
        with Measure(self.config.device) as whole:
            if cell.stage == "search":
                found = search_grid(spec.name, config, store, view, self.backbone, train_config=cfg,
                                    grid=grid_of(spec, self.config, view), progress=progress, memo=self._parts(cell))
            else:
                train_changes, config_changes = split_point(cell.point_dict, config)
                point_view = selection_view(view) if cell.stage == "grid" else view
                seeds = (cfg.seed,) if cell.stage == "grid" else cell.seeds
                result = run_protocol(spec.name, dataclasses.replace(config, **config_changes), store, point_view,
                                      self.backbone, train_config=cfg.updated(**train_changes), seeds=seeds,
                                      order_seed=order_seed, progress=progress)
        if cell.stage == "search":
            return {"cell_seconds": whole.seconds, "cell_peak_memory_mb": whole.peak_mb, "grid": found.rows,
                    "point": sorted(found.point.items()), "train_seconds": found.seconds,
                    "peak_memory_mb": found.peak_memory_mb}
        out: dict[str, Any] = {"cell_seconds": whole.seconds, "cell_peak_memory_mb": whole.peak_mb,
                               "train_seconds": result.train_seconds, "peak_memory_mb": result.peak_memory_mb,
                               "trainable_params": result.trainable_params, "train_losses": result.train_losses}
        if cell.stage == "grid":
            out["val_accuracy"] = result.test_accuracies[0]
            return out
        out.update(self._final_summary(cell, spec, view, result, store))
        return out

    def _final_by_seed(self, cell: Cell, progress: bool) -> dict[str, Any]:
        """A final cell trained seed after seed, each seed saved as a part the moment it is tested
        (:func:`seed_by_seed`): every seed keeps the minibatch order the seeds share in lockstep,
        so the merged result is the one a lockstep pass gives, and a rerun trains only the seeds
        not yet saved."""
        parts, saved = [], self._parts(cell)
        for seed in cell.seeds:
            part = saved.load({"seed": seed})
            if part is None:
                part = self._compute(dataclasses.replace(cell, seeds=(seed,)), progress, order_seed=cell.seeds[0])
                saved.save({"seed": seed}, part)
            parts.append(part)
        return merge_seed_parts(parts)

    def _final_summary(self, cell: Cell, spec: MethodSpec, view: AnyTask, result: MethodResult,
                       store: ActivationStore | None) -> dict[str, Any]:
        """Accuracies, selection and costs of a cell that tested final models."""
        model = result.model
        keys = model.tap_keys()
        out: dict[str, Any] = {
            "seeds": list(cell.seeds),
            "test_accuracies": result.test_accuracies,
            "grid": result.grid,
            "selected": {"train_config": {k: v for k, v in result.train_config.to_dict().items() if k != "device"},
                         "config": config_to_dict(result.config)},
            "store_bytes_per_image": store.bytes_per_image_of(keys) if store is not None and keys else 0,
        }
        out.update(self._flops(spec, view, model, store))
        layers = layer_analysis(model, view, store)
        if layers:
            out["layers"] = layers
        choices = [m.choices() for m in result.models]
        if any(choices):
            out["choices"] = choices
        return out

    def _flops(self, spec: MethodSpec, view: AnyTask, model: Method, store: ActivationStore | None) -> dict[str, Any]:
        """Training-step and forward FLOPs per image of ``model`` on real examples, and (store
        methods) the backbone FLOPs per image of extracting its taps once."""
        items = view.split("trainval")[:FLOP_IMAGES]
        if model.in_loop:
            few = dataclasses.replace(view, splits={"trainval": items})
            kind: Any = TextData if isinstance(view, TextTask) else ImageData
            data: Any = kind.from_task(few, "trainval", self.backbone)
        else:
            data = TapData.from_store(store, model.tap_keys(), [item_id(i) for i in items], [i.label for i in items],
                                      view.num_classes)
        device = self.config.device
        batch, targets = next(iter(data.batches(len(items), device=device)))
        forward, step = flops_per_image(model.to(device), batch, targets)
        out = {"forward_gflops_per_image": forward / 1e9, "train_step_gflops_per_image": step / 1e9,
               "extract_gflops_per_image": 0.0}
        if not model.in_loop:
            if spec.text not in self._extract_flops:
                taps = get_method(spec.name).taps(model.config, model.backbone_info)
                texts = [i.text for i in items] if isinstance(view, TextTask) else None
                self._extract_flops[spec.text] = backbone_flops_per_image(self.backbone, taps, FLOP_IMAGES, texts)
            out["extract_gflops_per_image"] = self._extract_flops[spec.text] / 1e9
        return out


def seed_by_seed(method: type[Method]) -> bool:
    """True when a final cell of ``method`` trains its seeds one after the other, saving each as
    it finishes: a store method that fits one model at a time anyway
    (:attr:`~frozenlens.methods.Method.trains_together` false: MIST, LAST). An in-loop method's
    final cells hold one seed each already."""
    return not method.in_loop and not method.trains_together


def merge_seed_parts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One final cell's result from its seeds' results (:meth:`Workspace._final_by_seed`): seeds,
    accuracies, losses and choices listed in seed order, times summed (the cell's) or averaged
    (per seed), peaks the highest; what the first seed's model gives (FLOPs, parameters,
    stored bytes, layers) as it gave it, as a lockstep cell reports its first model's."""
    out = dict(parts[0])
    for name in ("seeds", "test_accuracies", "train_losses"):
        out[name] = [value for part in parts for value in part[name]]
    choices = [choice for part in parts for choice in part.get("choices", [{}])]
    out.pop("choices", None)
    if any(choices):
        out["choices"] = choices
    out["cell_seconds"] = sum(part["cell_seconds"] for part in parts)
    out["train_seconds"] = statistics.fmean(part["train_seconds"] for part in parts)
    for name in ("cell_peak_memory_mb", "peak_memory_mb"):
        out[name] = max(part[name] for part in parts)
    return out


def layer_analysis(model: Method, view: AnyTask, store: ActivationStore | None) -> dict[str, Any] | None:
    """Which blocks matter, for InCA and VQT (None for other methods).

    * InCA / Open-InCA: validation accuracy of each block's adapter, from the method's own
      selection (on a held-out part of train+val in the final runs).
    * VQT (concatenated summaries, read from the store): test accuracy of the final model
      with one block's query outputs replaced by their mean over the test images (a mean
      ablation: analysis only, nothing is selected with it), beside the intact accuracy.
    """
    if hasattr(model, "layer_accuracies") and model.layer_accuracies:
        accuracies = model.layer_accuracies
        return {"kind": "inca-selection", "source": "per-block adapter accuracy on the selection split",
                "blocks": sorted(accuracies), "accuracy": [accuracies[b] for b in sorted(accuracies)]}
    if model.name == "vqt" and store is not None and getattr(model.config, "aggregate", "") == "concat" \
            and "test" in view.splits:
        return vqt_ablation(model, split_data(store, view, "test", model.tap_keys()))
    return None


@torch.no_grad()
def vqt_ablation(model: Method, data: TapData, batch_size: int = 64) -> dict[str, Any]:
    """Test accuracy of a VQT model with each block's summaries mean-ablated (see :func:`layer_analysis`)."""
    model.eval()
    device = next(model.parameters()).device
    features = torch.cat([model.features(batch, normed=False)
                          for batch, _ in data.batches(batch_size, device=device)]).cpu()
    labels = data.labels
    dim, queries = int(model.backbone_info["dim"]), int(model.config.num_queries)
    depth = (features.shape[1] - dim) // (dim * queries)

    def accuracy(values: torch.Tensor) -> float:
        logits = torch.cat([model.classify(chunk.to(device)).cpu() for chunk in values.split(batch_size)])
        return float((logits.argmax(1) == labels).float().mean())

    ablated = []
    for block in range(depth):
        start = dim + block * dim * queries
        changed = features.clone()
        changed[:, start:start + dim * queries] = features[:, start:start + dim * queries].mean(0)
        ablated.append(accuracy(changed))
    return {"kind": "vqt-ablation", "source": "test accuracy with one block's query outputs mean-ablated",
            "blocks": list(range(depth)), "accuracy": ablated, "intact": accuracy(features)}


def store_taps(config: BenchConfig, specs: list[MethodSpec], info: dict[str, Any]) -> list[Tap]:
    """Union of the taps the store-trained methods among ``specs`` read (one extraction per task)."""
    taps = {t for s in specs if not get_method(s.name).in_loop for t in get_method(s.name).taps(s.config(), info)}
    return sorted(taps)


def view_keys(config: BenchConfig) -> list[tuple[int | None, int | None, tuple[int, ...]]]:
    """``(shots, draw, seeds)`` of every view: the VTAB splits with all seeds, or each few-shot
    draw with its own seed."""
    if config.protocol == "vtab":
        return [(None, None, tuple(range(config.seeds)))]
    return [(k, d, (d,)) for k in config.shots for d in range(config.seeds)]


def select_point(grid_cells: list[tuple[Cell, dict[str, Any]]]) -> tuple[tuple[str, Any], ...]:
    """The grid point with the highest val accuracy (ties: the first in grid order); () for none.
    A ``search`` cell (a store method's whole grid) carries its selected point."""
    if len(grid_cells) == 1 and grid_cells[0][0].stage == "search":
        return tuple(tuple(pair) for pair in grid_cells[0][1]["point"])
    best, best_acc = (), -1.0
    for cell, result in grid_cells:
        if result["val_accuracy"] > best_acc:
            best, best_acc = cell.point, result["val_accuracy"]
    return best


def spec_paths(tasks: list[str | Path]) -> dict[str, str]:
    """Task name -> folder, refusing two tasks with one name (they name the report's columns)."""
    out: dict[str, str] = {}
    for path in tasks:
        name = Path(path).resolve().name
        if name in out:
            raise FrozenlensError(f"tasks {out[name]} and {path} have the same folder name {name!r}; the report "
                                  "names tasks by folder, so give each task a distinct folder name")
        out[name] = str(Path(path).resolve())
    return out
