"""InCA and Open-InCA: stacked adapters equal single ones, train independently, select the right layer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import frozenlens.methods.inca as inca
from frozenlens.adapter import load_adapter, save_adapter
from frozenlens.errors import FrozenlensError
from frozenlens.methods import build_method, make_config, method_names
from frozenlens.train.data import TapData
from frozenlens.train.trainer import TrainConfig, evaluate

BACKBONE = {"name": "fake", "weights_hash": "abc", "dim": 8, "depth": 4, "num_heads": 2,
            "num_prefix_tokens": 1}
TOKENS = 5
FAST = TrainConfig(epochs=25, warmup_epochs=2, batch_size=32, lr=1e-2, weight_decay=1e-4)


def _layer_task(n: int = 150, seed: int = 0, informative: int = 2, classes: int = 3,
                depth: int = 4) -> TapData:
    """Random tokens for every block; only block ``informative`` has a class-coded token.

    The class token sits at a random position per example, so the adapter has to attend.
    """
    centers = torch.randn(classes, 8, generator=torch.Generator().manual_seed(99)) * 3
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    feats = {f"block.{i}:tokens": torch.randn(n, TOKENS, 8, generator=g) for i in range(depth)}
    where = torch.randint(1, TOKENS, (n,), generator=g)
    feats[f"block.{informative}:tokens"][torch.arange(n), where] += centers[labels]
    return TapData(feats, labels, classes)


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Move every parameter away from its structured initialisation (LayerNorms included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.3
            p.copy_(1 + noise if "norm_weight" in name else noise)


def _batch(n: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"block.{i}:tokens": torch.randn(n, TOKENS, 8, generator=g) * 2 + 0.5 for i in range(4)}


def _textbook_outputs(model: inca.ParallelAdapters, slot: int, queries: torch.Tensor,
                      tokens: torch.Tensor) -> torch.Tensor:
    """One adapter with torch's own modules: LayerNorm, nn.MultiheadAttention, LayerNorm."""
    a, dim = model.attn, model.dim
    norm = nn.LayerNorm(dim, eps=a.eps)
    mha = nn.MultiheadAttention(dim, a.num_heads, batch_first=True)
    with torch.no_grad():
        norm.weight.copy_(a.norm_weight[slot])
        norm.bias.copy_(a.norm_bias[slot])
        mha.in_proj_weight.copy_(torch.cat([a.q_weight[slot], a.k_weight[slot], a.v_weight[slot]]))
        mha.in_proj_bias.copy_(torch.cat([a.q_bias[slot], torch.zeros(dim), a.v_bias[slot]]))
        mha.out_proj.weight.copy_(a.out_weight[slot])
        mha.out_proj.bias.copy_(a.out_bias[slot])
        kv = norm(tokens)
        out = mha(queries.expand(len(tokens), -1, -1), kv, kv, need_weights=False)[0]
        return F.layer_norm(out, (dim,), a.out_norm_weight[slot], a.out_norm_bias[slot], a.eps)


def test_registered_with_defaults_and_layer_specs():
    assert {"inca", "open-inca"} <= set(method_names())
    config = make_config("inca")
    assert (config.layers, config.num_queries, config.ensemble_top_k, config.head_hidden) == ("all", 1, 1, 0)
    model = build_method("inca", None, BACKBONE, 3)
    assert model.tap_keys() == [f"block.{i}:tokens" for i in range(4)]
    assert model.attn.num_heads == 2 and model.attn.q_weight.shape == (4, 8, 8)
    picked = build_method("inca", make_config("inca", {"layers": "1+-1"}), BACKBONE, 3)
    assert picked.tap_keys() == ["block.1:tokens", "block.3:tokens"]
    for bad in ("7", "1+1", "x"):
        with pytest.raises(FrozenlensError, match="layers"):
            build_method("inca", {"layers": bad}, BACKBONE, 3)
    with pytest.raises(FrozenlensError, match="num_heads"):
        build_method("inca", {"num_heads": 3}, BACKBONE, 3)


@pytest.mark.parametrize("method,settings", [("inca", {"num_queries": 2}), ("open-inca", {})])
def test_stacked_slots_equal_each_adapter_alone(method, settings):
    model = build_method(method, settings, BACKBONE, 3).eval()
    _randomize(model)
    batch = _batch()
    with torch.no_grad():
        stacked = model.slot_logits(batch)
    assert stacked.shape == (4, 6, 3)
    for slot in range(4):
        tokens = batch[f"block.{slot}:tokens"]
        if method == "inca":
            outputs = _textbook_outputs(model, slot, model.queries.weight[slot], tokens)
            alone = F.linear(outputs.flatten(1), model.head.weight[slot], model.head.bias[slot])
        else:
            new = model.new
            outputs = _textbook_outputs(model, slot, new.queries[slot], tokens)
            alone = (outputs * new.weight[slot]).sum(-1) + new.bias[slot]
        torch.testing.assert_close(stacked[slot], alone, atol=1e-6, rtol=0)
        single = copy.deepcopy(model)
        single.keep([slot])
        assert single.tap_keys() == [f"block.{slot}:tokens"]
        with torch.no_grad():
            torch.testing.assert_close(single.slot_logits(batch)[0], stacked[slot], atol=1e-6, rtol=0)


def test_slot_losses_only_reach_their_own_slot():
    model = build_method("inca", {"head_hidden": 4}, BACKBONE, 3)
    _randomize(model)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    losses = inca.slot_losses(model.slot_logits(_batch()), labels)
    params = list(model.parameters())
    assert all(p.shape[0] == 4 for p in params)
    for slot in range(4):
        grads = torch.autograd.grad(losses[slot], params, retain_graph=True)
        for grad in grads:
            others = torch.cat([grad[:slot], grad[slot + 1:]])
            assert torch.count_nonzero(others) == 0
        assert all(torch.count_nonzero(g[slot]) > 0 for g in grads)


def test_parallel_training_follows_each_slot_trained_alone():
    data = _layer_task(n=60)
    model = build_method("inca", None, BACKBONE, 3)
    model.reset_trainable(5)
    alone = copy.deepcopy(model)
    alone.keep([2])
    cfg = TrainConfig(epochs=3, warmup_epochs=1, batch_size=16, lr=1e-2)
    inca.train_parallel(model, data, cfg)
    inca.train_parallel(alone, data.subset(["block.2:tokens"]), cfg)
    for (name, together), single in zip(model.named_parameters(), alone.parameters()):
        torch.testing.assert_close(together[2], single[0], atol=1e-5, rtol=1e-4, msg=name)


def test_selection_keeps_the_informative_layer_and_records_accuracies():
    train, val, test = (_layer_task(seed=s) for s in (0, 1, 2))
    model = build_method("inca", None, BACKBONE, 3)
    model.fit(train, FAST, val=val)
    accuracies = model.layer_accuracies
    assert set(accuracies) == {0, 1, 2, 3}
    assert accuracies[2] > 0.9 and max(accuracies[i] for i in (0, 1, 3)) < 0.6
    assert model.config.layers == (2,) and model.tap_keys() == ["block.2:tokens"]
    assert model.attn.q_weight.shape[0] == 1
    assert evaluate(model, test) > 0.9

    ensemble = build_method("inca", {"ensemble_top_k": 2}, BACKBONE, 3)
    ensemble.fit(train, FAST, val=val)
    assert ensemble.config.layers[0] == 2 and len(ensemble.config.layers) == 2
    batch = {k: v[:4] for k, v in test.features.items()}
    torch.testing.assert_close(ensemble(batch), ensemble.slot_logits(batch).mean(0))


def test_open_inca_adds_classes_without_touching_old_logits():
    five = _layer_task(n=300, classes=5)
    old_data = five.rows(torch.nonzero(five.labels < 3).flatten())
    old_data.num_classes = 3
    model = build_method("open-inca", None, BACKBONE, 3)
    model.fit(old_data, FAST, val=old_data)
    assert model.config.layers == (2,)
    test = _layer_task(n=200, seed=3, classes=5)
    batch = {k: v[:20] for k, v in test.features.items()}
    before = model(batch)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}

    model.add_classes(2)
    assert model.num_classes == 5 and model.config.frozen_classes == 3
    assert torch.equal(model(batch)[:, :3], before)
    model.fit(five, FAST.updated(lr=3e-2))
    assert torch.equal(model(batch)[:, :3], before)
    for name, value in model.state_dict().items():
        if not name.startswith("new."):
            assert torch.equal(value, frozen[name.replace("old.", "new.")]), name
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"new.queries", "new.weight", "new.bias"}
    assert evaluate(model, test.rows(torch.nonzero(test.labels >= 3).flatten())) > 0.6  # chance 0.2


def test_adapter_round_trip_keeps_selection_and_added_classes(tmp_path):
    train, val = _layer_task(seed=0), _layer_task(seed=1)
    model = build_method("inca", {"ensemble_top_k": 2, "head_hidden": 6}, BACKBONE, 3)
    model.fit(train, FAST.updated(epochs=3), val=val)
    folder = save_adapter(tmp_path / "inca", model, ["a", "b", "c"])
    adapter_ = load_adapter(folder, BACKBONE)
    loaded, meta = adapter_.method, adapter_.meta
    assert meta["config"]["layers"] == list(model.config.layers)
    assert meta["taps"] == loaded.tap_keys() == model.tap_keys()
    assert loaded.layer_accuracies == model.layer_accuracies
    batch = _batch()
    assert torch.equal(loaded(batch), model.eval()(batch))

    open_model = build_method("open-inca", None, BACKBONE, 3)
    open_model.fit(train, FAST.updated(epochs=2), val=val)
    open_model.add_classes(1)
    folder = save_adapter(tmp_path / "open", open_model, ["a", "b", "c", "d"])
    reopened = load_adapter(folder, BACKBONE).method
    assert reopened.config.frozen_classes == 3 and reopened.num_classes == 4
    assert torch.equal(reopened(batch), open_model.eval()(batch))
    assert not any(p.requires_grad for p in reopened.old.parameters())


def test_protocol_on_tiny_task_selects_on_holdout_and_beats_chance(tiny_task, tiny_backbone):
    from frozenlens.data import load_task
    from frozenlens.methods import get_method
    from frozenlens.protocol import run_protocol
    from frozenlens.store import extract

    task = load_task(tiny_task)
    config = make_config("inca")
    taps = get_method("inca").taps(config, tiny_backbone.describe())
    assert len(taps) == tiny_backbone.depth
    store = extract(tiny_backbone, [str(i.path) for i in task.all_images()], taps, progress=False)
    result = run_protocol("inca", config, store, task, tiny_backbone,
                          train_config=TrainConfig(epochs=15, warmup_epochs=2, batch_size=16, lr=3e-3))
    model = result.model
    assert result.config.layers == "all" and len(model.config.layers) == 1
    assert len(model.layer_accuracies) == tiny_backbone.depth
    assert result.test_accuracies[0] > 0.6  # chance is 1/3


def test_adapters_read_block_output_tokens_which_are_the_next_blocks_inputs(tiny_backbone):
    """docs/methods/inca.md: adapters attach to block outputs, which are also the block inputs."""
    depth = tiny_backbone.depth
    model = build_method("inca", None, tiny_backbone, 3)
    taps = model.taps(model.config, tiny_backbone.describe())
    assert [t.key for t in taps] == [f"block.{i}:tokens" for i in range(depth)]
    inputs: dict[int, torch.Tensor] = {}
    hooks = [block.register_forward_pre_hook(lambda _m, args, i=i: inputs.__setitem__(i, args[0].detach()))
             for i, block in enumerate(tiny_backbone.model.blocks)]
    try:
        size = tiny_backbone.image_size
        images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        out = tiny_backbone.forward_taps(images, taps)
    finally:
        for hook in hooks:
            hook.remove()
    for i in range(depth - 1):
        assert torch.equal(out[f"block.{i}:tokens"], inputs[i + 1])
