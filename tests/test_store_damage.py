"""The store under stress: concurrent extractions, damaged shards, corrupt metadata, full disks."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pytest

from frozenlens.backbones import Tap
from frozenlens.errors import FrozenlensError, StoreError
from frozenlens.store import ActivationStore, extract, images_fingerprint, verify_store
from frozenlens.store import fingerprint as fingerprint_module
from frozenlens.store import shards as shards_module
from frozenlens.store.locks import file_lock, shard_lock_file

REPO = Path(__file__).resolve().parents[1]
TAPS = [Tap("final", "cls"), Tap("final", "pool2")]


class FakeSource:
    """A cheap deterministic TapSource: tap values derived from the image path."""

    origin = "fake"

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.calls: list[list[str]] = []

    def describe(self) -> dict:
        return {"name": "fake", "weights_hash": "0" * 64}

    def tap_shape(self, tap: Tap) -> tuple[int, ...]:
        return (3,) if tap.key.endswith("cls") else (2, 4)

    def compute_taps(self, image_paths: Sequence[str], taps: Sequence[Tap]) -> Mapping[str, np.ndarray]:
        self.calls.append(list(image_paths))
        time.sleep(self.delay)
        out = {}
        for tap in taps:
            rows = []
            for path in image_paths:
                seed = int.from_bytes(hashlib.sha256(f"{path}|{tap.key}".encode()).digest()[:4], "little")
                rows.append(np.random.RandomState(seed).randn(*self.tap_shape(tap)))
            out[tap.key] = np.stack(rows).astype(np.float32)
        return out


def _images(tmp_path: Path, n: int = 23) -> list[str]:
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for i in range(n):
        (folder / f"{i:03d}.png").write_bytes(f"image {i}".encode())
    return [str(folder / f"{i:03d}.png") for i in range(n)]


def _store_bytes(store_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store_dir)): p.read_bytes()
            for p in sorted((store_dir / "shards").rglob("*")) if p.is_file()}


def _extract(source: FakeSource, images: list[str], root: Path, **kwargs) -> ActivationStore:
    return extract(source, images, TAPS, root=root, shard_size=5, batch_size=5, progress=False, **kwargs)


_CONCURRENT = textwrap.dedent("""
    import json, os, sys, time
    from tests.test_store_damage import FakeSource, TAPS
    from frozenlens.store import extract
    source = FakeSource(delay=0.2)
    images = json.loads(sys.argv[1])
    print("ready", flush=True)
    while not os.path.exists(sys.argv[3]):  # both start extracting at the same moment
        time.sleep(0.01)
    store = extract(source, images, TAPS, root=sys.argv[2], shard_size=5, batch_size=5, progress=False)
    print(json.dumps({"path": str(store.path), "batches": len(source.calls)}))
""")


def test_concurrent_extractions_of_one_store_share_the_shards(tmp_path):
    import json

    images = _images(tmp_path)
    reference = _extract(FakeSource(), images, tmp_path / "reference")
    root = tmp_path / "shared"
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, json.dumps(images), str(root), str(go)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["path"] == results[1]["path"]
    assert sum(r["batches"] for r in results) == reference.meta["num_shards"]  # each shard once
    store = ActivationStore(results[0]["path"], verify=True)
    assert _store_bytes(store.path) == _store_bytes(reference.path)
    assert not list((store.path / "shards").glob(".tmp-*"))


def test_a_live_writers_temp_folder_is_kept_and_a_dead_ones_removed(tmp_path):
    images = _images(tmp_path, 6)
    store = _extract(FakeSource(), images, tmp_path)
    live = store.path / "shards" / ".tmp-000000-1-live"
    live.mkdir()
    with file_lock(shard_lock_file(store.path, 0)):
        shards_module.clean_stale_temps(store.path)
        assert live.is_dir()
    shards_module.clean_stale_temps(store.path)
    assert not live.exists()


def _corrupt_bytes(file: Path) -> None:
    data = bytearray(file.read_bytes())
    offset = len(data) - 24
    data[offset:] = os.urandom(24)
    file.write_bytes(bytes(data))


def test_random_bytes_over_a_shard_are_caught_by_verify_and_only_that_shard_redone(tmp_path, caplog):
    images = _images(tmp_path)
    original = _extract(FakeSource(), images, tmp_path)
    before = _store_bytes(original.path)
    _corrupt_bytes(original.path / "shards" / "000002" / "final__cls.npy")
    ActivationStore(original.path)  # same size and header: the cheap check on open passes
    with caplog.at_level(logging.WARNING):
        problems = verify_store(original.path)
    assert len(problems) == 1 and "shard 000002, file final__cls.npy" in problems[0]
    assert "hash" in problems[0] and "000002" in caplog.text
    assert not (original.path / "complete.json").exists()
    assert list((original.path / "quarantine").iterdir())
    source = FakeSource()
    repaired = _extract(source, images, tmp_path)
    assert repaired.path == original.path and len(source.calls) == 1
    assert source.calls[0] == images[10:15]
    assert _store_bytes(repaired.path) == before


def test_extract_with_verify_repairs_a_silently_damaged_shard(tmp_path):
    images = _images(tmp_path)
    original = _extract(FakeSource(), images, tmp_path)
    before = _store_bytes(original.path)
    _corrupt_bytes(original.path / "shards" / "000001" / "final__pool2.npy")
    source = FakeSource()
    assert _extract(source, images, tmp_path).path == original.path and not source.calls  # reused
    repaired = _extract(source, images, tmp_path, verify=True)
    assert len(source.calls) == 1 and _store_bytes(repaired.path) == before


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-7])


def _empty(file: Path) -> None:
    file.write_bytes(b"")


def _remove(file: Path) -> None:
    file.unlink()


def _wrong_shape(file: Path) -> None:
    np.save(file, np.zeros((4, 3), np.float16))


def _float64(file: Path) -> None:
    np.save(file, np.load(file).astype(np.float64))


def _reversed_rows(file: Path) -> None:
    np.save(file, np.load(file)[::-1])


@pytest.mark.parametrize("damage", [_truncate, _empty, _remove, _wrong_shape, _float64])
def test_damage_found_on_open_names_the_shard_and_is_repaired(tmp_path, damage):
    images = _images(tmp_path)
    original = _extract(FakeSource(), images, tmp_path)
    before = _store_bytes(original.path)
    damage(original.path / "shards" / "000003" / "final__cls.npy")
    with pytest.raises(StoreError, match=r"shard 000003, file final__cls\.npy.*re-extract"):
        ActivationStore(original.path)
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(original.path)
    source = FakeSource()
    repaired = _extract(source, images, tmp_path)
    assert len(source.calls) == 1 and source.calls[0] == images[15:20]
    assert _store_bytes(repaired.path) == before


def test_damage_found_while_reusing_is_repaired_by_the_same_extract(tmp_path, caplog):
    images = _images(tmp_path)
    original = _extract(FakeSource(), images, tmp_path)
    before = _store_bytes(original.path)
    _truncate(original.path / "shards" / "000000" / "final__pool2.npy")
    source = FakeSource()
    with caplog.at_level(logging.WARNING):
        repaired = _extract(source, images, tmp_path)
    assert "shard 000000, file final__pool2.npy" in caplog.text
    assert len(source.calls) == 1 and _store_bytes(repaired.path) == before


def test_reversed_rows_and_nan_values_are_caught_by_verify(tmp_path):
    images = _images(tmp_path)
    store = _extract(FakeSource(), images, tmp_path)
    _reversed_rows(store.path / "shards" / "000001" / "final__cls.npy")
    legacy = store.path / "shards" / "000002"
    (legacy / "manifest.json").unlink()  # as written before manifests: values still checked
    values = np.load(legacy / "final__cls.npy")
    values[1, 2] = np.nan
    np.save(legacy / "final__cls.npy", values)
    problems = verify_store(store)
    assert len(problems) == 2
    assert "shard 000001" in problems[0] and "hash" in problems[0]
    assert "shard 000002" in problems[1] and "NaN" in problems[1]


def test_one_corrupt_meta_json_does_not_stop_other_stores(tmp_path, caplog):
    images = _images(tmp_path)
    good = _extract(FakeSource(), images, tmp_path)
    for name, text in (("0-broken", "{not json"), ("0-list", "[1, 2]"), ("0-binary", "\udcff")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_bytes(text.encode("utf-8", "surrogateescape"))
        (tmp_path / name / "complete.json").write_text("{}")
    source = FakeSource()
    with caplog.at_level(logging.WARNING):
        again = _extract(source, images, tmp_path)
    assert again.path == good.path and not source.calls
    for name in ("0-broken", "0-list", "0-binary"):  # sorted before the good store
        assert str(tmp_path / name / "meta.json") in caplog.text


def test_a_corrupt_meta_json_of_the_store_itself_is_rebuilt(tmp_path, caplog):
    images = _images(tmp_path)
    good = _extract(FakeSource(), images, tmp_path)
    before = _store_bytes(good.path)
    (good.path / "meta.json").write_text('{"taps": 3')
    with pytest.raises(StoreError, match="meta.json: unreadable"):
        ActivationStore(good.path)
    with caplog.at_level(logging.WARNING):
        rebuilt = _extract(FakeSource(), images, tmp_path)
    assert rebuilt.path == good.path and _store_bytes(rebuilt.path) == before


def test_full_disk_while_writing_a_shard_is_a_clear_error_and_loses_nothing(tmp_path, monkeypatch):
    images = _images(tmp_path)
    real_save = shards_module._save_array
    written = []

    def save(file: Path, array: np.ndarray) -> dict:
        if len(written) == 7:
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        written.append(file)
        return real_save(file, array)

    monkeypatch.setattr(shards_module, "_save_array", save)
    with pytest.raises(StoreError, match="no space left"):
        _extract(FakeSource(), images, tmp_path)
    store_dir = next(tmp_path.glob("*/meta.json")).parent
    assert sorted(p.name for p in (store_dir / "shards").iterdir()) == ["000000", "000001", "000002"]
    monkeypatch.setattr(shards_module, "_save_array", real_save)
    source = FakeSource()
    store = _extract(source, images, tmp_path)
    assert len(source.calls) == 2
    assert _store_bytes(store.path) == _store_bytes(_extract(FakeSource(), images, tmp_path / "ref").path)


def test_full_disk_while_finishing_keeps_the_previous_meta(tmp_path, monkeypatch):
    from frozenlens import atomic

    images = _images(tmp_path)
    store = _extract(FakeSource(), images, tmp_path)
    meta_before = (store.path / "meta.json").read_bytes()
    (store.path / "complete.json").unlink()

    def full(path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "_fsync_file", full)
    with pytest.raises(StoreError, match=r"meta\.json: no space left"):
        _extract(FakeSource(), images, tmp_path)
    assert (store.path / "meta.json").read_bytes() == meta_before
    assert not [p for p in store.path.iterdir() if ".tmp-" in p.name]


# -- the images fingerprint --------------------------------------------------------------------


def test_an_image_edited_in_place_gives_a_new_store(tiny_task, tiny_backbone, tmp_path):
    from PIL import Image

    from frozenlens.data import load_task

    task_images = [str(i.path) for i in load_task(tiny_task).all_images()][:6]
    folder = tmp_path / "imgs"
    folder.mkdir()
    images = []
    for i, path in enumerate(task_images):
        images.append(str(folder / f"{i}.png"))
        Path(images[-1]).write_bytes(Path(path).read_bytes())
    first = extract(tiny_backbone, images, TAPS[:1], root=tmp_path / "stores", progress=False)
    edited = np.asarray(Image.open(images[2])).copy()
    edited[:4] = 255 - edited[:4]
    Image.fromarray(edited).save(images[2])  # same path, new bytes
    second = extract(tiny_backbone, images, TAPS[:1], root=tmp_path / "stores", progress=False)
    assert second.path != first.path
    assert not np.array_equal(second.get("final:cls", [2]), first.get("final:cls", [2]))
    np.testing.assert_array_equal(second.get("final:cls", [0, 1]), first.get("final:cls", [0, 1]))


def test_fingerprint_rehashes_only_changed_files(tmp_path, monkeypatch):
    images = _images(tmp_path, 10)
    cache = tmp_path / "hashes.json"
    monkeypatch.setattr(fingerprint_module, "_SETTLE_NS", 0)
    reads: list[str] = []
    real_hash = fingerprint_module._hash_file

    def counting(path: Path) -> str:
        reads.append(str(path))
        return real_hash(path)

    monkeypatch.setattr(fingerprint_module, "_hash_file", counting)
    first = images_fingerprint(images, cache_file=cache)
    assert len(reads) == 10
    reads.clear()
    assert images_fingerprint(images, cache_file=cache) == first and reads == []
    Path(images[4]).write_bytes(b"edited in place")
    changed = images_fingerprint(images, cache_file=cache)
    assert changed != first and reads == [images[4]]


def test_fingerprint_matches_the_uncached_definition_and_survives_a_bad_cache(tmp_path):
    images = _images(tmp_path, 4)
    digest = hashlib.sha256()
    for path in images:
        digest.update(path.encode() + b"\0")
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    cache = tmp_path / "hashes.json"
    cache.write_text("{broken")
    assert images_fingerprint(images, cache_file=cache) == digest.hexdigest()


def test_fingerprint_refuses_special_files_without_hanging(tmp_path):
    images = _images(tmp_path, 2)
    fifo = tmp_path / "images" / "fifo.png"
    os.mkfifo(fifo)
    with pytest.raises(FrozenlensError, match="fifo.png: not a regular file"):
        images_fingerprint(images + [str(fifo)], cache_file=tmp_path / "c.json")
    loop = tmp_path / "images" / "loop.png"
    loop.symlink_to(loop)
    with pytest.raises(FrozenlensError, match="loop.png: cannot read"):
        images_fingerprint([str(loop)], cache_file=tmp_path / "c.json")


def test_cli_extract_verify_repairs_a_damaged_shard(tiny_task, tmp_path, monkeypatch, capsys):
    from frozenlens.cli import main

    monkeypatch.setenv("FROZENLENS_CACHE", str(tmp_path / "cache"))
    argv = ["extract", str(tiny_task), "--tap", "final:cls", "--backbone", "random:vit_tiny_patch16_224",
            "--img-size", "32"]
    assert main(argv) == 0
    store_dir = next((tmp_path / "cache" / "stores").glob("*/meta.json")).parent
    before = _store_bytes(store_dir)
    _corrupt_bytes(next((store_dir / "shards" / "000000").glob("final__tokens.npy")))
    assert main(argv + ["--verify"]) == 0
    assert list((store_dir / "quarantine").iterdir())
    assert _store_bytes(store_dir) == before
