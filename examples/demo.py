"""The built-in demo: Fashion-MNIST in the VTAB-1k layout, the offline DINOv2-S, every method.

Run from the repository root (``make demo`` does it after installing)::

    python -m examples.demo [--n-test 400] [--img-size 224] [--seeds 0,1,2] [--out runs/demo]

It uses only the library's public API (:func:`frozenlens.fit`); the Fashion-MNIST
builder beside it (``examples/fashion_mnist.py``) is demo data, not library code.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from frozenlens.cli.common import seed_list
from frozenlens.errors import FrozenlensError
from frozenlens.paths import cache_dir

TUNED_METHODS = ("linear", "head2toe")
"""Cheap on stored pooled taps: the full VTAB protocol (grid search, every seed)."""
TOKEN_METHODS = (
    "vqt:epochs=10,warmup_epochs=1,seeds=0",
    "inca:layers=6+8+10+11,seeds=0",
    "mist:gather_depth=12,epochs=10,warmup_epochs=1,lr=0.003,seeds=0",
    "last:epochs=2,warmup_epochs=1,seeds=0",
)
"""Read every block's tokens; on a 2-core CPU the demo trains them once (seed 0) with their default
hyper-parameters. InCA runs its own 50 epochs on four of the twelve blocks; VQT, MIST and LAST run
fewer epochs than their recipes (each setting is printed in the table's label)."""
DEMO_METHODS = TUNED_METHODS + TOKEN_METHODS


def run_demo(*, n_test: int = 400, img_size: int = 224, seeds: Sequence[int] = (0, 1, 2),
             out: Path = Path("runs/demo"), fashion_mnist_dir: Path | None = None,
             device: str = "cpu") -> None:
    """Build the demo task, extract once (or reuse the store), run the VTAB protocol, print the table."""
    from examples.fashion_mnist import build_fashion_mnist_task
    from frozenlens.api import MethodSpec, fit
    from frozenlens.report import markdown_table

    started = time.perf_counter()
    task_dir = build_fashion_mnist_task(cache_dir() / "data" / f"fashion-mnist-vtab-{n_test}",
                                        n_test=n_test, source_dir=fashion_mnist_dir)
    print(f"demo task: Fashion-MNIST, 1000 training images (800 train / 200 val), {n_test} test "
          f"images, at {img_size} px -> {task_dir}")
    report = fit(task_dir, DEMO_METHODS, img_size=img_size, grid=[MethodSpec.parse(m).label for m in TUNED_METHODS],
                 seeds=seeds, out=out, device=device)
    print()
    print(markdown_table(report.records))
    print(f"\nbackbone {report.backbone.name} ({report.backbone.arch}, weights "
          f"{report.backbone.weights_hash[:12]}); test accuracy (%) is the mean ± std over seeds "
          f"{list(seeds)} of models retrained on all 1000 images with the lr/wd chosen on val200; "
          "methods without a best val acc ran once with their defaults and the epochs shown.")
    print(f"extraction this run: {report.extract_seconds:.0f} s; total {time.perf_counter() - started:.0f} s")
    print(f"results: {out}/results.md, {out}/results.json; adapters: {out}/<method>/")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m examples.demo``."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.demo",
        description="The built-in demo: a VTAB-1k-style Fashion-MNIST task (1000 training images) built "
        "from the Debian package dataset-fashion-mnist, the offline DINOv2 ViT-S/14, the reading methods "
        "(linear and Head2Toe with the VTAB grid and 3 seeds; VQT, InCA, MIST, LAST as labelled).")
    parser.add_argument("--n-test", type=int, default=400, help="test images (default: 400)")
    parser.add_argument("--img-size", type=int, default=224, help="input size (default: 224)")
    parser.add_argument("--seeds", type=seed_list, default=[0, 1, 2], help="final-run seeds (default: 0,1,2)")
    parser.add_argument("--out", default="runs/demo", help="results folder (default: runs/demo)")
    parser.add_argument("--fashion-mnist-dir", type=Path, help="folder with the four Fashion-MNIST idx files")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        run_demo(n_test=args.n_test, img_size=args.img_size, seeds=args.seeds, out=Path(args.out),
                 fashion_mnist_dir=args.fashion_mnist_dir, device=args.device)
    except FrozenlensError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
