"""The Python API: method specs with training overrides, grid search for some methods only."""

from __future__ import annotations

import json

import pytest

from frozenlens.api import MethodSpec, fit, parse_specs
from frozenlens.api import _check_remote as api_check_remote
from frozenlens.errors import FrozenlensError
from frozenlens.methods.vqt import VQTConfig
from frozenlens.train.trainer import TrainConfig
from tests.conftest import TINY_BACKBONE, adapter_folder


def test_method_spec_splits_method_and_training_settings():
    spec = MethodSpec.parse("head2toe:keep_fraction=0.2,epochs=7,lr=0.01,seeds=3+4")
    assert spec.method_settings == {"keep_fraction": "0.2"}
    assert spec.train_overrides() == {"epochs": 7, "lr": 0.01}
    assert spec.seeds([0]) == [3, 4] and MethodSpec.parse("linear").seeds([0, 1]) == [0, 1]
    assert spec.text == "head2toe:keep_fraction=0.2,epochs=7,lr=0.01,seeds=3+4"
    assert spec.label.startswith("head2toe-keep_fraction=0.2,epochs=7,lr=0.01,seeds=3+4-")
    with pytest.raises(FrozenlensError, match="no setting 'nope'"):
        MethodSpec.parse("linear:nope=1")
    with pytest.raises(FrozenlensError, match="epochs='many'"):
        MethodSpec.parse("linear:epochs=many")
    with pytest.raises(FrozenlensError, match="seeds"):
        MethodSpec.parse("linear:seeds=a")


def test_fit_tunes_only_the_named_methods_and_honours_overrides(tiny_task, tmp_path):
    report = fit(tiny_task, ["linear", "linear:epochs=5,seeds=1+2"], backbone=TINY_BACKBONE, img_size=32,
                 grid=["linear"], seeds=(0,), epochs=10, progress=False)
    tuned, fixed = report.records
    assert len(tuned["grid"]) == 12 and tuned["train_config"]["epochs"] == 10
    assert len(tuned["test_accuracies"]) == 1
    assert fixed["grid"] == [] and fixed["best_val_accuracy"] is None
    assert fixed["train_config"]["epochs"] == 5 and len(fixed["test_accuracies"]) == 2
    assert tuned["store_bytes_per_image"] == 192 * 2  # the final CLS token of ViT-Tiny, float16


def test_labels_are_folder_safe_unique_and_keep_the_spec():
    pretuned = MethodSpec.parse("toast:pretuned=runs/x y/../z")
    assert "/" not in pretuned.label and " " not in pretuned.label and pretuned.label.startswith("toast-pretuned=")
    assert pretuned.config().pretuned == "runs/x y/../z"
    other = MethodSpec.parse("toast:pretuned=runs/x_y/.._z")
    assert other.label != pretuned.label  # same slug, different hash
    assert MethodSpec.parse("linear").label == "linear"


def test_tuple_settings_join_with_plus():
    spec = MethodSpec.parse("head2toe:pool_sizes=1+2,keep_fraction=0.2")
    assert spec.config().pool_sizes == (1, 2)
    assert MethodSpec.parse("inca:layers=6+8+11").config().layers in ("6+8+11", (6, 8, 11))


def test_duplicate_specs_are_rejected():
    with pytest.raises(FrozenlensError, match="same run"):
        parse_specs(["linear", "linear"])
    with pytest.raises(FrozenlensError, match="same run"):
        parse_specs(["linear:lr=0.01", "linear:lr=1e-2"])
    assert len(parse_specs(["linear", "linear:lr=0.01"])) == 2


def test_typed_configs_are_accepted():
    spec = MethodSpec.of(VQTConfig(num_queries=2))
    assert spec.name == "vqt" and spec.text == "vqt:num_queries=2" and spec.config().num_queries == 2
    with pytest.raises(FrozenlensError, match="not the config of any method"):
        MethodSpec.of(TrainConfig())


def test_bad_training_values_fail_before_any_work():
    for text in ("linear:epochs=0", "linear:batch_size=0", "linear:seeds=+"):
        with pytest.raises(FrozenlensError):
            MethodSpec.parse(text)


def test_fit_saves_each_method_and_a_rerun_skips_finished_ones(tiny_task, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = fit(tiny_task, ["linear:epochs=2", "linear:epochs=3"], backbone=TINY_BACKBONE, img_size=32,
                seeds=(4, 5), out=out, progress=False)
    meta = json.loads((out / first.records[0]["label"] / "adapter.json").read_text())
    assert meta["seed"] == 4 and meta["spec"] == "linear:epochs=2" and first.records[0]["adapter_seed"] == 4
    calls = []
    import frozenlens.api as api
    monkeypatch.setattr(api, "run_protocol", lambda *a, **k: calls.append(a) or pytest.fail("retrained"))
    again = fit(tiny_task, ["linear:epochs=2", "linear:epochs=3"], backbone=TINY_BACKBONE, img_size=32,
                seeds=(4, 5), out=out, progress=False)
    assert not calls and [r["test_accuracies"] for r in again.records] == [r["test_accuracies"] for r in first.records]


def test_remote_vqt_is_refused_before_fetching():
    with pytest.raises(FrozenlensError, match="need the backbone on this machine"):
        api_check_remote(parse_specs(["linear", "vqt"]))


def test_predict_reads_images_in_memory_like_files(tiny_task, tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from frozenlens.api import predict

    fit(tiny_task, ["linear:epochs=3"], backbone=TINY_BACKBONE, img_size=32, out=tmp_path / "r", progress=False)
    adapter = adapter_folder(tmp_path / "r", "linear:epochs=3")
    path = sorted((tiny_task / "images" / "green").glob("test_*.png"))[0]
    picture = Image.open(path).convert("RGB")
    array = np.array(picture)
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    from_file, *in_memory = predict([adapter], [path, picture, array, tensor], top_k=3)
    assert [p.image for p in in_memory] == ["<image 1>", "<image 2>", "<image 3>"]
    for p in in_memory:
        assert [c for c, _ in p.top] == [c for c, _ in from_file.top]
        assert dict(p.top) == pytest.approx(dict(from_file.top), abs=1e-6)
    with pytest.raises(FrozenlensError, match="cannot read"):
        predict([adapter], [object()])
