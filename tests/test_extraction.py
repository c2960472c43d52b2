"""Extraction with decoding in DataLoader workers: same bytes, errors that name the file, locks kept."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from frozenlens.backbones import Tap, block_tap
from frozenlens.data import load_image, load_task
from frozenlens.errors import ConfigError, ImageError, StoreError
from frozenlens.store import extract
from frozenlens.store import store as store_module
from frozenlens.store.loader import ImageFiles
from frozenlens.store.locks import file_lock, shard_lock_file
from frozenlens.store.shards import shard_dir

TAPS = [Tap("final", "cls"), block_tap(3, "tokens"), block_tap(7, "pool2"), Tap("gather.5", "cls")]


def _images(task_dir: Path) -> list[str]:
    return [str(i.path) for i in load_task(task_dir).all_images()]


def _shard_bytes(store_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store_dir)): p.read_bytes()
            for p in sorted((store_dir / "shards").rglob("*")) if p.is_file()}


def _copy_images(images: list[str], folder: Path) -> list[str]:
    folder.mkdir(parents=True)
    copies = []
    for i, image in enumerate(images):
        copies.append(str(folder / f"{i:03d}.png"))
        shutil.copyfile(image, copies[-1])
    return copies


def _locks_free(store_dir: Path, shards: int) -> bool:
    for shard in range(shards):
        with file_lock(shard_lock_file(store_dir, shard), blocking=False) as held:
            if not held:
                return False
    return True


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_workers_store_the_same_bytes_as_the_main_thread(tiny_task, tiny_backbone, tmp_path, dtype):
    images = _images(tiny_task)
    kwargs = dict(dtype=dtype, shard_size=7, batch_size=3, progress=False)  # batches end inside shards
    main = extract(tiny_backbone, images, TAPS, root=tmp_path / "main", num_workers=0, **kwargs)
    workers = extract(tiny_backbone, images, TAPS, root=tmp_path / "workers", num_workers=2, **kwargs)
    assert main.path.name == workers.path.name
    assert _shard_bytes(main.path) == _shard_bytes(workers.path)

    # ... and the same values as decoding on the main thread batch by batch, as before workers
    transform = tiny_backbone.transform()
    torch_dtype = getattr(torch, dtype)
    for shard in (0, main.meta["num_shards"] - 1):
        paths = main.image_paths[shard * 7:(shard + 1) * 7]
        expected: dict[str, list[np.ndarray]] = {t.key: [] for t in TAPS}
        for start in range(0, len(paths), 3):
            batch = torch.stack([transform(load_image(Path(p))) for p in paths[start:start + 3]])
            with torch.inference_mode():
                values = tiny_backbone.forward_taps(batch, TAPS)
            for key, value in values.items():
                expected[key].append(value.to(torch_dtype).cpu().numpy())
        rows = np.arange(shard * 7, shard * 7 + len(paths))
        for key, chunks in expected.items():
            assert np.concatenate(chunks).tobytes() == workers.get(key, rows).tobytes()


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("content, message", [
    (None, "cannot decode image"),  # the real file cut in half
    (b"%PDF-1.4 not an image", "PDF, which is refused"),
])
def test_a_bad_image_is_an_error_naming_the_file(tiny_task, tiny_backbone, tmp_path, workers,
                                                          content, message):
    images = _copy_images(_images(tiny_task)[:30], tmp_path / "images")
    bad = Path(images[17])
    bad.write_bytes(content or bad.read_bytes()[: bad.stat().st_size // 2])
    root = tmp_path / "stores"
    with pytest.raises(ImageError, match=message) as caught:
        extract(tiny_backbone, images, TAPS[:2], root=root, shard_size=5, batch_size=2, progress=False,
                num_workers=workers)
    assert images[17] in str(caught.value)
    store_dir = next(root.glob("*/meta.json")).parent
    assert _locks_free(store_dir, 6)  # no lock outlives the error, and no worker holds one
    published = sorted(p.name for p in (store_dir / "shards").iterdir())
    assert published == ["000000", "000001", "000002"]  # shard 3 holds the bad image


def test_a_fixed_image_resumes_the_same_store(tiny_task, tiny_backbone, tmp_path, monkeypatch):
    """An image that fails to decode once (e.g. still being copied) and then reads: the rerun
    keeps the shards published before the error and computes the rest."""
    images = _images(tiny_task)[:30]
    real = ImageFiles.__getitem__
    failing = {"on": True}

    def flaky(self, index):
        if failing["on"] and index == 22:
            return index, ImageError(f"{self.paths[index]}: cannot decode image (test)")
        return real(self, index)

    monkeypatch.setattr(ImageFiles, "__getitem__", flaky)
    root = tmp_path / "stores"
    with pytest.raises(ImageError, match="cannot decode image"):
        extract(tiny_backbone, images, TAPS[:2], root=root, shard_size=5, batch_size=2, progress=False,
                num_workers=2)
    store_dir = next(root.glob("*/meta.json")).parent
    done = {p.name: p.stat().st_mtime_ns for p in (store_dir / "shards").iterdir() if p.name.isdigit()}
    assert {"000000", "000001", "000002", "000003"} <= set(done) and "000004" not in done
    failing["on"] = False
    resumed = extract(tiny_backbone, images, TAPS[:2], root=root, shard_size=5, batch_size=2,
                      progress=False, num_workers=2)
    assert resumed.path == store_dir
    assert {n: (store_dir / "shards" / n).stat().st_mtime_ns for n in done} == done
    reference = extract(tiny_backbone, images, TAPS[:2], root=tmp_path / "ref", shard_size=5, batch_size=2,
                        progress=False, num_workers=0)
    assert _shard_bytes(resumed.path) == _shard_bytes(reference.path)


@pytest.mark.parametrize("publish", [False, True])
def test_a_shard_held_by_another_process_is_waited_for(tiny_task, tiny_backbone, tmp_path, caplog, publish):
    """While another holder has shard 1's lock the others are computed; then shard 1 is computed
    here, or (``publish``) taken as the other holder published it."""
    images = _images(tiny_task)[:40]
    kwargs = dict(shard_size=8, batch_size=3, progress=False)
    reference = extract(tiny_backbone, images, TAPS, root=tmp_path / "ref", num_workers=0, **kwargs)
    root = tmp_path / "stores"
    store_dir = root / reference.path.name
    held, release = threading.Event(), threading.Event()

    def other_process():
        with file_lock(shard_lock_file(store_dir, 1)) as ok:
            assert ok
            held.set()
            release.wait(60)
            if publish:
                shutil.copytree(shard_dir(reference.path, 1), shard_dir(store_dir, 1))

    holder = threading.Thread(target=other_process)
    holder.start()
    assert held.wait(10)
    watcher = threading.Thread(target=lambda: (_wait_for(lambda: shard_dir(store_dir, 4).is_dir(), timeout=5),
                                               release.set()))
    watcher.start()
    try:
        with caplog.at_level(logging.INFO, logger="frozenlens"):
            store = extract(tiny_backbone, images, TAPS, root=root, num_workers=2, **kwargs)
    finally:
        release.set()
        holder.join()
        watcher.join()
    assert "waiting for another process writing shard 000001" in caplog.text
    assert _shard_bytes(store.path) == _shard_bytes(reference.path)


def _wait_for(condition, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.02)


def test_a_failed_shard_write_releases_every_lock(tiny_task, tiny_backbone, tmp_path, monkeypatch):
    images = _images(tiny_task)[:30]
    real = store_module._write_shard

    def full_disk(path, shard, arrays):
        if shard == 2:
            raise StoreError(f"{path}: no space left on device (test)")
        real(path, shard, arrays)

    monkeypatch.setattr(store_module, "_write_shard", full_disk)
    root = tmp_path / "stores"
    with pytest.raises(StoreError, match="no space left"):
        extract(tiny_backbone, images, TAPS[:2], root=root, shard_size=5, batch_size=2, progress=False,
                num_workers=1)
    store_dir = next(root.glob("*/meta.json")).parent
    assert _locks_free(store_dir, 6)
    monkeypatch.setattr(store_module, "_write_shard", real)
    store = extract(tiny_backbone, images, TAPS[:2], root=root, shard_size=5, batch_size=2, progress=False)
    assert store.path == store_dir and store.num_images == 30


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_num_workers_is_checked(tiny_task, tiny_backbone, tmp_path, bad):
    with pytest.raises(ConfigError, match="num_workers"):
        extract(tiny_backbone, _images(tiny_task)[:4], TAPS[:1], root=tmp_path, num_workers=bad)


def test_progress_counts_images_and_messages_are_logged(tiny_task, tiny_backbone, tmp_path, capsys, caplog):
    images = _images(tiny_task)[:20]
    store = extract(tiny_backbone, images, TAPS[:1], root=tmp_path, shard_size=5, batch_size=4,
                    progress=True, num_workers=1)
    bar = capsys.readouterr().err
    assert "extracting" in bar and "20/20" in bar and "img/s" in bar
    shutil.rmtree(shard_dir(store.path, 2))
    (store.path / "complete.json").unlink()
    with caplog.at_level(logging.INFO, logger="frozenlens"):
        extract(tiny_backbone, images, TAPS[:1], root=tmp_path, shard_size=5, batch_size=4, progress=True)
        extract(tiny_backbone, images, TAPS[:1], root=tmp_path, shard_size=5, batch_size=4, progress=True)
    assert "resuming extraction" in caplog.text and "3/4 shards already done" in caplog.text
    assert "reusing activation store" in caplog.text
    assert not capsys.readouterr().out  # messages go to the log, not stdout


def test_cli_extract_and_fit_take_a_worker_count(tiny_task, tmp_path, monkeypatch, capsys):
    from frozenlens.cli import main

    monkeypatch.setenv("FROZENLENS_CACHE", str(tmp_path / "cache"))
    argv = ["extract", str(tiny_task), "--tap", "final:cls", "--backbone", "random:vit_tiny_patch16_224",
            "--img-size", "32"]
    assert main(argv + ["--workers", "1"]) == 0
    # the training images only (3 classes x 18): fit scores the 27 test images in a streaming pass
    assert "54 images" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main(argv + ["--workers", "-1"])
    assert exited.value.code == 2 and "--workers" in capsys.readouterr().err
    fit = ["fit", str(tiny_task), "--backbone", "random:vit_tiny_patch16_224", "--img-size", "32",
           "--epochs", "1", "--workers", "0", "--out", str(tmp_path / "run")]
    assert main(fit) == 0
