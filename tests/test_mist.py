"""MIST and LAST: the gather from the store equals a fresh pass, k is chosen on validation,
the low-rank attention block is what the papers describe, adapters round-trip, the CLI fits."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional as F

from frozenlens.adapter import load_adapter, save_adapter
from frozenlens.errors import FrozenlensError
from frozenlens.methods import build_method, make_config, method_names
from frozenlens.methods.mist import (
    VIT_B16,
    LowRankAttentionBlock,
    gather,
    gather_candidates,
    gather_depths_in,
    gather_key,
    gather_taps,
    gathered_data,
)
from frozenlens.train.data import TapData
from frozenlens.train.trainer import TrainConfig, evaluate
from tests.conftest import adapter_folder

BACKBONE = {"name": "fake", "weights_hash": "abc", "dim": 8, "depth": 6, "num_heads": 2,
            "num_prefix_tokens": 1}
TOKENS = 5
FAST = TrainConfig(epochs=15, warmup_epochs=2, batch_size=45, lr=1e-2, weight_decay=1e-4)


def _depth_task(n: int = 90, seed: int = 0, signal: tuple[int, ...] = (5,),
                cancel: tuple[int, ...] = (), classes: int = 3) -> TapData:
    """Random embedding and block tokens; a class code is added to the class token of the
    blocks in ``signal`` and subtracted in ``cancel``.

    g_k carries the class only when it sums a ``signal`` block and no ``cancel`` block
    after it, so exactly the candidate depths that do can beat chance.
    """
    centers = torch.randn(classes, 8, generator=torch.Generator().manual_seed(99)) * 3
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    feats = {"embed:tokens": torch.randn(n, TOKENS, 8, generator=g)}
    feats.update({f"block.{i}:tokens": torch.randn(n, TOKENS, 8, generator=g) for i in range(6)})
    for block, sign in [(b, 1) for b in signal] + [(b, -1) for b in cancel]:
        feats[f"block.{block}:tokens"][:, 0] += sign * centers[labels]
    return TapData(feats, labels, classes)


def test_candidates_taps_and_registration():
    assert {"mist", "last"} <= set(method_names())
    assert gather_candidates(12) == [4, 8, 12]
    assert gather_candidates(24) == [8, 16, 24] and gather_candidates(2) == [1, 2]
    assert [t.key for t in gather_taps(12, 3)] == ["embed:tokens", "block.0:tokens", "block.1:tokens",
                                                   "block.2:tokens"]
    for bad in (-1, 13):
        with pytest.raises(FrozenlensError, match="gather depth"):
            gather_taps(12, bad)
    assert make_config("mist").gather_depth == 0
    choose = build_method("mist", None, BACKBONE, 3)
    assert choose.tap_keys() == [t.key for t in gather_taps(6, 6)]
    assert build_method("mist", {"gather_depth": 2}, BACKBONE, 3).tap_keys() == [
        "embed:tokens", "block.0:tokens", "block.1:tokens"]
    assert build_method("last", None, BACKBONE, 3).tap_keys() == choose.tap_keys()
    with pytest.raises(FrozenlensError, match="fit the model first"):
        choose(_depth_task(n=3).features)
    with pytest.raises(FrozenlensError, match="gather depth"):
        build_method("mist", {"gather_depth": 7}, BACKBONE, 3)
    with pytest.raises(FrozenlensError, match="no class token"):
        build_method("mist", None, {**BACKBONE, "num_prefix_tokens": 0}, 3)
    with pytest.raises(FrozenlensError, match="heads must divide"):
        build_method("last", {"qkv_dim": 16, "heads": 3}, BACKBONE, 3)


def test_gather_sums_in_float32_and_accepts_a_precomputed_map():
    half = {k: v.half() for k, v in _depth_task(n=4).features.items()}
    expected = half["embed:tokens"].float() + half["block.0:tokens"].float() + half["block.1:tokens"].float()
    assert gather(half, 2).dtype == torch.float32
    assert torch.equal(gather(half, 2), expected)
    assert torch.equal(gather({gather_key(2): expected.half()}, 2), expected.half().float())
    with pytest.raises(FrozenlensError, match="block.2:tokens"):
        gather({k: v for k, v in half.items() if k != "block.2:tokens"}, 4)
    data = TapData(half, torch.zeros(4, dtype=torch.long), 3)
    assert torch.equal(gathered_data(data, 3, chunk=3).features[gather_key(3)], gather(half, 3))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gather_from_the_store_equals_a_fresh_forward_pass(tiny_task, tiny_backbone, tmp_path, dtype):
    from frozenlens.backbones import Tap
    from frozenlens.data import load_task
    from frozenlens.data.images import load_image
    from frozenlens.store import extract

    paths = [str(i.path) for i in load_task(tiny_task).split("val")[:8]]
    depth = tiny_backbone.depth
    store = extract(tiny_backbone, paths, gather_taps(depth, depth), root=tmp_path, dtype=dtype,
                    batch_size=8, progress=False)
    stored = TapData.from_store(store, [t.key for t in gather_taps(depth, depth)], paths, [0] * 8, 3)

    transform = tiny_backbone.transform()
    images = torch.stack([transform(load_image(p)) for p in paths])
    with torch.inference_mode():  # textbook pass through timm's modules
        x = tiny_backbone.embed(images)
        outputs = [x]
        for block in tiny_backbone.model.blocks:
            x = block(x)
            outputs.append(x)
        served = tiny_backbone.forward_taps(images, [Tap(f"gather.{k}") for k in gather_candidates(depth)])
    for k in gather_candidates(depth):
        from_store = gather(stored.features, k)
        fresh = torch.stack(outputs[: k + 1]).sum(0)
        if dtype == "float32":
            assert (from_store - fresh).abs().max() <= 1e-6 * fresh.abs().max()
            assert torch.equal(from_store, served[gather_key(k)])
        else:  # each stored term is rounded to float16: error <= 2^-11 |term| per term
            bound = sum(o.abs() for o in outputs[: k + 1]) * 2.0 ** -11 + 1e-6 * fresh.abs().max()
            error = (from_store - fresh).abs()
            assert (error <= bound).all() and error.max() > 0


def _textbook_block(block: LowRankAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """Per-head softmax(q k^T / sqrt(d)) v, written out."""
    h = F.layer_norm(x, x.shape[-1:], block.norm.weight, block.norm.bias, block.norm.eps)
    q, k, v = F.linear(h, block.qkv.weight, block.qkv.bias).chunk(3, dim=-1)
    heads = []
    for qh, kh, vh in zip(*(t.chunk(block.num_heads, dim=-1) for t in (q, k, v))):
        weights = (qh @ kh.transpose(1, 2) / math.sqrt(qh.shape[-1])).softmax(-1)
        heads.append(weights @ vh)
    return x + F.linear(torch.cat(heads, -1), block.proj.weight, block.proj.bias)


@pytest.mark.parametrize("heads", [1, 4])
def test_low_rank_attention_block_shapes_count_and_math(heads):
    block = LowRankAttentionBlock(768, qkv_dim=16, num_heads=heads)
    assert block.qkv.weight.shape == (48, 768) and block.proj.weight.shape == (768, 16)
    assert sum(p.numel() for p in block.parameters()) == 2 * 768 + 3 * (768 * 16 + 16) + 16 * 768 + 768
    torch.manual_seed(0)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 197, 768)
    with torch.no_grad():
        out = block(x)
        assert out.shape == (2, 197, 768)
        torch.testing.assert_close(out, _textbook_block(block, x), atol=1e-5, rtol=1e-5)


def test_trainable_parameters_for_vit_b_next_to_the_paper():
    """Paper (ViT-B/16, VTAB-1k): MIST 0.38 M, LAST 0.66 M trainable parameters."""
    vtab_mean_classes = 50  # the 19 VTAB-1k tasks have 49.5 classes on average
    mist = build_method("mist", {"gather_depth": 12}, VIT_B16, vtab_mean_classes).parameter_counts()
    last = build_method("last", None, VIT_B16, vtab_mean_classes).parameter_counts()
    print(f"\nViT-B/16, {vtab_mean_classes} classes: MIST {mist}, LAST {last}")
    assert mist["blocks"] == 4 * 51_504 and last["blocks"] == 12 * 51_504
    assert mist["head"] == last["head"] == 2 * 768 + 768 * 50 + 50
    assert abs(last["total"] - 0.66e6) / 0.66e6 < 0.02  # same block as LAST: matches its count
    assert 0.2e6 < mist["total"] < 0.38e6  # below the paper's 0.38 M (see docs/methods/mist.md)


@pytest.mark.parametrize("signal,cancel,expected", [((5,), (), 6), ((0,), (2,), 2)])
def test_k_selection_picks_the_informative_depth(signal, cancel, expected):
    train, val, test = (_depth_task(seed=s, signal=signal, cancel=cancel) for s in (0, 1, 2))
    model = build_method("mist", None, BACKBONE, 3)
    model.fit(train, FAST, val=val)
    accuracies = model.gather_accuracies
    assert set(accuracies) == {2, 4, 6} and model.config.gather_depth == expected
    assert accuracies[expected] > 0.8
    assert max(v for k, v in accuracies.items() if k != expected) < 0.55  # chance is 1/3
    assert model.tap_keys() == [t.key for t in gather_taps(6, expected)]
    assert evaluate(model, test) > 0.8


def test_holdout_selection_then_refit_on_all_data():
    data = _depth_task(signal=(0,), cancel=(2,))
    model = build_method("mist", {"holdout_fraction": 0.25}, BACKBONE, 3)
    losses = model.fit(data, FAST)
    assert model.config.gather_depth == 2 and len(model.gather_accuracies) == 3
    assert len(losses) == 4 * FAST.epochs  # three candidates, then the refit on all data
    fixed = build_method("mist", {"gather_depth": 2}, BACKBONE, 3)
    fixed.fit(data, FAST)
    batch = _depth_task(n=6, seed=3).features
    assert torch.equal(model(batch), fixed(batch))  # the refit is a plain fit with the chosen k


def test_last_feeds_every_block_output_into_its_side_blocks():
    model = build_method("last", None, BACKBONE, 3).eval()
    features = _depth_task(n=4).features
    with torch.no_grad():
        for block in model.blocks:  # identity side blocks: y_N is the gather of all blocks
            block.proj.weight.zero_()
        torch.testing.assert_close(model(features), model.head(gather(features, 6)), atol=0, rtol=0)
    trained = build_method("last", None, BACKBONE, 3)
    trained.fit(_depth_task(signal=(5,)), FAST)
    assert evaluate(trained, _depth_task(seed=2, signal=(5,))) > 0.8


@pytest.mark.parametrize("method", ["mist", "last"])
def test_frozen_backbone_gets_no_gradient(tiny_backbone, method):
    depth = tiny_backbone.depth
    model = build_method(method, {"gather_depth": 4} if method == "mist" else None, tiny_backbone, 3)
    images = torch.randn(2, 3, 32, 32)
    features = tiny_backbone.forward_taps(images, gather_taps(depth, depth))
    F.cross_entropy(model(features), torch.tensor([0, 2])).backward()
    assert all(not p.requires_grad and p.grad is None for p in tiny_backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert "backbone" not in " ".join(model.state_dict())


@pytest.mark.parametrize("method", ["mist", "last"])
def test_adapter_round_trip_keeps_chosen_depth_and_logits(tmp_path, method):
    train, val = _depth_task(seed=0), _depth_task(seed=1)
    model = build_method(method, None, BACKBONE, 3)
    model.fit(train, FAST.updated(epochs=2), val=val)
    folder = save_adapter(tmp_path / method, model, ["a", "b", "c"])
    adapter_ = load_adapter(folder, BACKBONE)
    loaded, meta = adapter_.method, adapter_.meta
    assert meta["taps"] == loaded.tap_keys() == model.tap_keys()
    if method == "mist":
        assert meta["config"]["gather_depth"] in (2, 4, 6)
        assert loaded.gather_accuracies == model.gather_accuracies and len(loaded.gather_accuracies) == 3
    batch = _depth_task(n=6, seed=3).features
    assert torch.equal(loaded(batch), model.eval()(batch))


def test_cli_fits_mist_and_last_then_predicts(tiny_task, tmp_path, capsys):
    from frozenlens.cli import main
    from tests.conftest import TINY_BACKBONE

    out = tmp_path / "run"
    assert main(["fit", str(tiny_task), "--backbone", TINY_BACKBONE, "--img-size", "32", "--out", str(out),
                 "--method", "mist", "--method", "last:qkv_dim=8", "--epochs", "4"]) == 0
    printed = capsys.readouterr().out
    assert "| mist |" in printed and "| last:qkv_dim=8 |" in printed
    results = {r["spec"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert results["mist"]["test_accuracies"] and results["last:qkv_dim=8"]["test_accuracies"]
    meta = json.loads((out / "mist" / "adapter.json").read_text())
    assert meta["config"]["gather_depth"] in (4, 8, 12)
    assert meta["taps"] == [t.key for t in gather_taps(12, meta["config"]["gather_depth"])]
    image = next((tiny_task / "images" / "green").glob("test_*.png"))
    assert main(["predict", str(out / "mist"), str(adapter_folder(out, "last:qkv_dim=8")), str(image), "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_precomputed_gather_trains_the_same_model_as_the_stored_blocks():
    """``gathered=True`` reads ``gather.<k>:tokens`` (the feature server's tap) instead of the blocks."""
    data, batch = _depth_task(), _depth_task(n=6, seed=3).features
    from_blocks = build_method("mist", {"gather_depth": 4}, BACKBONE, 3)
    served = build_method("mist", {"gather_depth": 4, "gathered": True}, BACKBONE, 3)
    assert served.tap_keys() == [gather_key(4)]
    assert build_method("mist", {"gathered": True}, BACKBONE, 3).tap_keys() == [gather_key(k) for k in (2, 4, 6)]
    cfg = FAST.updated(epochs=3)
    from_blocks.fit(data, cfg)
    served.fit(gathered_data(data, 4), cfg)
    assert torch.equal(served({gather_key(4): gather(batch, 4)}), from_blocks(batch))


def test_mist_owns_the_gather_site_and_offers_its_candidates_to_servers():
    """``gather.<k>`` is registered by MIST (not the generic grammar) and served for k in {N/3, 2N/3, N}."""
    from frozenlens.backbones.taps import Tap, method_sites
    from frozenlens.methods import get_method
    from frozenlens.methods.mist import GATHER_SITE

    assert method_sites()["gather"] is GATHER_SITE and Tap.parse("gather.4:cls").method_site == (GATHER_SITE, 4)
    assert GATHER_SITE.inputs(6, 2) == gather_taps(6, 2) and GATHER_SITE.combine is gather
    served = get_method("mist").served_taps(BACKBONE)
    assert [t.key for t in served] == [gather_key(k) for k in gather_candidates(BACKBONE["depth"])]
    assert get_method("linear").served_taps(BACKBONE) == []
    assert gather_depths_in(["final:cls", "gather.8:tokens", "gather.4:tokens", "gather.4:cls"]) == [4, 8]
