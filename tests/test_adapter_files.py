"""Adapter and results files: atomic writes, damaged or edited files, format versions."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from frozenlens import atomic
from frozenlens.adapter import FORMAT_VERSION, load_adapter, read_adapter_meta, save_adapter
from frozenlens.errors import AdapterError, FrozenlensError
from frozenlens.methods import build_method

BACKBONE = {"name": "fake", "weights_hash": "abc", "dim": 8, "depth": 3, "num_prefix_tokens": 1}


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    model = build_method("linear", None, BACKBONE, 3)
    return save_adapter(tmp_path / "lin", model, ["x", "y", "z"])


def _edit_json(folder: Path, **changes) -> None:
    meta = json.loads((folder / "adapter.json").read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    (folder / "adapter.json").write_text(json.dumps(meta))


def test_saved_adapter_records_its_format_and_weights_hash(adapter):
    meta = read_adapter_meta(adapter)
    assert meta["format_version"] == FORMAT_VERSION == 1
    assert len(meta["weights_sha256"]) == 64
    load_adapter(adapter, BACKBONE)
    assert not [p for p in adapter.iterdir() if ".tmp-" in p.name]


def _truncated(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-10])


def _empty(file: Path) -> None:
    file.write_bytes(b"")


def _garbage(file: Path) -> None:
    file.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage" * 5)


@pytest.mark.parametrize("damage", [_truncated, _empty, _garbage])
@pytest.mark.parametrize("recorded_hash", [True, False])
def test_damaged_weights_file_is_a_clear_error(adapter, damage, recorded_hash):
    if not recorded_hash:  # an adapter written before weights hashes were recorded
        _edit_json(adapter, weights_sha256=None)
    damage(adapter / "adapter.safetensors")
    with pytest.raises(AdapterError, match=r"adapter\.safetensors"):
        load_adapter(adapter, BACKBONE)


def test_nan_weights_are_refused(adapter):
    state = load_file(str(adapter / "adapter.safetensors"))
    state["head.weight"][0, 0] = float("nan")
    save_file(state, str(adapter / "adapter.safetensors"))
    _edit_json(adapter, weights_sha256=None)
    with pytest.raises(AdapterError, match="'head.weight' holds NaN"):
        load_adapter(adapter, BACKBONE)


def test_weights_replaced_after_the_save_are_refused(adapter):
    state = load_file(str(adapter / "adapter.safetensors"))
    state["head.bias"] += 1
    save_file(state, str(adapter / "adapter.safetensors"))
    with pytest.raises(AdapterError, match="does not match adapter.json"):
        load_adapter(adapter, BACKBONE)


def test_weights_of_another_shape_are_refused(adapter):
    state = load_file(str(adapter / "adapter.safetensors"))
    state["head.weight"] = torch.zeros(5, 2)
    save_file(state, str(adapter / "adapter.safetensors"))
    _edit_json(adapter, weights_sha256=None)
    with pytest.raises(AdapterError, match="does not fit method 'linear'"):
        load_adapter(adapter, BACKBONE)


@pytest.mark.parametrize("changes, message", [
    ({"classes": "x y z"}, "'classes' is a str"),
    ({"classes": []}, "non-empty list"),
    ({"classes": [1, 2, 3]}, "non-empty list of class names"),
    ({"num_classes": "3"}, "'num_classes'"),
    ({"method": None}, "missing field 'method'"),
    ({"method": 5}, "'method' is a int"),
    ({"config": [1]}, "'config' is a list"),
    ({"backbone": {"name": "fake"}}, "'weights_hash'"),
    ({"taps": "final:cls"}, "'taps'"),
    ({"format_version": "1"}, "not a positive integer"),
    ({"method": "nonexistent"}, "unknown method 'nonexistent'"),
    ({"config": {"no_such_setting": 1}}, "no setting 'no_such_setting'"),
])
def test_edited_adapter_json_is_a_clear_error(adapter, changes, message):
    _edit_json(adapter, **changes)
    with pytest.raises(AdapterError, match="adapter.json") as info:
        load_adapter(adapter, BACKBONE)
    assert message in str(info.value)


@pytest.mark.parametrize("text", ["{broken", "[1, 2]", "\udcff"])
def test_unreadable_adapter_json_is_a_clear_error(adapter, text):
    (adapter / "adapter.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(AdapterError, match="adapter.json"):
        read_adapter_meta(adapter)


def test_newer_format_is_refused_naming_the_writer(adapter):
    _edit_json(adapter, format_version=FORMAT_VERSION + 1, frozenlens_version="9.0.0")
    with pytest.raises(AdapterError, match=r"adapter format 2, written by frozenlens 9\.0\.0.*Upgrade"):
        load_adapter(adapter, BACKBONE)


def test_adapter_without_format_version_is_read_if_its_layout_is_known(adapter):
    _edit_json(adapter, format_version=None, weights_sha256=None, frozenlens_version="0.0.9")
    adapter_ = load_adapter(adapter, BACKBONE)
    meta = adapter_.meta
    assert meta["classes"] == ["x", "y", "z"]
    _edit_json(adapter, classes=None)
    with pytest.raises(AdapterError, match=r"no format_version \(written by frozenlens 0\.0\.9\)"):
        load_adapter(adapter, BACKBONE)


def test_full_disk_while_saving_keeps_the_previous_adapter(adapter, monkeypatch):
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}

    def full(path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "_fsync_file", full)
    model = build_method("linear", None, BACKBONE, 3)
    with torch.no_grad():
        model.head.bias += 1
    with pytest.raises(AdapterError, match=r"adapter\.safetensors: no space left"):
        save_adapter(adapter, model, ["x", "y", "z"])
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
    monkeypatch.undo()
    load_adapter(adapter, BACKBONE)


def test_atomic_write_keeps_the_old_file_on_any_error(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    atomic.write_json(target, {"a": 1})

    def failing(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(FrozenlensError, match="results.json: no space left"):
        atomic.atomic_write(target, failing)
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_results_files_keep_their_previous_version_on_a_full_disk(tmp_path, monkeypatch):
    from frozenlens.report import write_results

    json_path, md_path = write_results(tmp_path, [], {"task": "first"})
    before = (json_path.read_bytes(), md_path.read_bytes())

    def full(path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "_fsync_file", full)
    with pytest.raises(FrozenlensError, match=r"results\.json: no space left"):
        write_results(tmp_path, [], {"task": "second"})
    assert (json_path.read_bytes(), md_path.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]
