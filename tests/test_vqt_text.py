"""VQT on a frozen text encoder (offline all-MiniLM-L6-v2): padding masked everywhere, tokens untouched,
the BERT layer view equal to BertLayer itself, training from in-memory taps, stacked equal to alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from frozenlens.backbones.taps import Tap
from frozenlens.errors import FrozenlensError
from frozenlens.methods import build_method
from frozenlens.methods.vqt.query_attention import (
    backbone_blocks,
    check_block,
    forward_with_queries,
    input_taps,
    query_block,
)
from frozenlens.train.data import TapData
from frozenlens.train.trainer import TrainConfig, predict_logits

MASK = "attention_mask"
TEXTS = [
    "A cat sat on the mat.",
    "ok",
    "Frozen transformers can be read without changing a single weight, layer after layer.",
]
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 25)  # ~225 word pieces
TOPICS = {
    "animals": (["The dog", "A small cat", "The old horse", "A hungry fox"],
                ["chased a rabbit", "slept in the barn", "drank from the river"]),
    "weather": (["Heavy rain", "A cold wind", "Thick fog", "Bright sunshine"],
                ["covered the valley", "arrived this morning", "is expected all week"]),
    "food": (["Fresh bread", "A bowl of soup", "The spicy curry", "Chocolate cake"],
             ["was served for dinner", "tasted wonderful", "needs more salt"]),
}
FAST = TrainConfig(optimizer="adam", epochs=3, warmup_epochs=1, batch_size=8, lr=0.02, seed=5)
GRID = [(1e-2, 1e-2), (1e-3, 0.0), (3e-3, 1e-4)]
"""(lr, weight decay) of the stacked configurations."""


def _texts_and_labels() -> tuple[list[str], list[int]]:
    """36 short texts in 3 topics (plus padding variety: some with a long tail)."""
    texts, labels = [], []
    for label, (subjects, endings) in enumerate(TOPICS.values()):
        for i, subject in enumerate(subjects):
            for j, ending in enumerate(endings):
                tail = " and everyone talked about it for days" * ((i + j) % 3)
                texts.append(f"{subject} {ending}{tail}.")
                labels.append(label)
    return texts, labels


def _taps(method) -> list[Tap]:
    return [Tap.parse(k) for k in method.tap_keys() if k != MASK]


def _vqt(minilm, config=None, seed: int = 0):
    method = build_method("vqt", config or {"num_queries": 2}, minilm, 3).eval()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.nn.init.normal_(method.queries, std=0.5)
    return method


@pytest.fixture(scope="module")
def text_data(minilm) -> TapData:
    """Taps of every text as a store would hold them: float16 token maps, float 0/1 mask."""
    texts, labels = _texts_and_labels()
    method = build_method("vqt", None, minilm, 3)
    with torch.no_grad():
        taps = minilm.forward_taps(texts, _taps(method))
    features = {k: v.half() if k != MASK else v.float() for k, v in taps.items()}
    return TapData(features, torch.tensor(labels), 3)


def _cfgs(seeds=(0, 1, 2)) -> list[TrainConfig]:
    return [TrainConfig(epochs=2, batch_size=8, optimizer="adamw", lr=lr, weight_decay=wd, warmup_epochs=1,
                        seed=seed, order_seed=7) for (lr, wd), seed in zip(GRID, seeds)]


def test_vqt_reads_text_taps_block_inputs_then_cls_then_mask(minilm):
    method = build_method("vqt", None, minilm, 3)
    assert "text" in type(method).modalities
    assert method.tap_keys() == [t.key for t in input_taps(minilm.depth)] + ["final:cls", MASK]
    assert len(backbone_blocks(minilm)) == minilm.depth


@pytest.mark.parametrize("pooled", ["cls", "patch_mean"])
def test_logits_do_not_depend_on_padding_and_the_mask_is_what_keeps_them_so(minilm, pooled):
    method = _vqt(minilm, {"num_queries": 2, "pooled": pooled})
    assert f"final:{pooled}" in method.tap_keys()
    taps = _taps(method)
    with torch.no_grad():
        alone = minilm.forward_taps(TEXTS, taps)
        beside = minilm.forward_taps(TEXTS + [LONG], taps)
        assert beside[MASK].shape[1] > alone[MASK].shape[1] + 100
        logits = method(alone)
        torch.testing.assert_close(method(beside)[:3], logits, atol=1e-4, rtol=1e-4)
        for a, b in zip(method.summaries(alone, normed=False), method.summaries(beside, normed=False)):
            torch.testing.assert_close(b[:3], a, atol=1e-5, rtol=1e-5)
        stored = dict(beside, **{MASK: beside[MASK].half().float()})   # the store's float 0/1 mask
        torch.testing.assert_close(method(stored)[:3], logits, atol=1e-4, rtol=1e-4)
        unmasked = dict(beside, **{MASK: torch.ones_like(beside[MASK])})
        assert (method(unmasked)[:3] - logits).abs().max() > 1e-2, "padding must matter without the mask"


def test_queries_leave_every_original_activation_bit_identical(minilm):
    """The backbone's own pass, with queries at every layer, is the pass without them; and the
    live query outputs (over un-zeroed padded states) equal those from the zero-padded taps."""
    method = _vqt(minilm)
    taps = _taps(method) + [Tap("final", "tokens"), Tap("final", "patch_mean")]
    batch = TEXTS + [LONG]
    with torch.no_grad():
        plain = minilm.forward_taps(batch, taps)
        with_queries, outputs = forward_with_queries(minilm, batch, list(method.queries), taps)
        stored = method.summaries(plain, normed=False)
    assert set(plain) == set(with_queries)
    for key in plain:
        assert torch.equal(plain[key], with_queries[key]), key
    assert all(o.shape == (4, 2, minilm.dim) for o in outputs)
    for layer, (live, taped) in enumerate(zip(outputs, stored)):
        torch.testing.assert_close(live, taped, atol=1e-5, rtol=1e-5, msg=f"layer {layer}")


def test_layer_view_equals_bert_layer_for_real_token_queries(minilm):
    """A real token's state fed as a query, over the layer's (masked) tokens, comes out as the
    layer's own output for that token: every token of every layer at once."""
    keys = [t.key for t in input_taps(minilm.depth)] + [f"block.{minilm.depth - 1}:tokens"]
    with torch.no_grad():
        states = minilm.forward_taps(TEXTS + [LONG], [Tap.parse(k) for k in keys])
        mask = states[MASK]
        for index, layer in enumerate(backbone_blocks(minilm)):
            x, expected = states[keys[index]], states[keys[index + 1]]
            ours = query_block(layer, x, x, key_mask=mask)
            torch.testing.assert_close(ours[mask], expected[mask], atol=1e-5, rtol=1e-5, msg=f"layer {index}")


def test_layer_view_equals_bert_layer_with_queries_prepended_and_masked(minilm):
    """The query rows of BertLayer itself on [P, X], where no row may attend to P or to padding."""
    layer = backbone_blocks(minilm)[2]
    with torch.no_grad():
        states = minilm.forward_taps(TEXTS, [Tap("block.1", "tokens")])
        x, mask = states["block.1:tokens"], states[MASK]
        queries = torch.randn(3, minilm.dim, generator=torch.Generator().manual_seed(1))
        count, batch = queries.shape[0], x.shape[0]
        allowed = torch.cat([torch.zeros(batch, count, dtype=torch.bool), mask], dim=1)   # keys: P, then X
        additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        joined = layer(torch.cat([queries.expand(batch, -1, -1), x], dim=1), additive[:, None, None, :])
        ours = query_block(layer, queries, x, key_mask=mask)
    torch.testing.assert_close(ours, joined[:, :count], atol=1e-5, rtol=1e-5)


def test_only_queries_and_head_train_and_the_backbone_gets_no_gradient(minilm, text_data):
    method = build_method("vqt", {"aggregate": "weighted_sum"}, minilm, 3)
    before = {k: v.clone() for k, v in minilm.model.state_dict().items()}
    losses = method.fit(text_data, FAST)
    assert all(not p.requires_grad and p.grad is None for p in minilm.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in minilm.model.state_dict().items())
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable == {"queries", "summary_weights", "head.weight", "head.bias"}
    assert all(torch.isfinite(torch.tensor(losses)))
    assert method.queries.grad is not None and method.queries.grad.abs().sum() > 0


def test_keys_read_the_stored_inputs_as_they_are_no_copy(minilm, text_data):
    """Post-norm layers have no norm1: the training view shares the stored tensors and the mask."""
    method = build_method("vqt", None, minilm, 3)
    normed = method.normed_inputs(text_data)
    for layer, tap in enumerate(input_taps(minilm.depth)):
        assert normed.features[f"norm1.{layer}"] is text_data.features[tap.key]
    assert normed.features[MASK] is text_data.features[MASK]
    method.eval()
    with torch.no_grad():
        torch.testing.assert_close(method.features(normed.float_features(), normed=True),
                                   method.features(text_data.float_features(), normed=False))


def test_stacked_training_equals_training_each_configuration_alone(minilm, text_data, monkeypatch):
    from frozenlens.methods.vqt.stacked import StackedVQT

    config = {"query_dropout": 0.0, "num_queries": 2}
    cfgs = _cfgs()
    stacked_calls = []
    original = StackedVQT.forward
    monkeypatch.setattr(StackedVQT, "forward", lambda self, b: stacked_calls.append(1) or original(self, b))
    models = [build_method("vqt", config, minilm, 3) for _ in cfgs]
    type(models[0]).fit_many(models, text_data, cfgs)
    assert stacked_calls, "VQT on text did not take the stacked path"
    for model, cfg in zip(models, cfgs):
        alone = build_method("vqt", config, minilm, 3)
        alone.fit(text_data, cfg)
        for (key, a), (_, b) in zip(sorted(alone.state_dict().items()), sorted(model.state_dict().items())):
            assert torch.allclose(a.float(), b.float(), atol=2e-4, rtol=1e-3), f"{key} differs"
        assert torch.allclose(predict_logits(alone, text_data), predict_logits(model, text_data), atol=1e-3)


def test_refuses_text_layers_it_cannot_redo(minilm):
    layer = copy.deepcopy(backbone_blocks(minilm)[0])
    check_block(layer)
    layer.attention.self.position_embedding_type = "relative_key"
    with pytest.raises(FrozenlensError, match="absolute"):
        check_block(layer)
    del layer.attention.self.query
    with pytest.raises(FrozenlensError, match="BERT-style"):
        check_block(layer)
    with pytest.raises(FrozenlensError, match="timm"):
        check_block(nn.Linear(4, 4))
