"""The bench report: cells gathered into one row per method, written as Markdown, CSV and JSON.

Everything in it is computed from the saved cells, so a resumed bench writes the
same report as an uninterrupted one (measured times and memory aside, which
belong to the run that computed each cell).
"""

from __future__ import annotations

import csv
import io
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from frozenlens.atomic import write_json, write_text
from frozenlens.bench.config import SELECTION_RULE, BenchConfig
from frozenlens.bench.workspace import select_point

if TYPE_CHECKING:
    from frozenlens.bench.cells import Cell

_log = logging.getLogger("frozenlens")

REPORT_FILES = ("report.md", "report.csv", "report.json")


@dataclass
class BenchReport:
    """A bench's results.

    Attributes:
        context: settings, backbone, selection rule and recipe of the run.
        entries: one per task view x method: accuracies per seed (or draw), the grid, the
            selected point, costs, layer analysis.
        rows: one per method: per-task (and per-shots) mean and std, group mean, costs.
    """

    context: dict[str, Any]
    entries: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able report."""
        return {"context": self.context, "rows": self.rows, "entries": self.entries}


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and population std (as :class:`frozenlens.protocol.MethodResult`), None when empty."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.pstdev(values)


def _mean_curve(curves: Sequence[Sequence[float]]) -> list[float] | None:
    """The per-epoch mean of equally long loss curves (None when there are none, or they differ)."""
    if not curves or len({len(c) for c in curves}) > 1:
        return None
    return [statistics.fmean(values) for values in zip(*curves)]


def _entry(group: Any, results: dict["Cell", dict[str, Any]]) -> dict[str, Any]:
    """One task view x method, from its cells' results."""
    base = {"task": group.task, "shots": group.shots, "draw": group.draw, "method": group.spec.text,
            "label": group.spec.label, "in_loop": group.in_loop}
    grid_results = [(c, results[c]) for c in group.grid_cells]
    finals = [results[c] for c in group.finals(select_point(grid_results))]
    accs = [a for f in finals for a in f["test_accuracies"]]
    if grid_results and grid_results[0][0].stage == "search":
        grid = grid_results[0][1]["grid"]
    else:
        grid = [{**c.point_dict, "val_accuracy": g["val_accuracy"]} for c, g in grid_results]
    final = finals[0]
    selected = final["selected"]
    cost_cells = [g for _, g in grid_results] + finals
    grid_seconds = sum(g["cell_seconds"] for _, g in grid_results) if grid_results else None
    seconds = [f["train_seconds"] for f in finals]
    curves = [curve for f in finals for curve in f.get("train_losses", []) if curve]
    last_losses = [curve[-1] for curve in curves]
    mean, std = _mean_std(accs)
    return {**base, "seeds": list(group.seeds), "test_accuracies": accs, "test_accuracy_mean": mean,
            "test_accuracy_std": std, "grid": grid,
            "best_val_accuracy": max((g["val_accuracy"] for g in grid), default=None),
            "selected": selected, "trainable_params": final["trainable_params"],
            "train_seconds_per_seed": statistics.fmean(seconds),
            "final_train_loss": statistics.fmean(last_losses) if last_losses else None,
            "train_loss_curve": _mean_curve(curves),
            "grid_seconds": grid_seconds,
            "peak_memory_mb": max(c["peak_memory_mb"] for c in cost_cells),
            "train_step_gflops_per_image": final["train_step_gflops_per_image"],
            "forward_gflops_per_image": final["forward_gflops_per_image"],
            "extract_gflops_per_image": final["extract_gflops_per_image"],
            "store_bytes_per_image": final["store_bytes_per_image"],
            "epochs": selected["train_config"]["epochs"],
            **({"layers": final["layers"]} if "layers" in final else {}),
            **({"choices": [c for f in finals for c in f["choices"]]} if "choices" in final else {})}


def finished(group: Any, results: dict["Cell", dict[str, Any]]) -> bool:
    """Whether every cell of ``group`` (its grid, then the finals of the point it selected) is in ``results``."""
    if any(c not in results for c in group.grid_cells):
        return False
    return all(c in results for c in group.finals(select_point([(c, results[c]) for c in group.grid_cells])))


def aggregate(config: BenchConfig, groups: list[Any], results: dict["Cell", dict[str, Any]],
              backbone: Any) -> BenchReport:
    """The report of the groups whose cells are all in ``results``; the others are listed under
    ``context["unfinished"]``, and a method missing a task gets no mean over tasks."""
    tasks = list(dict.fromkeys(g.task for g in groups))
    context = {
        "protocol": config.protocol,
        "selection_rule": SELECTION_RULE[config.protocol],
        "backbone": backbone.name,
        "weights_hash": backbone.weights_hash,
        "image_size": getattr(backbone, "image_size", None),
        "modality": backbone.describe().get("modality", "image"),
        "tasks": tasks,
        "seeds": config.seeds,
        "shots": list(config.shots) if config.protocol == "fewshot" else None,
        "epochs_override": config.epochs,
        "grid": "each method's own" if config.grid is None else (config.grid or "none (defaults)"),
        "store_dtype": config.store_dtype,
        "device": config.device,
        "engine": config.engine,
        **({"extra": config.extra} if config.extra else {}),
    }
    done = [g for g in groups if finished(g, results)]
    if len(done) < len(groups):
        context["unfinished"] = [f"{g.task}{'' if g.shots is None else f' {g.shots}-shot draw {g.draw}'} "
                                 f"{g.spec.text}" for g in groups if g not in done]
    report = BenchReport(context)
    report.entries = [_entry(g, results) for g in done]
    methods = list(dict.fromkeys(g.spec.text for g in done))
    for method in methods:
        mine = [e for e in report.entries if e["method"] == method]
        row: dict[str, Any] = {"method": method, "label": mine[0]["label"], "in_loop": mine[0]["in_loop"],
                               "epochs": sorted({e["epochs"] for e in mine})}
        if config.protocol == "vtab":
            row["tasks"] = {}
            for e in mine:
                row["tasks"][e["task"]] = {"mean": e["test_accuracy_mean"], "std": e["test_accuracy_std"],
                                           "runs": len(e["test_accuracies"])}
            means = [v["mean"] for v in row["tasks"].values() if v["mean"] is not None]
            row["group_mean"] = statistics.fmean(means) if means and len(row["tasks"]) == len(tasks) else None
        else:
            row["shots"] = {}
            for k in config.shots:
                per_task = {}
                for task in tasks:
                    accs = [e["test_accuracy_mean"] for e in mine if e["shots"] == k and e["task"] == task
                            and e["test_accuracy_mean"] is not None]
                    mean, std = _mean_std(accs)
                    per_task[task] = {"mean": mean, "std": std, "runs": len(accs)}
                means = [v["mean"] for v in per_task.values() if v["mean"] is not None]
                row["shots"][str(k)] = {"tasks": per_task, "group_mean": statistics.fmean(means) if means else None}
        row["trainable_params"] = round(statistics.fmean(e["trainable_params"] for e in mine))
        row["peak_memory_mb"] = max(e["peak_memory_mb"] for e in mine)
        row["train_seconds_per_seed"] = statistics.fmean(e["train_seconds_per_seed"] for e in mine)
        losses = [e.get("final_train_loss") for e in mine]
        row["final_train_loss"] = statistics.fmean(losses) if None not in losses else None
        for key in ("train_step_gflops_per_image", "forward_gflops_per_image", "extract_gflops_per_image"):
            row[key] = statistics.fmean(e[key] for e in mine)
        row["store_bytes_per_image"] = max(e["store_bytes_per_image"] for e in mine)
        report.rows.append(row)
    return report


# -- writing --------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def selected_point(entry: dict[str, Any]) -> dict[str, Any]:
    """The grid point a report entry's search selected, as ``{hyper-parameter: value}`` over the grid's
    keys (empty when there was no search)."""
    grid_keys = sorted({k for g in entry["grid"] for k in g if k != "val_accuracy"})
    selected = entry["selected"]
    return {k: selected["train_config"].get(k, selected["config"].get(k)) for k in grid_keys}


def _pm(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "not run"
    if cell["mean"] is None:
        return "n/a"
    return f"{100 * cell['mean']:.2f} ± {100 * cell['std']:.2f}" if cell["runs"] > 1 else f"{100 * cell['mean']:.2f}"


COST_COLUMNS = [("trainable params", lambda r: f"{r['trainable_params']:,}"),
                ("peak train mem (MB)", lambda r: f"{r['peak_memory_mb']:.0f}"),
                ("train s/seed", lambda r: f"{r['train_seconds_per_seed']:.1f}"),
                ("last-epoch train loss", lambda r: "—" if r.get("final_train_loss") is None
                 else f"{r['final_train_loss']:.3f}"),
                ("train GFLOPs/img", lambda r: f"{r['train_step_gflops_per_image']:.3g}"),
                ("extract GFLOPs/img", lambda r: f"{r['extract_gflops_per_image']:.3g}" if not r["in_loop"] else "—"),
                ("stored KB/img", lambda r: f"{r['store_bytes_per_image'] / 1024:.1f}" if not r["in_loop"] else "—")]


def table(report: BenchReport) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the report's main table (accuracies in %)."""
    ctx = report.context
    if ctx["protocol"] == "vtab":
        header = ["method", *ctx["tasks"], "mean"]
        body = [[r["method"], *(_pm(r["tasks"].get(t)) for t in ctx["tasks"]), _pct(r["group_mean"])]
                for r in report.rows]
    else:
        header = ["method", *(f"{k}-shot" for k in ctx["shots"])]
        body = [[r["method"], *(_pct(r["shots"][str(k)]["group_mean"]) for k in ctx["shots"])] for r in report.rows]
    header += ["epochs"] + [name for name, _ in COST_COLUMNS]
    for r, line in zip(report.rows, body):
        line += ["/".join(map(str, r["epochs"]))] + [fmt(r) for _, fmt in COST_COLUMNS]
    return header, body


def markdown(report: BenchReport) -> str:
    """The report as Markdown."""
    ctx = report.context
    header, body = table(report)
    lines = [f"# frozenlens bench ({ctx['protocol']})", ""]
    lines += [f"- {k}: {v}" for k, v in ctx.items() if k not in ("selection_rule", "tasks", "unfinished")]
    lines += ["", f"**Selection rule.** {ctx['selection_rule']}.", ""]
    if ctx.get("unfinished"):
        lines += [f"**Unfinished** (cells not all saved; 'not run' below, and no mean for a method missing a "
                  f"task; run the bench without --report-only to compute them): {'; '.join(ctx['unfinished'])}.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    lines += ["", ("Test accuracy in %, mean ± std over seeds (few-shot: per task over draws, then the mean over "
                   "tasks). 'mean': the mean over tasks. 'trainable params': mean over tasks (heads grow with the "
                   "number of classes). 'peak train mem': growth of resident memory (CUDA: "
                   "max allocated) while training, largest over tasks and stages. 'train s/seed': training time "
                   "of one final run. 'train GFLOPs/img': one training step (forward + backward) per image of "
                   "what trains (store methods: on stored taps); 'extract GFLOPs/img': the backbone pass that "
                   "stores the taps, once per image ever. 'stored KB/img': stored taps the method reads.")]
    if ctx["protocol"] == "fewshot":
        for k in ctx["shots"]:
            lines += ["", f"## {k}-shot per task", "", "| method | " + " | ".join(ctx["tasks"]) + " |",
                      "|" + "---|" * (len(ctx["tasks"]) + 1)]
            for r in report.rows:
                lines.append(f"| {r['method']} | " + " | ".join(_pm(r["shots"][str(k)]["tasks"][t])
                                                              for t in ctx["tasks"]) + " |")
    lines += ["", "## Selected hyper-parameters", "", "| task | view | method | selected | best val acc |",
              "|---|---|---|---|---|"]
    for e in report.entries:
        view = "vtab" if e["shots"] is None else f"{e['shots']}-shot draw {e['draw']}"
        chosen = selected_point(e)
        lines.append(f"| {e['task']} | {view} | {e['method']} | "
                     f"{', '.join(f'{k}={v}' for k, v in chosen.items()) or 'defaults (no search)'} | "
                     f"{_pct(e['best_val_accuracy'])} |")
    layered = [e for e in report.entries if "layers" in e]
    if layered:
        lines += ["", "## Which blocks matter", ""]
        for e in layered:
            layers = e["layers"]
            values = ", ".join(f"{b}: {100 * a:.1f}" for b, a in zip(layers["blocks"], layers["accuracy"]))
            intact = f" (intact: {100 * layers['intact']:.1f})" if "intact" in layers else ""
            lines.append(f"- {e['task']} {e['method']}: {layers['source']}{intact} — {values}")
    chose = [e for e in report.entries if e.get("choices")]
    if chose:
        lines += ["", "## Chosen on held-out data by the method itself", ""]
        lines += [f"- {e['task']} {e['method']}: " + "; ".join(
            f"seed {seed}: {_choice_text(c)}" for seed, c in zip(e["seeds"], e["choices"])) for e in chose]
    return "\n".join(lines) + "\n"


def _choice_text(choice: dict[str, Any]) -> str:
    """One seed's choices as ``name=value`` (a dict of held-out accuracies as ``key: %``)."""
    def text(value: Any) -> str:
        if isinstance(value, dict):
            return "(" + ", ".join(f"{k}: {100 * v:.1f}" for k, v in value.items()) + ")"
        return str(value)
    return ", ".join(f"{k}={text(v)}" for k, v in choice.items())


def csv_text(report: BenchReport) -> str:
    """The report as CSV: one row per method, accuracies as fractions, every number unrounded."""
    ctx = report.context
    columns = ["method"]
    if ctx["protocol"] == "vtab":
        for t in ctx["tasks"]:
            columns += [f"{t} acc mean", f"{t} acc std"]
        columns.append("group mean")
    else:
        for k in ctx["shots"]:
            for t in ctx["tasks"]:
                columns += [f"{t} {k}-shot mean", f"{t} {k}-shot std"]
            columns.append(f"{k}-shot group mean")
    costs = ["trainable_params", "peak_memory_mb", "train_seconds_per_seed", "final_train_loss",
             "train_step_gflops_per_image", "forward_gflops_per_image", "extract_gflops_per_image",
             "store_bytes_per_image"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns + ["epochs"] + costs)
    for r in report.rows:
        line: list[Any] = [r["method"]]
        if ctx["protocol"] == "vtab":
            for t in ctx["tasks"]:
                cell = r["tasks"].get(t) or {}
                line += [cell.get("mean"), cell.get("std")]
            line.append(r["group_mean"])
        else:
            for k in ctx["shots"]:
                for t in ctx["tasks"]:
                    cell = r["shots"][str(k)]["tasks"][t]
                    line += [cell["mean"], cell["std"]]
                line.append(r["shots"][str(k)]["group_mean"])
        writer.writerow(["" if v is None else v for v in line] + ["/".join(map(str, r["epochs"]))]
                        + ["" if r.get(c) is None else r[c] for c in costs])
    return buffer.getvalue()


def write_report(out_dir: Path, report: BenchReport, *, plots: bool = True) -> list[Path]:
    """Write ``report.{md,csv,json}`` (atomically) and, with ``plots``, the PNG plots into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_text(out_dir / "report.md", markdown(report)),
               write_text(out_dir / "report.csv", csv_text(report)),
               write_json(out_dir / "report.json", report.to_dict())]
    if plots:
        from frozenlens.bench.plots import write_plots

        written += write_plots(out_dir, report)
    return written
