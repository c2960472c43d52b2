"""Text tasks through ``fit``, the activation store and ``predict``: the offline MiniLM on a small
subset of the real WordNet supersense task (built from the Debian package wordnet-base)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import frozenlens
from frozenlens.backbones import Tap
from frozenlens.backbones.text import MASK_KEY
from frozenlens.errors import DataError, FrozenlensError
from frozenlens.store import ActivationStore
from tests.conftest import skip_or_fail_in_ci

PER_CLASS = {"train800": 8, "val200": 2, "test": 6}


@pytest.fixture(scope="module")
def text_task(tmp_path_factory) -> Path:
    """A VTAB-style text task folder: the first rows of each class of the real WordNet task."""
    from examples.text_data import build_wordnet_task

    try:
        source = build_wordnet_task(n_test=1000)
    except DataError as err:
        skip_or_fail_in_ci(f"WordNet (Debian package wordnet-base) is not available here: {err}")
    folder = tmp_path_factory.mktemp("wordnet-small")
    (folder / "classes.txt").write_text((source / "classes.txt").read_text())
    for split, count in PER_CLASS.items():
        taken: dict[str, int] = {}
        with open(source / f"{split}.jsonl") as rows, open(folder / f"{split}.jsonl", "w") as out:
            for line in rows:
                record = json.loads(line)
                if taken.get(record["label"], 0) < count:
                    taken[record["label"]] = taken.get(record["label"], 0) + 1
                    out.write(json.dumps({"text": record["text"], "label": record["label"]}) + "\n")
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh frozenlens cache (no store yet): for tests that count backbone passes."""
    monkeypatch.setenv("FROZENLENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache for the module: later tests reuse the store of the task's training texts."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("text-cache")
        patch.setenv("FROZENLENS_CACHE", str(folder))
        yield folder


def count_passes(monkeypatch, backbone) -> list[int]:
    """Texts the backbone runs on, per call (patched on the instance)."""
    seen: list[int] = []
    original = backbone.forward_taps

    def counted(batch, taps):
        seen.append(len(batch["input_ids"]) if isinstance(batch, dict) else len(batch))
        return original(batch, taps)

    monkeypatch.setattr(backbone, "forward_taps", counted)
    return seen


def test_fit_reads_a_text_folder_and_trains_linear_and_head2toe(text_task, minilm, cache, tmp_path, monkeypatch):
    passes = count_passes(monkeypatch, minilm)
    report = frozenlens.fit(text_task, ["linear:patch_mean=true", "head2toe"], backbone=minilm, epochs=30,
                            out=tmp_path / "out", progress=False)
    assert isinstance(report.task, frozenlens.data.TextTask)
    train_texts = sum(PER_CLASS[s] for s in ("train800", "val200")) * 10
    assert sum(passes) == train_texts + PER_CLASS["test"] * 10  # one pass over training texts, one over test
    for record in report.records:
        assert record["test_accuracy_mean"] > 0.3, record  # chance is 0.1
    store = report.store
    assert store.modality == "text" and MASK_KEY in store.taps
    assert store.meta["num_tokens"] == max(minilm.token_lengths([t for t in _texts(report.task)]))
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["context"]["modality"] == "text"


def _texts(task) -> list[str]:
    return [i.text for split, items in task.splits.items() if split != "test" for i in items]


def test_a_second_fit_reuses_the_store_without_the_backbone(text_task, minilm, cache, monkeypatch):
    frozenlens.fit(text_task, ["linear"], backbone=minilm, epochs=2, progress=False)
    passes = count_passes(monkeypatch, minilm)
    frozenlens.fit(text_task, ["head2toe", "linear:patch_mean=true"], backbone=minilm, epochs=2, progress=False)
    assert sum(passes) == PER_CLASS["test"] * 10  # the test split only: training texts come from the store


def test_stored_reductions_equal_the_backbone_pass(text_task, minilm, shared_cache):
    report = frozenlens.fit(text_task, ["linear"], backbone=minilm, epochs=1, progress=False)
    store: ActivationStore = report.store
    items = report.task.split("val")[:5]
    rows = store.index_of(i.key for i in items)
    live = minilm.forward_taps([i.text for i in items], [Tap("block.2", "patch_mean"), Tap("final", "cls")])
    for key in ("block.2:patch_mean", "final:cls"):
        stored = torch.from_numpy(store.get(key, rows)).float()
        assert torch.allclose(stored, live[key], atol=2e-2), key  # float16 tokens, reduced in float32
    mask = store.get(MASK_KEY, rows)
    assert mask.shape == (5, store.meta["num_tokens"])
    assert list(mask.sum(1).astype(int)) == minilm.token_lengths([i.text for i in items])
    with pytest.raises(FrozenlensError):
        store.get("final:pool2", rows)  # text has no patch grid


def test_predict_classifies_strings_as_the_test_pass_scored_them(text_task, minilm, shared_cache, tmp_path):
    report = frozenlens.fit(text_task, ["head2toe"], backbone=minilm, epochs=20, out=tmp_path / "out",
                            progress=False)
    test = report.task.split("test")
    predictions = frozenlens.predict([tmp_path / "out" / "head2toe"], [i.text for i in test], backbone=minilm,
                                     batch_size=7)
    classes = report.task.classes
    accuracy = np.mean([p.top[0][0] == classes[i.label] for p, i in zip(predictions, test)])
    assert accuracy == pytest.approx(report.records[0]["test_accuracy_mean"])
    assert predictions[0].image == test[0].text
    with pytest.raises(FrozenlensError, match="classify strings"):
        frozenlens.predict([tmp_path / "out" / "head2toe"], [Path("x.png")], backbone=minilm)


def test_modality_mismatches_are_refused_by_name(text_task, minilm, shared_cache, tiny_task):
    with pytest.raises(FrozenlensError, match="text task.*image backbone"):
        frozenlens.fit(text_task, ["linear"], backbone="random:vit_tiny_patch16_224", img_size=32, progress=False)
    with pytest.raises(FrozenlensError, match="image task.*text encoder"):
        frozenlens.fit(tiny_task, ["linear"], backbone=minilm, progress=False)


def test_methods_that_do_not_read_text_say_so(text_task, minilm, shared_cache):
    from frozenlens.methods import get_method, method_names

    image_only = [n for n in method_names() if "text" not in get_method(n).modalities]
    assert image_only, "every method reads text: drop this test"
    with pytest.raises(FrozenlensError, match="does not work on text backbones"):
        frozenlens.fit(text_task, [image_only[0]], backbone=minilm, epochs=1, progress=False)


def test_cli_fit_on_a_text_folder(text_task, minilm, shared_cache, tmp_path, capsys):
    from frozenlens.cli import main

    code = main(["-q", "fit", str(text_task), "--method", "linear", "--epochs", "2", "--out", str(tmp_path / "cli")])
    assert code == 0
    assert (tmp_path / "cli" / "linear" / "adapter.json").is_file()
    assert "all-minilm-l6-v2" in (tmp_path / "cli" / "results.md").read_text()  # the text default backbone


def test_bench_runs_text_tasks_like_image_tasks(text_task, minilm, shared_cache, tmp_path):
    """``frozenlens bench`` on a text task: one store for the store methods, the VTAB protocol,
    the report (the backbone defaults to the text encoder in the CLI; given here)."""
    from frozenlens.bench import BenchConfig, run_bench

    config = BenchConfig([text_task], ["linear:patch_mean=true", "head2toe"], tmp_path / "bench",
                         backbone="all-minilm-l6-v2", seeds=1, epochs=20, grid={"lr": [0.01, 0.001]},
                         progress=False, plots=False)
    report = run_bench(config, backbone=minilm)
    assert [r["method"] for r in report.rows] == ["linear:patch_mean=true", "head2toe"]
    for row in report.rows:
        assert row["tasks"][text_task.name]["mean"] > 0.3  # chance 0.1
        assert row["store_bytes_per_image"] > 0 and row["extract_gflops_per_image"] > 0
    assert report.context["modality"] == "text" and report.context["image_size"] is None


@pytest.mark.parametrize("spec", ["vqt", "mist", "last", "inca", "toast"])
def test_token_methods_train_from_the_store_and_predict_alike(spec, text_task, minilm, shared_cache, tmp_path):
    """The token methods train from the padded store (one length for every row) and are scored on
    texts padded per batch; predict (other batches again) agrees with the test pass exactly."""
    report = frozenlens.fit(text_task, [spec], backbone=minilm, epochs=8, out=tmp_path / "out", progress=False)
    record = report.records[0]
    assert record["test_accuracy_mean"] > 0.1, record  # above chance after 8 short epochs
    test = report.task.split("test")
    predictions = frozenlens.predict([tmp_path / "out" / record["label"]], [i.text for i in test], backbone=minilm,
                                     batch_size=5)
    accuracy = np.mean([p.top[0][0] == report.task.classes[i.label] for p, i in zip(predictions, test)])
    assert accuracy == pytest.approx(record["test_accuracy_mean"])


def test_cli_predict_classifies_text_arguments_and_lines_of_a_file(text_task, minilm, shared_cache, tmp_path,
                                                                   capsys):
    from frozenlens.cli import main

    frozenlens.fit(text_task, ["linear:patch_mean=true"], backbone=minilm, epochs=20, out=tmp_path / "out",
                   progress=False)
    adapter = next((tmp_path / "out").glob("linear*"))
    lines = tmp_path / "texts.txt"
    lines.write_text("a small songbird of marshes and reeds\n\na hand tool for cutting wood\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["-q", "predict", str(adapter), "a large wild cat of Africa", "--texts-from", str(lines),
                 "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == ["a large wild cat of Africa", "a small songbird of marshes and reeds",
                                          "a hand tool for cutting wood"]
    assert rows[0]["top"][0][0] == "noun.animal"  # a small probe (100 texts) gets this one right
    assert all(len(r["top"]) == 3 and r["top"][0][1] >= r["top"][1][1] for r in rows)
