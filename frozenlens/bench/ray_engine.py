"""The Ray engine of ``frozenlens bench`` (``--engine ray``; the ``[ray]`` extra).

* **Extraction** is a Ray Data pipeline: image paths flow through ``map_batches`` into an
  actor pool, each actor holding the frozen backbone (on a GPU when the cluster has one),
  decoding and preprocessing images exactly as local extraction does
  (:class:`frozenlens.store.loader.ImageFiles`) and returning the taps. The results fill
  the activation store through :func:`frozenlens.store.extract` with a
  :class:`RayTaps` source, so shards, locks, manifests and resumption are the store's own,
  and the store has the same key as a local extraction (the values come from the same
  backbone and preprocessing): either engine reuses the other's store.
* **Cells** run as Ray tasks (one CPU each, or one GPU with ``--device cuda``), each
  computing :meth:`frozenlens.bench.workspace.Workspace.execute`, the local engine's code.
  The driver saves every result the moment it arrives, so a bench interrupted under Ray
  resumes like a local one, with either engine.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np

from frozenlens.backbones import Tap
from frozenlens.bench.cells import Cell
from frozenlens.bench.workspace import Workspace, WorkspaceSpec
from frozenlens.data import TextTask
from frozenlens.errors import FrozenlensError
from frozenlens.extras import require
from frozenlens.paths import cache_dir
from frozenlens.store import extract

_log = logging.getLogger("frozenlens")

ROW = "__row__"
"""Column holding each image's index in its shard (Ray Data may reorder blocks)."""


class TapActor:
    """A Ray Data actor holding the frozen backbone: paths in, tap values out."""

    def __init__(self, backbone: str, arch: str | None, img_size: int | None, device: str, taps: list[str]):
        import torch

        from frozenlens.backbones import load_backbone

        self.torch = torch
        self.device = device
        self.net = load_backbone(backbone, arch=arch, img_size=img_size, device=device)
        self.taps = [Tap.parse(key) for key in taps]
        self.transform = self.net.transform()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from frozenlens.store.loader import ImageFiles

        files = ImageFiles([str(p) for p in batch["path"]], self.transform)
        images = []
        for index in range(len(files)):
            _, value = files[index]
            if isinstance(value, Exception):
                raise value
            images.append(value)
        with self.torch.inference_mode():
            values = self.net.forward_taps(self.torch.stack(images).to(self.device), self.taps)
        return {ROW: batch[ROW], **{key: value.float().cpu().numpy() for key, value in values.items()}}


class RayTaps:
    """A :class:`frozenlens.store.TapSource` that computes a shard's taps with a Ray Data pipeline.

    ``origin`` is None: the values are the local backbone's, computed with the same
    preprocessing, so the store key is the local extraction's (see the module docstring).
    """

    origin = None

    def __init__(self, ws: Workspace, actors: int, gpus_per_actor: float):
        self.ws = ws
        self.actors, self.gpus = actors, gpus_per_actor

    def describe(self) -> dict:
        return self.ws.backbone.describe()

    def tap_shape(self, tap: Tap) -> tuple[int, ...]:
        return self.ws.backbone.tap_shape(tap)

    def compute_taps(self, image_paths: Sequence[str], taps: Sequence[Tap]) -> dict[str, np.ndarray]:
        """Values of ``taps`` for ``image_paths`` (one shard), in order."""
        import ray.data

        c = self.ws.config
        device = "cuda" if self.gpus else "cpu"
        items = [{ROW: i, "path": str(p)} for i, p in enumerate(image_paths)]
        dataset = ray.data.from_items(items).map_batches(
            TapActor, batch_size=c.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(self.actors, -(-len(items) // c.batch_size))),
            num_cpus=1, num_gpus=self.gpus,
            fn_constructor_kwargs={"backbone": c.backbone, "arch": c.arch, "img_size": c.img_size,
                                   "device": device, "taps": [t.key for t in taps]})
        parts: dict[str, list[np.ndarray]] = {}
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for key, value in batch.items():
                parts.setdefault(key, []).append(value)
        rows = np.concatenate(parts.pop(ROW))
        order = np.argsort(rows)
        if not np.array_equal(rows[order], np.arange(len(image_paths))):
            raise FrozenlensError(f"Ray extraction returned rows {sorted(rows.tolist())[:8]}... for "
                                  f"{len(image_paths)} images; run the bench again (finished shards are kept)")
        return {key: np.concatenate(values)[order] for key, values in parts.items()}


_WORKSPACES: dict[str, Workspace] = {}


def _execute(spec: WorkspaceSpec, cell: Cell) -> dict[str, Any]:
    """A cell, computed in a Ray worker (its workspace is kept for the worker's next cells)."""
    token = repr((spec.config.to_dict(), sorted(spec.task_paths.items()), sorted(spec.store_paths.items())))
    if token not in _WORKSPACES:
        _WORKSPACES.clear()
        _WORKSPACES[token] = Workspace(spec)
    return _WORKSPACES[token].execute(cell)


class RayEngine:
    """Runs a bench's extraction and cells on a Ray cluster (started here unless one is given)."""

    def __init__(self, ws: Workspace):
        ray = require("ray", "--engine ray")
        self.ray, self.ws = ray, ws
        c = ws.config
        self.started = False
        if not ray.is_initialized():
            env = {"FROZENLENS_CACHE": str(cache_dir())}
            env.update({k: os.environ[k] for k in ("TQDM_DISABLE",) if k in os.environ})
            ray.init(address=c.ray_address, num_cpus=c.ray_num_cpus if not c.ray_address else None,
                     include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
            self.started = True
        resources = ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0))
        self.cpus = max(1, int(resources.get("CPU", 1)))
        if c.device.startswith("cuda") and not self.gpus:
            raise FrozenlensError("--device cuda with --engine ray: the Ray cluster has no GPU; use --device cpu")
        _log.info("Ray cluster: %d CPU(s), %d GPU(s)", self.cpus, self.gpus)
        self.remote = ray.remote(_execute)

    def extract(self, ws: Workspace, task: str, taps: list[Any]) -> str:
        c = ws.config
        if isinstance(ws.task(task), TextTask):  # tokenizing is cheap and the pipeline reads image files
            from frozenlens.bench.runner import LocalEngine  # (runner imports this module lazily)

            return LocalEngine(ws).extract(ws, task, taps)
        actors = self.gpus or max(1, min(self.cpus, 4))
        source = RayTaps(ws, actors, 1.0 if self.gpus else 0.0)
        images = [str(i.path) for i in ws.task(task).all_images()]
        # One compute_taps call per shard: the whole shard goes through one pipeline.
        store = extract(source, images, taps, dtype=c.store_dtype, batch_size=len(images), progress=c.progress)
        return str(store.path)

    def run(self, cells: list[Cell], done: Any, bar: Any) -> None:
        if not cells:
            return
        ray = self.ray
        options = {"num_cpus": 1, "num_gpus": 1 if self.ws.config.device.startswith("cuda") else 0}
        spec = ray.put(self.ws.spec)
        pending = {self.remote.options(**options).remote(spec, cell): cell for cell in cells}
        try:
            while pending:
                bar.set_postfix_str(f"{len(pending)} cell(s) on Ray, e.g. {next(iter(pending.values())).describe()}",
                                    refresh=True)
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    cell = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError as err:
                        cause = err.as_instanceof_cause()
                        raise (cause if isinstance(cause, FrozenlensError) else
                               FrozenlensError(f"{cell.describe()}: failed on Ray: {err}")) from None
                    done(cell, result)
        finally:
            for ref in pending:
                ray.cancel(ref)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
