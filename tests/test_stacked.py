"""Stacked training (frozenlens.train.stacked): configurations trained together equal each trained alone."""

from __future__ import annotations

import pytest
import torch

from frozenlens.methods import build_method
from frozenlens.protocol import split_data
from frozenlens.store import extract
from frozenlens.train.data import TapData
from frozenlens.train.stacked import StackedOptimizer, groups, train_many
from frozenlens.train.trainer import TrainConfig, predict_logits
from tests.conftest import TINY_BACKBONE  # noqa: F401  (the fixtures' backbone)

GRID = [(1e-2, 1e-2), (1e-3, 0.0), (3e-3, 1e-4)]
"""(lr, weight decay) of the stacked configurations."""


@pytest.fixture(scope="module")
def stored(tiny_backbone, tiny_task):
    from frozenlens.data import load_task

    task = load_task(tiny_task)
    taps = set()
    for name, config in SPECS.values():
        probe = build_method(name, config, tiny_backbone, len(task.classes))
        taps |= set(probe.taps(probe.config, tiny_backbone.describe()))
    store = extract(tiny_backbone, [str(i.path) for i in task.all_images()], sorted(taps), progress=False)
    return store, task


SPECS = {
    "linear": ("linear", {"patch_mean": True}),
    "head2toe": ("head2toe", {"keep_fraction": 0.3}),
    "vqt": ("vqt", {"num_queries": 2}),    # its default query dropout (0.1): each config draws its own
    "mist": ("mist", {"gather_depth": 8, "lae_blocks": 1}),
    "inca": ("inca", {"layers": "10+11"}),
}


def _cfgs(optimizer: str, seeds=(0, 0, 0)) -> list[TrainConfig]:
    return [TrainConfig(epochs=3, batch_size=16, optimizer=optimizer, lr=lr, weight_decay=wd, warmup_epochs=1,
                        seed=seed, order_seed=7) for (lr, wd), seed in zip(GRID, seeds)]


@pytest.mark.parametrize("key", list(SPECS))
def test_stacked_training_equals_training_each_configuration_alone(stored, tiny_backbone, key):
    store, task = stored
    name, config = SPECS[key]
    cfgs = _cfgs("adamw", seeds=(0, 1, 2))
    make = [build_method(name, config, tiny_backbone, len(task.classes)) for _ in cfgs]
    data = split_data(store, task, "train", make[0].tap_keys())
    test = split_data(store, task, "test", make[0].tap_keys())
    type(make[0]).fit_many(make, data, cfgs)
    for model, cfg in zip(make, cfgs):
        alone = build_method(name, config, tiny_backbone, len(task.classes))
        alone.fit(data, cfg)
        for (key_a, a), (_, b) in zip(sorted(alone.state_dict().items()), sorted(model.state_dict().items())):
            assert torch.allclose(a.float(), b.float(), atol=2e-4, rtol=1e-3), f"{name}: {key_a} differs"
        assert torch.allclose(predict_logits(alone, test), predict_logits(model, test), atol=1e-3)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_stacked_optimizer_equals_torch_per_configuration(optimizer):
    cfgs = _cfgs(optimizer)
    torch.manual_seed(0)
    start = [torch.randn(4, 3) for _ in cfgs]
    grads = [[torch.randn(4, 3) for _ in cfgs] for _ in range(5)]
    stacked = torch.nn.Parameter(torch.stack(start).clone())
    mine = StackedOptimizer([stacked], cfgs)
    alone = [torch.nn.Parameter(s.clone()) for s in start]
    reference = [__import__("frozenlens.train.trainer", fromlist=["make_optimizer"]).make_optimizer([p], c)
                 for p, c in zip(alone, cfgs)]
    for step in grads:
        stacked.grad = torch.stack(step)
        mine.step(1.0)
        for p, g, opt in zip(alone, step, reference):
            p.grad = g.clone()
            opt.step()
    for p, s in zip(alone, stacked):
        assert torch.allclose(p, s, atol=1e-6)


def test_configurations_that_differ_in_shared_settings_train_in_separate_groups():
    cfgs = [TrainConfig(epochs=2), TrainConfig(epochs=2, lr=0.1), TrainConfig(epochs=3), TrainConfig(epochs=2, seed=4)]
    assert groups(cfgs) == [[0, 1], [2], [3]]  # seed 4 brings its own minibatch order
    shared = [c.updated(order_seed=0) for c in cfgs]
    assert groups(shared) == [[0, 1, 3], [2]]


def test_train_many_reads_each_minibatch_once(stored, tiny_backbone):
    store, task = stored
    models = [build_method("linear", None, tiny_backbone, len(task.classes)) for _ in GRID]
    data = split_data(store, task, "train", models[0].tap_keys())
    reads = []
    original = TapData.batch
    TapData.batch = lambda self, idx, device="cpu": reads.append(len(idx)) or original(self, idx, device)
    cfgs = _cfgs("adamw")
    try:
        type(models[0]).fit_many(models, data, cfgs)
    finally:
        TapData.batch = original
    steps = -(-len(data) // cfgs[0].batch_size) * cfgs[0].epochs
    assert len(reads) == steps  # not once per configuration
    assert train_many  # the function under test is importable on its own


def test_linear_heads_and_vqt_take_the_fat_stacked_path(stored, tiny_backbone, monkeypatch):
    """The fast path is taken where it exists (not the lockstep fallback)."""
    from frozenlens.methods.layers import StackedFeatureHead
    from frozenlens.methods.vqt.stacked import StackedVQT

    store, task = stored
    for name, config, kind in [("linear", None, StackedFeatureHead), ("head2toe", {"keep_fraction": 0.3},
                                StackedFeatureHead), ("vqt", {"query_dropout": 0.1}, StackedVQT)]:
        calls = []
        original = kind.forward
        monkeypatch.setattr(kind, "forward", lambda self, batch, _o=original: calls.append(1) or _o(self, batch))
        models = [build_method(name, config, tiny_backbone, len(task.classes)) for _ in GRID]
        data = split_data(store, task, "train", models[0].tap_keys())
        type(models[0]).fit_many(models, data, _cfgs("adam"))
        assert calls, f"{name} did not train stacked"
        monkeypatch.setattr(kind, "forward", original)


def test_inca_with_val_and_mist_candidate_depths_train_in_lockstep_like_alone(stored, tiny_backbone):
    """InCA ranking on val and MIST's candidate depths (different g_k per model) in one pass."""
    store, task = stored
    cfgs = _cfgs("adamw", seeds=(0, 1, 2))
    inca = [build_method("inca", {"layers": "10+11"}, tiny_backbone, len(task.classes)) for _ in cfgs]
    train = split_data(store, task, "train", inca[0].tap_keys())
    val = split_data(store, task, "val", inca[0].tap_keys())
    type(inca[0]).fit_many(inca, train, cfgs, val=val)
    for model, cfg in zip(inca, cfgs):
        alone = build_method("inca", {"layers": "10+11"}, tiny_backbone, len(task.classes))
        alone.fit(train, cfg, val=val)
        assert alone.config.layers == model.config.layers
        assert torch.allclose(predict_logits(alone, val), predict_logits(model, val), atol=1e-4)
    mist = [build_method("mist", {"gather_depth": k, "lae_blocks": 1}, tiny_backbone, len(task.classes))
            for k in (4, 8, 12)]
    data = split_data(store, task, "train", sorted({key for m in mist for key in m.tap_keys()}))
    type(mist[0]).fit_many(mist, data, _cfgs("adamw"))
    for model, cfg in zip(mist, _cfgs("adamw")):
        alone = build_method("mist", {"gather_depth": model.config.gather_depth, "lae_blocks": 1}, tiny_backbone,
                             len(task.classes))
        alone.fit(data, cfg)
        for a, b in zip(alone.state_dict().values(), model.state_dict().values()):
            assert torch.allclose(a.float(), b.float(), atol=2e-4)
