"""Extract taps once, keep them on disk, read them memory-mapped.

Layout of one store (``<cache>/stores/<key>/``)::

    meta.json            what the store holds: backbone identity, taps, shapes, dtype, images
    shards/000000/       one folder per block of images: one ``.npy`` per tap + manifest.json
    shards/000001/ ...
    locks/               one lock file per shard and one for the store (``fcntl.flock``)
    quarantine/          damaged shards, set aside (see :func:`verify_store`)
    complete.json        written last: the store is whole

The key hashes the backbone weights, its preprocessing, the taps, the dtype and
the image files (paths and contents); taps computed elsewhere (a feature server,
see :class:`TapSource`) add their origin, e.g. ``remote:int8``, so they never mix
with locally computed ones. A shard is written by the one process holding its
lock, under a temporary name of its own, and renamed into place, so a folder
named ``shards/NNNNNN`` is always complete and is never replaced. Several
processes may extract the same store at once: they share the shards out, and
each waits for the shards the others are writing. An interrupted extraction
resumes at the missing shards and never recomputes a finished one. Every shard
has a manifest (shape, dtype, size, BLAKE2b hash per file) that opening a store
checks cheaply and :func:`verify_store` checks in full. While the backbone runs,
DataLoader workers decode and preprocess the next images
(:mod:`frozenlens.store.loader`) and a background thread writes the previous
shard; the stored bytes are the same with or without workers. Arrays are plain ``.npy``
(loaded with ``allow_pickle=False``) plus JSON: nothing in a store can execute code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from frozenlens.atomic import write_json
from frozenlens.backbones.base import FrozenBackbone
from frozenlens.backbones.taps import Tap, reduce_tokens, tap_shape
from frozenlens.backbones.text import MASK_KEY, TextBackbone, reduce_text_tokens
from frozenlens.errors import ConfigError, FrozenlensError, StoreError
from frozenlens.paths import cache_dir, ensure_dir
from frozenlens.store.examples import (
    TextExamples,
    check_examples,
    examples_fingerprint,
    forward_batch,
    input_rows,
    row_ids,
)
from frozenlens.store.fingerprint import images_fingerprint
from frozenlens.store.loader import preprocessed_batches, resolve_workers
from frozenlens.store.locks import file_lock, shard_lock_file, store_lock_file
from frozenlens.store.shards import (
    COMPLETE,
    QUARANTINE,
    clean_stale_temps,
    published_shards,
    quarantine_shard,
    shard_dir,
    shard_problem,
    shard_rows,
    tap_file,
    write_shard,
)

logger = logging.getLogger(__name__)

STORE_FORMAT = 1
_SHARD_BYTES = 256 * 2**20
_DTYPES = {"float16": (torch.float16, np.float16), "float32": (torch.float32, np.float32)}

__all__ = ["ActivationStore", "TapSource", "check_disk_room", "extract", "find_store", "find_task_store",
           "images_fingerprint", "read_meta", "store_root", "token_maps", "verify_store"]


def store_root() -> Path:
    """Default folder holding all stores: ``<cache>/stores``."""
    return cache_dir() / "stores"


def _hash_json(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


@runtime_checkable
class TapSource(Protocol):
    """Computes tap values for image files somewhere other than a local backbone.

    :func:`extract` fills a store from a :class:`FrozenBackbone` or from a
    source like this one (the feature server's client,
    :class:`frozenlens.serve.client.RemoteTaps`); shards are written the same way,
    so a remote fetch resumes exactly like a local extraction.
    """

    origin: str
    """Where values come from, e.g. ``"remote:int8"``; part of the store key."""

    def describe(self) -> dict:
        """Identity of the backbone that computes the taps (as :meth:`FrozenBackbone.describe`)."""

    def tap_shape(self, tap: Tap) -> tuple[int, ...]:
        """Per-image shape of ``tap``'s value."""

    def compute_taps(self, image_paths: Sequence[str], taps: Sequence[Tap]) -> Mapping[str, np.ndarray]:
        """Values of ``taps`` for ``image_paths``, one row per image, as float arrays."""


@dataclass(frozen=True)
class _Plan:
    """What an extraction must produce; hashed into the store key."""

    backbone: dict
    taps: tuple[str, ...]
    dtype: str
    images: tuple[str, ...]
    fingerprint: str
    origin: str | None = None
    num_tokens: int | None = None
    """Texts only: every row's padded token length (the longest text's)."""

    @property
    def base(self) -> dict:
        base = {"format": STORE_FORMAT, "backbone": self.backbone, "dtype": self.dtype,
                "images": self.fingerprint}
        return {**base, "origin": self.origin} if self.origin else base

    @property
    def base_key(self) -> str:
        return _hash_json(self.base)

    @property
    def key(self) -> str:
        return _hash_json({**self.base, "taps": list(self.taps)})[:24]


class ActivationStore:
    """Read access to a complete store; arrays are memory-mapped, shard by shard.

    Opening a store checks every shard file's size, ``.npy`` header and shape
    (cheap: no data is read); ``verify=True`` also compares every file's hash
    with the manifest written with the shard and looks for NaN/inf values. A
    damaged shard is moved to ``quarantine/``, the store is marked incomplete and
    :class:`StoreError` names the shard and file: running the same extraction
    again re-extracts that shard alone.
    """

    def __init__(self, path: Path | str, *, verify: bool = False):
        self.path = Path(path)
        self.meta = read_meta(self.path / "meta.json")
        if not (self.path / COMPLETE).is_file():
            done = len(published_shards(self.path))
            raise StoreError(
                f"{self.path}: extraction incomplete ({done}/{self.meta['num_shards']} shards); "
                "run the same extraction again to resume it"
            )
        problems = _repair(self.path, self.meta, full=verify)
        if problems:
            raise StoreError(
                f"{self.path}: damaged activation store: {'; '.join(problems)}. The store is "
                "marked incomplete: run the same extraction again to re-extract only the "
                "damaged shard(s)"
            )

    @property
    def num_images(self) -> int:
        """Images in the store, in extraction order."""
        return int(self.meta["num_images"])

    @property
    def taps(self) -> list[str]:
        """Keys of the stored taps."""
        return list(self.meta["taps"])

    @property
    def image_paths(self) -> list[str]:
        """Row ids in store order: image paths, or text keys (``TextItem.key``)."""
        return list(self.meta["images"])

    @property
    def modality(self) -> str:
        """``"image"`` or ``"text"``: what the rows are."""
        return str(self.meta["backbone"].get("modality", "image"))

    @property
    def dtype(self) -> str:
        """Precision of the stored taps, e.g. ``"float16"``."""
        return str(self.meta["dtype"])

    @property
    def bytes_per_image(self) -> float:
        """Stored bytes per image, all taps together."""
        return self.meta["bytes_total"] / max(self.num_images, 1)

    def bytes_per_image_of(self, keys: Iterable[str]) -> int:
        """Bytes per image of taps ``keys`` alone, in the store's precision (a tap computed from a
        stored token map counts at its own size)."""
        itemsize = np.dtype(self.dtype).itemsize
        return sum(int(np.prod(self.shape(k))) * itemsize for k in keys)

    def holds(self, key: str) -> bool:
        """True when tap ``key`` is stored, or is a reduction of a stored token map (see :meth:`get`)."""
        return holds_tap(self.meta, key)

    def shape(self, key: str) -> tuple[int, ...]:
        """Per-image shape of tap ``key``."""
        if key in self.meta["shapes"]:
            return tuple(self.meta["shapes"][key])
        source = self._source(key)
        num_tokens, dim = self.meta["shapes"][source]
        return tap_shape(Tap.parse(key), num_tokens, self.meta["backbone"]["num_prefix_tokens"], dim)

    def has_images(self, paths: Iterable[Path | str]) -> bool:
        """True when every image of ``paths`` is in the store."""
        stored = set(self.meta["images"])
        return all(str(p) in stored for p in paths)

    def index_of(self, paths: Iterable[Path | str]) -> np.ndarray:
        """Row indices of ``paths`` in the store."""
        lookup = {p: i for i, p in enumerate(self.meta["images"])}
        try:
            return np.array([lookup[str(p)] for p in paths], dtype=np.int64)
        except KeyError as err:
            raise StoreError(f"{self.path}: image {err.args[0]} is not in this store") from err

    def get(self, key: str, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows ``indices`` of tap ``key`` (random access, memory-mapped).

        Each shard is mapped only while its rows are copied: a read of a whole
        split keeps its copy resident, not the file pages it came from as well.
        """
        indices = np.asarray(indices, dtype=np.int64)
        if key not in self.meta["shapes"]:
            return self._derive(key, indices)
        size = self.meta["shard_size"]
        out = np.empty((len(indices), *self.shape(key)), dtype=self.meta["dtype"])
        shard_of = indices // size
        for shard in np.unique(shard_of):
            rows = np.nonzero(shard_of == shard)[0]
            mapped = self._map(key, int(shard))
            out[rows] = mapped[indices[rows] - shard * size]
            del mapped  # unmapped here; the copy is what stays
        return out

    def array(self, key: str) -> np.ndarray:
        """All rows of tap ``key``, in memory."""
        return self.get(key, np.arange(self.num_images))

    def _source(self, key: str) -> str:
        """The stored token map tap ``key`` is computed from."""
        source = derivation_source(self.meta, key)
        if source is None:
            raise StoreError(f"{self.path}: tap {key!r} is neither stored nor a reduction of a stored token "
                             f"map (has {', '.join(self.taps)})")
        return source

    def _derive(self, key: str, indices: np.ndarray, chunk: int = 256) -> np.ndarray:
        """Rows of tap ``key`` reduced from its site's stored tokens, ``chunk`` images at a time
        (in float32, then stored precision: what the backbone pass would have stored)."""
        source, reduce = self._source(key), Tap.parse(key).reduce
        backbone = self.meta["backbone"]
        prefix = int(backbone["num_prefix_tokens"])
        out = np.empty((len(indices), *self.shape(key)), dtype=self.meta["dtype"])
        for start in range(0, len(indices), chunk):
            rows = indices[start:start + chunk]
            tokens = torch.from_numpy(self.get(source, rows)).float()
            if backbone.get("modality") == "text":
                mask = torch.from_numpy(self.get(MASK_KEY, rows)) > 0.5
                value = reduce_text_tokens(tokens, mask, reduce, prefix)
            else:
                value = reduce_tokens(tokens, reduce, prefix, tuple(backbone["grid_size"]))
            out[start:start + chunk] = value.numpy()
        return out

    def _map(self, key: str, shard: int) -> np.ndarray:
        file = shard_dir(self.path, shard) / tap_file(key)
        try:
            return np.load(file, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise StoreError(f"{file}: cannot read this shard file ({err}); check the store with "
                             "frozenlens.store.verify_store or `frozenlens extract --verify`") from err


_META_FIELDS = {"taps": list, "shapes": dict, "dtype": str, "num_images": int, "shard_size": int,
                "num_shards": int, "images": list, "base_key": str}


def derivation_source(meta: Mapping, key: str) -> str | None:
    """The stored ``<site>:tokens`` map that tap ``key`` (not stored itself) is a reduction of,
    or None when ``key`` cannot be computed from what the store ``meta`` describes."""
    try:
        tap = Tap.parse(key)
    except FrozenlensError:
        return None
    source = f"{tap.site}:tokens"
    backbone = meta.get("backbone", {})
    if backbone.get("modality") == "text":  # no patch grid; reductions use the stored padding mask
        reducible = MASK_KEY in meta["shapes"] and not tap.reduce.startswith("pool")
    else:
        reducible = "num_prefix_tokens" in backbone and "grid_size" in backbone
    return source if tap.reduce != "tokens" and reducible and source in meta["shapes"] else None


def holds_tap(meta: Mapping, key: str) -> bool:
    """True when the store described by ``meta`` stores tap ``key`` or can compute it."""
    return key in meta["shapes"] or derivation_source(meta, key) is not None


def read_meta(meta_file: Path) -> dict:
    """A store's ``meta.json``, checked for what reading the store needs.

    Raises:
        StoreError: naming the file when it is missing, unreadable or inconsistent.
    """
    if not meta_file.is_file():
        raise StoreError(f"{meta_file.parent}: not an activation store (no meta.json)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise StoreError(f"{meta_file}: unreadable store description ({err}); delete the folder "
                         f"{meta_file.parent} and the store is rebuilt when it is next needed") from err
    problem = _meta_problem(meta)
    if problem:
        raise StoreError(f"{meta_file}: {problem}; delete the folder {meta_file.parent} and the "
                         "store is rebuilt when it is next needed")
    return meta


def _meta_problem(meta: object) -> str | None:
    if not isinstance(meta, dict):
        return "not a JSON object"
    for key, kind in _META_FIELDS.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            return f"field {key!r} is missing or not a {kind.__name__}"
    if meta["dtype"] not in _DTYPES:
        return f"unknown dtype {meta['dtype']!r}"
    shapes_ok = all(isinstance(s, list) and all(type(d) is int and d >= 0 for d in s)
                    for s in meta["shapes"].values())
    if not shapes_ok or sorted(meta["shapes"]) != sorted(map(str, meta["taps"])):
        return "taps and shapes do not match"
    size, count = meta["shard_size"], meta["num_images"]
    if size < 1 or count < 0 or meta["num_shards"] != -(-count // size) or len(meta["images"]) != count:
        return "image, shard and shard-size counts do not match"
    return None


def _repair(path: Path, meta: dict, *, full: bool, shards: Iterable[int] | None = None) -> list[str]:
    """Check ``shards`` (default: all); set damaged ones aside. Returns the problems found."""
    problems = []
    for shard in range(meta["num_shards"]) if shards is None else sorted(shards):
        problem = shard_problem(path, meta, shard, full=full)
        if problem is None:
            continue
        try:
            problem = quarantine_shard(path, meta, shard, full=full)
        except (StoreError, OSError) as err:
            problem = f"{problem} (could not set it aside: {err})"
        if problem:
            problems.append(problem)
    return problems


def verify_store(store: ActivationStore | Path | str, *, hashes: bool = True) -> list[str]:
    """Check a store in full and set damaged shards aside; this is ``frozenlens extract --verify``.

    Every published shard is checked: each tap file must exist with the size,
    ``.npy`` header (dtype, shape) and, with ``hashes``, the BLAKE2b hash recorded
    in the shard's manifest when it was written, and hold no more NaN/inf values
    than it was written with. Shards written before manifests existed get the
    size, shape and value checks only. A damaged shard is moved to the store's
    ``quarantine/`` folder, the store loses ``complete.json`` and every problem is
    logged as a warning; the next :func:`extract` of the same images and taps
    recomputes the damaged shards and nothing else.

    Args:
        store: an :class:`ActivationStore` or the folder of one (complete or not).
        hashes: also read every byte and compare hashes and values (else the
            cheap checks only, as done whenever a store is opened).

    Returns:
        One line per damaged shard (shard, file and what is wrong); empty when intact.

    Raises:
        StoreError: ``store`` is not a store or its ``meta.json`` is unreadable.
    """
    path = store.path if isinstance(store, ActivationStore) else Path(store)
    meta = read_meta(path / "meta.json")
    complete = (path / COMPLETE).is_file()
    return _repair(path, meta, full=hashes, shards=None if complete else published_shards(path))


def find_store(root: Path, base_key: str, taps: Iterable[str], *,
               verify: bool = False) -> ActivationStore | None:
    """A complete store under ``root`` with the same backbone/images/dtype holding all ``taps``
    (stored, or as reductions of stored token maps: :meth:`ActivationStore.holds`).

    Unreadable or damaged stores are skipped with a warning naming the file, so
    one bad store never stops the search (or another task).
    """
    wanted = set(taps)
    if not root.is_dir():
        return None
    for meta_file in sorted(root.glob("*/meta.json")):
        if not meta_file.parent.name.startswith("."):
            store = _open_candidate(meta_file, base_key, wanted, verify)
            if store is not None:
                return store
    return None


def _open_candidate(meta_file: Path, base_key: str, wanted: set[str],
                    verify: bool) -> ActivationStore | None:
    try:
        meta = read_meta(meta_file)
        if meta["base_key"] != base_key or not all(holds_tap(meta, key) for key in wanted):
            return None
        if not (meta_file.parent / COMPLETE).is_file():
            return None
        if verify:
            logger.info("checking every shard of activation store %s (hashes and values)", meta_file.parent)
        return ActivationStore(meta_file.parent, verify=verify)
    except StoreError as err:
        logger.warning("skipping activation store: %s", err)
        return None


def token_maps(depth: int) -> list[Tap]:
    """Every token map a store-trained method reads, or reduces to what it reads: the input of
    block 0 (``embed``), the output of each of the ``depth`` blocks, and the final norm's output.
    Every other tap (``cls``, ``patch_mean``, ``pool<g>``) is a reduction of one of these
    (:meth:`ActivationStore.get` computes it), and MIST's gather is their sum."""
    return [Tap("embed"), *(Tap(f"block.{i}") for i in range(depth)), Tap("final")]


def find_task_store(backbone: FrozenBackbone | TextBackbone | TapSource, images: Sequence[Path | str] | TextExamples,
                    taps: Iterable[Tap], dtype: str = "float16", root: Path | None = None, verify: bool = False,
                    ) -> ActivationStore | None:
    """A complete store of ``images`` (or :class:`TextExamples`) by ``backbone`` (same weights,
    preprocessing, dtype and contents) that holds ``taps`` or token maps they reduce from; None
    when there is none."""
    plan = _plan(backbone, images, taps, dtype)
    return find_store(Path(root) if root else store_root(), plan.base_key, plan.taps, verify=verify)


def _plan(backbone: FrozenBackbone | TextBackbone | TapSource, examples: Sequence[Path | str] | TextExamples,
          taps: Iterable[Tap], dtype: str) -> _Plan:
    """What storing ``taps`` of ``examples`` means: the store's identity (a text store also keeps
    the padding mask, and pads every row to the longest text)."""
    check_examples(backbone, examples)
    origin = None if isinstance(backbone, (FrozenBackbone, TextBackbone)) else backbone.origin
    keys = tuple(t.key for t in sorted(set(taps)))
    text = isinstance(examples, TextExamples)
    return _Plan(backbone.describe(), (*keys, MASK_KEY) if text else keys, dtype, tuple(row_ids(examples)),
                 examples_fingerprint(examples), origin,
                 examples.num_tokens(backbone) if text else None)


def check_disk_room(backbone: FrozenBackbone | TextBackbone | TapSource, taps: Sequence[Tap], num_images: int,
                    dtype: str, *, root: Path | None = None, progress: bool = True, num_tokens: int | None = None,
                    ) -> int:
    """Bytes a store of ``taps`` for ``num_images`` images (or texts padded to ``num_tokens``)
    takes, logged before it is written.

    Raises:
        StoreError: the disk holding the store folder has less room than that (naming the folder,
            the sizes and what to do).
    """
    itemsize = np.dtype(_DTYPES[dtype][1]).itemsize if dtype in _DTYPES else 2
    shapes = _tap_shapes(backbone, taps, num_tokens)
    per_image = sum(int(np.prod(shape)) for shape in shapes.values()) * itemsize
    total = per_image * num_images
    folder = ensure_dir(Path(root) if root else store_root())
    free = shutil.disk_usage(folder).free
    if progress:
        logger.info("storing %d taps of %d images: %.2f MB per image, %.2f GB in %s (%.1f GB free)",
                    len(taps), num_images, per_image / 1e6, total / 1e9, folder, free / 1e9)
    if total > free:
        raise StoreError(f"{folder}: the activation store needs {total / 1e9:.2f} GB ({per_image / 1e6:.2f} MB "
                         f"per image x {num_images} images) but the disk has {free / 1e9:.2f} GB free. Store "
                         "only what these methods read (fit --store-taps needed / store_taps='needed'), "
                         "use --store-dtype float16, or point FROZENLENS_CACHE at a larger disk")
    return total


def extract(
    backbone: FrozenBackbone | TextBackbone | TapSource,
    images: Sequence[Path | str] | TextExamples,
    taps: Iterable[Tap],
    *,
    root: Path | None = None,
    dtype: str = "float16",
    batch_size: int = 32,
    shard_size: int | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    verify: bool = False,
    num_workers: int | None = None,
) -> ActivationStore:
    """Run ``backbone`` once over ``images`` and store ``taps``; resume or reuse when possible.

    Args:
        backbone: the frozen backbone (an image or a text one), or a :class:`TapSource` that
            computes the taps elsewhere (e.g. a feature server).
        images: image files, in the order rows will have in the store; for a text backbone,
            :class:`~frozenlens.store.examples.TextExamples` (rows keyed by their ids, padded to
            the longest text, with the padding mask stored as ``attention_mask``).
        taps: activations to keep.
        root: folder of stores (default :func:`store_root`).
        dtype: ``float16`` (default, half the disk) or ``float32``.
        batch_size: images per forward pass.
        shard_size: images per shard (default: as many as fit in 256 MiB).
        progress: show a progress bar with images/s.
        device: where to run the backbone (default: where it is).
        verify: check the hashes and values of an existing store's shards
            (:func:`verify_store`) before reusing it; damaged shards are re-extracted.
        num_workers: processes that decode and preprocess images while the backbone
            runs (a torch ``DataLoader``; the stored values do not depend on it).
            None: the cores the backbone leaves free, at most 4 (:func:`~frozenlens.store.loader.resolve_workers`); 0:
            decode on this thread between backbone passes. Ignored for a
            :class:`TapSource`.

    Returns:
        The complete store. An existing complete store with the same backbone,
        images and dtype that holds all ``taps`` (or the token maps they reduce from)
        is returned as is. Several
        processes may extract the same store at once; each returns it complete.
    """
    if dtype not in _DTYPES:
        raise StoreError(f"dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                    or num_workers < 0):
        raise ConfigError(f"num_workers={num_workers!r}: give a whole number of worker processes "
                          "(0: decode images on the main thread), or None for the default")
    root = Path(root) if root else store_root()
    taps = sorted(set(taps))
    plan = _plan(backbone, images, taps, dtype)
    existing = find_store(root, plan.base_key, plan.taps, verify=verify)
    if existing is not None:
        if progress:
            logger.info("reusing activation store %s (%d %s)", existing.path, existing.num_images,
                        "texts" if existing.modality == "text" else "images")
        return existing
    path = ensure_dir(root / plan.key)
    meta = _write_meta(path, plan, backbone, taps, shard_size)
    if verify and published_shards(path):
        logger.info("checking the finished shards of %s (hashes and values)", path)
        _repair(path, meta, full=True, shards=published_shards(path))
    _extract_missing(path, meta, backbone, images, taps, batch_size, progress, device, num_workers)
    return _finish(path, meta)


def _write_meta(path: Path, plan: _Plan, backbone: FrozenBackbone | TapSource, taps: list[Tap],
                shard_size: int | None) -> dict:
    """The store's meta (written now unless a valid one for this plan exists)."""
    meta_file = path / "meta.json"
    with file_lock(store_lock_file(path)):
        if meta_file.exists():
            try:
                meta = read_meta(meta_file)
                if meta.get("key") == plan.key and meta["taps"] == list(plan.taps):
                    return meta
                logger.warning("%s: describes another store; starting this one again", meta_file)
            except StoreError as err:
                logger.warning("%s; starting this store again", err)
            _set_aside_all(path)
        meta = _new_meta(plan, backbone, taps, shard_size)
        write_json(meta_file, meta, indent=1, error=StoreError)
        return meta


def _tap_shapes(backbone: FrozenBackbone | TextBackbone | TapSource, taps: Sequence[Tap],
                num_tokens: int | None) -> dict[str, tuple[int, ...]]:
    """Per-row shape of each tap; texts padded to ``num_tokens`` add their padding mask."""
    if not isinstance(backbone, TextBackbone):
        return {t.key: tuple(backbone.tap_shape(t)) for t in taps}
    return {**{t.key: backbone.tap_shape(t, num_tokens) for t in taps}, MASK_KEY: (num_tokens or backbone.max_length,)}


def _new_meta(plan: _Plan, backbone: FrozenBackbone | TextBackbone | TapSource, taps: list[Tap],
              shard_size: int | None) -> dict:
    shapes = {key: list(shape) for key, shape in _tap_shapes(backbone, taps, plan.num_tokens).items()}
    itemsize = np.dtype(plan.dtype).itemsize
    per_image = sum(int(np.prod(s)) for s in shapes.values()) * itemsize
    size = shard_size or max(1, min(1024, _SHARD_BYTES // max(per_image, 1)))
    return {
        "format": STORE_FORMAT, "key": plan.key, "base_key": plan.base_key,
        "backbone": plan.backbone, "taps": list(plan.taps), "shapes": shapes,
        "dtype": plan.dtype, "num_images": len(plan.images), "shard_size": size,
        "num_shards": -(-len(plan.images) // size), "images": list(plan.images),
        "images_fingerprint": plan.fingerprint, **({"origin": plan.origin} if plan.origin else {}),
        **({"num_tokens": plan.num_tokens} if plan.num_tokens else {}),
    }


def _set_aside_all(path: Path) -> None:
    """Move every shard of a store whose meta.json cannot be trusted into quarantine/."""
    (path / COMPLETE).unlink(missing_ok=True)
    if (path / "shards").is_dir():
        target = path / QUARANTINE / f"shards-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        target.parent.mkdir(parents=True, exist_ok=True)
        (path / "shards").rename(target)
        logger.warning("%s: shards of the old store moved to %s", path, target)


def _extract_missing(path: Path, meta: dict, backbone: FrozenBackbone | TextBackbone | TapSource,
                     examples: Sequence[Path | str] | TextExamples, taps: list[Tap],
                     batch_size: int, progress: bool, device, num_workers: int | None) -> None:
    """Compute every shard not yet published, sharing the work with concurrent extractions."""
    ensure_dir(path / "shards")
    clean_stale_temps(path)
    todo = [s for s in range(meta["num_shards"]) if not shard_dir(path, s).is_dir()]
    if progress and len(todo) < meta["num_shards"]:
        logger.info("resuming extraction in %s: %d/%d shards already done", path,
                    meta["num_shards"] - len(todo), meta["num_shards"])
    local = isinstance(backbone, (FrozenBackbone, TextBackbone))
    desc = "extracting" if local else f"fetching ({backbone.origin})"
    finished = meta["num_images"] - sum(shard_rows(meta, s) for s in todo)
    unit = "text" if meta["backbone"].get("modality") == "text" else "img"
    bar = tqdm(total=meta["num_images"], initial=finished, unit=unit, desc=desc,
               disable=not progress, dynamic_ncols=True)
    with bar:
        if local:
            _LocalExtraction(path, meta, backbone, examples, taps, batch_size, device, num_workers, bar).run(todo)
            return

        def compute(images: list[str]) -> dict[str, np.ndarray]:
            return _fetch_shard(backbone, images, taps, batch_size, meta["dtype"], bar)

        busy = [s for s in todo if not _extract_shard(path, meta, s, compute, bar, blocking=False)]
        for shard in busy:  # being written by another process: wait for it (or take over)
            logger.info("%s: waiting for another process writing shard %06d", path, shard)
            _extract_shard(path, meta, shard, compute, bar, blocking=True)


def _extract_shard(path: Path, meta: dict, shard: int, compute, bar, *, blocking: bool) -> bool:
    """Compute and publish one shard under its lock; False if another process holds the lock."""
    with file_lock(shard_lock_file(path, shard), blocking=blocking) as held:
        if not held:
            return False
        if shard_dir(path, shard).is_dir():  # published by another process meanwhile
            bar.update(shard_rows(meta, shard))
            return True
        size = meta["shard_size"]
        arrays = compute(meta["images"][shard * size:(shard + 1) * size])
        _write_shard(path, shard, arrays)
        return True


class _LocalExtraction:
    """Fills a store's missing shards from a local backbone, keeping the backbone busy.

    Three things overlap: worker processes decode and preprocess the next batches
    (:mod:`frozenlens.store.loader`), the backbone computes the current one, and
    a background thread writes the previous shard. Shards are claimed lazily, in
    order, as the loader needs their first batch: a claimed shard's lock is held
    from then until it is published, so other processes skip it, and claiming
    never blocks while a lock is held (pass 1). Shards held by other processes
    are waited for afterwards, one at a time (pass 2). Batches never span shards
    and are cut as without workers, so the values do not depend on the workers.
    """

    def __init__(self, path: Path, meta: dict, backbone: FrozenBackbone | TextBackbone,
                 examples: Sequence[Path | str] | TextExamples, taps: list[Tap], batch_size: int,
                 device, num_workers: int | None, bar):
        self.path, self.meta, self.backbone, self.taps = path, meta, backbone, taps
        self.examples = examples
        self.batch_size, self.num_workers, self.bar = batch_size, num_workers, bar
        self.device = torch.device(device) if device else next(backbone.parameters()).device
        self.torch_dtype, self.np_dtype = _DTYPES[meta["dtype"]]
        self.claimed: dict[int, ExitStack] = {}  # shards whose lock is held, not yet handed to the writer
        self.filling: dict[int, tuple[dict[str, np.ndarray], list[int]]] = {}
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="frozenlens-shard-writer")
        self.pending: Future | None = None

    def run(self, todo: list[int]) -> None:
        if not todo:
            return
        dataset = input_rows(self.backbone, self.examples)
        try:
            busy: list[int] = []
            self._compute(dataset, self._claim(todo, busy, blocking=False), self._batches(todo))
            for shard in busy:  # being written by another process: wait for it (or take over)
                logger.info("%s: waiting for another process writing shard %06d", self.path, shard)
                self._compute(dataset, self._claim([shard], [], blocking=True), self._batches([shard]))
            self._wait_for_write()
        finally:
            self.writer.shutdown(wait=True)  # a write under way finishes and releases its lock
            for lock in self.claimed.values():
                lock.close()

    def _batches(self, shards: list[int]) -> int:
        return sum(-(-shard_rows(self.meta, s) // self.batch_size) for s in shards)

    def _claim(self, shards: list[int], busy: list[int], *, blocking: bool) -> Iterator[list[int]]:
        """Rows of each batch of the shards this process takes, taking each shard's lock first;
        shards another process holds go to ``busy``."""
        size = self.meta["shard_size"]
        for shard in shards:
            lock = ExitStack()
            if not lock.enter_context(file_lock(shard_lock_file(self.path, shard), blocking=blocking)):
                lock.close()
                busy.append(shard)
                continue
            if shard_dir(self.path, shard).is_dir():  # published by another process meanwhile
                lock.close()
                self.bar.update(shard_rows(self.meta, shard))
                continue
            self.claimed[shard] = lock
            start = shard * size
            stop = start + shard_rows(self.meta, shard)
            for first in range(start, stop, self.batch_size):
                yield list(range(first, min(first + self.batch_size, stop)))

    def _compute(self, dataset: Dataset, batches: Iterator[list[int]], count: int) -> None:
        pin = self.device.type == "cuda"
        workers = resolve_workers(self.num_workers, count, self.device)
        for rows, images in preprocessed_batches(dataset, batches, num_workers=workers, pin_memory=pin):
            with torch.inference_mode():
                values = forward_batch(self.backbone, images, self.taps, self.device,
                                       num_tokens=self.meta.get("num_tokens"), non_blocking=pin)
            shard = int(rows[0]) // self.meta["shard_size"]
            arrays, filled = self.filling.setdefault(shard, (self._new_arrays(shard), [0]))
            offset = int(rows[0]) - shard * self.meta["shard_size"]
            for key, value in values.items():
                arrays[key][offset:offset + len(rows)] = value.to(self.torch_dtype).cpu().numpy()
            filled[0] += len(rows)
            self.bar.update(len(rows))
            if filled[0] == shard_rows(self.meta, shard):
                self._publish(shard, self.filling.pop(shard)[0])

    def _new_arrays(self, shard: int) -> dict[str, np.ndarray]:
        rows = shard_rows(self.meta, shard)
        return {key: np.empty((rows, *shape), dtype=self.np_dtype) for key, shape in self.meta["shapes"].items()}

    def _publish(self, shard: int, arrays: dict[str, np.ndarray]) -> None:
        """Write ``shard`` in the background (after the previous one) and release its lock."""
        self._wait_for_write()
        lock = self.claimed.pop(shard)

        def write() -> None:
            with lock:
                _write_shard(self.path, shard, arrays)

        self.pending = self.writer.submit(write)

    def _wait_for_write(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()


def _fetch_shard(source: TapSource, image_paths: list[str], taps: list[Tap], batch_size: int,
                 dtype: str, bar) -> dict[str, np.ndarray]:
    """A shard's taps computed by ``source``, checked for shape, cast to the store's dtype."""
    _, np_dtype = _DTYPES[dtype]
    parts: dict[str, list[np.ndarray]] = {t.key: [] for t in taps}
    for start in range(0, len(image_paths), batch_size):
        chunk = image_paths[start:start + batch_size]
        values = source.compute_taps(chunk, taps)
        for tap in taps:
            value = np.asarray(values[tap.key])
            expected = (len(chunk), *source.tap_shape(tap))
            if value.shape != expected:
                raise StoreError(f"{source.origin}: tap {tap.key} came back with shape "
                                 f"{value.shape}, expected {expected}")
            parts[tap.key].append(value.astype(np_dtype, copy=False))
        bar.update(len(chunk))
    return {key: np.concatenate(chunks) for key, chunks in parts.items()}


def _write_shard(path: Path, shard: int, arrays: dict[str, np.ndarray]) -> None:
    """Publish a computed shard (the caller holds its lock)."""
    write_shard(path, shard, arrays)


def _finish(path: Path, meta: dict) -> ActivationStore:
    """Mark the store complete once every shard is published and intact; open it."""
    with file_lock(store_lock_file(path)):
        if not (path / COMPLETE).is_file():
            problems = [p for s in range(meta["num_shards"]) if (p := shard_problem(path, meta, s))]
            if problems:
                raise StoreError(f"{path}: not complete after extraction ({'; '.join(problems)}); "
                                 "run the same extraction again")
            total = sum(f.stat().st_size for s in range(meta["num_shards"])
                        for f in shard_dir(path, s).glob("*.npy"))
            write_json(path / "meta.json", {**meta, "bytes_total": total}, indent=1, error=StoreError)
            write_json(path / COMPLETE, {"bytes_total": total}, indent=None, error=StoreError)
    return ActivationStore(path)
