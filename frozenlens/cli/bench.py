"""``frozenlens bench``: many methods on many tasks under the VTAB-1k or few-shot protocol."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from frozenlens.cli.common import add_backbone_args, default_backbone, positive_int

_DESCRIPTION = """\
Benchmark methods on tasks under one protocol and write one report: a row per
method with per-task accuracy (mean ± std over seeds), the mean over tasks,
trainable parameters, peak training memory, training time, FLOPs per image and
stored bytes per image; Markdown, CSV, JSON and PNG plots in --out.

VTAB-1k (default): each method's grid is trained on train800 and scored on
val200; the winner is retrained on train800val200 once per seed and tested
once. Few-shot: 1, 2, 4, 8, 16 images per class drawn from the training split
(one draw per seed); selection on a held-out part of the shots. Nothing is ever
selected on the test split.

Methods that train from stored activations share one backbone pass per task,
and their grid points and seeds train together in one pass over the store
(MIST and LAST fit grid points one at a time and save each under <out>/parts/).
Every finished cell (task, method, stage or grid point, seed) is saved in
<out>/cells/ as it finishes: run the same command again after an interruption
and only the missing cells are computed. --report-only writes the report of
what is saved so far."""

_EPILOG = """\
examples:
  frozenlens bench --tasks ../shared/data/cifar10 ../shared/data/aid --methods linear,head2toe --out runs/bench
  frozenlens bench --tasks ../shared/data/cifar10 --methods linear,vqt,inca,mist --seeds 3 --img-size 224
  frozenlens bench --tasks ../shared/data/cifar10 --methods lora,bitfit,toast --img-size 56 --epochs 10
  frozenlens bench --tasks mydata/ --methods linear,head2toe --protocol fewshot --shots 1,4,16
  frozenlens bench --tasks ../shared/data/cifar10 --methods linear,lora --engine ray --ray-cpus 2
  frozenlens bench --tasks ../shared/data/aid --methods linear --grid lr=0.01+0.001,weight_decay=0 --seeds 1
  frozenlens bench --tasks ../shared/data/cifar10 ../shared/data/aid --methods linear,mist --report-only

methods: comma-separated specs as in `frozenlens fit --method`; settings of one
method stay with it (head2toe:keep_fraction=0.2,group_lasso=1e-3,linear is
head2toe with two settings, then linear). `frozenlens methods` lists them.
"""


def add_parsers(sub: Any) -> None:
    """Register ``bench``."""
    parser = sub.add_parser("bench", help="benchmark methods x tasks (VTAB-1k or few-shot), resumable, one report",
                            description=_DESCRIPTION, epilog=_EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", required=True, metavar="DIR",
                        help="task folders: VTAB-1k export, ImageFolder or HF imagefolder (distinct folder names)")
    parser.add_argument("--methods", action="append", required=True, metavar="SPEC,SPEC,...",
                        help="methods, comma-separated (repeatable), e.g. linear,head2toe,vqt,lora")
    parser.add_argument("--seeds", type=positive_int, default=3,
                        help="VTAB: final runs with seeds 0..N-1; few-shot: draws 0..N-1 (default: 3)")
    parser.add_argument("--protocol", choices=["vtab", "fewshot"], default="vtab",
                        help="vtab: train800/val200 grid, retrain on train800val200, test once (default); "
                             "fewshot: k images per class from the training split")
    parser.add_argument("--shots", type=_int_list, default=[1, 2, 4, 8, 16], metavar="K,K,...",
                        help="few-shot: images per class (default: 1,2,4,8,16)")
    parser.add_argument("--epochs", type=positive_int, help="override every method's default epochs")
    parser.add_argument("--grid", type=_grid, metavar="KEY=V+V,...",
                        help="one grid for every method instead of each method's own, e.g. "
                             "lr=0.01+0.001,weight_decay=0; 'none' trains the defaults without a search")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="results folder (default: runs/bench)")
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="local: this process (default); ray: extraction as a Ray Data pipeline and cells "
                             "as Ray tasks (needs the [ray] extra)")
    parser.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else start one here)")
    parser.add_argument("--ray-cpus", type=positive_int, help="CPUs of a Ray cluster started here (default: all)")
    parser.add_argument("--store-dtype", default="float16", choices=["float16", "float32"],
                        help="precision of stored activations (default: float16)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per backbone pass (default: 32)")
    parser.add_argument("--workers", type=_workers, metavar="N",
                        help="image-decoding processes during local extraction (default: the cores the backbone "
                             "leaves free, at most 4: none on a 2-core CPU, one per core with --device cuda)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--report-only", action="store_true",
                        help="compute nothing: write the report from the cells already saved in --out (a long "
                             "bench's results so far, or methods run task by task into one folder); unfinished "
                             "task x method pairs are listed, and a method missing a task gets no mean")
    add_backbone_args(parser, text=True)
    parser.set_defaults(run=run_bench_command)


def split_methods(values: list[str]) -> list[str]:
    """Method specs from ``--methods`` values: commas separate methods, except that a part with
    ``=`` and no ``:`` is one more setting of the method before it."""
    specs: list[str] = []
    for value in values:
        for part in filter(None, (p.strip() for p in value.split(","))):
            if "=" in part and ":" not in part and specs and ":" in specs[-1]:
                specs[-1] += "," + part
            else:
                specs.append(part)
    if not specs:
        raise argparse.ArgumentTypeError("--methods: give at least one method, e.g. linear,head2toe")
    return specs


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated whole numbers of at least 1, e.g. 1,2,4,8,16")
    return values


def _grid(text: str) -> dict[str, list[Any]]:
    if text.strip().lower() == "none":
        return {}
    grid: dict[str, list[Any]] = {}
    for part in filter(None, text.split(",")):
        key, eq, values = part.partition("=")
        try:
            parsed = [_number(v) for v in values.split("+") if v.strip()]
        except ValueError:
            parsed = []
        if not eq or not key.strip() or not parsed:
            raise argparse.ArgumentTypeError(f"--grid {text!r}: give KEY=V1+V2 pairs, comma-separated, e.g. "
                                             "lr=0.01+0.001,weight_decay=0 (or 'none')")
        grid[key.strip()] = parsed
    return grid


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def _workers(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number (0: no worker processes)")
    return int(text)


def run_bench_command(args: argparse.Namespace) -> int:
    """``frozenlens bench``."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from frozenlens.bench import BenchConfig, run_bench
    from frozenlens.bench.report import table
    from frozenlens.data import load_any_task
    from frozenlens.errors import ConfigError

    try:
        methods = split_methods(args.methods)
    except argparse.ArgumentTypeError as err:
        raise ConfigError(str(err)) from None
    backbone = args.backbone or default_backbone(load_any_task(args.tasks[0])) if args.tasks else args.backbone
    config = BenchConfig(args.tasks, methods, args.out, backbone=backbone, arch=args.arch,
                         img_size=args.img_size, device=args.device, seeds=args.seeds, protocol=args.protocol,
                         shots=args.shots, epochs=args.epochs, grid=args.grid, store_dtype=args.store_dtype,
                         engine=args.engine, batch_size=args.batch_size, workers=args.workers,
                         ray_address=args.ray_address, ray_num_cpus=args.ray_cpus, plots=not args.no_plots,
                         report_only=args.report_only)
    with logging_redirect_tqdm():
        report = run_bench(config)
    header, body = table(report)
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for line in body:
        print("| " + " | ".join(line) + " |")
    if report.context.get("unfinished"):
        print(f"\nunfinished: {'; '.join(report.context['unfinished'])}")
    print(f"\nreport.md / report.csv / report.json and plots in {args.out}/; finished cells in {args.out}/cells/")
    return 0
