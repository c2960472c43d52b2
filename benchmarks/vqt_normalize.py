"""VQT with and without L2-normalised head inputs: a shortened run on a shared VTAB-1k task.

The VQT paper concatenates the final CLS token with every layer's query outputs
and says nothing about normalising them; the official code (``andytu28/VQT``,
``MODEL.H2T.NORMALIZE_FEATS``, default True and not overridden by its VTAB
scripts) L2-normalises each part before the linear head. This script measures
both settings with everything else equal: the same store, seed and schedule,
each tuned over the same learning rates on train800/val200 (normalisation
changes the scale of the head's input, so one fixed learning rate would favour
one of them), then retrained on train800val200 and tested once on an evenly
spaced subset of the test split.

A shortened run (reduced input size, few epochs, one seed, a small lr grid, a
test subset) so that it finishes in minutes on two CPU cores: compare the two
rows with each other, not with the paper's numbers.

Run from the repository root::

    FROZENLENS_CACHE=/tmp/flcache .venv/bin/python benchmarks/vqt_normalize.py

Writes ``vqt_normalize.{json,md}`` into ``--out``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Sequence

from common import command_line, machine_context, open_small_run, save_results, small_run_head, small_run_parser

from frozenlens.api import fit
from frozenlens.report import markdown_table


def parse_args(argv: Sequence[str] | None):
    parser = small_run_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=10, help="epochs per run (default: 10; the recipe: 100)")
    parser.add_argument("--warmup-epochs", type=int, default=1, help="warm-up epochs (default: 1)")
    parser.add_argument("--lrs", default="0.05,0.005",
                        help="learning rates tuned on train/val, comma-separated (default: 0.05,0.005; "
                             "batch 128, so the paper's grid is 0.5...0.025)")
    return parser.parse_args(argv)


def markdown(records: list[dict[str, Any]], ctx: dict[str, Any]) -> str:
    recipe = (f"VQT T=1, {ctx['epochs']} epochs with {ctx['warmup_epochs']} warm-up (the recipe: 100 with 10), "
              f"seed {ctx['seed']}; lr tuned over {ctx['lrs']} on train800/val200 (weight decay 1e-4), then "
              "retrained on train800val200 and tested once.")
    lines = [
        *small_run_head("VQT: L2-normalised head inputs or not (shortened run)", ctx, recipe),
        markdown_table(records),
        "",
        "| setting | chosen lr | val acc per lr |",
        "|---|---|---|",
    ]
    for r in records:
        per_lr = ", ".join(f"{row['lr']}: {100 * row['val_accuracy']:.1f}" for row in r["grid"])
        lines.append(f"| {r['spec']} | {r['train_config']['lr']} | {per_lr} |")
    lines += [
        "",
        f"Shortened run (reduced input size, {ctx['epochs']} epochs, one seed, a {len(ctx['lrs'])}-point lr grid, "
        f"{ctx['test_images']} test images): "
        "a comparison of the two settings with each other, not the paper's numbers.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    task, backbone = open_small_run(args)
    lrs = [float(v) for v in args.lrs.split(",")]
    ctx = {**machine_context(), "task": task.name, "backbone": backbone.name, "image_size": backbone.image_size,
           "train_images": len(task.split("trainval")), "test_images": len(task.split("test")),
           "epochs": args.epochs, "warmup_epochs": args.warmup_epochs, "seed": args.seed, "lrs": lrs,
           "shortened": True, "command": command_line(__file__)}
    records: list[dict[str, Any]] = []
    for normalize in ("true", "false"):
        spec = (f"vqt:normalize={normalize},epochs={args.epochs},warmup_epochs={args.warmup_epochs},"
                f"seeds={args.seed}")
        print(f"== {spec}", flush=True)
        started = time.perf_counter()
        report = fit(task, [spec], backbone=backbone, grid={"lr": lrs}, device=args.device, progress=True)
        record = dict(report.records[0])
        record["wall_seconds"] = round(time.perf_counter() - started, 1)
        record["extract_seconds"] = round(report.extract_seconds, 1)
        records.append(record)
        save_results(args.out, "vqt_normalize", ctx, records, markdown(records, ctx))
    print(markdown(records, ctx))
    return 0


if __name__ == "__main__":
    sys.exit(main())
