"""``frozenlens bench``: many methods on many tasks under one protocol, resumable, one report.

    >>> from frozenlens.bench import BenchConfig, run_bench
    >>> report = run_bench(BenchConfig(["../shared/data/cifar10", "../shared/data/aid"],
    ...                                ["linear", "head2toe", "lora"], out="runs/bench", seeds=3))
    >>> report.rows[0]["group_mean"]

Modules: :mod:`~frozenlens.bench.config` (settings, selection rules),
:mod:`~frozenlens.bench.views` (VTAB selection and few-shot views of a task),
:mod:`~frozenlens.bench.cells` (units of work, saved as they finish),
:mod:`~frozenlens.bench.workspace` (computing a cell with
:func:`frozenlens.protocol.run_protocol`), :mod:`~frozenlens.bench.runner` (planning,
the local engine), :mod:`~frozenlens.bench.ray_engine` (Ray Data extraction, cells as
Ray tasks), :mod:`~frozenlens.bench.report` and :mod:`~frozenlens.bench.plots`
(Markdown, CSV, JSON, PNG), :mod:`~frozenlens.bench.flops` (FLOP counting).
"""

from frozenlens.bench.config import ENGINES, PROTOCOLS, SELECTION_RULE, BenchConfig
from frozenlens.bench.report import BenchReport
from frozenlens.bench.runner import bench, run_bench

__all__ = ["ENGINES", "PROTOCOLS", "SELECTION_RULE", "BenchConfig", "BenchReport", "bench", "run_bench"]
