"""What a bench runs: tasks, methods, backbone, protocol, seeds, where results go."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from frozenlens.backbones import DEFAULT_BACKBONE
from frozenlens.bench.views import FEWSHOT_SHOTS
from frozenlens.errors import ConfigError
from frozenlens.train.trainer import TrainConfig

PROTOCOLS = ("vtab", "fewshot")
ENGINES = ("local", "ray")

SELECTION_RULE = {
    "vtab": ("each grid point is trained on train800 and scored on val200; the point with the highest val "
             "accuracy wins (ties: the first in grid order); it is retrained on train800val200 once per seed "
             "and tested once; test accuracy is never used to select anything"),
    "fewshot": ("per draw, k images per class are drawn from the training split (seed = draw); 20% of each "
                "class's shots (at least one) are held out, each grid point is trained on the rest and scored "
                "on the held-out shots; the winner is retrained on all k shots (seed = draw) and tested once; "
                "with 1 shot nothing can be held out and the method's default hyper-parameters are used; "
                "test accuracy is never used to select anything"),
}
"""How hyper-parameters are chosen, per protocol (stated in every report)."""


@dataclass
class BenchConfig:
    """Settings of one bench run.

    Attributes:
        tasks: task folders (VTAB-1k export, ImageFolder or HF imagefolder); their folder
            names must differ (they name the report's columns).
        methods: method specs (``linear``, ``head2toe``, ``vqt:num_queries=2``, ``lora`` ...).
        out: results folder: ``cells/`` (one JSON per finished cell), ``report.{md,csv,json}``,
            plots.
        backbone, arch, img_size, device: as for :func:`frozenlens.load_backbone`.
        seeds: VTAB: final runs with seeds ``0..seeds-1``; few-shot: draws ``0..seeds-1``
            (each draw's model trains with its draw's seed). A spec's own ``seeds=`` wins (VTAB).
        protocol: ``vtab`` or ``fewshot`` (:data:`SELECTION_RULE`).
        shots: images per class of the few-shot protocol.
        epochs: override every method's default number of epochs (a spec's ``epochs=`` wins).
        grid: None: each method's own grid; a dict (``{"lr": [...]}``) applied to every method;
            ``{}``: no search, the methods' defaults.
        store_dtype: precision of stored taps.
        engine: ``local`` (this process) or ``ray`` (Ray Data extraction, cells as Ray tasks).
        batch_size: images per backbone pass during extraction.
        workers: image-decoding processes during local extraction (None: the default).
        ray_address: Ray cluster to join (None: start a local one, or join ``RAY_ADDRESS``).
        ray_num_cpus: CPUs of a Ray cluster started here (None: Ray's default, all of them).
        plots: write PNG plots (needs matplotlib, the ``[plots]`` extra).
        report_only: compute nothing; write the report from the cells already saved in ``out``
            (a task view x method whose cells are not all saved is listed as unfinished).
        progress: the overall progress bar and per-cell messages.
    """

    tasks: Sequence[str | Path]
    methods: Sequence[str]
    out: str | Path
    backbone: str = DEFAULT_BACKBONE
    arch: str | None = None
    img_size: int | None = None
    device: str = "cpu"
    seeds: int = 3
    protocol: str = "vtab"
    shots: Sequence[int] = FEWSHOT_SHOTS
    epochs: int | None = None
    grid: dict[str, list[Any]] | None = None
    store_dtype: str = "float16"
    engine: str = "local"
    batch_size: int = 32
    workers: int | None = None
    ray_address: str | None = None
    ray_num_cpus: int | None = None
    plots: bool = True
    report_only: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form context recorded in the report (e.g. ``{"recipe": "shortened"}``)."""

    def check(self) -> None:
        """Refuse settings that cannot run, naming the value and what to do, before any work.

        Raises:
            ConfigError: a bad value.
        """
        if not self.tasks:
            raise ConfigError("no tasks: give at least one task folder (--tasks DIR ...)")
        if not self.methods:
            raise ConfigError("no methods: give at least one method (--methods linear,head2toe)")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol {self.protocol!r}: use one of {', '.join(PROTOCOLS)}")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine {self.engine!r}: use one of {', '.join(ENGINES)}")
        for name, value in (("seeds", self.seeds), ("batch_size", self.batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r}: give a whole number of at least 1")
        if self.img_size is not None and (isinstance(self.img_size, bool) or not isinstance(self.img_size, int)
                                          or self.img_size < 1):
            raise ConfigError(f"img_size={self.img_size!r}: give a size in pixels of at least 1 (e.g. 56 or 224)")
        if self.protocol == "fewshot":
            if not self.shots or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.shots):
                raise ConfigError(f"shots={list(self.shots)!r}: give whole numbers of at least 1, e.g. 1,2,4,8,16")
            if len(set(self.shots)) != len(self.shots):
                raise ConfigError(f"shots={list(self.shots)!r}: each number of shots once")
        if self.epochs is not None:
            try:
                TrainConfig(epochs=self.epochs)
            except ConfigError as err:
                raise ConfigError(f"--epochs/epochs: {err}") from None
        if self.grid is not None:
            if not isinstance(self.grid, dict) or any(not isinstance(v, (list, tuple)) or not v
                                                      for v in self.grid.values()):
                raise ConfigError(f"grid={self.grid!r}: give a dict of setting -> non-empty list of values, "
                                  "e.g. {'lr': [0.01, 0.001]}, or {} for no search")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out}: an existing file, not a folder; give a new or existing folder")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings (recorded in the report)."""
        data = dataclasses.asdict(self)
        data["tasks"] = [str(t) for t in self.tasks]
        data["out"] = str(self.out)
        data["shots"] = list(self.shots)
        return data
