"""One backbone pass per training image per task, and one streaming pass over the test split per fit."""

from __future__ import annotations

import json
from collections import namedtuple

import numpy as np
import pytest

from frozenlens import api
from frozenlens.api import fit, training_images
from frozenlens.backbones import Tap
from frozenlens.backbones.base import FrozenBackbone
from frozenlens.data import load_task
from frozenlens.errors import FrozenlensError, StoreError
from frozenlens.protocol import split_data
from frozenlens.store import extract, token_maps
from frozenlens.store import store as store_module
from frozenlens.train.trainer import evaluate


@pytest.fixture
def counted(monkeypatch):
    """Images each ``FrozenBackbone.forward_taps`` call ran the backbone over, in call order."""
    calls: list[int] = []
    real = FrozenBackbone.forward_taps

    def forward_taps(self, images, taps):
        calls.append(int(images.shape[0]))
        return real(self, images, taps)

    monkeypatch.setattr(FrozenBackbone, "forward_taps", forward_taps)
    return calls


def test_a_later_fit_of_other_methods_never_runs_the_backbone_over_training_images(
        tiny_task, tiny_backbone, tmp_path, counted, monkeypatch):
    monkeypatch.setenv("FROZENLENS_CACHE", str(tmp_path / "cache"))
    task = load_task(tiny_task)
    first = fit(task, ["linear:epochs=2"], backbone=tiny_backbone, progress=False)
    assert sum(counted) == len(training_images(task)) + len(task.split("test"))  # one pass over each image
    assert set(first.store.taps) == {t.key for t in token_maps(tiny_backbone.depth)}
    counted.clear()
    later = fit(task, ["head2toe:epochs=2", "mist:gather_depth=2,epochs=1", "inca:layers=1+2,epochs=1",
                       "vqt:epochs=1", "last:epochs=1"], backbone=tiny_backbone, seeds=(0, 1), progress=False)
    assert later.store.path == first.store.path
    assert sum(counted) == len(task.split("test")), "only the test split (once, for every method and seed)"
    assert all(len(r["test_accuracies"]) == 2 for r in later.records)


def test_streaming_test_scores_equal_scores_from_a_store_of_the_test_images(tiny_task, tiny_backbone, tmp_path):
    task = load_task(tiny_task)
    report = fit(task, ["linear:epochs=3", "head2toe:epochs=3"], backbone=tiny_backbone, seeds=(0, 1),
                 progress=False)
    assert not report.store.has_images(str(i.path) for i in task.split("test"))
    for record, result in zip(report.records, report.results.values()):
        keys = result.model.tap_keys()
        store = extract(tiny_backbone, [str(i.path) for i in task.split("test")], [Tap.parse(k) for k in keys],
                        root=tmp_path / "test-store", progress=False)
        test = split_data(store, task, "test", keys)
        assert record["test_accuracies"] == pytest.approx([evaluate(model, test) for model in result.models], abs=1e-6)


def test_reductions_read_from_stored_tokens_equal_stored_reductions(tiny_task, tiny_backbone, tmp_path):
    images = [str(i.path) for i in load_task(tiny_task).all_images()][:20]
    reduced = [Tap("block.1", r) for r in ("cls", "patch_mean", "pool2", "prefix")] + [Tap("final", "cls")]
    both = extract(tiny_backbone, images, [*reduced, Tap("block.1"), Tap("final")], root=tmp_path / "a",
                   progress=False, dtype="float32")
    tokens_only = extract(tiny_backbone, images, [Tap("block.1"), Tap("final")], root=tmp_path / "b",
                          progress=False, dtype="float32")
    rows = np.array([3, 0, 17, 5])
    for tap in reduced:
        assert tokens_only.holds(tap.key) and tokens_only.shape(tap.key) == both.shape(tap.key)
        np.testing.assert_allclose(tokens_only.get(tap.key, rows), both.get(tap.key, rows), rtol=1e-6, atol=1e-6)
    assert not tokens_only.holds("block.2:cls")
    with pytest.raises(StoreError, match="neither stored nor a reduction"):
        tokens_only.get("block.2:cls", rows)


def test_a_fit_stopped_before_its_test_pass_is_scored_on_rerun_without_training(
        tiny_task, tiny_backbone, tmp_path, monkeypatch):
    task, out = load_task(tiny_task), tmp_path / "run"
    methods = ["linear:epochs=3", "head2toe:epochs=3"]

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "score_test", stop)
    with pytest.raises(KeyboardInterrupt):
        fit(task, methods, backbone=tiny_backbone, seeds=(0, 1), out=out, progress=False)
    monkeypatch.undo()
    saved = json.loads((out / "results.json").read_text())["results"]
    assert all(r["test_pending"] and r["test_accuracies"] == [] for r in saved)
    trained = []
    real_run = api._run_method
    monkeypatch.setattr(api, "_run_method", lambda spec, *a: trained.append(spec.text) or real_run(spec, *a))
    resumed = fit(task, methods, backbone=tiny_backbone, seeds=(0, 1), out=out, progress=False)
    assert trained == []
    fresh = fit(task, methods, backbone=tiny_backbone, seeds=(0, 1), progress=False)
    assert [r["test_accuracies"] for r in resumed.records] == [r["test_accuracies"] for r in fresh.records]
    for record in json.loads((out / "results.json").read_text())["results"]:
        assert "test_pending" not in record and len(record["test_accuracies"]) == 2
        assert (out / record["label"] / "seed-1" / "adapter.safetensors").is_file()


def test_the_disk_room_is_checked_before_the_pass_and_needed_stores_less(tiny_task, tiny_backbone, tmp_path,
                                                                         monkeypatch, counted):
    monkeypatch.setenv("FROZENLENS_CACHE", str(tmp_path / "cache"))
    task = load_task(tiny_task)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(store_module.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 10_000))
    with pytest.raises(StoreError, match="store-taps needed"):
        fit(task, ["linear:epochs=2"], backbone=tiny_backbone, progress=False)
    assert counted == []  # refused before the backbone ran
    report = fit(task, ["linear:epochs=2"], backbone=tiny_backbone, progress=False, store_taps="needed")
    assert report.store.taps == ["final:cls"]
    assert len(report.records[0]["test_accuracies"]) == 1


def test_fit_refuses_a_text_encoder_on_an_image_task_before_any_work(tiny_task):
    from frozenlens.backbones import load_backbone

    pytest.importorskip("transformers")
    with pytest.raises(FrozenlensError, match="is a text encoder"):
        fit(tiny_task, ["linear"], backbone=load_backbone("all-minilm-l6-v2"), progress=False)


def test_seeds_that_choose_different_taps_are_each_scored_on_their_own(tiny_task, tiny_backbone, tmp_path,
                                                                        monkeypatch):
    """InCA keeps each seed's best layer: stacked seeds may end up reading different taps."""
    from frozenlens.methods import get_method
    from frozenlens.protocol import run_protocol
    from frozenlens.train.trainer import TrainConfig

    task = load_task(tiny_task)
    store = extract(tiny_backbone, [str(i.path) for i in task.all_images()], token_maps(tiny_backbone.depth),
                    root=tmp_path, progress=False)
    inca = get_method("inca")
    real = inca.fit_many.__func__

    def fit_many(cls, models, *args, **kwargs):
        losses = real(cls, models, *args, **kwargs)
        for index, model in enumerate(models):  # as if each seed had kept another block
            model.keep([0])
            model.config = model.config.__class__(**{**model.config.__dict__, "layers": (index,)})
        return losses

    monkeypatch.setattr(inca, "fit_many", classmethod(fit_many))
    result = run_protocol("inca", {"layers": "0+1+2"}, store, task, tiny_backbone,
                          train_config=TrainConfig(epochs=1, warmup_epochs=0), seeds=(0, 1, 2))
    assert [m.tap_keys() for m in result.models] == [["block.0:tokens"], ["block.1:tokens"], ["block.2:tokens"]]
    assert len(result.test_accuracies) == 3 and not result.test_pending


def test_results_of_a_folder_list_every_method_fitted_into_it(tiny_task, tiny_backbone, tmp_path, monkeypatch):
    """A later fit of other methods into the same --out keeps the earlier methods' rows in
    results.json / results.md (same task and backbone), and a rerun replaces a method's own row."""
    monkeypatch.setenv("FROZENLENS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    fit(tiny_task, ["linear:epochs=2"], backbone=tiny_backbone, out=out, progress=False)
    fit(tiny_task, ["head2toe:epochs=2"], backbone=tiny_backbone, out=out, progress=False)
    rows = json.loads((out / "results.json").read_text())["results"]
    assert sorted(r["spec"] for r in rows) == ["head2toe:epochs=2", "linear:epochs=2"]
    assert "| linear:epochs=2 |" in (out / "results.md").read_text()
    fit(tiny_task, ["linear:epochs=2"], backbone=tiny_backbone, out=out, progress=False)  # skipped: same run
    rows = json.loads((out / "results.json").read_text())["results"]
    assert sorted(r["spec"] for r in rows) == ["head2toe:epochs=2", "linear:epochs=2"]
