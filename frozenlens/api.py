"""The library's front door: ``fit`` a method on a task, ``predict`` with adapters."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

import torch

from frozenlens.adapter import load_adapter, read_adapter_meta, save_adapter
from frozenlens.backbones import DEFAULT_BACKBONE, FrozenBackbone, Tap, load_backbone
from frozenlens.data import Task, load_task
from frozenlens.errors import FrozenlensError
from frozenlens.methods import get_method, make_config
from frozenlens.methods.base import convert_setting
from frozenlens.report import result_record, write_results
from frozenlens.store import ActivationStore, TapSource, extract
from frozenlens.train.images import IMAGES_KEY, preprocess
from frozenlens.train.protocol import MethodResult, run_protocol
from frozenlens.train.trainer import TrainConfig


TRAIN_SETTINGS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("seed", "device"))
"""Training settings a method spec may override, e.g. ``vqt:epochs=20,lr=0.01``."""


@dataclass
class MethodSpec:
    """A method name with settings, parsed from ``"name"`` or ``"name:key=value,key=value"``.

    Keys are the method's config fields, the training settings in
    :data:`TRAIN_SETTINGS` (``epochs``, ``lr``, ``weight_decay``, ``batch_size`` ...),
    or ``seeds`` (``0+1+2``: this method's final-run seeds instead of the global ones).
    """

    name: str
    settings: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "MethodSpec":
        name, _, rest = text.partition(":")
        settings = {}
        for part in filter(None, rest.split(",")):
            key, eq, value = part.partition("=")
            if not eq:
                raise FrozenlensError(f"method spec {text!r}: settings are key=value, comma-separated")
            settings[key.strip()] = value.strip()
        spec = cls(name, settings)
        make_config(name, spec.method_settings)  # unknown method or setting: fail before any work
        spec.train_overrides()
        spec.seeds(())
        return spec

    @property
    def label(self) -> str:
        """Folder-safe name, e.g. ``linear-patch_mean=true``."""
        extra = ",".join(f"{k}={v}" for k, v in self.settings.items())
        return f"{self.name}-{extra}" if extra else self.name

    @property
    def method_settings(self) -> dict[str, str]:
        """Settings of the method's config."""
        return {k: v for k, v in self.settings.items() if k not in TRAIN_SETTINGS and k != "seeds"}

    def train_overrides(self) -> dict[str, Any]:
        """Training settings given in the spec, converted to their types."""
        defaults = TrainConfig()
        return {k: convert_setting(v, getattr(defaults, k), k)
                for k, v in self.settings.items() if k in TRAIN_SETTINGS}

    def seeds(self, default: Sequence[int]) -> list[int]:
        """The spec's ``seeds`` (``0+1+2``), else ``default``."""
        if "seeds" not in self.settings:
            return list(default)
        try:
            return [int(s) for s in self.settings["seeds"].split("+") if s.strip()]
        except ValueError as err:
            raise FrozenlensError(f"method spec {self.label!r}: seeds are integers joined by '+', "
                                  "e.g. seeds=0+1+2") from err


@dataclass
class FitReport:
    """What :func:`fit` produced."""

    task: Task
    backbone: FrozenBackbone | TapSource
    store: ActivationStore | None
    results: dict[str, MethodResult]
    records: list[dict[str, Any]]
    out_dir: Path | None
    extract_seconds: float


def fit(
    data: str | Path | Task,
    methods: Sequence[str] = ("linear",),
    *,
    backbone: str | FrozenBackbone | TapSource = DEFAULT_BACKBONE,
    arch: str | None = None,
    img_size: int | None = None,
    grid: bool | Collection[str] = False,
    seeds: Sequence[int] = (0,),
    epochs: int | None = None,
    out: str | Path | None = None,
    device: str = "cpu",
    store_dtype: str = "float16",
    batch_size: int = 32,
    progress: bool = True,
    low_memory: bool = False,
) -> FitReport:
    """Fit one or more methods on a task from one extraction of the backbone.

    Methods that run the backbone in the training loop (``Method.in_loop``: the
    PETL baselines, TOAST) train on the preprocessed images instead; when every
    method is such a method nothing is extracted and ``FitReport.store`` is None.

    Args:
        data: task folder (VTAB-1k export, ImageFolder or HF imagefolder) or a :class:`Task`.
        methods: method specs, e.g. ``["linear", "linear:patch_mean=true", "head2toe"]``;
            a spec may also override training settings and seeds (``"vqt:epochs=20,seeds=0"``).
        backbone: backbone name/path (see :func:`frozenlens.load_backbone`), a loaded one, or
            a :class:`~frozenlens.store.TapSource` that computes taps elsewhere (a feature
            server: :class:`frozenlens.serve.RemoteTaps`); features then fill the store one
            request per shard, so an interrupted fetch resumes without fetching anything twice.
        arch, img_size: passed to :func:`frozenlens.load_backbone`.
        grid: tune lr x weight decay on train/val first (the VTAB protocol): True for every
            method, or the labels (:attr:`MethodSpec.label`) of the methods to tune.
        seeds: final runs on train+val, one per seed; test accuracy is their mean.
        epochs: override the methods' default number of epochs.
        out: folder for adapters (``<out>/<method>/``) and ``results.{json,md}``; None writes nothing.
        device: ``cpu`` or ``cuda``.
        store_dtype: precision of stored taps.
        batch_size: images per backbone pass during extraction (per request when remote).
        progress: progress bars and messages.
        low_memory: leave stored taps on disk and read every minibatch from the store, so
            training memory is one batch rather than the whole split (for edge devices).
    """
    task = data if isinstance(data, Task) else load_task(data)
    specs = [MethodSpec.parse(m) for m in methods]
    net = backbone if isinstance(backbone, (FrozenBackbone, TapSource)) else load_backbone(
        backbone, arch=arch, img_size=img_size, device=device)
    remote = not isinstance(net, FrozenBackbone)
    info = net.describe()
    configs = {s.label: make_config(s.name, {**(remote_settings(s.name) if remote else {}), **s.method_settings})
               for s in specs}
    in_loop = [s.label for s in specs if get_method(s.name).in_loop]
    if remote and in_loop:
        raise FrozenlensError(f"{', '.join(in_loop)}: these methods run the backbone in the training "
                              "loop; they need the backbone on this machine, not a --remote feature server")
    taps = sorted({t for s in specs for t in get_method(s.name).taps(configs[s.label], info)})
    started = time.perf_counter()
    store = extract(net, [str(i.path) for i in task.all_images()], taps, dtype=store_dtype,
                    batch_size=batch_size, progress=progress, device=device,
                    shard_size=batch_size if remote else None) if taps else None
    extract_seconds = time.perf_counter() - started
    results, records = {}, []
    for spec in specs:
        method_class = get_method(spec.name)
        overrides = {**({"epochs": epochs} if epochs else {}), **spec.train_overrides()}
        cfg = method_class.train_defaults.updated(device=device, **overrides)
        tune = grid is True or (not isinstance(grid, bool) and spec.label in grid)
        if progress:
            print(f"training {spec.label}" + (" (grid search on train/val)" if tune else ""))
        result = run_protocol(spec.name, configs[spec.label], store, task, info if remote else net,
                              train_config=cfg,
                              grid=method_class.grid if tune else None, seeds=spec.seeds(seeds),
                              progress=progress, stream=low_memory)
        results[spec.label] = result
        keys = result.model.tap_keys()
        records.append(result_record(spec.label, result, store.bytes_per_image_of(keys) if keys else 0))
    out_dir = Path(out) if out else None
    if out_dir is not None:
        _save(out_dir, task, net, store, results, records, extract_seconds, store_dtype, seeds, grid)
    return FitReport(task, net, store, results, records, out_dir, extract_seconds)


def remote_settings(method: str) -> dict[str, Any]:
    """Settings method ``method`` takes when a feature server computes its taps (``fit`` with a
    :class:`~frozenlens.store.TapSource`): its class's ``remote_settings``, e.g. MIST reads
    the served g_k (``gathered=True``) instead of every block's tokens. Explicit settings win."""
    return dict(getattr(get_method(method), "remote_settings", {}))


def _save(out_dir: Path, task: Task, net: FrozenBackbone | TapSource, store: ActivationStore | None,
          results: dict[str, MethodResult], records: list[dict[str, Any]], extract_seconds: float,
          store_dtype: str, seeds: Sequence[int], grid: bool | Collection[str]) -> None:
    for label, result in results.items():
        record = next(r for r in records if r["label"] == label)
        save_adapter(out_dir / label, result.model, task.classes,
                     extra={"store_dtype": store_dtype, "features_from": getattr(net, "origin", "local backbone"),
                            "result": record})
    context = {
        "task": task.name, "task_root": str(task.root), "backbone": net.name,
        "weights_hash": net.weights_hash, "image_size": net.image_size,
        "train_images": len(task.split("trainval")),
        "test_images": len(task.splits.get("test", [])),
        "store": str(store.path) if store else None, "extract_seconds_this_run": round(extract_seconds, 1),
        "features_from": getattr(net, "origin", "local backbone"),
        "seeds": list(seeds), "grid_search": grid if isinstance(grid, bool) else sorted(grid),
    }
    write_results(out_dir, records, context)


@dataclass
class Prediction:
    """Top classes of one image for one adapter."""

    image: str
    adapter: str
    top: list[tuple[str, float]]


def predict(
    adapters: Sequence[str | Path],
    images: Sequence[str | Path],
    *,
    backbone: str | FrozenBackbone | TapSource | None = None,
    top_k: int = 3,
    batch_size: int = 32,
    device: str = "cpu",
) -> list[Prediction]:
    """Classify ``images`` with one or more adapters, from one backbone pass per image.

    All adapters must have been trained on the same backbone (checked by weights
    hash). ``backbone`` defaults to the one recorded in the first adapter; a
    :class:`~frozenlens.store.TapSource` (a feature server) computes the taps
    remotely, checked against the same weights hash.
    """
    if not adapters:
        raise FrozenlensError("predict needs at least one adapter folder")
    metas = [read_adapter_meta(a) for a in adapters]
    net = backbone if isinstance(backbone, (FrozenBackbone, TapSource)) else _backbone_for(
        metas[0], backbone, device)
    loaded = [load_adapter(a, net if isinstance(net, FrozenBackbone) else net.describe()) for a in adapters]
    taps = sorted({Tap.parse(k) for method, _ in loaded for k in method.tap_keys()})
    needs_images = any(method.in_loop for method, _ in loaded)
    if needs_images and not isinstance(net, FrozenBackbone):
        raise FrozenlensError("in-loop adapters run the backbone: predict them with the backbone on this "
                              "machine, not a --remote feature server")
    predictions = []
    for start in range(0, len(images), batch_size):
        chunk = [Path(p) for p in images[start:start + batch_size]]
        with torch.inference_mode():
            pixels = preprocess(net, chunk, device) if isinstance(net, FrozenBackbone) else None
            values = _tap_values(net, chunk, pixels, taps, device) if taps else {}
            for (method, meta), folder in zip(loaded, adapters):
                if method.in_loop:
                    feats = {IMAGES_KEY: pixels}
                else:
                    dtype = getattr(torch, meta.get("store_dtype", "float32"))
                    feats = {k: v.to(dtype).float() for k, v in values.items()}
                probs = method.to(device)(feats).softmax(-1).cpu()
                predictions += _top(chunk, str(folder), probs, meta["classes"], top_k)
    return predictions


def _tap_values(net: FrozenBackbone | TapSource, images: list[Path], pixels: torch.Tensor | None,
                taps: list[Tap], device: str) -> dict[str, torch.Tensor]:
    """Values of ``taps``: a local backbone pass on ``pixels``, or one request to a feature server."""
    if isinstance(net, FrozenBackbone):
        return net.forward_taps(pixels, taps)
    values = net.compute_taps([str(p) for p in images], taps)
    return {key: torch.from_numpy(value).to(device) for key, value in values.items()}


def _backbone_for(meta: dict[str, Any], name: str | None, device: str) -> FrozenBackbone:
    recorded = meta["backbone"]
    size = recorded.get("data_config", {}).get("input_size", [None])[-1]
    return load_backbone(name or recorded["name"], arch=recorded.get("arch") if name is None else None,
                         img_size=size, device=device)


def _top(paths: list[Path], adapter: str, probs: torch.Tensor, classes: list[str],
         k: int) -> list[Prediction]:
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [Prediction(str(p), adapter, [(classes[i], float(v)) for v, i in zip(vs, ids)])
            for p, vs, ids in zip(paths, values.tolist(), indices.tolist())]
