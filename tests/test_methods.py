"""Linear probe and Head2Toe on stored taps; the trainer; the VTAB protocol; adapter files."""

from __future__ import annotations

import json

import pytest
import torch

from frozenlens.adapter import load_adapter, save_adapter
from frozenlens.errors import AdapterError, FrozenlensError
from frozenlens.methods import build_method, get_method, make_config, method_names
from frozenlens.protocol import grid_points
from frozenlens.train.data import TapData
from frozenlens.train.trainer import TrainConfig, evaluate

BACKBONE = {"name": "fake", "weights_hash": "abc", "dim": 8, "depth": 3, "num_prefix_tokens": 1}


def _blobs(n: int = 120, seed: int = 0, informative_block: int = 1) -> TapData:
    """Three classes separable only through one block's cls tap; everything else is noise."""
    centers = torch.randn(3, 8, generator=torch.Generator().manual_seed(123)) * 3
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    feats = {}
    for block in range(3):
        for red in ("cls", "pool1", "pool2"):
            shape = (n, 8) if red == "cls" else (n, int(red[-1]) ** 2, 8)
            feats[f"block.{block}:{red}"] = torch.randn(*shape, generator=g)
    feats[f"block.{informative_block}:cls"] += centers[labels]
    feats["final:cls"] = centers[labels] + torch.randn(n, 8, generator=g)
    feats["final:patch_mean"] = torch.randn(n, 8, generator=g)
    return TapData(feats, labels, 3)


def test_registry_lists_methods_with_defaults():
    assert {"linear", "head2toe"} <= set(method_names())
    assert make_config("head2toe").keep_fraction == 0.1
    assert make_config("head2toe").group_lasso == 1e-4
    assert make_config("linear", {"patch_mean": "true"}).patch_mean is True
    with pytest.raises(FrozenlensError, match="no setting"):
        make_config("linear", {"nope": "1"})
    with pytest.raises(FrozenlensError, match="unknown method"):
        get_method("nope")


def test_training_is_repeatable_and_learns():
    data = _blobs()
    cfg = TrainConfig(epochs=30, warmup_epochs=3, batch_size=32, seed=3, lr=1e-2)
    a, b = (build_method("linear", None, BACKBONE, 3) for _ in range(2))
    losses_a, losses_b = a.fit(data, cfg), b.fit(data, cfg)
    assert losses_a == losses_b
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert losses_a[-1] < losses_a[0]
    assert evaluate(a, _blobs(seed=1)) > 0.9
    other = build_method("linear", None, BACKBONE, 3)
    other.fit(data, cfg.updated(seed=4))
    assert not torch.equal(other.head.weight, a.head.weight)


def test_linear_probe_reads_cls_or_cls_and_mean():
    assert build_method("linear", None, BACKBONE, 3).tap_keys() == ["final:cls"]
    both = build_method("linear", {"patch_mean": True}, BACKBONE, 3)
    assert both.tap_keys() == ["final:cls", "final:patch_mean"]
    assert both.head.in_features == 16


def test_head2toe_selects_the_informative_block():
    data = _blobs(informative_block=1)
    model = build_method("head2toe", {"keep_fraction": 0.05, "group_lasso": 1e-3}, BACKBONE, 3)
    assert model.feature_count() == 3 * (8 + 8 + 32)
    model.fit(data, TrainConfig(epochs=40, warmup_epochs=4, batch_size=32, lr=1e-2))
    keys = model.tap_keys()
    start = _offset(keys, "block.1:cls")
    informative = set(range(start, start + 8))
    assert model.num_kept == 7
    assert len(informative & set(model.selected.tolist())) >= 6
    assert model.head.in_features == 7
    assert evaluate(model, _blobs(seed=2, informative_block=1)) > 0.9


def _offset(keys: list[str], key: str) -> int:
    sizes = {"cls": 8, "pool1": 8, "pool2": 32}
    return sum(sizes[k.split(":")[1]] for k in keys[: keys.index(key)])


def test_group_lasso_only_during_selection():
    model = build_method("head2toe", None, BACKBONE, 3)
    assert float(model.regularization()) == 0.0


def test_grid_points_cover_the_product():
    points = grid_points({"lr": [1, 2], "weight_decay": [0, 1, 2]})
    assert len(points) == 6 and {"lr": 2, "weight_decay": 1} in points


def test_adapter_round_trip_and_backbone_check(tmp_path):
    data = _blobs()
    model = build_method("head2toe", None, BACKBONE, 3)
    model.fit(data, TrainConfig(epochs=5, warmup_epochs=1))
    folder = save_adapter(tmp_path / "a", model, ["x", "y", "z"])
    assert json.loads((folder / "adapter.json").read_text())["backbone"]["weights_hash"] == "abc"
    adapter_ = load_adapter(folder, BACKBONE)
    loaded, meta = adapter_.method, adapter_.meta
    assert meta["classes"] == ["x", "y", "z"]
    assert torch.equal(loaded.selected, model.selected)
    batch = {k: v[:5] for k, v in data.features.items()}
    assert torch.equal(loaded(batch), model.eval()(batch))
    with pytest.raises(AdapterError, match="trained on backbone 'fake'"):
        load_adapter(folder, {**BACKBONE, "name": "other", "weights_hash": "def"})
    with pytest.raises(AdapterError, match="not an adapter folder"):
        load_adapter(tmp_path)


def test_adapter_holds_only_what_the_method_learned(tmp_path):
    model = build_method("linear", None, BACKBONE, 3)
    folder = save_adapter(tmp_path / "lin", model, ["x", "y", "z"])
    from safetensors.torch import load_file

    assert set(load_file(str(folder / "adapter.safetensors"))) == {
        "standardize.mean", "standardize.std", "head.weight", "head.bias"}


def test_train_rejects_bad_config():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")


def test_holdout_is_stratified_and_disjoint():
    data = _blobs(n=60)
    rest, held = data.holdout(0.2, seed=1)
    assert len(rest) + len(held) == 60 and len(held) == 12
    assert torch.bincount(held.labels).tolist() == [4, 4, 4]
    again = data.holdout(0.2, seed=1)[1]
    assert torch.equal(again.labels, held.labels)


def test_grid_searches_method_settings_too(tiny_task, tiny_backbone):
    from frozenlens.data import load_task
    from frozenlens.protocol import run_protocol
    from frozenlens.store import extract

    task = load_task(tiny_task)
    config = make_config("head2toe")
    from frozenlens.methods import get_method
    store = extract(tiny_backbone, [str(i.path) for i in task.all_images()],
                    get_method("head2toe").taps(config, tiny_backbone.describe()), progress=False)
    result = run_protocol("head2toe", config, store, task, tiny_backbone,
                          train_config=TrainConfig(epochs=3, warmup_epochs=1),
                          grid={"keep_fraction": [0.05, 0.5], "lr": [1e-2]})
    assert [row["keep_fraction"] for row in result.grid] == [0.05, 0.5]
    best = max(result.grid, key=lambda row: row["val_accuracy"])
    assert result.config.keep_fraction == best["keep_fraction"]
    with pytest.raises(FrozenlensError, match="neither"):
        run_protocol("head2toe", config, store, task, tiny_backbone,
                     train_config=TrainConfig(epochs=1), grid={"nonsense": [1]})
