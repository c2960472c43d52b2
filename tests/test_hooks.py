"""Edited views of the frozen backbone (frozenlens.backbones.hooks) and in-memory image data."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from frozenlens.backbones.hooks import (
    Edits,
    add_branch,
    attention,
    edited_model,
    forward_edited,
    mlp_branch,
    run_blocks,
    value_input,
)
from frozenlens.data import load_image, load_task
from frozenlens.errors import FrozenlensError
from frozenlens.train.images import ImageData


def _images(backbone, n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(seed))


def _snapshot(backbone) -> tuple[dict, dict]:
    """Every module object and every tensor of the backbone, by name."""
    return dict(backbone.model.named_modules()), {k: v.clone() for k, v in backbone.model.state_dict().items()}


def test_no_edits_is_the_plain_forward(tiny_backbone):
    images = _images(tiny_backbone)
    assert torch.equal(forward_edited(tiny_backbone, images), tiny_backbone(images))
    assert edited_model(tiny_backbone.model, Edits()) is tiny_backbone.model


def test_edits_change_the_view_never_the_shared_backbone(tiny_backbone):
    images = _images(tiny_backbone)
    plain = tiny_backbone(images)
    modules_before, state_before = _snapshot(tiny_backbone)
    bias = tiny_backbone.model.blocks[1].mlp.fc2.bias.detach().clone() + 1.0
    edits = Edits(modules={"blocks.0.attn": value_input(torch.ones(3, tiny_backbone.num_tokens, tiny_backbone.dim))},
                  params={"blocks.1.mlp.fc2.bias": bias})
    view = edited_model(tiny_backbone.model, edits)
    assert view is not tiny_backbone.model and view.blocks[0].attn is not tiny_backbone.model.blocks[0].attn
    assert view.blocks[2] is tiny_backbone.model.blocks[2]               # untouched paths are shared
    assert view.blocks[1].mlp.fc1 is tiny_backbone.model.blocks[1].mlp.fc1
    assert view.blocks[1].mlp.fc2.weight is tiny_backbone.model.blocks[1].mlp.fc2.weight
    edited = forward_edited(tiny_backbone, images, edits)
    assert not torch.allclose(edited, plain)
    modules_after, state_after = _snapshot(tiny_backbone)
    assert all(modules_after[name] is module for name, module in modules_before.items())
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())
    assert torch.equal(tiny_backbone(images), plain)                     # same instance, plain again


def test_plain_outputs_while_another_thread_runs_an_edited_pass(tiny_backbone):
    images = _images(tiny_backbone)
    plain = tiny_backbone(images)
    gate, results = threading.Barrier(2), {}
    signal = torch.full((3, tiny_backbone.num_tokens, tiny_backbone.dim), 5.0)

    def edited_pass():
        view = edited_model(tiny_backbone.model, Edits(modules={"blocks.0.attn": value_input(signal)}))
        gate.wait()
        results["edited"] = run_blocks(view, tiny_backbone.embed(images))

    thread = threading.Thread(target=edited_pass)
    thread.start()
    gate.wait()
    results["plain"] = tiny_backbone(images)
    thread.join()
    assert torch.equal(results["plain"], plain)


def test_bad_edit_paths_are_named(tiny_backbone):
    with pytest.raises(FrozenlensError, match="blocks.0.nope"):
        edited_model(tiny_backbone.model, Edits(modules={"blocks.0.nope": nn.Identity()}))
    with pytest.raises(FrozenlensError, match="no parameter 'gamma'"):
        edited_model(tiny_backbone.model, Edits(params={"blocks.0.attn.qkv.gamma": torch.zeros(1)}))
    with pytest.raises(FrozenlensError, match="same place"):
        Edits(params={"a.b": torch.zeros(1)}).merged(Edits(params={"a.b": torch.zeros(1)}))


def test_zero_branches_and_value_inputs_equal_the_plain_backbone(tiny_backbone):
    images = _images(tiny_backbone)
    plain = tiny_backbone(images)
    zeros = torch.zeros(3, tiny_backbone.num_tokens, tiny_backbone.dim)
    modules = {f"blocks.{i}.attn": value_input(zeros) for i in range(tiny_backbone.depth)}
    modules["blocks.0.attn.qkv"] = add_branch(lambda x: torch.zeros(*x.shape[:-1], 3 * tiny_backbone.dim))
    for i in range(tiny_backbone.depth):
        modules.update(mlp_branch(i, torch.zeros_like))
    assert torch.equal(forward_edited(tiny_backbone, images, Edits(modules=modules)), plain)


def test_branches_land_where_they_should(tiny_backbone):
    """The MLP branch reads the residual stream after attention and adds to the block output;
    a value input changes V only; a qkv branch adds to timm's qkv."""
    block = tiny_backbone.model.blocks[0]
    x = tiny_backbone.embed(_images(tiny_backbone))
    h = x + block.ls1(block.attn(block.norm1(x)))
    view = edited_model(tiny_backbone.model, Edits(modules=mlp_branch(0, lambda t: 2 * t)))
    assert torch.allclose(view.blocks[0](x), block(x) + 2 * h, atol=1e-6)

    y, signal = block.norm1(x), torch.randn_like(x)
    attn, dim = block.attn, tiny_backbone.dim
    shape = (*y.shape[:2], attn.num_heads, attn.head_dim)
    q, k = (attn.qkv(y)[..., i * dim:(i + 1) * dim].reshape(shape).transpose(1, 2) for i in (0, 1))
    v = attn.qkv(y + signal)[..., 2 * dim:].reshape(shape).transpose(1, 2)   # V = W_v (X + X_td) + b_v
    mixed = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1) @ v
    expected = attn.proj(mixed.transpose(1, 2).reshape(y.shape))
    kept = []
    assert torch.allclose(attention(attn, y, value_input=signal, keep_weights=kept), expected, atol=1e-5)
    assert kept[0].shape == (y.shape[0], attn.num_heads, y.shape[1], y.shape[1])
    assert torch.allclose(kept[0].sum(-1), torch.ones(()))
    qkv = attn.qkv

    offset = torch.randn(3 * tiny_backbone.dim)
    branch = add_branch(lambda t: offset.expand(*t.shape[:-1], -1))
    view = edited_model(tiny_backbone.model, Edits(modules={"blocks.0.attn.qkv": branch}))
    assert torch.allclose(view.blocks[0].attn.qkv(y), qkv(y) + offset)


def test_block_input_and_recorded_tokens(tiny_backbone):
    images = _images(tiny_backbone)
    inputs, outputs = {}, {}
    calls = []

    def block_input(index, x):
        calls.append(index)
        return x

    tokens = forward_edited(tiny_backbone, images, Edits(block_input=block_input), inputs=inputs, outputs=outputs)
    assert calls == list(range(tiny_backbone.depth))
    taps = tiny_backbone.forward_taps(images, [__import__("frozenlens").backbones.Tap("block.1", "tokens")])
    assert torch.equal(outputs[1], taps["block.1:tokens"]) and torch.equal(inputs[2], outputs[1])
    assert torch.equal(tokens, tiny_backbone(images))


def test_gradients_reach_edits_not_the_backbone(tiny_backbone):
    bias = tiny_backbone.model.blocks[0].attn.qkv.bias.detach().clone().requires_grad_(True)
    out = forward_edited(tiny_backbone, _images(tiny_backbone), Edits(params={"blocks.0.attn.qkv.bias": bias}))
    out.sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_backbone.parameters())


def test_image_data_equals_the_backbone_transform(tiny_task, tiny_backbone):
    task = load_task(tiny_task)
    data = ImageData.from_task(task, "train", tiny_backbone)
    assert len(data) == len(task.split("train")) and data.pixels.dtype == torch.uint8
    transform = tiny_backbone.transform()
    expected = torch.stack([transform(load_image(i.path)) for i in task.split("train")])
    batches = list(data.batches(7))
    got = torch.cat([b["images"] for b, _ in batches])
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert torch.equal(torch.cat([labels for _, labels in batches]), data.labels)
    g1, g2 = (torch.Generator().manual_seed(3) for _ in range(2))
    order = [labels for _, labels in data.batches(5, shuffle=True, generator=g1)]
    assert all(torch.equal(a, b) for a, b in zip(order, [lb for _, lb in data.batches(5, shuffle=True, generator=g2)]))
    rest, held = data.holdout(0.25, seed=1)
    assert len(rest) + len(held) == len(data) and set(held.labels.tolist()) == {0, 1, 2}
    assert not set(rest.paths) & set(held.paths)
    sub = data.select_paths(data.paths[4:6])
    assert torch.equal(sub.pixels, data.pixels[4:6])
    assert data.select_paths(["nope.png"]) is None
    assert data.nbytes == len(data) * 3 * tiny_backbone.image_size ** 2
