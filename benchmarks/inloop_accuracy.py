"""Small accuracy runs of the in-loop methods (TOAST, PETL baselines) next to store-trained references.

On a CPU every training step of these methods runs the backbone forward and
backward, so the full 100-epoch recipes take days here. This script runs each
method's own recipe (optimizer, learning rate, batch size, schedule) for a few
epochs on the 1000 training images of a VTAB-1k task at a reduced input size,
one seed, no grid search, and tests on an evenly spaced subset of the test
split. It is a smoke test of learning, not a reproduction of the papers'
numbers: compare methods within one run only. On a GPU, run the recipes in full
with ``--epochs 100 --img-size 224 --test-limit 0 --device cuda``.

Each method goes through the public API (``frozenlens.fit``), as a user's run
would; the JSON and Markdown results are rewritten after every method, so an
interrupted run keeps what finished.

Run from the repository root::

    FROZENLENS_CACHE=/tmp/flcache .venv/bin/python benchmarks/inloop_accuracy.py
    .venv/bin/python benchmarks/inloop_accuracy.py --method toast --method lora --epochs 1

Writes ``inloop_accuracy.{json,md}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence

from common import command_line, machine_context, open_small_run, save_results, small_run_head, small_run_parser

from frozenlens.api import MethodSpec, fit
from frozenlens.methods import get_method
from frozenlens.report import markdown_table

IN_LOOP = ["toast", "lora", "vpt-deep", "adaptformer", "full", "bitfit", "partial", "vpt-shallow",
           "toast-lite", "toast:feedback=late", "vqt+vpt", "vqt+adaptformer"]
REFERENCES = ["linear", "vqt"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = small_run_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of every in-loop method (default: 3)")
    parser.add_argument("--reference-epochs", type=int, default=100,
                        help="epochs of the store-trained references (default: 100, their recipe; "
                             "they cost seconds per epoch)")
    parser.add_argument("--warmup-epochs", type=int, default=1,
                        help="warm-up epochs of every in-loop method (default: 1; with none, full "
                             "fine-tuning, BitFit and AdaptFormer stayed nearer chance after 2 epochs)")
    parser.add_argument("--method", action="append", dest="methods", metavar="SPEC",
                        help="method spec, repeatable (default: the store references "
                             f"{', '.join(REFERENCES)}, then every in-loop method)")
    return parser.parse_args(argv)


def run_method(spec: str, task, backbone, args: argparse.Namespace) -> dict[str, Any]:
    """One method through ``frozenlens.fit`` (in-loop methods with the short schedule); its record."""
    if get_method(MethodSpec.parse(spec).name).in_loop:
        short = f"epochs={args.epochs},warmup_epochs={args.warmup_epochs},seeds={args.seed}"
    else:
        short = f"epochs={args.reference_epochs},seeds={args.seed}"
    full_spec = f"{spec},{short}" if ":" in spec else f"{spec}:{short}"
    started = time.perf_counter()
    report = fit(task, [full_spec], backbone=backbone, device=args.device, progress=True)
    record = dict(report.records[0])
    record["label"] = spec
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    record["extract_seconds"] = round(report.extract_seconds, 1)
    return record


def markdown(records: list[dict[str, Any]], ctx: dict[str, Any]) -> str:
    recipe = (f"in-loop methods {ctx['epochs']} epoch(s) with {ctx['warmup_epochs']} warm-up, store-trained "
              f"references ({', '.join(REFERENCES)}) {ctx['reference_epochs']} epochs; seed {ctx['seed']}, no "
              "grid search; each method otherwise with its own recipe (optimizer, lr, batch size, cosine schedule).")
    return "\n".join([
        *small_run_head("In-loop methods: small accuracy runs", ctx, recipe),
        markdown_table(records),
        "",
        "A few epochs at a reduced input size: a check that every method learns through the public API, "
        "not the papers' 100-epoch numbers (their recipes are tuned for 100 epochs; short runs favour "
        "methods with larger learning rates). `train time` is that of the one seed; the store "
        "methods' extraction is in `extract_seconds` of the JSON.",
        "",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    task, backbone = open_small_run(args)
    ctx = {**machine_context(), "task": task.name, "backbone": backbone.name, "image_size": backbone.image_size,
           "train_images": len(task.split("trainval")), "test_images": len(task.split("test")),
           "epochs": args.epochs, "warmup_epochs": args.warmup_epochs,
           "reference_epochs": args.reference_epochs, "seed": args.seed,
           "command": command_line(__file__)}
    records: list[dict[str, Any]] = []
    for spec in args.methods or REFERENCES + IN_LOOP:
        print(f"== {spec}", flush=True)
        records.append(run_method(spec, task, backbone, args))
        save_results(args.out, "inloop_accuracy", ctx, records, markdown(records, ctx))
    print(markdown(records, ctx))
    return 0


if __name__ == "__main__":
    sys.exit(main())
