"""TOAST on a frozen text encoder (offline all-MiniLM-L6-v2) and TextData, the in-loop text batches."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from frozenlens.errors import FrozenlensError
from frozenlens.methods import build_method

TEXTS = ["A cat sat on the mat.", "ok", "Frozen encoders read text without changing a weight.",
         "héllo wörld, ünïcode survives"]
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 6)  # ~56 word pieces
TOPICS = {
    "animal": ["cat", "dog", "horse", "sparrow", "whale", "tiger", "rabbit", "wolf", "owl", "goat"],
    "food": ["bread", "cheese", "apple", "soup", "rice", "pasta", "cake", "salad", "honey", "butter"],
    "vehicle": ["car", "truck", "bicycle", "train", "boat", "plane", "tractor", "bus", "scooter", "tram"],
    "weather": ["rain", "snow", "fog", "storm", "hail", "thunder", "drizzle", "frost", "wind", "heat"],
}
PATTERNS = ["the {} was mentioned twice", "a short note about the {}", "everyone talked about the {} today",
            "she wrote a long story about a {}", "{}"]


def _batch(backbone, texts):
    from frozenlens.train.texts import text_batch

    return text_batch(backbone, texts)


def _plain(backbone, batch) -> torch.Tensor:
    """The encoder's own output tokens, padded rows zero (TextBackbone.forward)."""
    with torch.no_grad():
        return backbone(batch)


def _strong(method, backbone, seed: int = 0) -> None:
    """Seeded modules whose top-down signal reaches every layer at a visible size; xi is the mean output
    token of TEXTS, so the feature selection keeps some tokens (a random xi may keep none)."""
    method.reset_trainable(seed)
    batch = _batch(backbone, TEXTS)
    with torch.no_grad():
        tokens = _plain(backbone, batch)
        method.selection.task_embedding.copy_(tokens.sum(dim=(0, 1)) / batch["attention_mask"].sum())
        for layer in method.feedback.values():
            layer.feed_down.weight.copy_(torch.eye(layer.feed_down.weight.shape[0]))
            layer.top_down.weight.normal_(0, 0.05)


def _topic_texts() -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for label, words in enumerate(TOPICS.values()):
        for index, word in enumerate(words):
            texts.append(PATTERNS[index % len(PATTERNS)].format(word))
            labels.append(label)
    return texts, labels


# -- the equations -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["full", "early", "late"])
def test_zero_top_down_signal_gives_the_plain_encoder_exactly(minilm, mode):
    method = build_method("toast", {"feedback": mode, "pool": "cls"}, minilm, 3)
    with torch.no_grad():
        for layer in method.feedback.values():
            layer.top_down.weight.zero_()
    batch = _batch(minilm, TEXTS + [LONG])
    with torch.no_grad():
        passes = method.run(batch)
        plain = _plain(minilm, batch)
    assert torch.equal(passes.tokens, plain)
    assert torch.equal(passes.logits, method.head(plain[:, 0]))       # the CLS token of pass 2
    assert torch.equal(passes.mask, batch["attention_mask"])


def test_the_head_reads_the_masked_mean_by_default_and_the_cls_token_when_asked(minilm):
    batch = _batch(minilm, TEXTS + [LONG])
    mask = batch["attention_mask"]
    with torch.no_grad():
        plain = _plain(minilm, batch)
        mean = plain.sum(dim=1) / mask.sum(dim=1, keepdim=True)    # sentence-transformers' pooling
        for settings, pooled in ((None, mean), ({"pool": "mean"}, mean), ({"pool": "cls"}, plain[:, 0])):
            method = build_method("toast", settings, minilm, 3)
            for layer in method.feedback.values():
                layer.top_down.weight.zero_()
            torch.testing.assert_close(method(batch), method.head(pooled), rtol=0, atol=1e-6)


def test_pass_two_keeps_queries_and_keys_and_adds_the_signal_to_the_values_only(minilm):
    method = build_method("toast", None, minilm, 3)
    _strong(method, minilm)
    batch = _batch(minilm, TEXTS)
    mask = batch["attention_mask"]
    captured: dict[str, list[torch.Tensor]] = {"query": [], "key": [], "attn": []}
    layers = minilm.model.encoder.layer
    hooks = []
    for layer in layers:
        attention = layer.attention.self
        for name in ("query", "key"):
            hooks.append(getattr(attention, name).register_forward_hook(
                lambda _m, _i, out, name=name: captured[name].append(out.detach())))
        hooks.append(attention.register_forward_hook(lambda _m, _i, out: captured["attn"].append(out[0].detach())))
    try:
        with torch.no_grad():
            passes = method.run(batch, record_blocks=True)
    finally:
        for hook in hooks:
            hook.remove()
    depth = len(layers)
    assert all(len(v) == 2 * depth for v in captured.values())      # pass 1, then pass 2
    with torch.no_grad():
        signals = method.feedback_signals(method.selection(_plain(minilm, batch)))
    for index, layer in enumerate(layers):
        attention, x = layer.attention.self, passes.block_inputs[index]
        q, k = captured["query"][depth + index], captured["key"][depth + index]
        assert torch.equal(q, attention.query(x)) and torch.equal(k, attention.key(x))  # Q, K from X alone
        with torch.no_grad():
            values = attention.value(x) + F.linear(signals[index], attention.value.weight)  # W_v (X + X_td) + b_v
            expected = _attend(q, k, values, mask, minilm.num_heads)
            plain = _attend(q, k, attention.value(x), mask, minilm.num_heads)
        ours = captured["attn"][depth + index]
        torch.testing.assert_close(ours[mask], expected[mask], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(ours[mask], plain[mask], atol=1e-3)   # ... and the values moved


def _attend(q, k, v, mask, heads):
    """Softmax attention over the real keys, heads split and merged as BERT does."""
    b, t, d = q.shape
    split = lambda x: x.reshape(b, t, heads, d // heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask[:, None, None, :])
    return out.transpose(1, 2).reshape(b, t, d)


def test_only_toast_parameters_get_gradients_and_the_encoder_none(minilm):
    depth = minilm.depth
    feedback = {f"feedback.{i}.{m}.weight" for i in range(depth) for m in ("feed_down", "top_down")}
    lora = {f"feedback.{i}.{m}.lora_{f}" for i in range(depth) for m in ("feed_down", "top_down") for f in "ab"}
    shared = {"selection.task_embedding", "selection.channel_transform", "head.weight", "head.bias"}
    batch = _batch(minilm, TEXTS)
    for name, expected in (("toast", shared | feedback), ("toast-lite", shared | lora)):
        method = build_method(name, None, minilm, 3)
        _strong(method, minilm)
        assert {n for n, p in method.named_parameters() if p.requires_grad} == expected
        method.run(batch).logits.logsumexp(1).sum().backward()
        assert all(p.grad is None for p in minilm.parameters())
        grads = {n: p.grad for n, p in method.named_parameters() if p.requires_grad}
        assert all(g is not None for g in grads.values())
        assert all(g.abs().sum() > 0 for n, g in grads.items() if ".lora_a" not in n)  # LoRA's B starts at 0


@pytest.mark.parametrize("pool", ["cls", "auto"])
def test_padding_changes_no_logit_and_only_the_mask_keeps_it_out(minilm, pool):
    method = build_method("toast", {"pool": pool}, minilm, 3)
    _strong(method, minilm)
    alone, beside = _batch(minilm, TEXTS), _batch(minilm, TEXTS + [LONG])
    assert beside["input_ids"].shape[1] > 3 * alone["input_ids"].shape[1]
    with torch.no_grad():
        short = method.run(alone)
        padded = method.run(beside)
        unmasked = method(dict(beside, attention_mask=torch.ones_like(beside["attention_mask"])))
        garbage = dict(beside, input_ids=beside["input_ids"].masked_fill(~beside["attention_mask"], 2000))
        other_pad = method(garbage)
    n, width = len(TEXTS), alone["input_ids"].shape[1]
    torch.testing.assert_close(padded.logits[:n], short.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(padded.tokens[:n, :width], short.tokens, rtol=0, atol=1e-4)
    assert torch.all(padded.tokens[:n, width:] == 0) and torch.all(padded.token_weights[~beside["attention_mask"]] == 0)
    torch.testing.assert_close(other_pad, padded.logits, rtol=0, atol=1e-5)   # nothing reads a padded token
    assert (unmasked[:n] - short.logits).abs().max() > 1e-2                   # ... because of the mask


def test_variational_loss_reads_real_tokens_and_trains_only_feed_down(minilm):
    from frozenlens.methods.toast.model import steering_objective

    method = build_method("toast", {"variational_weight": 0.5}, minilm, 3)
    _strong(method, minilm)
    batch, labels = _batch(minilm, TEXTS + [LONG]), torch.tensor([0, 1, 2, 0, 1])
    passes = method.run(batch, record_blocks=True)
    mask = batch["attention_mask"]
    assert sorted(passes.block_inputs) == list(range(minilm.depth))
    expected = sum(F.mse_loss(passes.block_outputs[i][mask] @ method.feedback[str(i)].feed_down.weight.T,
                              passes.block_inputs[i][mask]) for i in range(minilm.depth))
    everywhere = sum(F.mse_loss(passes.block_outputs[i] @ method.feedback[str(i)].feed_down.weight.T,
                                passes.block_inputs[i]) for i in range(minilm.depth))
    loss = method.variational_loss(passes)
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, everywhere)                              # padding would change it
    loss.backward()
    assert all((p.grad is not None) == (".feed_down." in n) for n, p in method.named_parameters() if p.requires_grad)
    total, reported = steering_objective(method, batch, labels, 0.0)
    with torch.no_grad():
        again = method.run(batch, record_blocks=True)
        check = F.cross_entropy(again.logits, labels) + 0.5 * method.variational_loss(again)
    torch.testing.assert_close(total.detach(), check)
    assert reported == pytest.approx(float(check))


def test_late_and_early_feedback_cost_half_a_pass_less(minilm):
    batch = _batch(minilm, TEXTS)
    inputs = {k: v for k, v in batch.items()}

    def flops(run) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            run()
        return counter.get_total_flops()

    plain = flops(lambda: minilm.model(**inputs))
    ratios = {mode: flops(lambda: build_method("toast", {"feedback": mode}, minilm, 3).run(batch)) / plain
              for mode in ("full", "early", "late")}
    assert 2.0 < ratios["full"] < 2.6, ratios                   # + feedback maps and W_v X_td
    assert 1.5 < ratios["early"] < 1.9 and 1.5 < ratios["late"] < 1.9, ratios


# -- fitting, adapters, settings ----------------------------------------------------------------
def test_fit_on_forty_texts_lowers_the_loss_and_leaves_the_encoder_alone(minilm):
    from frozenlens.backbones.base import state_dict_sha256
    from frozenlens.train.texts import TextData
    from frozenlens.train.trainer import TrainConfig

    texts, labels = _topic_texts()
    data = TextData.from_texts(texts, labels, len(TOPICS), minilm)
    assert len(data) == 40
    before = state_dict_sha256(minilm.model)
    cfg = TrainConfig(optimizer="sgd", lr=0.05, weight_decay=0.0, epochs=3, warmup_epochs=0, batch_size=8)
    for settings in (None, {"variational_weight": 0.01, "pool": "cls"}):
        method = build_method("toast", settings, minilm, len(TOPICS))
        losses = method.fit(data, cfg)
        assert len(losses) == 3 and losses[-1] < losses[0], (settings, losses)
    assert state_dict_sha256(minilm.model) == before


def test_adapter_round_trip_on_the_text_backbone(minilm, tmp_path):
    from frozenlens.adapter import load_adapter, save_adapter

    method = build_method("toast-lite", {"feedback": "late", "pool": "cls"}, minilm, 3)
    _strong(method, minilm, seed=2)
    save_adapter(tmp_path / "a", method, ["x", "y", "z"])
    loaded = load_adapter(tmp_path / "a", minilm).method
    batch = _batch(minilm, TEXTS)
    with torch.no_grad():
        assert torch.equal(loaded(batch), method(batch))
    assert json.loads((tmp_path / "a" / "adapter.json").read_text())["taps"] == []


def test_bad_settings_and_unsupported_encoders_are_clear_errors(minilm):
    import transformers

    from frozenlens.methods.toast.bert import encoder_value_sites

    with pytest.raises(FrozenlensError, match="pool='max'"):
        build_method("toast", {"pool": "max"}, minilm, 3)
    with pytest.raises(FrozenlensError, match="variational_weight=-1"):
        build_method("toast", {"variational_weight": -1.0}, minilm, 3)
    distil = transformers.DistilBertModel(transformers.DistilBertConfig(
        vocab_size=50, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=16))
    assert [s.proj for s in encoder_value_sites(distil)] == [f"transformer.layer.{i}.attention.v_lin" for i in (0, 1)]
    assert encoder_value_sites(minilm.model)[5].proj == "encoder.layer.5.attention.self.value"
    with pytest.raises(FrozenlensError, match="value projection each"):
        encoder_value_sites(torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(4, 4)])))


# -- TextData ------------------------------------------------------------------------------
def test_text_data_batches_follow_minibatch_indices_padded_to_their_own_longest(minilm, monkeypatch):
    from frozenlens.train import texts as texts_module
    from frozenlens.train.data import minibatch_indices
    from frozenlens.train.texts import TextData, text_batch

    monkeypatch.setattr(texts_module, "TOKENIZE_CHUNK", 3)       # chunks join as one tokenization pads
    texts = TEXTS + [LONG] + [t.upper() for t in TEXTS]
    labels = [i % 3 for i in range(len(texts))]
    data = TextData.from_texts(texts, labels, 3, minilm, keys=[f"k{i}" for i in range(len(texts))])
    order = list(minibatch_indices(len(data), 4, shuffle=True, generator=torch.Generator().manual_seed(3)))
    got = list(data.batches(4, shuffle=True, generator=torch.Generator().manual_seed(3)))
    assert len(got) == len(order) == 3
    for idx, (features, batch_labels) in zip(order, got):
        expected = text_batch(minilm, [texts[int(i)] for i in idx])
        assert features.keys() == expected.keys() == {"input_ids", "attention_mask", "token_type_ids"}
        assert all(torch.equal(features[k], expected[k]) and features[k].dtype == expected[k].dtype
                   for k in expected)
        assert features["attention_mask"].dtype == torch.bool and features["input_ids"].dtype == torch.long
        assert features["input_ids"].shape[1] == int(features["attention_mask"].sum(1).max())
        assert batch_labels.tolist() == [labels[int(i)] for i in idx]
    plain = [b[1].tolist() for b in data.batches(4)]
    assert plain == [labels[0:4], labels[4:8], labels[8:9]]


def test_text_data_from_a_task_selects_keys_holds_out_and_subsets(minilm, tmp_path):
    from frozenlens.data.text import load_text_task
    from frozenlens.train.texts import TextData

    texts, labels = _topic_texts()
    names = list(TOPICS)
    rows = [{"text": t, "label": names[label]} for t, label in zip(texts, labels)]
    for stem, part in (("train800", rows[0::2]), ("val200", rows[1::2])):
        (tmp_path / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    task = load_text_task(tmp_path)
    data = TextData.from_task(task, "trainval", minilm)
    assert len(data) == 40 and data.num_classes == 4 and data.nbytes > 0
    assert data.keys == [i.key for i in task.split("trainval")]
    train = data.select_paths([i.key for i in task.split("train")])
    assert train is not None and train.keys == [i.key for i in task.split("train")]
    assert train.labels.tolist() == [i.label for i in task.split("train")]
    reverse = list(reversed(data.keys[:5]))
    picked = data.select_paths(reverse)
    assert picked.keys == reverse and picked.tokens["input_ids"].shape[1] == int(picked.lengths.max())
    assert data.select_paths(reverse + ["nowhere#1:0"]) is None
    rest, held = data.holdout(0.2, seed=0)
    assert len(rest) + len(held) == 40 and sorted(held.labels.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert not set(rest.keys) & set(held.keys)
