"""PNG plots of a bench report (matplotlib figures drawn off-screen; no backend is switched).

* ``accuracy_vs_params.png``: mean accuracy against trainable parameters (log scale);
* ``accuracy_vs_memory.png``: mean accuracy against peak training memory;
* ``accuracy_per_layer.png``: InCA's per-block adapter accuracy and VQT's accuracy with one
  block's summaries mean-ablated: which blocks matter (when the bench ran either);
* ``accuracy_vs_shots.png`` (few-shot): mean accuracy against shots per class;
* ``training_loss.png`` (VTAB): each method's training loss per epoch of its final runs, one panel
  per task: whether its epochs were enough.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from frozenlens.atomic import atomic_write
from frozenlens.extras import require


def headline(row: dict[str, Any], report: Any) -> float | None:
    """The accuracy a method is plotted with: the mean over tasks (few-shot: at the most shots)."""
    if report.context["protocol"] == "vtab":
        return row["group_mean"]
    return row["shots"][str(max(report.context["shots"]))]["group_mean"]


def _save(figure: Any, path: Path) -> Path:
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def _scatter(report: Any, key: str, xlabel: str, path: Path, log: bool) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5))
    axes = figure.add_subplot()
    for row in report.rows:
        y, x = headline(row, report), row[key]
        if y is None:
            continue
        axes.scatter([max(x, 1e-3)], [100 * y], marker="s" if row["in_loop"] else "o")
        axes.annotate(row["method"], (max(x, 1e-3), 100 * y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if log:
        axes.set_xscale("log")
    suffix = "" if report.context["protocol"] == "vtab" else f", {max(report.context['shots'])}-shot"
    axes.set_xlabel(xlabel)
    axes.set_ylabel(f"test accuracy (%), mean over tasks{suffix}")
    size = f"{report.context['image_size']} px" if report.context.get("image_size") else "text"
    axes.set_title(f"{report.context['backbone']} ({size}) "
                   "(o: from the store, s: backbone in the loop)", fontsize=9)
    axes.grid(alpha=0.3)
    return _save(figure, path)


def _layers(report: Any, path: Path) -> Path | None:
    from matplotlib.figure import Figure

    entries = [e for e in report.entries if "layers" in e]
    if not entries:
        return None
    kinds = sorted({e["layers"]["kind"] for e in entries})
    figure = Figure(figsize=(6.5, 3.5 * len(kinds)))
    for index, kind in enumerate(kinds):
        axes = figure.add_subplot(len(kinds), 1, index + 1)
        for e in (e for e in entries if e["layers"]["kind"] == kind):
            layers = e["layers"]
            view = "" if e["shots"] is None else f" {e['shots']}-shot d{e['draw']}"
            line = axes.plot(layers["blocks"], [100 * a for a in layers["accuracy"]], marker="o",
                             label=f"{e['task']}{view} {e['method']}")
            if "intact" in layers:
                axes.axhline(100 * layers["intact"], linestyle="--", color=line[0].get_color(), alpha=0.6)
        axes.set_xlabel("block")
        axes.set_ylabel("accuracy (%)")
        axes.set_title({"inca-selection": "InCA: each block's adapter, on its selection split",
                        "vqt-ablation": "VQT: test accuracy with one block's summaries mean-ablated "
                                        "(dashed: intact)"}.get(kind, kind), fontsize=9)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    return _save(figure, path)


def _shots(report: Any, path: Path) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5))
    axes = figure.add_subplot()
    shots = report.context["shots"]
    for row in report.rows:
        values = [row["shots"][str(k)]["group_mean"] for k in shots]
        axes.plot(shots, [None if v is None else 100 * v for v in values], marker="o", label=row["method"])
    axes.set_xscale("log", base=2)
    axes.set_xticks(shots, [str(k) for k in shots])
    axes.set_xlabel("shots per class")
    axes.set_ylabel("test accuracy (%), mean over tasks and draws")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, path)


def _losses(report: Any, path: Path) -> Path | None:
    from matplotlib.figure import Figure

    tasks = report.context["tasks"]
    entries = [e for e in report.entries if e.get("train_loss_curve")]
    if not entries:
        return None
    figure = Figure(figsize=(6.5, 3.2 * len(tasks)))
    for index, task in enumerate(tasks):
        axes = figure.add_subplot(len(tasks), 1, index + 1)
        for e in (e for e in entries if e["task"] == task):
            curve = e["train_loss_curve"]
            axes.plot(range(1, len(curve) + 1), curve, label=e["method"])
        axes.set_yscale("log")
        axes.set_xlabel("epoch (methods that train in phases: the phases one after the other)")
        axes.set_ylabel("training loss")
        axes.set_title(f"{task}: training loss of the final runs (mean over seeds)", fontsize=9)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))       # beside, not over, the curves
    figure.tight_layout()
    return _save(figure, path)


def write_plots(out_dir: Path, report: Any) -> list[Path]:
    """Write the plots of ``report`` into ``out_dir``; returns their paths.

    Raises:
        FrozenlensError: matplotlib is not installed (naming the ``[plots]`` extra).
    """
    require("matplotlib.figure", "bench plots")
    written = [_scatter(report, "trainable_params", "trainable parameters", out_dir / "accuracy_vs_params.png", True),
               _scatter(report, "peak_memory_mb", "peak training memory (MB)", out_dir / "accuracy_vs_memory.png",
                        False)]
    layers = _layers(report, out_dir / "accuracy_per_layer.png")
    if layers is not None:
        written.append(layers)
    if report.context["protocol"] == "fewshot":
        written.append(_shots(report, out_dir / "accuracy_vs_shots.png"))
    else:
        written += filter(None, [_losses(report, out_dir / "training_loss.png")])
    return written
