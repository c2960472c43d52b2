"""Special files in image folders and undecodable split files: clear errors, never a hang."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from frozenlens.data import load_task
from frozenlens.errors import DataError
from tests.conftest import make_vtab_task


def _vtab(tmp_path: Path) -> Path:
    (tmp_path / "vtab").mkdir()
    return make_vtab_task(tmp_path / "vtab", {"train": 2, "val": 1, "test": 1})


def _image_folder(root: Path) -> Path:
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / name / f"{i}.png")
    return root


def test_fifo_and_symlink_loop_in_an_image_folder_are_skipped(tmp_path, caplog):
    root = _image_folder(tmp_path / "task")
    os.mkfifo(root / "cat" / "x.png")  # opening it for reading would block forever
    (root / "dog" / "loop.png").symlink_to(root / "dog" / "loop.png")
    (root / "dog" / "broken.png").symlink_to(root / "dog" / "nowhere.png")
    with caplog.at_level(logging.WARNING):
        task = load_task(root)
    names = sorted(i.path.name for i in task.split("trainval"))
    assert names == ["0.png", "0.png", "1.png", "1.png", "2.png", "2.png"]
    for name in ("x.png: skipped", "loop.png: skipped", "broken.png: skipped"):
        assert name in caplog.text


def test_fingerprinting_a_task_with_special_files_does_not_hang(tmp_path):
    from frozenlens.store import images_fingerprint

    root = _image_folder(tmp_path / "task")
    os.mkfifo(root / "cat" / "x.png")
    task = load_task(root)
    assert images_fingerprint([i.path for i in task.all_images()], cache_file=tmp_path / "c.json")


def test_split_file_listing_a_fifo_names_it(tmp_path):
    root = _vtab(tmp_path)
    target = root / "images" / "red" / "train_0.png"
    target.unlink()
    os.mkfifo(target)
    with pytest.raises(DataError, match=r"train800\.txt:1: images/red/train_0\.png is not a regular file"):
        load_task(root)


@pytest.mark.parametrize("name", ["train800.txt", "val200.txt", "classes.txt"])
def test_non_utf8_split_file_names_the_file(tmp_path, name):
    root = _vtab(tmp_path)
    (root / name).write_bytes((root / name).read_bytes() + "caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"{name}: not UTF-8 text \(byte 0xe9"):
        load_task(root)


@pytest.mark.parametrize("meta", ["metadata.csv", "metadata.jsonl"])
def test_non_utf8_metadata_file_names_the_file(tmp_path, meta):
    root = _image_folder(tmp_path / "task")
    shutil.rmtree(root / "dog")
    csv_line, json_line = "file_name,label\n0.png,caf\xe9\n", '{"file_name": "0.png", "label": "caf\xe9"}\n'
    line = csv_line if meta.endswith("csv") else json_line
    (root / "cat" / meta).write_bytes(line.encode("latin-1"))
    with pytest.raises(DataError, match=rf"{meta}: not UTF-8 text"):
        load_task(root / "cat")
