"""frozenlens.backbones.attention, the one re-implementation of timm's Attention.forward,
against timm's own Attention.forward / Block.forward on a random tiny ViT."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from frozenlens.backbones import attention as attention_module
from frozenlens.backbones.attention import (
    TIMM_SUPPORTED,
    AttentionMismatch,
    attention,
    check_attention,
    query_attention,
    timm_supported,
)
from frozenlens.backbones.hooks import ValueInputAttention, shallow_module_copy
from frozenlens.methods.vqt.query_attention import query_block


def _vit(**kwargs) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0, depth=4,
                                  **kwargs)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():   # non-zero biases everywhere, so a dropped bias term shows
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


MODELS = {"plain": {}, "qk_norm": {"qk_norm": True}}


@pytest.fixture(scope="module", params=list(MODELS))
def vit(request) -> nn.Module:
    return _vit(**MODELS[request.param])


def _tokens(model: nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 32, 32, generator=generator)
    with torch.no_grad():
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))


def test_installed_timm_is_in_the_supported_range() -> None:
    assert timm_supported(), f"timm {timm.__version__} is outside {TIMM_SUPPORTED}"
    assert timm_supported("1.0.16") and timm_supported("1.0.31") and timm_supported("1.0.40.dev0")
    assert not timm_supported("1.0.15") and not timm_supported("0.9.16") and not timm_supported("1.1.0")


@pytest.mark.parametrize("fused", [True, False])
def test_value_input_zero_equals_timm_attention_and_block(vit: nn.Module, fused: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """TOAST's V = W_v(X + X_td) with X_td = 0 is timm's Attention.forward exactly."""
    x = _tokens(vit)
    with torch.no_grad():
        for index, block in enumerate(vit.blocks):
            attn = block.attn
            check_attention(attn)
            monkeypatch.setattr(attn, "fused_attn", fused)
            y = block.norm1(x)
            expected = attn(y)
            assert torch.equal(attention(attn, y), expected)
            assert torch.equal(attention(attn, y, value_input=torch.zeros_like(y)), expected)
            # the same through timm's own Block.forward, with the attention swapped in a copy
            edited = shallow_module_copy(block)
            edited._modules["attn"] = ValueInputAttention(attn, torch.zeros_like(x))
            assert torch.equal(edited(x), block(x)), index
            x = block(x)


def test_value_input_adds_the_value_projection_only(vit: nn.Module) -> None:
    """A non-zero X_td changes only V: the result is timm's attention with V recomputed by hand."""
    x = _tokens(vit)
    attn = vit.blocks[3].attn
    x_td = torch.randn_like(x)
    heads, head_dim = attn.num_heads, attn.head_dim
    width = heads * head_dim
    with torch.no_grad():
        q, k, _ = attn.qkv(x).reshape(*x.shape[:2], 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        v = nn.functional.linear(x + x_td, attn.qkv.weight[2 * width:], attn.qkv.bias[2 * width:])
        v = v.reshape(*x.shape[:2], heads, head_dim).transpose(1, 2)
        weights = ((attn.q_norm(q) * attn.scale) @ attn.k_norm(k).transpose(-2, -1)).softmax(-1)
        expected = attn.proj(attn.norm((weights @ v).transpose(1, 2).reshape(*x.shape[:2], width)))
        kept: list[torch.Tensor] = []
        got = attention(attn, x, value_input=x_td, keep_weights=kept)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kept[0], weights, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, attn(x), atol=1e-4)


def test_query_attention_equals_timm_attention_with_a_mask(vit: nn.Module) -> None:
    """VQT's queries: the P rows of timm's Attention / Block over concat([P, X]) when no row may attend to P."""
    x = _tokens(vit)
    generator = torch.Generator().manual_seed(2)
    count = 3
    queries = torch.randn(x.shape[0], count, x.shape[-1], generator=generator)
    total = count + x.shape[1]
    mask = torch.zeros(total, total, dtype=torch.bool)
    mask[:, count:] = True                      # True: may attend; nobody attends to P
    with torch.no_grad():
        for block in vit.blocks:
            attn = block.attn
            joint = block.norm1(torch.cat([queries, x], dim=1))
            expected = attn(joint, attn_mask=mask)[:, :count]
            got = query_attention(attn, block.norm1(queries), block.norm1(x))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            shared = query_attention(attn, block.norm1(queries[:1]), block.norm1(x))  # (1, T, D) queries
            torch.testing.assert_close(shared[0], query_attention(attn, block.norm1(queries[:1]),
                                                                  block.norm1(x[:1]))[0])
            torch.testing.assert_close(query_block(block, queries, x),
                                       block(torch.cat([queries, x], dim=1), attn_mask=mask)[:, :count],
                                       rtol=1e-5, atol=1e-5)
            x = block(x)


def test_check_attention_refuses_a_changed_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    vit = _vit()
    attn = vit.blocks[0].attn
    check_attention(attn)

    class Overridden(type(attn)):
        def forward(self, x, attn_mask=None, is_causal=False):
            return super().forward(x)

    changed = Overridden.__new__(Overridden)
    changed.__dict__.update(attn.__dict__)
    with pytest.raises(AttentionMismatch, match=r"overrides Attention.forward.*pip install 'timm>="):
        check_attention(changed)
    with pytest.raises(AttentionMismatch, match="not timm.layers.Attention"):
        check_attention(nn.Linear(4, 4))
    with pytest.raises(AttentionMismatch, match="not timm.layers.Attention"):
        ValueInputAttention(nn.Identity())
    renamed = type(attn).__new__(type(attn))
    renamed.__dict__.update(attn.__dict__)
    renamed._modules = {k: v for k, v in attn._modules.items() if k != "q_norm"}
    with pytest.raises(AttentionMismatch, match="has no q_norm"):
        check_attention(renamed)
    # a timm whose Attention.forward grew an argument
    attention_module.timm_attention.cache_clear()
    original = type(attn).forward

    def forward(self, x, attn_mask=None, is_causal=False, rope=None):
        return original(self, x, attn_mask, is_causal)

    monkeypatch.setattr(type(attn), "forward", forward)
    try:
        with pytest.raises(AttentionMismatch, match=r"new arguments \(rope\).*this timm \("):
            check_attention(attn)
    finally:
        monkeypatch.undo()
        attention_module.timm_attention.cache_clear()
    check_attention(attn)
