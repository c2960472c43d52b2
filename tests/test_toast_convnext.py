"""TOAST on a timm ConvNeXt (randomly initialised convnext_atto, offline): the defining properties."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from frozenlens.methods.toast.convnext import ConvNeXtTOAST


@pytest.fixture(scope="module")
def convnext():
    import timm

    torch.manual_seed(0)
    return timm.create_model("convnext_atto", pretrained=False).eval()


def _images(count: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _strong(toast: ConvNeXtTOAST) -> None:
    with torch.no_grad():
        toast.selection.task_embedding.fill_(1.0)
        for layer in toast.feedback.values():
            for conv in (layer.feed_down, layer.top_down):
                if conv is not None:
                    conv.weight.normal_(0, 0.3)


def test_zero_top_down_signal_gives_the_plain_convnext_bit_for_bit(convnext):
    toast = ConvNeXtTOAST(convnext, 5)
    with torch.no_grad():
        for layer in toast.feedback.values():
            if layer.top_down is not None:
                layer.top_down.weight.zero_()
        images = _images()
        passes = toast.passes(images)
        plain = convnext.forward_features(images)
        assert torch.equal(passes.features, plain)
        assert torch.equal(passes.logits, toast.head(convnext.forward_head(plain, pre_logits=True)))
        _strong(toast)
        assert not torch.allclose(toast.passes(images).features, plain)


def test_feedback_layers_mirror_the_forward_layers(convnext):
    toast = ConvNeXtTOAST(convnext, 5)
    _strong(toast)
    images = _images()
    passes = toast.passes(images, record_blocks=True)
    blocks = [f"{s}_{b}" for s, stage in enumerate(convnext.stages) for b in range(len(stage.blocks))]
    downs = [f"{s}_down" for s in (1, 2, 3)]              # stage 0 starts at the stem's resolution
    assert set(toast.feedback) == set(blocks) | set(downs)
    assert toast.order[0] == blocks[-1] and toast.order[-1] == "0_0"
    for key in downs:                                      # transposed conv back to the previous stage
        layer = toast.feedback[key]
        assert isinstance(layer.feed_down, torch.nn.ConvTranspose2d) and layer.top_down is None
        out = passes.block_outputs[key]
        assert layer.feed_down(out).shape == passes.block_inputs[key].shape
        assert out.shape[-1] * 2 == passes.block_inputs[key].shape[-1]
    # pass 2 adds each block's signal to its input: reproduce block 0_0 by hand
    from frozenlens.methods.toast.core import run_feedback

    with torch.no_grad():
        z = convnext.head.norm(convnext.forward_features(images)).flatten(2).transpose(1, 2)
        selected = toast.selection(z).transpose(1, 2).reshape(convnext.forward_features(images).shape)
        signals = run_feedback(toast.feedback, toast.order, selected)
        assert set(signals) == set(blocks)
        stem = convnext.stem(images)
        torch.testing.assert_close(passes.block_outputs["0_0"], convnext.stages[0].blocks[0](stem + signals["0_0"]))
        for key in blocks:
            assert signals[key].shape == passes.block_inputs[key].shape


def test_only_toast_parameters_train_and_the_convnext_gets_no_gradient(convnext):
    toast = ConvNeXtTOAST(convnext, 5)
    _strong(toast)
    names = {n for n, p in toast.named_parameters() if p.requires_grad}
    assert names == set(toast.state_dict())
    assert {n.split(".")[0] for n in names} == {"selection", "feedback", "head"}
    passes = toast.passes(_images(), record_blocks=True)
    (F.cross_entropy(passes.logits, torch.tensor([0, 3])) + 0.03 * toast.variational_loss(passes)).backward()
    assert all(p.grad is None for p in convnext.parameters())
    assert all(not p.requires_grad for p in convnext.parameters())
    assert all(p.grad is not None for p in toast.parameters() if p.requires_grad)
    frozen_p = ConvNeXtTOAST(convnext, 5, tune_p=False)
    assert not frozen_p.selection.channel_transform.requires_grad


def test_variational_loss_trains_only_feed_down(convnext):
    toast = ConvNeXtTOAST(convnext, 5)
    _strong(toast)
    passes = toast.passes(_images(), record_blocks=True)
    loss = toast.variational_loss(passes)
    expected = sum(F.mse_loss(toast.feedback[k].feed_down(passes.block_outputs[k]), passes.block_inputs[k])
                   for k in toast.feedback)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all((p.grad is not None) == (".feed_down." in n) for n, p in toast.named_parameters() if p.requires_grad)


def test_fit_with_the_shared_trainer_saves_and_loads(convnext, tiny_task, tmp_path):
    from frozenlens.backbones.base import state_dict_sha256
    from frozenlens.data import load_task
    from frozenlens.errors import AdapterError
    from frozenlens.train.images import ImageData
    from frozenlens.train.trainer import TrainConfig, train

    before = state_dict_sha256(convnext)
    toast = ConvNeXtTOAST(convnext, 3, img_size=32)
    data = ImageData.from_task(load_task(tiny_task), "train", toast)
    assert data.pixels.shape[-1] == 32
    start = {k: v.clone() for k, v in toast.state_dict().items()}
    losses = train(toast, data, TrainConfig(optimizer="adamw", lr=3e-3, epochs=4, warmup_epochs=0, batch_size=12))
    assert losses[-1] < losses[0]
    end = toast.state_dict()
    assert all(not torch.equal(start[k], end[k]) for k in ("head.weight", "selection.task_embedding",
                                                            "feedback.3_1.top_down.weight",
                                                            "feedback.0_0.top_down.weight"))
    assert state_dict_sha256(convnext) == before
    toast.save(tmp_path / "a", ["red", "green", "blue"])
    loaded, classes = ConvNeXtTOAST.load(tmp_path / "a", convnext)
    images = data.images(torch.arange(3))
    with torch.no_grad():
        assert torch.equal(loaded({"images": images}), toast({"images": images}))
    assert classes == ["red", "green", "blue"]
    import timm

    with pytest.raises(AdapterError, match="other ConvNeXt weights"):
        ConvNeXtTOAST.load(tmp_path / "a", timm.create_model("convnext_atto", pretrained=False))


def test_a_vit_is_refused_with_a_clear_error(tiny_backbone):
    from frozenlens.errors import FrozenlensError

    with pytest.raises(FrozenlensError, match="needs a timm ConvNeXt.*not VisionTransformer"):
        ConvNeXtTOAST(tiny_backbone.model, 3)
