"""PETL baselines with the backbone in the loop: each one's defining property, adapters, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from frozenlens.adapter import load_adapter, save_adapter
from frozenlens.backbones.hooks import forward_edited
from frozenlens.cli import main
from frozenlens.data import load_task
from frozenlens.errors import FrozenlensError
from frozenlens.methods import build_method, get_method, method_names
from frozenlens.train.images import ImageData
from frozenlens.train.trainer import TrainConfig, count_trainable, evaluate, train
from tests.conftest import adapter_folder

PETL = ["full", "partial", "bitfit", "lora", "vpt-shallow", "vpt-deep", "adaptformer", "vqt+vpt", "vqt+adaptformer"]
STARTS_AT_BACKBONE = ["full", "partial", "bitfit", "lora", "adaptformer"]
TINY = TrainConfig(epochs=1, warmup_epochs=0, batch_size=12, lr=1e-3, optimizer="adamw")


def _images(backbone, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def train_data(tiny_task, tiny_backbone) -> ImageData:
    return ImageData.from_task(load_task(tiny_task), "train", tiny_backbone)


def test_all_baselines_are_registered_in_loop_and_have_a_grid():
    assert set(PETL) <= set(method_names())
    for name in PETL:
        method = get_method(name)
        assert method.in_loop and method.grid and method.taps(method.config_class(), {}) == []
    assert get_method("lora").config_class().rank == 4
    assert get_method("adaptformer").config_class().bottleneck == 64
    assert get_method("adaptformer").config_class().scale == 0.1
    assert get_method("partial").config_class().blocks == 1


@pytest.mark.parametrize("name", STARTS_AT_BACKBONE)
def test_the_start_equals_the_frozen_backbone(name, tiny_backbone):
    method = build_method(name, None, tiny_backbone, 3).eval()
    images = _images(tiny_backbone)
    tokens = method.model.forward_features(images) if name == "full" else method.tokens(images)
    assert torch.equal(tokens, tiny_backbone(images))


@pytest.mark.parametrize("name", PETL)
def test_only_the_method_trains_and_the_backbone_gets_no_gradient(name, tiny_backbone):
    method = build_method(name, None, tiny_backbone, 3).train()
    backbone_params = {id(p) for p in tiny_backbone.parameters()}
    assert not backbone_params & {id(p) for p in method.parameters()}
    assert count_trainable(method) == sum(p.numel() for p in method.state_dict().values()) - _buffers(method)
    part = method.petl if name.startswith("vqt+") else method    # combinations: stage 1 trains the PETL part
    part.train()
    with torch.no_grad():
        part.head.weight.normal_()      # the head starts at zero, which would block every other gradient
    logits = part({"images": _images(tiny_backbone)})
    logits.sum().backward()
    assert all(p.grad is None for p in tiny_backbone.parameters())
    trained = [n for n, p in part.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any(n.startswith("head.") for n in trained)
    assert len(trained) > 2 or name == "vpt-shallow"


@pytest.mark.parametrize("name", PETL)
def test_every_baseline_starts_with_a_zero_head(name, tiny_backbone):
    """Equal logits at the start (loss log C), whatever the scale of the backbone's features."""
    method = build_method(name, None, tiny_backbone, 3).eval()
    part = method.petl if name.startswith("vqt+") else method
    with torch.no_grad():
        logits = part({"images": _images(tiny_backbone)})
    assert torch.count_nonzero(logits) == 0


def _buffers(method) -> int:
    return sum(b.numel() for b in method.buffers())


def test_trainable_counts_are_what_each_paper_trains(tiny_backbone):
    dim, depth, classes = tiny_backbone.dim, tiny_backbone.depth, 3
    head = dim * classes + classes
    counts = {n: count_trainable(build_method(n, None, tiny_backbone, classes)) for n in PETL}
    assert counts["lora"] == depth * 3 * (4 * dim + dim * 4) + head
    assert counts["adaptformer"] == depth * (dim * 64 + 64 + 64 * dim + dim) + head
    assert counts["vpt-shallow"] == 10 * dim + head and counts["vpt-deep"] == depth * 10 * dim + head
    biases = sum(p.numel() for n, p in tiny_backbone.model.named_parameters() if n.endswith("bias"))
    assert counts["bitfit"] == biases + head
    assert counts["full"] == sum(p.numel() for p in tiny_backbone.parameters()) + head
    block = sum(p.numel() for p in tiny_backbone.model.blocks[-1].parameters())
    norm = sum(p.numel() for p in tiny_backbone.model.norm.parameters())
    assert counts["partial"] == block + norm + head
    vqt = count_trainable(build_method("vqt", None, tiny_backbone, classes))
    assert counts["vqt+vpt"] == counts["vpt-deep"] + vqt
    with pytest.raises(FrozenlensError, match="blocks=0"):
        build_method("partial", {"blocks": 0}, tiny_backbone, 3)
    with pytest.raises(FrozenlensError, match="targets"):
        build_method("lora", {"targets": "qx"}, tiny_backbone, 3)


@pytest.mark.parametrize("name", ["full", "partial"])
def test_weight_tuning_never_touches_the_shared_backbone(name, tiny_backbone, train_data):
    before = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    method = build_method(name, None, tiny_backbone, 3)
    method.fit(train_data, TINY.updated(lr=1e-2))
    assert all(torch.equal(tiny_backbone.state_dict()[k], v) for k, v in before.items())
    tuned = method.model.state_dict() if name == "full" else method.blocks[0].state_dict()
    reference = tiny_backbone.model.state_dict() if name == "full" else tiny_backbone.model.blocks[-1].state_dict()
    assert any(not torch.equal(tuned[k], reference[k]) for k in reference)   # the copy did train


def test_lora_and_adaptformer_change_what_they_should(tiny_backbone):
    images = _images(tiny_backbone)
    lora = build_method("lora", {"targets": "qv"}, tiny_backbone, 3).eval()
    with torch.no_grad():
        lora.updates[0].up.fill_(0.1)
    block = tiny_backbone.model.blocks[0]
    x = block.norm1(tiny_backbone.embed(images))
    edited = lora.edits(4).modules["blocks.0.attn.qkv"](block.attn.qkv)(x)
    delta = edited - block.attn.qkv(x)
    dim = tiny_backbone.dim
    assert delta[..., dim:2 * dim].abs().max() == 0                     # k untouched with targets=qv
    assert delta[..., :dim].abs().max() > 0 and delta[..., 2 * dim:].abs().max() > 0
    assert not torch.equal(lora.tokens(images), tiny_backbone(images))

    adapt = build_method("adaptformer", None, tiny_backbone, 3).eval()
    with torch.no_grad():
        adapt.adapters[5].up.bias.fill_(1.0)
    outputs, plain = {}, {}
    adapt_tokens = forward_edited(tiny_backbone, images, adapt.edits(4), outputs=outputs)
    forward_edited(tiny_backbone, images, None, outputs=plain)
    assert torch.equal(outputs[4], plain[4])                            # blocks before 5: unchanged
    assert torch.allclose(outputs[5] - plain[5], torch.full_like(plain[5], 0.1), atol=1e-5)
    assert not torch.equal(adapt_tokens, tiny_backbone(images))


def test_vpt_deep_replaces_prompts_and_keeps_patch_tokens(tiny_backbone):
    images = _images(tiny_backbone)
    deep = build_method("vpt-deep", {"num_prompts": 3}, tiny_backbone, 3).eval()
    inputs, outputs = {}, {}
    tokens = forward_edited(tiny_backbone, images, deep.edits(4), inputs=inputs, outputs=outputs)
    plain = tiny_backbone.embed(images)
    assert tokens.shape[1] == tiny_backbone.num_tokens + 3
    assert torch.equal(inputs[0][:, :1], plain[:, :1]) and torch.equal(inputs[0][:, 4:], plain[:, 1:])
    for layer in range(tiny_backbone.depth):
        assert torch.equal(inputs[layer][:, 1:4], deep.prompts[layer].expand(4, -1, -1))
        if layer:   # every other token is the previous block's output, in order
            assert torch.equal(inputs[layer][:, :1], outputs[layer - 1][:, :1])
            assert torch.equal(inputs[layer][:, 4:], outputs[layer - 1][:, 4:])
    assert not torch.allclose(tokens[:, 0], tiny_backbone(images)[:, 0])   # the CLS path differs

    shallow = build_method("vpt-shallow", {"num_prompts": 3}, tiny_backbone, 3).eval()
    inputs, outputs = {}, {}
    forward_edited(tiny_backbone, images, shallow.edits(4), inputs=inputs, outputs=outputs)
    assert torch.equal(inputs[0][:, 1:4], shallow.prompts[0].expand(4, -1, -1))
    assert all(torch.equal(inputs[i], outputs[i - 1]) for i in range(1, tiny_backbone.depth))  # input only
    assert shallow.prompts.shape[0] == 1


def test_vqt_on_adaptformer_reads_adapted_blocks_and_keeps_stage_one(tiny_backbone, train_data):
    combo = build_method("vqt+adaptformer", {"bottleneck": 8}, tiny_backbone, 3)
    combo.fit(train_data, TINY)
    adapters = {k: v.clone() for k, v in combo.petl.state_dict().items()}
    with torch.no_grad():
        for adapter in combo.petl.adapters:
            adapter.up.bias.fill_(0.5)
    batch = {"images": train_data.images(torch.arange(4))}
    combo.eval()
    inputs = {}
    with torch.no_grad():
        tokens = combo.petl.tokens(batch["images"], inputs=inputs)
        from frozenlens.methods.vqt.query_attention import backbone_blocks, input_taps
        taps = {t.key: inputs[i] for i, t in enumerate(input_taps(tiny_backbone.depth))}
        taps["final:cls"] = tokens[:, 0]
        frozen_blocks = combo.vqt.classify(combo.vqt.features(taps, normed=False,
                                                              blocks=backbone_blocks(tiny_backbone)))
        assert not torch.allclose(combo(batch), frozen_blocks)        # queries pass the adapter branch
    combo.petl.load_state_dict(adapters)
    assert all(p.requires_grad for p in combo.petl.parameters())       # unfrozen after stage 2


@pytest.mark.parametrize("name", ["vqt+adaptformer", "vqt+vpt"])
def test_stage_two_from_adapted_activations_equals_it_in_the_loop(name, tiny_backbone, train_data):
    """Stage 2 trains from the adapted model's activations, computed once; with them kept in float32
    it gives the model that training with the adapted model in the loop gives (same seed and order)."""
    settings = {"activations_dtype": "float32", "query_dropout": 0.0, "bottleneck": 8, "num_prompts": 2}
    combo = build_method(name, {k: v for k, v in settings.items() if hasattr(
        get_method(name).config_class(), k)}, tiny_backbone, 3)
    combo.petl.fit(train_data, TINY)
    stage_one = {k: v.clone() for k, v in combo.petl.state_dict().items()}
    query_cfg = combo.query_config(TrainConfig(epochs=2, warmup_epochs=0, batch_size=12, seed=3))
    assert query_cfg.optimizer == "adam" and query_cfg.lr == pytest.approx(0.05 / 128 * 12)
    batch = {"images": train_data.images(torch.arange(6))}

    activations = combo.adapted_activations(train_data, query_cfg)
    assert set(activations.features) == {*(f"block.{i}:tokens" for i in range(tiny_backbone.depth - 1)),
                                         "embed:tokens", "final:cls"}
    combo.vqt.read_through(combo.adapted_blocks())
    combo.vqt.fit(activations, query_cfg)
    with torch.no_grad():
        from_activations = combo.eval()(batch)

    combo.vqt.reset_trainable(query_cfg.seed)
    combo.petl.requires_grad_(False)
    train(combo.query_stage(), train_data, query_cfg)
    with torch.no_grad():
        in_the_loop = combo.eval()(batch)
    assert torch.allclose(from_activations, in_the_loop, atol=1e-4), (from_activations - in_the_loop).abs().max()
    assert all(torch.equal(v, stage_one[k]) for k, v in combo.petl.state_dict().items())   # stage 1 untouched


def test_stage_two_recipe_is_chosen_on_held_out_data(tiny_backbone, train_data, tiny_task):
    """With val (the protocol's grid search) the kept stage 2 is the grid point best on val; without,
    both stages fit without a holdout of the training data, which ranks the grid points, and the
    winner's recipe is refitted (both stages) on all of it."""
    val = ImageData.from_task(load_task(tiny_task), "val", tiny_backbone)
    combo = build_method("vqt+vpt", {"num_prompts": 2, "activations_dtype": "float32"}, tiny_backbone, 3)
    combo.fit(train_data, TINY, val=val)
    choice, grid = combo.choices(), combo.query_grid(TINY)
    assert len(grid) == len(choice["held_out_accuracy"]) == 20            # VQT's 5 lrs x 4 weight decays
    assert grid[0].lr == pytest.approx(1.0 / 256 * TINY.batch_size) and grid[0].optimizer == "adam"
    best = max(choice["held_out_accuracy"].values())
    assert choice["held_out_accuracy"][f"lr={choice['query_lr']:g} wd={choice['query_weight_decay']:g}"] == best
    assert evaluate(combo, val) == pytest.approx(best)                      # the kept model is the winner

    refit = build_method("vqt+vpt", {"num_prompts": 2, "holdout_fraction": 0.25}, tiny_backbone, 3)
    stage_one_sizes, fit_stage_one = [], refit.petl.fit
    refit.petl.fit = lambda data, *a, **k: stage_one_sizes.append(len(data)) or fit_stage_one(data, *a, **k)
    losses = refit.fit(train_data, TINY)
    assert len(losses) == 1 + 20 + 1 + 1        # stage 1, the candidates, both stages refitted (1 epoch each)
    rest, held_out = train_data.holdout(0.25, seed=TINY.seed)
    assert stage_one_sizes == [len(rest), len(train_data)]   # the ranking holdout was unseen by stage 1
    assert refit.choices()["query_lr"] in {c.lr for c in grid}
    fixed = build_method("vqt+vpt", {"num_prompts": 2, "query_search": False}, tiny_backbone, 3)
    assert len(fixed.fit(train_data, TINY)) == 2 and fixed.choices() == {}


def test_query_stage_recipe_can_be_set(tiny_backbone):
    combo = build_method("vqt+vpt", {"query_lr": 0.003, "query_weight_decay": 0.0}, tiny_backbone, 3)
    cfg = combo.query_config(TrainConfig(epochs=1, batch_size=64, lr=0.1, optimizer="sgd", weight_decay=0.5))
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.batch_size) == ("adam", 0.003, 0.0, 64)
    with pytest.raises(FrozenlensError, match="activations_dtype"):
        build_method("vqt+vpt", {"activations_dtype": "int8"}, tiny_backbone, 3)


def test_adapters_hold_only_what_was_trained_and_round_trip(tiny_backbone, train_data, tmp_path):
    for name in ["lora", "vqt+vpt", "bitfit"]:
        method = build_method(name, {"num_prompts": 2} if name == "vqt+vpt" else None, tiny_backbone, 3)
        method.fit(train_data, TINY)
        folder = save_adapter(tmp_path / name, method, ["r", "g", "b"])
        stored = load_file(str(folder / "adapter.safetensors"))
        assert set(stored) == set(method.state_dict())
        assert not any(k.startswith(("blocks.", "patch_embed", "model.")) for k in stored)
        assert sum(v.numel() for v in stored.values()) == count_trainable(method) + _buffers(method)
        adapter_ = load_adapter(folder, tiny_backbone)
        loaded, meta = adapter_.method, adapter_.meta
        batch = {"images": train_data.images(torch.arange(5))}
        method.eval()
        with torch.no_grad():
            assert torch.equal(loaded(batch), method(batch))
        assert meta["taps"] == []


def test_cli_fits_and_predicts_petl_methods(tiny_task, tmp_path, capsys):
    from tests.conftest import TINY_BACKBONE

    out = tmp_path / "run"
    code = main(["fit", str(tiny_task), "--method", "lora:epochs=1,batch_size=16", "--method",
                 "vpt-deep:epochs=1,num_prompts=2", "--backbone", TINY_BACKBONE, "--img-size", "32",
                 "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["spec"] for r in results["results"]] == ["lora:epochs=1,batch_size=16", "vpt-deep:epochs=1,num_prompts=2"]
    assert results["context"]["store"] is None and "activation store" not in capsys.readouterr().out
    image = next((tiny_task / "images" / "red").glob("test_*.png"))
    assert main(["predict", str(adapter_folder(out, "vpt-deep:epochs=1,num_prompts=2")), str(image), "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["image"] == str(image) and len(line["top"]) == 3
