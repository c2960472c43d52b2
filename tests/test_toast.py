"""TOAST: the equations, what trains, what late/early feedback skip, adapters, pre-tuning, explain."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from frozenlens.backbones.hooks import attention
from frozenlens.methods import build_method
from frozenlens.methods.toast import FeatureSelection, FeedbackPlan
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


def _strong_feedback(method, seed: int = 0) -> None:
    """Seeded modules whose top-down signal reaches every block at a visible size."""
    method.reset_trainable(seed)
    with torch.no_grad():
        for layer in method.feedback.values():
            layer.feed_down.weight.copy_(torch.eye(layer.feed_down.weight.shape[0]))
            layer.top_down.weight.normal_(0, 0.1)


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
    assert _trainable(toast) == {"selection.task_embedding", "head.weight", "head.bias"} | feedback
    lite = build_method("toast-lite", None, tiny_backbone, 3)
    lora = {f"feedback.{i}.{m}.lora_{f}" for i in range(depth) for m in ("feed_down", "top_down")
            for f in ("a", "b")}
    assert _trainable(lite) == {"selection.task_embedding", "selection.channel_transform",
                                "head.weight", "head.bias"} | lora
    assert count_trainable(lite) == dim + dim * dim + 3 * dim + 3 + depth * 2 * 2 * 4 * dim
    for method in (toast, lite):
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
