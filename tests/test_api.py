"""The Python API: method specs with training overrides, grid search for some methods only."""

from __future__ import annotations

import pytest

from frozenlens.api import MethodSpec, fit
from frozenlens.errors import FrozenlensError
from tests.conftest import TINY_BACKBONE


def test_method_spec_splits_method_and_training_settings():
    spec = MethodSpec.parse("head2toe:keep_fraction=0.2,epochs=7,lr=0.01,seeds=3+4")
    assert spec.method_settings == {"keep_fraction": "0.2"}
    assert spec.train_overrides() == {"epochs": 7, "lr": 0.01}
    assert spec.seeds([0]) == [3, 4] and MethodSpec.parse("linear").seeds([0, 1]) == [0, 1]
    assert spec.label == "head2toe-keep_fraction=0.2,epochs=7,lr=0.01,seeds=3+4"
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
