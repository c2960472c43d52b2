"""MIST and LAST on a frozen text encoder (offline all-MiniLM-L6-v2): padded tokens never reach
an attention key or a pooled feature, so logits do not depend on padding; training from
in-memory taps runs, chooses its gather depth, and stacked training equals training alone.

The helpers here (texts, the module-scoped backbone, tap data) are shared with
``tests/test_inca_text.py``.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import nn

from frozenlens.backbones.text import MASK_KEY
from frozenlens.methods import build_method
from frozenlens.methods.base import Method
from frozenlens.methods.layers import masked_token_mean, token_mask
from frozenlens.methods.mist import LowRankAttentionBlock, gather_key, gathered_data
from frozenlens.train.data import TapData
from frozenlens.train.trainer import TrainConfig, evaluate, predict_logits

_TOPICS = {  # two classes: animals outdoors, cooking
    0: (["The dog", "A small cat", "The old horse", "A wild fox", "The parrot"],
        ["ran across the field", "slept in the warm sun all afternoon long", "chased a bird by the river",
         "hid under the barn"]),
    1: (["The chef", "My grandmother", "A baker", "The cook", "Our neighbour"],
        ["baked fresh bread with butter and flour", "stirred the soup", "roasted vegetables in a hot oven "
         "for an hour", "sliced onions for the stew"]),
}
TEXTS = [f"{who} {what}." for label in _TOPICS for who in _TOPICS[label][0] for what in _TOPICS[label][1]]
LABELS = torch.tensor([label for label in _TOPICS for _ in _TOPICS[label][0] for _ in _TOPICS[label][1]])
SHORT = ["A cat sat on the mat.", "ok", "The baker sliced warm bread for everyone in the kitchen."]
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 25)  # ~225 word pieces
TEXT_INFO = {"name": "fake-text", "weights_hash": "abc", "modality": "text", "dim": 8, "depth": 3,
             "num_heads": 2, "num_prefix_tokens": 1}
"""A text backbone's description without weights: for the unit tests that need no transformers."""

FAST = TrainConfig(epochs=2, warmup_epochs=1, batch_size=8, lr=3e-3, weight_decay=1e-4)


# -- helpers shared with tests/test_inca_text.py ----------------------------------------------


def taps_of(backbone: Any, method: Method, texts: list[str] | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ``method`` reads for ``texts`` (a list, or a tokenized batch), with the bool mask."""
    with torch.no_grad():
        return backbone.forward_taps(texts, method.taps(method.config, method.backbone_info))


def text_data(backbone: Any, method: Method, texts: list[str] = TEXTS, labels: torch.Tensor = LABELS) -> TapData:
    """In-memory training data as a store would hold it: one padded length, the mask as float 0./1."""
    features = taps_of(backbone, method, texts)
    features[MASK_KEY] = features[MASK_KEY].float()
    return TapData(features, labels, int(labels.max()) + 1)


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Move every parameter away from its (near-zero) start so every part of the model matters;
    LayerNorm scales stay near one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            p.copy_(1 + noise if "norm" in name and name.endswith("weight") else noise)


def logits_of(model: Method, features: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(features)


def unmasked(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same features with every position marked real: what forgetting the mask would read."""
    return {**features, MASK_KEY: torch.ones_like(features[MASK_KEY])}


def assert_padding_invariant(backbone: Any, model: Method,
                             output: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None) -> None:
    """Logits of SHORT batched alone equal those beside LONG and those padded to a store's fixed
    length; the same padded batch read without its mask differs (so the check can fail).
    ``output`` maps features to ``(..., B, C)`` (default: the model's logits)."""
    output = output or model
    model.eval()
    n = len(SHORT)
    alone = taps_of(backbone, model, SHORT)
    beside = taps_of(backbone, model, SHORT + [LONG])
    fixed = taps_of(backbone, model, backbone.tokenize(SHORT, pad_to=96))
    assert beside[MASK_KEY].shape[1] > alone[MASK_KEY].shape[1] + 100 and not alone[MASK_KEY].all()
    with torch.no_grad():
        reference = output(alone)
        for padded in (beside, fixed):
            torch.testing.assert_close(output(padded)[..., :n, :], reference, atol=1e-4, rtol=1e-4)
        forgotten = output(unmasked(beside))[..., :n, :]
    assert float((forgotten - reference).abs().max()) > 1e-2, "the mask must matter for this check to mean anything"


def assert_same_weights(a: nn.Module, b: nn.Module, atol: float = 1e-5) -> None:
    for (name, x), (_, y) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        torch.testing.assert_close(x.float(), y.float(), atol=atol, rtol=0, msg=name)


# -- unit tests: no transformers needed --------------------------------------------------------


def test_token_mask_reads_bool_and_float_masks_and_is_none_on_images():
    bool_mask = torch.tensor([[True, True, False], [True, False, False]])
    for given in (bool_mask, bool_mask.float(), bool_mask.half()):
        assert torch.equal(token_mask({MASK_KEY: given, "block.0:tokens": torch.zeros(2, 3, 4)}), bool_mask)
    assert token_mask({"block.0:tokens": torch.zeros(2, 3, 4)}) is None
    tokens = torch.randn(2, 3, 4)
    assert torch.equal(masked_token_mean(tokens, None), tokens.mean(1))
    torch.testing.assert_close(masked_token_mean(tokens, bool_mask)[1], tokens[1, 0])


def test_masked_block_equals_the_block_on_the_real_tokens_alone():
    """Garbage in padded rows changes no real row; an all-real mask equals no mask (the image path)."""
    torch.manual_seed(0)
    block = LowRankAttentionBlock(8, qkv_dim=4, num_heads=2).requires_grad_(False)
    randomize(block)
    x = torch.randn(2, 6, 8)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    garbage = x.clone()
    garbage[1, 3:] = 100.0
    out = block(garbage, mask)
    torch.testing.assert_close(out[0], block(x[:1])[0])
    torch.testing.assert_close(out[1, :3], block(x[1:, :3])[0])
    torch.testing.assert_close(block(x, torch.ones(2, 6, dtype=torch.bool)), block(x))
    assert float((block(garbage)[1, :3] - out[1, :3]).abs().max()) > 1e-2


@pytest.mark.parametrize("name, config", [("mist", {"gather_depth": 2, "lae_blocks": 2, "pool": "mean"}),
                                          ("last", {"pool": "mean"})])
def test_side_networks_read_real_tokens_only(name, config):
    """A text batch padded with garbage rows (and a float mask) gives the logits of the real tokens."""
    model = build_method(name, config, TEXT_INFO, 3)
    randomize(model)
    g = torch.Generator().manual_seed(1)
    keys = model.tap_keys()
    assert keys[-1] == MASK_KEY and model.modalities == ("image", "text")
    real = {k: torch.randn(1, 4, 8, generator=g) for k in keys[:-1]}
    padded = {k: torch.cat([v, torch.randn(1, 5, 8, generator=g) * 50], dim=1) for k, v in real.items()}
    mask = torch.tensor([[1.0] * 4 + [0.0] * 5])
    reference = logits_of(model, {**real, MASK_KEY: torch.ones(1, 4)})
    torch.testing.assert_close(logits_of(model, {**padded, MASK_KEY: mask}), reference)
    assert not torch.allclose(logits_of(model, {**padded, MASK_KEY: torch.ones(1, 9)}), reference, atol=1e-2)


def test_gathered_data_keeps_the_mask():
    g = torch.Generator().manual_seed(0)
    feats = {k: torch.randn(5, 4, 8, generator=g) for k in ("embed:tokens", "block.0:tokens", "block.1:tokens")}
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]]).expand(5, -1)
    data = TapData({**feats, MASK_KEY: mask}, torch.arange(5) % 2, 2)
    gathered = gathered_data(data, 2)
    assert sorted(gathered.features) == sorted([gather_key(2), MASK_KEY])
    assert torch.equal(gathered.features[MASK_KEY], mask)
    assert list(gathered_data(TapData(feats, data.labels, 2), 2).features) == [gather_key(2)]  # images: no mask


# -- on all-MiniLM-L6-v2 -------------------------------------------------------------------------

SPECS = [("mist", {"gather_depth": 4, "lae_blocks": 2}), ("mist", {"gather_depth": 6, "pool": "mean"}),
         ("last", {}), ("last", {"pool": "mean"})]


@pytest.mark.parametrize("name, config", SPECS)
def test_logits_do_not_depend_on_padding(minilm, name, config):
    model = build_method(name, config, minilm, 3)
    randomize(model)
    assert_padding_invariant(minilm, model)


@pytest.mark.parametrize("name, config", SPECS[::2])
def test_float_and_bool_masks_give_the_same_logits(minilm, name, config):
    model = build_method(name, config, minilm, 2)
    randomize(model)
    features = taps_of(minilm, model, SHORT + [LONG])
    as_float = {**features, MASK_KEY: features[MASK_KEY].float()}
    assert torch.equal(logits_of(model, as_float), logits_of(model, features))


def test_mist_chooses_its_gather_depth_on_text_and_trains(minilm):
    """gather_depth=0: one fit per candidate {2, 4, 6} on a holdout of 40 texts, then a refit."""
    model = build_method("mist", {"lae_blocks": 1}, minilm, 2)
    data = text_data(minilm, model)
    assert data.features[MASK_KEY].dtype == torch.float32 and not data.features[MASK_KEY].bool().all()
    losses = model.fit(data, FAST)
    assert model.config.gather_depth in (2, 4, 6) and sorted(model.gather_accuracies) == [2, 4, 6]
    assert len(losses) == 4 * FAST.epochs and all(torch.isfinite(torch.tensor(losses)))
    assert predict_logits(model, data).shape == (len(TEXTS), 2)


def test_side_networks_learn_the_topic(minilm):
    """Long enough to learn: two topics, 40 texts, MIST at k=6 and LAST fit the training texts."""
    cfg = TrainConfig(epochs=15, warmup_epochs=1, batch_size=8, lr=3e-3, weight_decay=0.0)
    for name, config in (("mist", {"gather_depth": 6, "lae_blocks": 1}), ("last", {})):
        model = build_method(name, config, minilm, 2)
        data = text_data(minilm, model)
        losses = model.fit(data, cfg)
        assert losses[-1] < 0.5 * losses[0], name
        assert evaluate(model, data) >= 0.9, name


@pytest.mark.parametrize("name, configs", [
    ("mist", [{"gather_depth": 2, "lae_blocks": 1}, {"gather_depth": 6, "lae_blocks": 1}]),
    ("last", [{}, {}]),
])
def test_stacked_fit_many_equals_training_alone(minilm, name, configs):
    cfgs = [TrainConfig(epochs=2, warmup_epochs=1, batch_size=8, lr=lr, weight_decay=wd, seed=seed, order_seed=7)
            for lr, wd, seed in ((3e-3, 1e-4, 0), (1e-3, 0.0, 1))]
    models = [build_method(name, config, minilm, 2) for config in configs]
    data = text_data(minilm, models[-1])
    type(models[0]).fit_many(models, data, cfgs)
    for model, config, cfg in zip(models, configs, cfgs):
        alone = build_method(name, config, minilm, 2)
        alone.fit(data, cfg)
        assert_same_weights(alone, model)
