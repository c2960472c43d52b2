"""The activation store: extract once, reuse, resume after a kill, never read partial shards."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from frozenlens.backbones import Tap, block_tap
from frozenlens.data import load_task
from frozenlens.errors import StoreError
from frozenlens.store import ActivationStore, extract

TAPS = [Tap("final", "cls"), block_tap(3, "tokens"), block_tap(7, "pool2")]


def _images(task_dir: Path) -> list[str]:
    return [str(i.path) for i in load_task(task_dir).all_images()]


def _shard_bytes(store: ActivationStore) -> dict[str, bytes]:
    return {str(p.relative_to(store.path)): p.read_bytes()
            for p in sorted((store.path / "shards").rglob("*.npy"))}


def test_store_matches_direct_forward(tiny_task, tiny_backbone, tmp_path):
    images = _images(tiny_task)
    store = extract(tiny_backbone, images, TAPS, root=tmp_path, dtype="float32", shard_size=7,
                    progress=False)
    assert store.num_images == len(images) == 81
    from frozenlens.data import load_image

    transform = tiny_backbone.transform()
    rows = [0, 8, 40, 80]
    batch = torch.stack([transform(load_image(Path(images[i]))) for i in rows])
    with torch.no_grad():
        direct = tiny_backbone.forward_taps(batch, TAPS)
    for tap in TAPS:
        np.testing.assert_allclose(store.get(tap.key, rows), direct[tap.key].numpy(), atol=1e-5)
    assert store.get("block.3:tokens", [5]).shape == (1, 5, 192)
    assert store.bytes_per_image > 0


def test_second_extraction_reuses_the_store_and_subsets(tiny_task, tiny_backbone, tmp_path, caplog):
    images = _images(tiny_task)
    first = extract(tiny_backbone, images, TAPS, root=tmp_path, progress=False)
    with caplog.at_level(logging.INFO, logger="frozenlens"):
        again = extract(tiny_backbone, images, TAPS[:1], root=tmp_path, progress=True)
    assert again.path == first.path
    assert "reusing activation store" in caplog.text
    assert first.meta["dtype"] == "float16"


def test_store_key_changes_with_image_content(tiny_task, tiny_backbone, tmp_path):
    images = _images(tiny_task)[:6]
    first = extract(tiny_backbone, images, TAPS[:1], root=tmp_path, progress=False)
    copy = tmp_path / "copy.png"
    copy.write_bytes(Path(images[0]).read_bytes())
    other = extract(tiny_backbone, [str(copy)] + images[1:], TAPS[:1], root=tmp_path, progress=False)
    assert other.path != first.path


def test_incomplete_store_is_refused(tiny_task, tiny_backbone, tmp_path):
    store = extract(tiny_backbone, _images(tiny_task), TAPS[:1], root=tmp_path, shard_size=10,
                    progress=False)
    (store.path / "complete.json").unlink()
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(store.path)


_KILLABLE = textwrap.dedent("""
    import sys, time
    import frozenlens.store.store as store_module
    from frozenlens.backbones import load_backbone, Tap, block_tap
    from frozenlens.data import load_task

    original = store_module._write_shard
    def slow_write(*args, **kwargs):
        original(*args, **kwargs)
        time.sleep(0.4)
    store_module._write_shard = slow_write
    backbone = load_backbone("random:vit_tiny_patch16_224", img_size=32)
    images = [str(i.path) for i in load_task(sys.argv[1]).all_images()]
    taps = [Tap("final", "cls"), block_tap(3, "tokens"), block_tap(7, "pool2")]
    print("started", flush=True)
    store_module.extract(backbone, images, taps, root=sys.argv[2], shard_size=8, progress=False)
""")


def test_killed_and_resumed_extraction_is_byte_identical(tiny_task, tiny_backbone, tmp_path):
    images = _images(tiny_task)
    reference = extract(tiny_backbone, images, TAPS, root=tmp_path / "reference", shard_size=8,
                        progress=False)
    root = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, str(tiny_task), str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        done = list(root.glob("*/shards/00000[2-9]"))
        if done or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store_dir = next(root.glob("*/meta.json")).parent
    assert not (store_dir / "complete.json").exists()
    finished = sorted(p.name for p in (store_dir / "shards").iterdir() if p.name.isdigit())
    assert 0 < len(finished) < reference.meta["num_shards"]
    mtimes = {name: (store_dir / "shards" / name).stat().st_mtime_ns for name in finished}

    resumed = extract(tiny_backbone, images, TAPS, root=root, shard_size=8, progress=False)
    assert resumed.path == store_dir
    assert {n: (store_dir / "shards" / n).stat().st_mtime_ns for n in finished} == mtimes
    assert not list((store_dir / "shards").glob(".tmp-*"))
    assert _shard_bytes(resumed) == _shard_bytes(reference)


def test_streamed_taps_stay_on_disk_and_give_the_same_batches(tiny_task, tiny_backbone, tmp_path):
    from frozenlens.train.data import StoredRows, TapData

    task = load_task(tiny_task)
    images = _images(tiny_task)
    store = extract(tiny_backbone, images, TAPS, root=tmp_path, shard_size=7, progress=False)
    items = task.split("trainval")
    args = (store, [t.key for t in TAPS], [str(i.path) for i in items], [i.label for i in items], 3)
    held, streamed = TapData.from_store(*args), TapData.from_store(*args, stream=True)
    assert all(isinstance(v, StoredRows) for v in streamed.features.values())
    assert streamed.features["block.3:tokens"].shape == held.features["block.3:tokens"].shape
    rest, out = streamed.holdout(0.25, seed=1)
    assert all(isinstance(v, StoredRows) for v in rest.features.values())   # a subset reads nothing
    pairs = zip(held.holdout(0.25, seed=1)[0].batches(5, shuffle=True, generator=torch.Generator().manual_seed(2)),
                rest.batches(5, shuffle=True, generator=torch.Generator().manual_seed(2)))
    for (expected, labels), (got, got_labels) in pairs:
        assert torch.equal(labels, got_labels)
        assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_low_memory_fit_trains_the_same_model(tiny_task, tiny_backbone, tmp_path):
    from frozenlens.api import fit

    runs = [fit(tiny_task, ["mist:epochs=2"], backbone=tiny_backbone, low_memory=low, progress=False)
            for low in (False, True)]
    (in_memory, streamed) = (next(iter(r.results.values())) for r in runs)
    assert in_memory.test_accuracies == streamed.test_accuracies
    assert in_memory.model.config.gather_depth == streamed.model.config.gather_depth
    for key, value in in_memory.model.state_dict().items():
        torch.testing.assert_close(value, streamed.model.state_dict()[key], rtol=0, atol=0, equal_nan=True)
