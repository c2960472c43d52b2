"""VQT: query tokens leave the backbone untouched; store and backbone-in-the-loop agree."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.live_taps import LiveTaps
from frozenlens.adapter import load_adapter, save_adapter
from frozenlens.backbones.taps import Tap
from frozenlens.cli import main
from frozenlens.data import load_task
from frozenlens.errors import FrozenlensError
from frozenlens.methods import build_method, make_config
from frozenlens.methods.vqt.query_attention import forward_with_queries, input_taps, query_block
from frozenlens.protocol import split_data
from frozenlens.store import extract
from frozenlens.train.trainer import TrainConfig, predict_logits
from tests.conftest import TINY_BACKBONE, adapter_folder

FAST = TrainConfig(optimizer="adam", epochs=3, warmup_epochs=1, batch_size=8, lr=0.02, seed=5)


def _images(backbone, n: int = 4, seed: int = 0) -> torch.Tensor:
    size = backbone.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _vqt_store(tiny_task, backbone, method, dtype: str = "float32"):
    task = load_task(tiny_task)
    taps = [Tap.parse(k) for k in method.tap_keys()]
    store = extract(backbone, [str(i.path) for i in task.all_images()], taps, dtype=dtype,
                    progress=False)
    return task, store


def test_queries_leave_every_original_activation_bit_identical(tiny_backbone):
    images = _images(tiny_backbone)
    depth = tiny_backbone.depth
    taps = input_taps(depth) + [Tap(f"block.{depth - 1}", "tokens"), Tap("final", "tokens")]
    plain = tiny_backbone.forward_taps(images, taps)
    queries = [torch.randn(3, tiny_backbone.dim) for _ in range(depth)]
    with_queries, outputs = forward_with_queries(tiny_backbone, images, queries, taps)
    assert set(plain) == set(with_queries)
    for key in plain:
        assert torch.equal(plain[key], with_queries[key]), key
    assert all(o.shape == (4, 3, tiny_backbone.dim) for o in outputs)


def test_query_block_equals_timm_block_with_queries_prepended_and_masked(tiny_backbone):
    """The query rows of timm's own block on [P, X], where no row may attend to P."""
    block = tiny_backbone.model.blocks[2]
    x = tiny_backbone.forward_taps(_images(tiny_backbone), [Tap("block.1", "tokens")])["block.1:tokens"]
    queries = torch.randn(2, tiny_backbone.dim)
    count, tokens = queries.shape[0], x.shape[1]
    allowed = torch.ones(count + tokens, count + tokens, dtype=torch.bool)
    allowed[:, :count] = False
    with torch.no_grad():
        joined = block(torch.cat([queries.expand(x.shape[0], -1, -1), x], dim=1), attn_mask=allowed)
        ours = query_block(block, queries, x)
    torch.testing.assert_close(ours, joined[:, :count], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(joined[:, count:], block(x), atol=1e-5, rtol=1e-5)


def test_store_and_backbone_in_the_loop_give_the_same_query_outputs(tiny_task, tiny_backbone):
    method = build_method("vqt", {"num_queries": 2}, tiny_backbone, 3)
    torch.nn.init.normal_(method.queries)
    task, store = _vqt_store(tiny_task, tiny_backbone, method)
    data = split_data(store, task, "test", method.tap_keys())
    method.eval()
    with torch.no_grad():
        from_store = method.summaries(data.float_features(), normed=False)
        from_normed = method.summaries(method.normed_inputs(data).float_features(), normed=True)
        images = LiveTaps.from_task(tiny_backbone, task, "test", []).images(torch.arange(len(data)))
        _, live = forward_with_queries(tiny_backbone, images, list(method.queries), [])
    for layer, (a, b, c) in enumerate(zip(from_store, from_normed, live)):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=0, msg=f"layer {layer}")
        torch.testing.assert_close(b, c, atol=1e-5, rtol=0, msg=f"layer {layer}")


def test_training_from_store_equals_training_in_the_loop(tiny_task, tiny_backbone):
    """Same seed, same batches: the store path and the backbone-in-the-loop path end at the same model."""
    store_model = build_method("vqt", None, tiny_backbone, 3)
    task, store = _vqt_store(tiny_task, tiny_backbone, store_model)
    keys = store_model.tap_keys()
    store_losses = store_model.fit(split_data(store, task, "train", keys), FAST)
    live_model = build_method("vqt", None, tiny_backbone, 3)
    live_losses = live_model.fit(LiveTaps.from_task(tiny_backbone, task, "train", keys,
                                                    cast="float32"), FAST)
    assert store_losses == pytest.approx(live_losses, abs=1e-5)
    for (name, a), b in zip(store_model.state_dict().items(), live_model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    test = split_data(store, task, "test", keys)
    torch.testing.assert_close(predict_logits(store_model, test), predict_logits(live_model, test),
                               atol=1e-4, rtol=1e-4)


def test_low_memory_fit_holds_no_normed_copy_and_trains_the_same_model(tiny_task, tiny_backbone, monkeypatch):
    from frozenlens.api import fit
    from frozenlens.methods.vqt.model import VQT

    in_memory = fit(tiny_task, ["vqt:epochs=2"], backbone=tiny_backbone, progress=False)
    monkeypatch.setattr(VQT, "normed_inputs", lambda *a, **k: pytest.fail("normed copy built from streamed taps"))
    streamed = fit(tiny_task, ["vqt:epochs=2"], backbone=tiny_backbone, low_memory=True, progress=False)
    (held, lean) = (next(iter(r.results.values())) for r in (in_memory, streamed))
    assert held.test_accuracies == lean.test_accuracies
    for key, value in held.model.state_dict().items():   # norm1 rounded to float16 once vs not at all
        torch.testing.assert_close(value, lean.model.state_dict()[key], rtol=1e-3, atol=1e-3)


def test_head_input_is_the_papers_plain_concatenation_unless_normalize(tiny_backbone):
    """Paper: final CLS and the summaries concatenated; normalize=true L2-normalises each part
    (the official code's default; docs/methods/vqt.md has the measured comparison)."""
    assert make_config("vqt").normalize is False
    plain = build_method("vqt", None, tiny_backbone, 3).eval()
    normed = build_method("vqt", {"normalize": True}, tiny_backbone, 3).eval()
    normed.load_state_dict(plain.state_dict())
    taps = [Tap.parse(k) for k in plain.tap_keys()]
    batch = tiny_backbone.forward_taps(_images(tiny_backbone), taps)
    dim, depth = tiny_backbone.dim, tiny_backbone.depth
    with torch.no_grad():
        summaries = plain.summaries(batch, normed=False)
        raw, unit = plain.features(batch, normed=False), normed.features(batch, normed=False)
    expected = torch.cat([batch["final:cls"]] + [s.flatten(1) for s in summaries], dim=1)
    torch.testing.assert_close(raw, expected)
    parts = unit.view(len(unit), depth + 1, dim)
    torch.testing.assert_close(parts.norm(dim=-1), torch.ones(len(unit), depth + 1))
    torch.testing.assert_close(parts, torch.nn.functional.normalize(expected.view_as(parts), dim=-1))


def test_only_queries_and_head_train(tiny_task, tiny_backbone):
    method = build_method("vqt", {"aggregate": "weighted_sum"}, tiny_backbone, 3)
    task, store = _vqt_store(tiny_task, tiny_backbone, method, dtype="float16")
    data = split_data(store, task, "train", method.tap_keys())
    before = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    method.fit(data, FAST)
    assert all(not p.requires_grad and p.grad is None for p in tiny_backbone.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in tiny_backbone.model.state_dict().items())
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable == {"queries", "summary_weights", "head.weight", "head.bias"}


def test_compression_keeps_the_fraction_and_adapter_round_trips(tiny_task, tiny_backbone, tmp_path):
    method = build_method("vqt", {"compress": True, "keep_fraction": 0.5}, tiny_backbone, 3)
    task, store = _vqt_store(tiny_task, tiny_backbone, method, dtype="float16")
    data = split_data(store, task, "train", method.tap_keys())
    method.fit(data, FAST)
    width = tiny_backbone.dim * (1 + tiny_backbone.depth)
    assert method.head.in_features == round(0.5 * width) == method.selected.numel()
    assert method.selected.unique().numel() == method.selected.numel()
    save_adapter(tmp_path / "vqt", method, task.classes)
    loaded = load_adapter(tmp_path / "vqt", tiny_backbone).method
    test = split_data(store, task, "test", method.tap_keys())
    assert torch.equal(predict_logits(method, test), predict_logits(loaded, test))


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="num_queries"):
        build_method("vqt", {"num_queries": 0}, {"dim": 8, "depth": 2, "weights_hash": "x"}, 3)
    with pytest.raises(ValueError, match="aggregate"):
        build_method("vqt", {"aggregate": "max"}, {"dim": 8, "depth": 2, "weights_hash": "x"}, 3)
    with pytest.raises(FrozenlensError, match="frozen backbone"):
        method = build_method("vqt", None, {"dim": 8, "depth": 2, "weights_hash": "x"}, 3)
        method.summaries({"embed:tokens": torch.zeros(1, 3, 8), "block.0:tokens": torch.zeros(1, 3, 8)},
                         normed=False)
    assert make_config("vqt").num_queries == 1 and make_config("vqt").keep_fraction == 0.7


def test_cli_fit_and_predict_vqt(tiny_task, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["fit", str(tiny_task), "--backbone", TINY_BACKBONE, "--img-size", "32", "--out", str(out),
                 "--method", "vqt:num_queries=2", "--epochs", "20"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["results"][0]["test_accuracy_mean"] > 0.6  # colour task, chance 1/3
    image = sorted((tiny_task / "images" / "green").glob("test_*.png"))[0]
    capsys.readouterr()
    assert main(["predict", str(adapter_folder(out, "vqt:num_queries=2")), str(image), "--json"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["top"][0][0] in ("red", "green", "blue")
