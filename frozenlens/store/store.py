"""Extract taps once, keep them on disk, read them memory-mapped.

Layout of one store (``<cache>/stores/<key>/``)::

    meta.json            what the store holds: backbone identity, taps, shapes, dtype, images
    shards/000000/       one folder per block of images, one ``.npy`` per tap
    shards/000001/ ...
    complete.json        written last: the store is whole

The key hashes the backbone weights, its preprocessing, the taps, the dtype and
the image files (paths and contents); taps computed elsewhere (a feature server,
see :class:`TapSource`) add their origin, e.g. ``remote:int8``, so they never mix
with locally computed ones. A shard folder is written under a
temporary name and renamed into place, so a folder named ``shards/NNNNNN`` is
always complete; an interrupted extraction resumes at the first missing shard
and never recomputes a finished one. Arrays are plain ``.npy`` (loaded with
``allow_pickle=False``) plus JSON: nothing in a store can execute code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm

from frozenlens.backbones.base import FrozenBackbone
from frozenlens.backbones.taps import Tap
from frozenlens.errors import StoreError
from frozenlens.paths import cache_dir, ensure_dir

STORE_FORMAT = 1
_SHARD_BYTES = 256 * 2**20
_DTYPES = {"float16": (torch.float16, np.float16), "float32": (torch.float32, np.float32)}


def store_root() -> Path:
    """Default folder holding all stores: ``<cache>/stores``."""
    return cache_dir() / "stores"


def _tap_file(key: str) -> str:
    return key.replace(":", "__") + ".npy"


def _hash_json(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def images_fingerprint(paths: Sequence[Path]) -> str:
    """SHA-256 over the ordered list of image paths and their file contents."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path).encode() + b"\0")
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()


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
    """Read access to a complete store; arrays are memory-mapped, shard by shard."""

    def __init__(self, path: Path):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise StoreError(f"{self.path}: not an activation store (no meta.json)")
        self.meta = json.loads(meta_file.read_text())
        if not (self.path / "complete.json").is_file():
            done = len(_done_shards(self.path))
            raise StoreError(
                f"{self.path}: extraction incomplete ({done}/{self.meta['num_shards']} shards); "
                "run the same extraction again to resume it"
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
        """Image paths in store order."""
        return list(self.meta["images"])

    @property
    def dtype(self) -> str:
        """Precision of the stored taps, e.g. ``"float16"``."""
        return str(self.meta["dtype"])

    @property
    def bytes_per_image(self) -> float:
        """Stored bytes per image, all taps together."""
        return self.meta["bytes_total"] / max(self.num_images, 1)

    def bytes_per_image_of(self, keys: Iterable[str]) -> int:
        """Stored bytes per image of taps ``keys`` alone."""
        itemsize = np.dtype(self.dtype).itemsize
        return sum(int(np.prod(self.shape(k))) * itemsize for k in keys)

    def shape(self, key: str) -> tuple[int, ...]:
        """Per-image shape of tap ``key``."""
        return tuple(self.meta["shapes"][self._check(key)])

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
        key = self._check(key)
        indices = np.asarray(indices, dtype=np.int64)
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

    def _check(self, key: str) -> str:
        if key not in self.meta["shapes"]:
            raise StoreError(f"{self.path}: tap {key!r} not stored (has {', '.join(self.taps)})")
        return key

    def _map(self, key: str, shard: int) -> np.ndarray:
        file = self.path / "shards" / f"{shard:06d}" / _tap_file(key)
        return np.load(file, mmap_mode="r", allow_pickle=False)


def _done_shards(path: Path) -> set[int]:
    shards = path / "shards"
    if not shards.is_dir():
        return set()
    return {int(p.name) for p in shards.iterdir() if p.is_dir() and p.name.isdigit()}


def find_store(root: Path, base_key: str, taps: Iterable[str]) -> ActivationStore | None:
    """A complete store under ``root`` with the same backbone/images/dtype holding all ``taps``."""
    wanted = set(taps)
    if not root.is_dir():
        return None
    for meta_file in sorted(root.glob("*/meta.json")):
        meta = json.loads(meta_file.read_text())
        complete = (meta_file.parent / "complete.json").is_file()
        if complete and meta.get("base_key") == base_key and wanted <= set(meta["taps"]):
            return ActivationStore(meta_file.parent)
    return None


def extract(
    backbone: FrozenBackbone | TapSource,
    images: Sequence[Path | str],
    taps: Iterable[Tap],
    *,
    root: Path | None = None,
    dtype: str = "float16",
    batch_size: int = 32,
    shard_size: int | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> ActivationStore:
    """Run ``backbone`` once over ``images`` and store ``taps``; resume or reuse when possible.

    Args:
        backbone: the frozen backbone, or a :class:`TapSource` that computes the
            taps elsewhere (e.g. a feature server).
        images: image files, in the order rows will have in the store.
        taps: activations to keep.
        root: folder of stores (default :func:`store_root`).
        dtype: ``float16`` (default, half the disk) or ``float32``.
        batch_size: images per forward pass.
        shard_size: images per shard (default: as many as fit in 256 MiB).
        progress: show a progress bar with images/s.
        device: where to run the backbone (default: where it is).

    Returns:
        The complete store. An existing complete store with the same backbone,
        images and dtype that holds all ``taps`` is returned as is.
    """
    if dtype not in _DTYPES:
        raise StoreError(f"dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    root = Path(root) if root else store_root()
    taps = sorted(set(taps))
    paths = [str(Path(p)) for p in images]
    origin = None if isinstance(backbone, FrozenBackbone) else backbone.origin
    plan = _Plan(backbone.describe(), tuple(t.key for t in taps), dtype, tuple(paths),
                 images_fingerprint([Path(p) for p in paths]), origin)
    existing = find_store(root, plan.base_key, plan.taps)
    if existing is not None:
        if progress:
            print(f"reusing activation store {existing.path} ({existing.num_images} images)")
        return existing
    path = ensure_dir(root / plan.key)
    meta = _write_meta(path, plan, backbone, taps, shard_size)
    _extract_missing(path, meta, backbone, taps, batch_size, progress, device)
    return _finish(path, meta)


def _write_meta(path: Path, plan: _Plan, backbone: FrozenBackbone | TapSource, taps: list[Tap],
                shard_size: int | None) -> dict:
    meta_file = path / "meta.json"
    if meta_file.is_file():
        return json.loads(meta_file.read_text())
    shapes = {t.key: list(backbone.tap_shape(t)) for t in taps}
    itemsize = np.dtype(plan.dtype).itemsize
    per_image = sum(int(np.prod(s)) for s in shapes.values()) * itemsize
    size = shard_size or max(1, min(1024, _SHARD_BYTES // max(per_image, 1)))
    meta = {
        "format": STORE_FORMAT, "key": plan.key, "base_key": plan.base_key,
        "backbone": plan.backbone, "taps": list(plan.taps), "shapes": shapes,
        "dtype": plan.dtype, "num_images": len(plan.images), "shard_size": size,
        "num_shards": -(-len(plan.images) // size), "images": list(plan.images),
        "images_fingerprint": plan.fingerprint, **({"origin": plan.origin} if plan.origin else {}),
    }
    _atomic_write_text(meta_file, json.dumps(meta, indent=1))
    return meta


def _extract_missing(path: Path, meta: dict, backbone: FrozenBackbone | TapSource, taps: list[Tap],
                     batch_size: int, progress: bool, device) -> None:
    shards_dir = ensure_dir(path / "shards")
    for stale in shards_dir.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    done = _done_shards(path)
    size, images = meta["shard_size"], meta["images"]
    todo = [s for s in range(meta["num_shards"]) if s not in done]
    finished = len(images) - sum(len(images[s * size:(s + 1) * size]) for s in todo)
    if progress and done:
        print(f"resuming extraction in {path}: {len(done)}/{meta['num_shards']} shards already done")
    desc = "extracting" if isinstance(backbone, FrozenBackbone) else f"fetching ({backbone.origin})"
    bar = tqdm(total=len(images), initial=finished, unit="img", desc=desc,
               disable=not progress, dynamic_ncols=True)
    with bar:
        for shard in todo:
            shard_images = images[shard * size:(shard + 1) * size]
            arrays = _run_shard(backbone, shard_images, taps, batch_size, meta["dtype"], device, bar)
            _write_shard(shards_dir, shard, arrays)


def _run_shard(backbone: FrozenBackbone | TapSource, image_paths: list[str], taps: list[Tap],
               batch_size: int, dtype: str, device, bar) -> dict[str, np.ndarray]:
    from frozenlens.data.images import load_image

    if not isinstance(backbone, FrozenBackbone):
        return _fetch_shard(backbone, image_paths, taps, batch_size, dtype, bar)

    transform = backbone.transform()
    torch_dtype, _ = _DTYPES[dtype]
    device = device or next(backbone.parameters()).device
    parts: dict[str, list[np.ndarray]] = {t.key: [] for t in taps}
    for start in range(0, len(image_paths), batch_size):
        chunk = image_paths[start:start + batch_size]
        batch = torch.stack([transform(load_image(Path(p))) for p in chunk]).to(device)
        with torch.inference_mode():
            values = backbone.forward_taps(batch, taps)
        for key, value in values.items():
            parts[key].append(value.to(torch_dtype).cpu().numpy())
        bar.update(len(chunk))
    return {key: np.concatenate(chunks) for key, chunks in parts.items()}


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


def _write_shard(shards_dir: Path, shard: int, arrays: dict[str, np.ndarray]) -> None:
    tmp = shards_dir / f".tmp-{shard:06d}-{os.getpid()}"
    tmp.mkdir()
    for key, array in arrays.items():
        with open(tmp / _tap_file(key), "wb") as handle:
            np.save(handle, array, allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
    try:
        os.rename(tmp, shards_dir / f"{shard:06d}")
    except OSError:  # another process finished this shard first
        shutil.rmtree(tmp, ignore_errors=True)


def _finish(path: Path, meta: dict) -> ActivationStore:
    total = sum(f.stat().st_size for f in (path / "shards").rglob("*.npy"))
    meta = {**meta, "bytes_total": total}
    _atomic_write_text(path / "meta.json", json.dumps(meta, indent=1))
    _atomic_write_text(path / "complete.json", json.dumps({"bytes_total": total}))
    return ActivationStore(path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
