"""TOAST: the equations, what trains, what late/early feedback skip, adapters, pre-tuning, explain."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from frozenlens.backbones.hooks import attention
from frozenlens.methods import build_method
from frozenlens.methods.toast.model import FeatureSelection, FeedbackPlan
from frozenlens.train.trainer import count_trainable


def _images(backbone, count: int = 2, seed: int = 0) -> torch.Tensor:
    size = backbone.image_size
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _zero_top_down(method) -> None:
    with torch.no_grad():
        for layer in method.feedback.values():
            layer.top_down.weight.zero_()


def test_value_input_attention_matches_the_equation(tiny_backbone):
    attn = tiny_backbone.model.blocks[2].attn
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, tiny_backbone.num_tokens, tiny_backbone.dim, generator=generator)
    x_td = torch.randn(x.shape, generator=generator)
    dim, heads = tiny_backbone.dim, attn.num_heads
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(x, weight[:dim], bias[:dim])
    k = F.linear(x, weight[dim:2 * dim], bias[dim:2 * dim])
    v = F.linear(x + x_td, weight[2 * dim:], bias[2 * dim:])        # V = W_v (X + X_td)
    split = lambda t: t.reshape(2, -1, heads, dim // heads).transpose(1, 2)  # noqa: E731
    expected = attn.proj(F.scaled_dot_product_attention(split(q), split(k), split(v))
                         .transpose(1, 2).reshape(x.shape))
    torch.testing.assert_close(attention(attn, x, value_input=x_td), expected)
    assert torch.equal(attention(attn, x, value_input=torch.zeros_like(x)), attn(x))
    assert not torch.allclose(attention(attn, x, value_input=x_td), attn(x))


def test_zero_top_down_signal_gives_the_plain_backbone_exactly(tiny_backbone):
    method = build_method("toast", None, tiny_backbone, 3)
    _zero_top_down(method)
    images = _images(tiny_backbone)
    with torch.no_grad():
        passes = method.passes(images)
        plain = tiny_backbone(images)
    assert torch.equal(passes.tokens, plain)
    assert torch.equal(passes.logits, method.head(plain[:, 0]))


def _strong_feedback(method, seed: int = 0, images: torch.Tensor | None = None) -> None:
    """Seeded modules whose top-down signal reaches every block at a visible size.

    With ``images``, the task embedding is their mean output token, so that the
    feature selection keeps some tokens of them (a random one may keep none).
    """
    method.reset_trainable(seed)
    with torch.no_grad():
        if images is not None:
            method.selection.task_embedding.copy_(method.frozen_backbone(images).mean(dim=(0, 1)))
        for layer in method.feedback.values():
            layer.feed_down.weight.copy_(torch.eye(layer.feed_down.weight.shape[0]))
            layer.top_down.weight.normal_(0, 0.1)


def test_zero_signal_is_exact_on_a_dinov2_block_too():
    """Layer scale, 14 px patches, 6 heads: the architecture of the offline default backbone."""
    from frozenlens.backbones import load_backbone

    net = load_backbone("random:vit_small_patch14_dinov2", img_size=28)
    method = build_method("toast-lite", {"feedback": "late"}, net, 2)
    _zero_top_down(method)
    images = _images(net)
    with torch.no_grad():
        assert torch.equal(method.passes(images).tokens, net(images))


def test_pass_two_keeps_queries_and_keys_of_a_plain_pass(tiny_backbone):
    method = build_method("toast", None, tiny_backbone, 3)
    _strong_feedback(method)
    blocks = tiny_backbone.model.blocks
    captured: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
             for b in blocks for m in (b.attn.q_norm, b.attn.k_norm)]
    try:
        images = _images(tiny_backbone)
        with torch.no_grad():
            passes = method.passes(images, record_blocks=True)
        pass2 = captured[2 * len(blocks):]                       # pass 1 first, then pass 2
        captured.clear()
        with torch.no_grad():
            plain_outputs = [blocks[i](passes.block_inputs[i]) for i in range(len(blocks))]
    finally:
        for hook in hooks:
            hook.remove()
    assert len(pass2) == len(captured) == 2 * len(blocks)
    for ours, plain in zip(pass2, captured):
        assert torch.equal(ours, plain)                          # Q and K from X alone
    for index, plain_out in enumerate(plain_outputs):            # ... while V changed the output
        assert not torch.allclose(passes.block_outputs[index], plain_out)


def test_feature_selection_is_clamped_cosine_times_tokens_times_p():
    selection = FeatureSelection(8)
    with torch.no_grad():
        selection.channel_transform.copy_(torch.randn(8, 8))
    z = torch.randn(2, 5, 8)
    weights = F.cosine_similarity(z, selection.task_embedding.expand_as(z), dim=-1).clamp(0, 1)
    torch.testing.assert_close(selection.token_weights(z), weights)
    torch.testing.assert_close(selection(z), (weights.unsqueeze(-1) * z) @ selection.channel_transform)
    assert ((weights == 0).any() and (weights > 0).any())


def test_feedback_runs_top_down_one_output_feeding_the_next_layer(tiny_backbone):
    method = build_method("toast", None, tiny_backbone, 3)
    selected = torch.randn(2, tiny_backbone.num_tokens, tiny_backbone.dim)
    signals = method.feedback_signals(selected)
    hidden = selected
    for index in reversed(range(tiny_backbone.depth)):
        layer = method.feedback[str(index)]
        hidden = hidden @ layer.feed_down.weight.T
        torch.testing.assert_close(signals[index], hidden @ layer.top_down.weight.T)
        assert layer.feed_down.bias is None and layer.top_down.bias is None


def _trainable(method) -> set[str]:
    return {n for n, p in method.named_parameters() if p.requires_grad}


def test_only_the_intended_parameters_train(tiny_backbone):
    depth, dim = tiny_backbone.depth, tiny_backbone.dim
    toast = build_method("toast", None, tiny_backbone, 3)
    feedback = {f"feedback.{i}.{m}.weight" for i in range(depth) for m in ("feed_down", "top_down")}
    assert _trainable(toast) == {"selection.task_embedding", "selection.channel_transform",
                                 "head.weight", "head.bias"} | feedback      # paper: P tunes too
    frozen_p = build_method("toast", {"tune_p": False}, tiny_backbone, 3)
    assert _trainable(frozen_p) == {"selection.task_embedding", "head.weight", "head.bias"} | feedback
    lite = build_method("toast-lite", None, tiny_backbone, 3)
    lora = {f"feedback.{i}.{m}.lora_{f}" for i in range(depth) for m in ("feed_down", "top_down")
            for f in ("a", "b")}
    assert _trainable(lite) == {"selection.task_embedding", "selection.channel_transform",
                                "head.weight", "head.bias"} | lora
    assert count_trainable(lite) == dim + dim * dim + 3 * dim + 3 + depth * 2 * 2 * 4 * dim
    for method in (toast, frozen_p, lite):
        method.passes(_images(tiny_backbone)).logits.logsumexp(1).sum().backward()
        assert all(p.grad is None for p in tiny_backbone.parameters())
        assert all(p.grad is not None for p in method.parameters() if p.requires_grad)


def _count_block_calls(backbone, run) -> int:
    calls = []
    hooks = [b.register_forward_hook(lambda *_: calls.append(1)) for b in backbone.model.blocks]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return len(calls)


@pytest.mark.parametrize("mode, expected_calls", [("full", 24), ("late", 18), ("early", 18)])
def test_late_and_early_feedback_skip_half_a_pass(tiny_backbone, mode, expected_calls):
    method = build_method("toast", {"feedback": mode}, tiny_backbone, 3)
    images = _images(tiny_backbone)
    assert _count_block_calls(tiny_backbone, lambda: method.passes(images)) == expected_calls
    assert len(method.feedback) == {"full": 12, "late": 6, "early": 6}[mode]


def test_late_feedback_reuses_pass_one_below_the_middle(tiny_backbone):
    method = build_method("toast", {"feedback": "late"}, tiny_backbone, 3)
    images = _images(tiny_backbone)
    with torch.no_grad():
        passes = method.passes(images, record_blocks=True)
        expected = tiny_backbone.forward_taps(images, [_block_tap(5)])["block.5:tokens"]
    assert sorted(passes.block_inputs) == list(range(6, 12))
    assert torch.equal(passes.block_inputs[6], expected)
    assert FeedbackPlan.make("late", 12, 4).layers == tuple(range(4, 12))
    assert FeedbackPlan.make("early", 12, 4) == FeedbackPlan(3, (0, 1, 2, 3), 0)


@pytest.mark.parametrize("settings, message", [({"feedback": "sideways"}, "feedback='sideways'"),
                                               ({"feedback": "late", "middle": 12}, "middle=12"),
                                               ({"lora_rank": 0}, "lora_rank=0"),
                                               ({"head_init": "ones"}, "head_init='ones'")])
def test_bad_settings_are_clear_errors(tiny_backbone, settings, message):
    from frozenlens.errors import FrozenlensError

    with pytest.raises(FrozenlensError, match=message):
        build_method("toast-lite", settings, tiny_backbone, 3)


def _block_tap(index: int):
    from frozenlens.backbones.taps import block_tap

    return block_tap(index)


def _forward_flops(run) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        run()
    return counter.get_total_flops()


def test_flops_are_twice_the_backbone_and_one_and_a_half_with_early_or_late(tiny_backbone):
    images = _images(tiny_backbone, count=1)
    plain = _forward_flops(lambda: tiny_backbone(images))
    ratios = {}
    for mode in ("full", "early", "late"):
        method = build_method("toast", {"feedback": mode}, tiny_backbone, 3)
        ratios[mode] = _forward_flops(lambda: method.passes(images)) / plain
    # the feedback maps and the value projection of the top-down input add the rest
    assert 2.0 < ratios["full"] < 2.6
    assert 1.5 < ratios["early"] < 1.9 and 1.5 < ratios["late"] < 1.9


def test_the_shared_backbone_stays_plain_after_toast(tiny_backbone):
    images = _images(tiny_backbone)
    with torch.no_grad():
        before = tiny_backbone(images)
        method = build_method("toast", None, tiny_backbone, 3)
        _strong_feedback(method)
        method.passes(images, keep_attention=True)
        assert torch.equal(tiny_backbone(images), before)
    assert all(type(b.attn).__name__ == "Attention" for b in tiny_backbone.model.blocks)


# -- adapters, fitting, pre-tuning, explain -----------------------------------------------
def test_adapter_round_trip_holds_only_toast_modules(tiny_backbone, tmp_path):
    from safetensors.torch import load_file

    from frozenlens.adapter import load_adapter, save_adapter

    images = _images(tiny_backbone)
    for name in ("toast", "toast-lite"):
        method = build_method(name, {"feedback": "late"}, tiny_backbone, 3)
        _strong_feedback(method, seed=3)
        save_adapter(tmp_path / name, method, ["a", "b", "c"])
        adapter_ = load_adapter(tmp_path / name, tiny_backbone)
        loaded, meta = adapter_.method, adapter_.meta
        assert meta["method"] == name and meta["config"]["feedback"] == "late"
        with torch.no_grad():
            assert torch.equal(loaded({"images": images}), method({"images": images}))
        keys = set(load_file(str(tmp_path / name / "adapter.safetensors")))
        assert keys == set(method.state_dict())
        assert all(k.split(".")[0] in ("selection", "feedback", "head") for k in keys)


def _tiny_images(task_dir, split: str, backbone):
    from frozenlens.data import load_task
    from frozenlens.train.images import ImageData

    return ImageData.from_task(load_task(task_dir), split, backbone)


def test_fit_trains_the_intended_parameters_and_nothing_else(tiny_backbone, tiny_task):
    from frozenlens.train.trainer import TrainConfig, evaluate

    data = _tiny_images(tiny_task, "trainval", tiny_backbone)
    hash_before = tiny_backbone.weights_hash
    cfg = TrainConfig(optimizer="sgd", lr=0.05, epochs=3, warmup_epochs=1, batch_size=16)
    for name, changed, unchanged in (
        ("toast", ("feedback.11.feed_down.weight", "selection.task_embedding",
                   "selection.channel_transform", "head.weight"), ()),
        ("toast-lite", ("feedback.11.feed_down.lora_b", "selection.channel_transform", "head.weight"),
         ("feedback.11.feed_down.weight", "feedback.0.top_down.weight")),
    ):
        method = build_method(name, None, tiny_backbone, 3)
        method.reset_trainable(cfg.seed)
        start = {k: v.clone() for k, v in method.state_dict().items()}
        method.fit(data, cfg)
        end = method.state_dict()
        assert all(not torch.equal(start[k], end[k]) for k in changed), name
        assert all(torch.equal(start[k], end[k]) for k in unchanged), name
        assert evaluate(method, _tiny_images(tiny_task, "test", tiny_backbone)) > 0.5  # chance is 1/3
    from frozenlens.backbones.base import state_dict_sha256

    assert state_dict_sha256(tiny_backbone.model) == hash_before


def test_p_moves_in_training_by_default_and_stays_the_identity_with_tune_p_false(tiny_backbone, tiny_task):
    from frozenlens.train.trainer import TrainConfig

    data = _tiny_images(tiny_task, "train", tiny_backbone)
    cfg = TrainConfig(optimizer="sgd", lr=0.05, weight_decay=0.0, epochs=1, warmup_epochs=0, batch_size=16)
    eye = torch.eye(tiny_backbone.dim)
    moved = {}
    for settings in (None, {"tune_p": False}):
        method = build_method("toast", settings, tiny_backbone, 3)
        method.fit(data, cfg)
        p = method.selection.channel_transform.detach()
        moved[bool(settings is None)] = float((p - eye).abs().max())
        if settings is not None:
            assert torch.equal(p, eye)
            assert method.selection.channel_transform.grad is None
    assert moved[True] > 1e-4, moved


def test_variational_loss_trains_feed_down_to_invert_its_block(tiny_backbone):
    from frozenlens.methods.toast.pretune import VARIATIONAL_WEIGHT, variational_objective

    method = build_method("toast", {"feedback": "early"}, tiny_backbone, 3)
    _strong_feedback(method)
    images, labels = _images(tiny_backbone), torch.tensor([0, 2])
    passes = method.passes(images, record_blocks=True)
    assert sorted(passes.block_inputs) == list(range(6))
    expected = sum(F.mse_loss(passes.block_outputs[i] @ method.feedback[str(i)].feed_down.weight.T,
                              passes.block_inputs[i]) for i in range(6))
    torch.testing.assert_close(method.variational_loss(passes), expected)
    method.variational_loss(passes).backward()
    assert all(p.grad is not None for n, p in method.named_parameters() if ".feed_down." in n)
    assert all(p.grad is None for n, p in method.named_parameters() if ".feed_down." not in n)
    method.zero_grad(set_to_none=True)
    loss, _ = variational_objective(method, {"images": images}, labels, 0.0)
    with torch.no_grad():
        again = method.passes(images, record_blocks=True)
        total = F.cross_entropy(again.logits, labels) + VARIATIONAL_WEIGHT * method.variational_loss(again)
    torch.testing.assert_close(loss, total)


def test_mean_pooling_and_the_variational_weight_are_shared_settings(tiny_backbone):
    """``pool`` and ``variational_weight`` (the text variant's settings) mean the same on images;
    with the default weight 0 fitting uses the shared trainer's plain cross-entropy."""
    from frozenlens.methods.toast.model import _objective, steering_objective
    from frozenlens.train.trainer import cross_entropy_objective

    method = build_method("toast", {"pool": "mean", "variational_weight": 0.1}, tiny_backbone, 3)
    _strong_feedback(method)
    images, labels = _images(tiny_backbone), torch.tensor([0, 2])
    with torch.no_grad():
        passes = method.passes(images, record_blocks=True)
        torch.testing.assert_close(passes.logits, method.head(passes.tokens[:, 1:].mean(dim=1)))
        loss, _ = steering_objective(method, {"images": images}, labels, 0.0)
        expected = F.cross_entropy(passes.logits, labels) + 0.1 * method.variational_loss(passes)
    torch.testing.assert_close(loss, expected)
    assert _objective([method]) is steering_objective
    assert _objective([build_method("toast", None, tiny_backbone, 3)]) is cross_entropy_objective


def test_pretune_then_fit_from_it_through_the_cli(tiny_task, tmp_path, capsys):
    from safetensors.torch import load_file

    from frozenlens.adapter import read_adapter_meta
    from frozenlens.cli import main
    from tests.conftest import TINY_BACKBONE, make_vtab_task

    (tmp_path / "other").mkdir()
    other = make_vtab_task(tmp_path / "other", {"train": 4, "val": 2, "test": 1}, seed=1)
    pretuned = tmp_path / "pretuned"
    backbone = ["--backbone", TINY_BACKBONE, "--img-size", "32"]
    assert main(["pretune", "toast:batch_size=16", str(tiny_task), str(other), "--out", str(pretuned),
                 "--epochs", "1", *backbone]) == 0
    assert f"toast:pretuned={pretuned}" in capsys.readouterr().out
    meta = read_adapter_meta(pretuned)
    assert meta["classes"][:3] == [f"{tiny_task.name}/red", f"{tiny_task.name}/green",
                                   f"{tiny_task.name}/blue"] and len(meta["classes"]) == 6
    assert meta["pretune"]["images"] == 18 * 3 + 6 * 3 and meta["pretune"]["variational_weight"] == 0.03
    stored = load_file(str(pretuned / "adapter.safetensors"))

    out = tmp_path / "fit"
    assert main(["fit", str(tiny_task), "--out", str(out), "--method",
                 f"toast-lite:pretuned={pretuned},epochs=2,feedback=late", *backbone]) == 0
    printed = capsys.readouterr().out
    (record,) = json.loads((out / "results.json").read_text())["results"]
    assert record["spec"] == f"toast-lite:pretuned={pretuned},epochs=2,feedback=late"
    assert "/" not in record["label"] and str(out / record["label"]) in printed  # the CLI names the folder
    fitted = load_file(str(out / record["label"] / "adapter.safetensors"))
    for key in ("feedback.11.feed_down.weight", "feedback.6.top_down.weight"):  # frozen in Lite
        assert torch.equal(fitted[key], stored[key])
    assert not torch.equal(fitted["selection.task_embedding"], stored["selection.task_embedding"])
    assert "feedback.0.feed_down.weight" not in fitted                            # late: upper half only

    from frozenlens.backbones import load_backbone

    net = load_backbone(TINY_BACKBONE, img_size=32)
    start = build_method("toast", {"pretuned": str(pretuned)}, net, 3)
    start.reset_trainable(5)
    assert all(torch.equal(start.state_dict()[k], stored[k]) for k in start.state_dict()
               if not k.startswith("head."))


def test_pretuning_is_reproducible_on_one_machine(tiny_task, tmp_path, capsys):
    """The same seed gives bit-identical modules (the results page relies on it); another seed does not."""
    from safetensors.torch import load_file

    from frozenlens.cli import main
    from tests.conftest import TINY_BACKBONE

    def pretune(name: str, seed: int) -> dict[str, torch.Tensor]:
        out = tmp_path / name
        assert main(["pretune", "toast:batch_size=16", str(tiny_task), "--out", str(out), "--epochs", "1",
                     "--seed", str(seed), "--backbone", TINY_BACKBONE, "--img-size", "32"]) == 0
        return load_file(str(out / "adapter.safetensors"))

    first, again, other = pretune("a", 0), pretune("b", 0), pretune("c", 1)
    capsys.readouterr()
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_pretuned_modules_must_come_from_the_same_backbone(tiny_backbone, tmp_path):
    import json

    from frozenlens.adapter import save_adapter
    from frozenlens.errors import AdapterError

    save_adapter(tmp_path / "p", build_method("toast", None, tiny_backbone, 2), ["x", "y"])
    meta_file = tmp_path / "p" / "adapter.json"
    meta = json.loads(meta_file.read_text())
    meta["backbone"]["weights_hash"] = "0" * 64
    meta_file.write_text(json.dumps(meta))
    method = build_method("toast", {"pretuned": str(tmp_path / "p")}, tiny_backbone, 3)
    with pytest.raises(AdapterError, match="pre-tuned on backbone"):
        method.reset_trainable(0)


def test_explain_writes_attention_pngs(tiny_backbone, tiny_task, tmp_path, capsys):
    from PIL import Image

    from frozenlens.adapter import save_adapter
    from frozenlens.cli import main

    method = build_method("toast", None, tiny_backbone, 3)
    _strong_feedback(method)
    save_adapter(tmp_path / "toast", method, ["red", "green", "blue"])
    image = sorted((tiny_task / "images" / "red").glob("test_*.png"))[0]
    assert main(["explain", str(tmp_path / "toast"), str(image), "--out", str(tmp_path / "maps")]) == 0
    written = capsys.readouterr().out.split()
    assert [Path(p).name for p in written] == [f"{image.stem}_{s}.png" for s in ("pass1", "pass2", "steps")]
    for path in written:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as png:
            png.verify()
            assert png.size[0] >= 300


def test_attention_maps_are_cls_to_patch_attention_of_the_last_block(tiny_backbone):
    from frozenlens.backbones.hooks import Edits, edited_model, run_blocks, value_input
    from frozenlens.methods.toast.explain import toast_attention_maps

    method = build_method("toast", None, tiny_backbone, 3)
    image = _images(tiny_backbone, count=1)
    _strong_feedback(method, images=image)
    maps = toast_attention_maps(method, image[0])
    kept: list[torch.Tensor] = []
    view = edited_model(tiny_backbone.model, Edits(modules={"blocks.11.attn": value_input(None, kept)}))
    with torch.no_grad():
        run_blocks(view, tiny_backbone.embed(image))
    expected = kept[0][0, :, 0, 1:].mean(0).reshape(tiny_backbone.grid_size).numpy()
    assert maps.pass1.shape == tiny_backbone.grid_size
    assert np.allclose(maps.pass1, expected, atol=1e-6)
    assert not np.allclose(maps.pass2, maps.pass1)
    assert abs(maps.probabilities.sum() - 1) < 1e-5


def test_zero_head_starts_every_class_at_log_c_and_the_reference_head_does_not(tiny_backbone):
    """``head_init=zero`` (the PETL baselines' start) gives loss ln C before training, after every
    reset; the default keeps the reference code's Kaiming fan-out head."""
    images, labels = _images(tiny_backbone), torch.tensor([0, 2])
    zero = build_method("toast", {"head_init": "zero"}, tiny_backbone, 3)
    zero.reset_trainable(seed=1)
    reference = build_method("toast", None, tiny_backbone, 3)
    with torch.no_grad():
        loss = F.cross_entropy(zero.passes(images).logits, labels)
        torch.testing.assert_close(loss, torch.log(torch.tensor(3.0)))
        assert reference.head.weight.abs().sum() > 0 and torch.allclose(
            reference.head.bias, torch.full((3,), -float(np.log(99))))
