"""Build a small VTAB-1k-style Fashion-MNIST task from the original idx files.

The source is, in order of preference: ``source_dir`` if given, the Debian/Ubuntu package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``, gzipped idx files), or a
torchvision download into a temporary folder (needs internet). The built task holds
``images/<class>/<part>_<index>.png`` (28x28 grayscale PNGs, pixels as in the source; ``part`` is
the source part ``train`` or ``test`` and ``index`` the image's 0-based index in it), the VTAB
split files, ``classes.txt`` and ``SOURCE.md``.
"""

from __future__ import annotations

import gzip
import hashlib
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from examples.built_task import build_once
from frozenlens.data.split import class_permutations
from frozenlens.errors import DataError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the idx files (gzipped)."""

FASHION_MNIST_CLASSES: list[str] = [
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]
"""Folder-safe class names, label = index ("T-shirt/top", "Trouser", ... "Ankle boot")."""

OFFICIAL_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""Role -> base file name; ``.gz`` variants are accepted too."""

TRAIN_PER_CLASS = 80
VAL_PER_CLASS = 20
SEED = 0
FORMAT_VERSION = 1

_HOW_TO_GET = (
    "Get the Fashion-MNIST idx files one of these ways: (1) `sudo apt-get install "
    "dataset-fashion-mnist` (Debian/Ubuntu; installs them in /usr/share/datasets/fashion-mnist/); "
    "(2) run with internet access so torchvision can download them; (3) pass "
    "`--fashion-mnist-dir DIR` with the four idx files (train-images-idx3-ubyte, "
    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each optionally .gz)."
)


# -- finding and reading the source ----------------------------------------------------------


def idx_files(directory: Path) -> dict[str, Path] | None:
    """Role -> path of the four idx files in ``directory`` (raw or ``.gz``); None if any is absent."""
    found: dict[str, Path] = {}
    for role, base in IDX_FILES.items():
        candidates = [directory / base, directory / f"{base}.gz",
                      directory / base.replace("-idx", ".idx"),
                      directory / f"{base.replace('-idx', '.idx')}.gz"]  # fmt: skip
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            return None
        found[role] = path
    return found


def find_fashion_mnist_source() -> Path | None:
    """The Debian package's directory if it holds all four idx files, else None."""
    return DEBIAN_DIR if idx_files(DEBIAN_DIR) is not None else None


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file of unsigned bytes (gzip-compressed or raw, detected from the content)."""
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an idx file (bad magic number).")
    if data[2] != 0x08:
        raise DataError(f"{path}: idx data type 0x{data[2]:02x} unsupported (expected 0x08, ubyte).")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: idx header truncated.")
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">u4"))
    expected = int(np.prod(shape)) if shape else 0
    if len(data) - header != expected:
        raise DataError(
            f"{path}: idx file holds {len(data) - header} data bytes but its header "
            f"announces shape {shape} ({expected} bytes); the file is truncated or corrupt."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _read_bytes(path: Path) -> bytes:
    """File content, gunzipped when it starts with the gzip magic bytes."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: corrupt gzip file ({exc}).") from None


def _load_part(files: dict[str, Path], part: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) and labels (N,) of the source ``train`` or ``test`` part."""
    images = read_idx(files[f"{part}_images"])
    labels = read_idx(files[f"{part}_labels"])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"{files[f'{part}_images']} / {files[f'{part}_labels']}: shapes {images.shape} and "
            f"{labels.shape} do not match (expected (N, H, W) images and N labels)."
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{files[f'{part}_labels']}: label {labels.max()} out of range 0..9.")
    return images, labels


# -- selection --------------------------------------------------------------------------------


def _per_class_counts(total: int, n_classes: int) -> list[int]:
    """``total`` spread over classes as evenly as possible (remainder to the first classes)."""
    base, extra = divmod(total, n_classes)
    return [base + (1 if c < extra else 0) for c in range(n_classes)]


def _choose(labels: np.ndarray, counts: list[int], where: str) -> list[np.ndarray]:
    """Per class, ``counts[c]`` source indices drawn with ``RandomState(SEED)`` (class order):
    the first ``counts[c]`` of :func:`frozenlens.data.split.class_permutations`."""
    permutations = class_permutations(labels, SEED)
    chosen = []
    for c, count in enumerate(counts):
        pool = permutations.get(c, np.zeros(0, dtype=np.int64))
        if len(pool) < count:
            raise DataError(
                f"{where}: class {c} ({OFFICIAL_NAMES[c]}) has {len(pool)} images, {count} needed."
            )
        chosen.append(pool[:count])
    return chosen


def select_splits(
    train_labels: np.ndarray, test_labels: np.ndarray, n_test: int
) -> dict[str, list[tuple[int, int]]]:
    """Split name -> sorted ``(label, source index)`` pairs for train/val/trainval/test."""
    n_classes = len(FASHION_MNIST_CLASSES)
    per_class = [TRAIN_PER_CLASS + VAL_PER_CLASS] * n_classes
    train_val = _choose(train_labels, per_class, "source train part")
    test = _choose(test_labels, _per_class_counts(n_test, n_classes), "source test part")
    splits: dict[str, list[tuple[int, int]]] = {"train": [], "val": [], "test": []}
    for c in range(n_classes):
        splits["train"] += [(c, int(i)) for i in train_val[c][:TRAIN_PER_CLASS]]
        splits["val"] += [(c, int(i)) for i in train_val[c][TRAIN_PER_CLASS:]]
        splits["test"] += [(c, int(i)) for i in test[c]]
    splits["trainval"] = splits["train"] + splits["val"]
    return {name: sorted(pairs) for name, pairs in splits.items()}


# -- building ---------------------------------------------------------------------------------


def _rel_path(label: int, part: str, index: int) -> str:
    return f"images/{FASHION_MNIST_CLASSES[label]}/{part}_{index:05d}.png"


def _write_task(tmp: Path, files: dict[str, Path], source_desc: str, n_test: int) -> None:
    """Write images, split files, classes.txt and SOURCE.md into ``tmp``."""
    train_images, train_labels = _load_part(files, "train")
    test_images, test_labels = _load_part(files, "test")
    splits = select_splits(train_labels, test_labels, n_test)
    parts = {"train": train_images, "val": train_images, "trainval": train_images, "test": test_images}
    for name in FASHION_MNIST_CLASSES:
        (tmp / "images" / name).mkdir(parents=True, exist_ok=True)
    for split in ("trainval", "test"):
        part = "test" if split == "test" else "train"
        for label, index in splits[split]:
            Image.fromarray(parts[split][index], "L").save(tmp / _rel_path(label, part, index))
    for split, fname in (("train", "train800.txt"), ("val", "val200.txt"),
                         ("trainval", "train800val200.txt"), ("test", "test.txt")):  # fmt: skip
        part = "test" if split == "test" else "train"
        lines = [f"{_rel_path(label, part, index)} {label}\n" for label, index in splits[split]]
        (tmp / fname).write_text("".join(lines), encoding="utf-8")
    (tmp / "classes.txt").write_text("".join(f"{c}\n" for c in FASHION_MNIST_CLASSES), encoding="utf-8")
    (tmp / "SOURCE.md").write_text(_source_md(files, source_desc, splits, n_test), encoding="utf-8")


def _marker(n_test: int) -> dict[str, int]:
    return {"format_version": FORMAT_VERSION, "n_test": n_test, "seed": SEED}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _source_md(files: dict[str, Path], source_desc: str, splits: dict, n_test: int) -> str:
    """Provenance and method description written as SOURCE.md."""
    file_lines = "\n".join(f"- `{p.name}`: sha256 `{_sha256(p)}`" for p in files.values())
    rows = "\n".join(
        f"| {c} | {name} | {OFFICIAL_NAMES[c]} | "
        + " | ".join(str(sum(1 for lab, _ in splits[s] if lab == c)) for s in ("train", "val", "test"))
        + " |"
        for c, name in enumerate(FASHION_MNIST_CLASSES)
    )
    return f"""# fashion-mnist: Fashion-MNIST (10 clothing classes, 28x28 grayscale)

## Source

- Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747),
  https://github.com/zalandoresearch/fashion-mnist. Licence: MIT (Copyright 2017 Zalando SE).
- Read from: {source_desc}
{file_lines}

## Method

Built by `examples.fashion_mnist.build_fashion_mnist_task(out_dir, n_test={n_test})` in the frozenlens repository
(format version {FORMAT_VERSION}), deterministic:

- train800 / val200: from the source train part (60000 images in the original), per class in label
  order {TRAIN_PER_CLASS + VAL_PER_CLASS} images drawn with one `numpy.random.RandomState({SEED})`
  (`permutation` of the class's indices, first {TRAIN_PER_CLASS} -> train, next {VAL_PER_CLASS} -> val).
- test: {n_test} images from the source test part (`t10k`), as evenly per class as possible
  (remainder to the first classes), drawn the same way with a fresh `RandomState({SEED})`.
- Images: `images/<class>/<part>_<index>.png`, `part` = source part (`train`/`test`), `index` =
  0-based position in that part's idx file; 28x28 grayscale PNGs with the source pixels unchanged.
- Split files list `path label` sorted by label, then index; `classes.txt` gives label = line index.

## Counts

train800: {len(splits['train'])}, val200: {len(splits['val'])}, train800val200: \
{len(splits['trainval'])}, test: {len(splits['test'])}

| label | class | official name | train800 | val200 | test |
|---|---|---|---|---|---|
{rows}
"""


def _resolve_source(
    source_dir: Path | None, download: bool, scratch: Path
) -> tuple[dict[str, Path], str]:
    """The idx files to read and a one-line description of where they came from."""
    if source_dir is not None:
        files = idx_files(Path(source_dir))
        if files is None:
            raise DataError(
                f"{source_dir}: does not hold the four Fashion-MNIST idx files. {_HOW_TO_GET}"
            )
        return files, f"`{Path(source_dir).resolve()}` (given directory)"
    found = find_fashion_mnist_source()
    files = idx_files(found) if found is not None else None
    if files is not None:
        return files, f"`{found}` (Debian/Ubuntu package `dataset-fashion-mnist`)"
    if not download:
        raise DataError(f"Fashion-MNIST not found in {DEBIAN_DIR}. {_HOW_TO_GET}")
    return _download(scratch), "torchvision.datasets.FashionMNIST download (its mirror list)"


def _download(scratch: Path) -> dict[str, Path]:
    """Download the idx files with torchvision into ``scratch``; DataError with advice on failure."""
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(root=str(scratch), train=True, download=True)
        FashionMNIST(root=str(scratch), train=False, download=True)
    except Exception as exc:  # no internet, mirror down, torchvision missing ...
        raise DataError(
            f"Fashion-MNIST not found in {DEBIAN_DIR} and the torchvision download failed "
            f"({type(exc).__name__}: {exc}). {_HOW_TO_GET}"
        ) from exc
    files = idx_files(scratch / "FashionMNIST" / "raw")
    if files is None:
        raise DataError(f"torchvision download into {scratch} left no idx files. {_HOW_TO_GET}")
    return files


def build_fashion_mnist_task(
    out_dir: Path,
    n_test: int = 1000,
    source_dir: Path | None = None,
    download: bool = True,
) -> Path:
    """Build (or reuse) the Fashion-MNIST VTAB-1k-style task in ``out_dir`` and return its path.

    1000 images from the source train part (80 train + 20 val per class) and ``n_test`` from
    the source test part (class-balanced), chosen with ``numpy.random.RandomState(0)``. The task
    is built in a temporary sibling directory and renamed into place at the end, with a
    ``.complete`` marker; an existing complete task with the same settings is returned as is.

    Args:
        out_dir: directory to create (its parent is created if needed).
        n_test: number of test images (1..10000 for the real data).
        source_dir: directory holding the four idx files (raw or ``.gz``); default: the Debian
            package's directory, else a torchvision download.
        download: allow the torchvision download when no local source is found.

    Raises:
        DataError: no source data (the message says how to get it), bad idx files, too few
            images, or ``out_dir`` holds something else.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    if n_test < 1:
        raise DataError(f"n_test must be at least 1, got {n_test}.")

    def write(folder: Path) -> None:
        with tempfile.TemporaryDirectory(prefix=".fashion-mnist-download-", dir=out_dir.parent) as scratch:
            files, source_desc = _resolve_source(source_dir, download, Path(scratch))
            _write_task(folder, files, source_desc, n_test)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return build_once(out_dir, _marker(n_test), "Fashion-MNIST task", write)


