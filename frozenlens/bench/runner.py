"""``run_bench``: plan the cells, extract once per task, run the cells on an engine, write the report."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from tqdm.auto import tqdm

from frozenlens.api import MethodSpec, parse_specs
from frozenlens.backbones import FrozenBackbone
from frozenlens.backbones.taps import check_taps
from frozenlens.bench.cells import Cell, Ledger, cell_key
from frozenlens.bench.config import BenchConfig
from frozenlens.bench.report import BenchReport, aggregate, write_report
from frozenlens.bench.workspace import (
    Workspace,
    WorkspaceSpec,
    grid_of,
    select_point,
    spec_paths,
    store_taps,
    view_keys,
)
from frozenlens.methods import get_method
from frozenlens.protocol import grid_points
from frozenlens.store import extract
from frozenlens.store.examples import task_examples

_log = logging.getLogger("frozenlens")

Done = Callable[[Cell, dict[str, Any]], None]
"""Called by an engine with each cell's result as soon as it is computed."""


class Engine(Protocol):
    """Runs cells and reports each result as it comes (the caller saves it at once)."""

    def extract(self, ws: Workspace, task: str, taps: list[Any]) -> str:
        """Fill the activation store of ``task`` with ``taps``; returns the store's folder."""

    def run(self, cells: list[Cell], done: Done, bar: tqdm) -> None:
        """Compute ``cells``, calling ``done(cell, result)`` for each as it finishes."""

    def close(self) -> None:
        """Release what the engine holds."""


class LocalEngine:
    """Cells one after another in this process; extraction with :func:`frozenlens.store.extract`."""

    def __init__(self, ws: Workspace):
        self.ws = ws

    def extract(self, ws: Workspace, task: str, taps: list[Any]) -> str:
        c = ws.config
        store = extract(ws.backbone, task_examples(ws.task(task)), taps, dtype=c.store_dtype, batch_size=c.batch_size,
                        progress=c.progress, device=c.device, num_workers=c.workers)
        return str(store.path)

    def run(self, cells: list[Cell], done: Done, bar: tqdm) -> None:
        for cell in cells:
            bar.set_postfix_str(cell.describe(), refresh=True)
            done(cell, self.ws.execute(cell, progress=self.ws.config.progress))

    def close(self) -> None:
        return None


@dataclass
class Group:
    """One task view x one method: the cells of its protocol."""

    task: str
    shots: int | None
    draw: int | None
    spec: MethodSpec
    seeds: tuple[int, ...]
    in_loop: bool
    grid_cells: list[Cell] = field(default_factory=list)

    def cell(self, stage: str, **extra: Any) -> Cell:
        """A cell of this group."""
        return Cell(task=self.task, method=self.spec.text, label=self.spec.label, stage=stage,
                    shots=self.shots, draw=self.draw, **extra)

    def finals(self, point: tuple[tuple[str, Any], ...]) -> list[Cell]:
        """The final cells, trained with ``point``: one per seed for an in-loop method, one for
        all seeds together for a store method (they train in one stacked pass)."""
        if self.in_loop:
            return [self.cell("final", point=point, seeds=(s,)) for s in self.seeds]
        return [self.cell("final", point=point, seeds=self.seeds)]


def plan(ws: Workspace, specs: list[MethodSpec]) -> list[Group]:
    """Every group of the bench, with its first cells: the grid search (store methods: one cell
    for the whole grid; in-loop methods: one per point), none where there is nothing to tune."""
    groups = []
    for task in ws.spec.task_paths:
        for shots, draw, seeds in view_keys(ws.config):
            for spec in specs:
                own = tuple(spec.seeds(seeds)) if shots is None else seeds
                group = Group(task, shots, draw, spec, own, get_method(spec.name).in_loop)
                grid = grid_of(spec, ws.config, ws.view(group.cell("grid")))
                if group.in_loop:
                    group.grid_cells = [group.cell("grid", point=tuple(sorted(p.items())))
                                        for p in (grid_points(grid) if grid else [])]
                elif grid:
                    group.grid_cells = [group.cell("search")]
                groups.append(group)
    return groups


def run_bench(config: BenchConfig, *, backbone: FrozenBackbone | None = None) -> BenchReport:
    """Run (or resume) a bench and write its report; see :class:`BenchConfig`.

    Every finished cell is saved at once under ``<out>/cells/``; running the same bench
    again computes only the cells not yet saved with the same inputs, then rewrites the
    report from all of them. With ``config.report_only`` it computes nothing and writes
    the report from the cells already saved.

    Returns:
        The report (also written to ``<out>/report.{md,csv,json}`` and plots).
    """
    config.check()
    task_paths = spec_paths(list(config.tasks))
    specs = parse_specs(list(config.methods))
    for spec in specs:
        spec.check()
    out = Path(config.out)
    ws = Workspace(WorkspaceSpec(config, task_paths), backbone)
    for name in task_paths:
        ws.task(name)                      # data errors now, before the backbone loads
    net = ws.backbone
    taps = store_taps(config, specs, net.describe())
    check_taps(taps, net.depth, net.name)
    groups = plan(ws, specs)
    ledger = Ledger(out)
    results: dict[Cell, dict[str, Any]] = {}
    keys: dict[Cell, str] = {}

    def pending(cells: list[Cell]) -> list[Cell]:
        todo = []
        for cell in cells:
            keys[cell] = cell_key(cell, ws.material(cell))
            saved = ledger.load(cell, keys[cell])
            if saved is None:
                todo.append(cell)
            else:
                results[cell] = saved
        return todo

    def final_cells() -> list[Cell]:
        """The final cells of every group whose grid cells have all finished."""
        return [c for g in groups if all(gc in results for gc in g.grid_cells)
                for c in g.finals(select_point([(gc, results[gc]) for gc in g.grid_cells]))]

    first = [c for g in groups for c in g.grid_cells]
    todo = pending(first)
    known_finals = final_cells()
    finals_saved = len(known_finals) - len(pending(known_finals))
    total = len(first) + sum(len(g.finals(())) for g in groups)
    saved = len(first) - len(todo) + finals_saved
    if saved:
        _log.info("%d cell(s) already finished in %s; they are not recomputed", saved, ledger.root)
    started = time.perf_counter()
    if config.report_only:
        report = aggregate(config, groups, results, net)
        write_report(out, report, plots=config.plots)
        return report
    engine = _engine(config, ws)
    # Finished cells start the bar, so its ETA counts only the cells still to compute.
    bar = tqdm(total=total, initial=saved, desc="bench", unit="cell",
               disable=not config.progress, dynamic_ncols=True)

    def done(cell: Cell, result: dict[str, Any]) -> None:
        ledger.save(cell, keys[cell], result)
        results[cell] = ledger.as_saved(result)
        bar.update(1)
        _log.info("finished %s (%.1f s)%s", cell.describe(), result["cell_seconds"], _headline(result))

    try:
        with bar:
            store_methods = {g.spec.text for g in groups if not g.in_loop}

            def ensure_stores(cells: list[Cell]) -> None:
                for task in dict.fromkeys(c.task for c in cells if c.method in store_methods):
                    if task not in ws.spec.store_paths:
                        ws.spec.store_paths[task] = engine.extract(ws, task, taps)

            ensure_stores(todo)
            engine.run(todo, done, bar)
            finals = final_cells()
            todo = pending(finals)
            ensure_stores(todo)
            bar.update(len(finals) - len(todo) - finals_saved)
            engine.run(todo, done, bar)
    finally:
        engine.close()
    report = aggregate(config, groups, results, net)
    report.context["bench_seconds_this_run"] = round(time.perf_counter() - started, 1)
    write_report(out, report, plots=config.plots)
    return report


def _headline(result: dict[str, Any]) -> str:
    if "val_accuracy" in result:
        return f": val {100 * result['val_accuracy']:.2f}"
    accs = result.get("test_accuracies") or []
    return f": test {', '.join(f'{100 * a:.2f}' for a in accs)}" if accs else ""


def _engine(config: BenchConfig, ws: Workspace) -> Any:
    if config.engine == "ray":
        from frozenlens.bench.ray_engine import RayEngine

        return RayEngine(ws)
    return LocalEngine(ws)


def bench(tasks: Sequence[str | Path], methods: Sequence[str], out: str | Path, **settings: Any) -> BenchReport:
    """Shorthand for ``run_bench(BenchConfig(tasks, methods, out, **settings))``."""
    return run_bench(BenchConfig(list(tasks), list(methods), out, **settings))
