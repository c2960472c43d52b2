"""InCA and Open-InCA on a frozen text encoder (offline all-MiniLM-L6-v2): every adapter's
cross-attention gives padded tokens zero weight, so no slot's logits depend on padding;
parallel training from in-memory taps runs and selects a layer, and stacked training (ranking
on val) equals training alone. Shared helpers live in ``tests/test_mist_text.py``."""

from __future__ import annotations

import pytest
import torch

from frozenlens.backbones.text import MASK_KEY
from frozenlens.methods import build_method
from frozenlens.methods.inca import StackedCrossAttention
from frozenlens.train.data import TapData
from frozenlens.train.trainer import TrainConfig, predict_logits
from tests.test_mist_text import (
    FAST,
    LABELS,
    LONG,
    SHORT,
    TEXT_INFO,
    TEXTS,
    assert_padding_invariant,
    logits_of,
    randomize,
    taps_of,
    text_data,
)

SPECS = [("inca", {"layers": "1+3+5", "num_queries": 2}), ("inca", {"layers": "all", "head_hidden": 16}),
         ("open-inca", {"layers": "2+5"})]


# -- unit tests: no transformers needed --------------------------------------------------------


def test_masked_cross_attention_equals_attention_over_the_real_tokens():
    torch.manual_seed(0)
    attn = StackedCrossAttention(slots=2, dim=8, num_heads=2).requires_grad_(False)
    randomize(attn, scale=0.3)
    queries = torch.randn(2, 3, 8)
    tokens = torch.randn(2, 2, 7, 8)
    tokens[:, 1, 4:] = 40.0   # garbage in example 1's padded rows
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    out = attn.attend(attn.normalize(tokens), queries, mask)
    torch.testing.assert_close(out[:, 1], attn.attend(attn.normalize(tokens[:, 1:, :4]), queries)[:, 0])
    torch.testing.assert_close(out[:, 0], attn.attend(attn.normalize(tokens[:, :1]), queries)[:, 0])
    everything = torch.ones(2, 7, dtype=torch.bool)
    torch.testing.assert_close(attn.attend(attn.normalize(tokens), queries, everything),
                               attn.attend(attn.normalize(tokens), queries))
    assert not torch.allclose(attn.attend(attn.normalize(tokens), queries)[:, 1], out[:, 1], atol=1e-2)


@pytest.mark.parametrize("name, config", [("inca", {"layers": "0+2"}), ("open-inca", {"layers": "all"})])
def test_text_adapters_read_the_mask_beside_their_tokens(name, config):
    model = build_method(name, config, TEXT_INFO, 3)
    randomize(model, scale=0.3)
    assert model.modalities == ("image", "text") and model.tap_keys()[-1] == MASK_KEY
    assert MASK_KEY not in model.token_keys and len(model.token_keys) == model.num_slots
    g = torch.Generator().manual_seed(0)
    real = {k: torch.randn(2, 4, 8, generator=g) for k in model.token_keys}
    padded = {k: torch.cat([v, torch.randn(2, 6, 8, generator=g) * 30], dim=1) for k, v in real.items()}
    mask = torch.cat([torch.ones(2, 4), torch.zeros(2, 6)], dim=1)
    reference = model.slot_logits({**real, MASK_KEY: torch.ones(2, 4)})
    torch.testing.assert_close(model.slot_logits({**padded, MASK_KEY: mask}), reference)
    torch.testing.assert_close(model.slot_logits({**padded, MASK_KEY: mask.bool()}), reference)


# -- on all-MiniLM-L6-v2 -------------------------------------------------------------------------


@pytest.mark.parametrize("name, config", SPECS)
def test_every_slot_is_padding_invariant(minilm, name, config):
    model = build_method(name, config, minilm, 3)
    randomize(model, scale=0.3)
    assert_padding_invariant(minilm, model, model.slot_logits)   # (L, B, C): each adapter
    assert_padding_invariant(minilm, model)                      # their mean


@pytest.mark.parametrize("name, config", SPECS[::2])
def test_float_and_bool_masks_give_the_same_logits(minilm, name, config):
    model = build_method(name, config, minilm, 2)
    randomize(model, scale=0.3)
    features = taps_of(minilm, model, SHORT + [LONG])
    as_float = {**features, MASK_KEY: features[MASK_KEY].float()}
    assert torch.equal(logits_of(model, as_float), logits_of(model, features))


@pytest.mark.parametrize("name", ["inca", "open-inca"])
def test_parallel_adapters_train_on_text_and_select_a_layer(minilm, name):
    """All six layers train together on 80% of 40 texts, are ranked on the rest, the best is refitted."""
    model = build_method(name, {"layers": "all"}, minilm, 2)
    data = text_data(minilm, model)
    losses = model.fit(data, FAST)
    assert len(losses) == 2 * FAST.epochs and all(torch.isfinite(torch.tensor(losses)))
    assert sorted(model.layer_accuracies) == list(range(6)) and model.num_slots == 1
    assert model.layer_accuracies[model.config.layers[0]] == max(model.layer_accuracies.values())
    assert predict_logits(model, data).shape == (len(TEXTS), 2)


def test_open_inca_adds_a_class_on_text_without_moving_old_logits(minilm):
    model = build_method("open-inca", {"layers": "4"}, minilm, 2)
    data = text_data(minilm, model)
    model.fit(data, FAST)
    features = taps_of(minilm, model, SHORT + [LONG])
    before = logits_of(model, features)
    model.add_classes(1)
    model.fit(TapData(data.features, torch.where(LABELS == 1, 2, LABELS), 3), FAST)
    assert torch.equal(logits_of(model, features)[:, :2], before)


@pytest.mark.parametrize("name, config", [("inca", {"layers": "2+5"}), ("open-inca", {"layers": "1+4"})])
def test_stacked_fit_many_with_val_equals_training_alone(minilm, name, config):
    """Configurations ranking their layers on val train in lockstep, exactly as each alone."""
    cfgs = [TrainConfig(epochs=2, warmup_epochs=1, batch_size=8, lr=lr, weight_decay=wd, seed=seed, order_seed=7)
            for lr, wd, seed in ((3e-3, 1e-2, 0), (1e-3, 1e-4, 1))]
    models = [build_method(name, config, minilm, 2) for _ in cfgs]
    data = text_data(minilm, models[0])
    train, val = data.holdout(0.25, seed=3)
    type(models[0]).fit_many(models, train, cfgs, val=val)
    for model, cfg in zip(models, cfgs):
        alone = build_method(name, config, minilm, 2)
        alone.fit(train, cfg, val=val)
        assert alone.config.layers == model.config.layers
        assert alone.layer_accuracies == model.layer_accuracies
        torch.testing.assert_close(predict_logits(alone, val), predict_logits(model, val), atol=1e-5, rtol=0)
