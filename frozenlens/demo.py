"""The built-in demo: Fashion-MNIST in the VTAB-1k layout, the offline DINOv2-S, every method."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from frozenlens.paths import cache_dir

TUNED_METHODS = ("linear", "head2toe")
"""Cheap on stored pooled taps: the full VTAB protocol (grid search, every seed)."""
TOKEN_METHODS = (
    "vqt:epochs=10,warmup_epochs=1,seeds=0",
    "inca:layers=6+8+10+11,epochs=10,warmup_epochs=1,seeds=0",
    "mist:gather_depth=12,epochs=10,warmup_epochs=1,lr=0.003,seeds=0",
    "last:epochs=2,warmup_epochs=1,seeds=0",
)
"""Read every block's tokens; on a 2-core CPU the demo trains them once, with their default
hyper-parameters and fewer epochs (each setting is printed in the table's label)."""
DEMO_METHODS = TUNED_METHODS + TOKEN_METHODS


def run_demo(*, n_test: int = 400, img_size: int = 224, seeds: Sequence[int] = (0, 1, 2),
             out: Path = Path("runs/demo"), fashion_mnist_dir: Path | None = None,
             device: str = "cpu") -> None:
    """Build the demo task, extract once (or reuse the store), run the VTAB protocol, print the table."""
    from frozenlens.api import MethodSpec, fit
    from frozenlens.data.fashion_mnist import build_fashion_mnist_task
    from frozenlens.report import markdown_table

    started = time.perf_counter()
    task_dir = build_fashion_mnist_task(cache_dir() / "data" / f"fashion-mnist-vtab-{n_test}",
                                        n_test=n_test, source_dir=fashion_mnist_dir)
    print(f"demo task: Fashion-MNIST, 1000 training images (800 train / 200 val), {n_test} test "
          f"images, at {img_size} px -> {task_dir}")
    report = fit(task_dir, DEMO_METHODS, img_size=img_size, grid=[MethodSpec.parse(m).label for m in TUNED_METHODS], seeds=seeds, out=out,
                 device=device)
    print()
    print(markdown_table(report.records))
    print(f"\nbackbone {report.backbone.name} ({report.backbone.arch}, weights "
          f"{report.backbone.weights_hash[:12]}); test accuracy (%) is the mean ± std over seeds "
          f"{list(seeds)} of models retrained on all 1000 images with the lr/wd chosen on val200; "
          "methods without a best val acc ran once with their defaults and the epochs shown.")
    print(f"extraction this run: {report.extract_seconds:.0f} s; total {time.perf_counter() - started:.0f} s")
    print(f"results: {out}/results.md, {out}/results.json; adapters: {out}/<method>/")
