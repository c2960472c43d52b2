"""Tests of the demo's Fashion-MNIST builder (examples/fashion_mnist.py)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from examples import fashion_mnist
from examples.fashion_mnist import FASHION_MNIST_CLASSES, build_fashion_mnist_task, read_idx
from frozenlens.data import load_image, load_task
from frozenlens.errors import DataError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
SPLIT_FILES = ("train800.txt", "val200.txt", "train800val200.txt", "test.txt")


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)


def _fake_source(root: Path, per_class_train: int = 101, per_class_test: int = 4) -> Path:
    """Synthetic Fashion-MNIST idx files (train gzipped, t10k raw); pixel[0,0] = index % 256."""
    rng = np.random.RandomState(123)
    root.mkdir(parents=True)
    for part, per_class, gz in (("train", per_class_train, True), ("t10k", per_class_test, False)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
        images = rng.randint(0, 256, (len(labels), 28, 28)).astype(np.uint8)
        images[:, 0, 0] = np.arange(len(labels)) % 256
        suffix = ".gz" if gz else ""
        _write_idx(root / f"{part}-images-idx3-ubyte{suffix}", images, gz)
        _write_idx(root / f"{part}-labels-idx1-ubyte{suffix}", labels, gz)
    return root


def _split_texts(root: Path) -> dict[str, str]:
    return {f: (root / f).read_text() for f in (*SPLIT_FILES, "classes.txt")}


def _check_fashion_task(out: Path, n_test: int, source: Path) -> None:
    """Counts, class balance, labels vs. folders and source pixels of a built task."""
    task = load_task(out)
    assert task.layout == "vtab" and task.classes == FASHION_MNIST_CLASSES
    counts = {k: len(v) for k, v in task.splits.items()}
    assert counts == {"train": 800, "val": 200, "trainval": 1000, "test": n_test}
    for split, per_class in (("train", 80), ("val", 20), ("test", n_test // 10)):
        labels = [i.label for i in task.split(split)]
        assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10
    assert not {i.path for i in task.split("train")} & {i.path for i in task.split("val")}
    assert task.split("trainval") == sorted(task.split("train") + task.split("val"),
                                            key=lambda i: (i.label, i.path.name))  # fmt: skip
    files = fashion_mnist.idx_files(source)
    assert files is not None
    images, labels = read_idx(files["test_images"]), read_idx(files["test_labels"])
    item = task.split("test")[-1]
    index = int(item.path.stem.split("_")[1])
    assert labels[index] == item.label == 9 and item.path.parent.name == "ankle_boot"
    assert np.array_equal(np.asarray(Image.open(item.path)), images[index])
    assert Image.open(item.path).mode == "L" and load_image(item.path).mode == "RGB"
    assert (out / "SOURCE.md").read_text().startswith("# fashion-mnist")


def test_fashion_mnist_from_fake_idx(tmp_path: Path) -> None:
    source = _fake_source(tmp_path / "src")
    out = build_fashion_mnist_task(tmp_path / "a" / "fm", n_test=30, source_dir=source)
    assert out == tmp_path / "a" / "fm" and (out / ".complete").is_file()
    _check_fashion_task(out, 30, source)
    again = build_fashion_mnist_task(tmp_path / "b", n_test=30, source_dir=source)
    assert _split_texts(again) == _split_texts(out)
    mtime = (out / ".complete").stat().st_mtime_ns
    assert build_fashion_mnist_task(out, n_test=30, source_dir=source) == out  # reused as is
    assert (out / ".complete").stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["fm"]  # no temp dirs left behind


def test_fashion_mnist_uneven_n_test(tmp_path: Path) -> None:
    out = build_fashion_mnist_task(tmp_path / "fm", n_test=23, source_dir=_fake_source(tmp_path / "s"))
    labels = [int(line.split()[1]) for line in (out / "test.txt").read_text().splitlines()]
    assert np.bincount(labels).tolist() == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]


def test_fashion_mnist_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    advice = r"apt-get install dataset-fashion-mnist.*internet.*--fashion-mnist-dir"
    with pytest.raises(DataError, match=advice):
        build_fashion_mnist_task(tmp_path / "fm", download=False)
    assert not (tmp_path / "fm").exists() and list(tmp_path.iterdir()) == []
    small = _fake_source(tmp_path / "small", per_class_train=50)
    with pytest.raises(DataError, match="has 50 images, 100 needed"):
        build_fashion_mnist_task(tmp_path / "fm", source_dir=small)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small"]  # temp build removed
    source = _fake_source(tmp_path / "src")
    out = build_fashion_mnist_task(tmp_path / "fm", n_test=10, source_dir=source)
    with pytest.raises(DataError, match="other settings"):
        build_fashion_mnist_task(out, n_test=20, source_dir=source)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(DataError, match="not a complete Fashion-MNIST task"):
        build_fashion_mnist_task(tmp_path / "junk", source_dir=source)


def test_read_idx_rejects_truncated(tmp_path: Path) -> None:
    path = tmp_path / "x-idx1-ubyte"
    _write_idx(path, np.arange(10, dtype=np.uint8), gz=False)
    assert read_idx(path).tolist() == list(range(10))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(path)


@pytest.mark.skipif(
    not DEBIAN_FASHION.is_dir(),
    reason=f"{DEBIAN_FASHION} absent; install it with `sudo apt-get install dataset-fashion-mnist`",
)
def test_fashion_mnist_from_debian_package(tmp_path: Path) -> None:
    assert fashion_mnist.find_fashion_mnist_source() == DEBIAN_FASHION
    out = build_fashion_mnist_task(tmp_path / "one", n_test=100, download=False)
    _check_fashion_task(out, 100, DEBIAN_FASHION)
    again = build_fashion_mnist_task(tmp_path / "two", n_test=100, download=False)
    assert _split_texts(again) == _split_texts(out)
    assert (again / "SOURCE.md").read_text() == (out / "SOURCE.md").read_text()


# -- the real tasks in ../shared/data ---------------------------------------------------------
