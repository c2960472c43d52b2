"""TOAST on causal language models: tiny random LLaMA and GPT-2 decoders, no downloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from tests.conftest import skip_or_fail_in_ci

try:
    import transformers
except ImportError:  # the [text] extra; CI installs it, so there this must not skip
    transformers = None

WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(40)] + [
    "Below", "is", "an", "instruction", "that", "describes", "a", "task.", "Write", "response",
    "appropriately", "completes", "the", "request.", "###", "Instruction:", "Response:", "red", "blue"]


@pytest.fixture(autouse=True)
def _needs_transformers():
    if transformers is None:
        skip_or_fail_in_ci("transformers is not installed (pip install 'frozenlens[text]')")


def _llama(seed: int = 0):
    config = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def _gpt2(seed: int = 0):
    config = transformers.GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=3, n_head=4, n_positions=128,
                                     bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


MODELS = {"llama": _llama, "gpt2": _gpt2}


def _toast(kind: str, **settings):
    from frozenlens.methods.toast.lm import TOASTForCausalLM, TOASTLMConfig

    return TOASTForCausalLM(MODELS[kind](), TOASTLMConfig(**settings))


def _strong(toast, seed: int = 0) -> None:
    """Feedback whose signal reaches every layer visibly; xi = mean output, so some positions are kept."""
    with torch.no_grad():
        torch.manual_seed(seed)
        for layer in toast.feedback.values():
            layer.feed_down.weight.copy_(torch.eye(layer.feed_down.weight.shape[0]))
            layer.top_down.weight.normal_(0, 0.5)


def _ids(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, len(WORDS), (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_zero_top_down_signal_gives_the_plain_logits_bit_for_bit(kind):
    toast = _toast(kind)
    with torch.no_grad():
        for layer in toast.feedback.values():
            layer.top_down.weight.zero_()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with torch.no_grad():
        plain = toast.frozen_model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(toast(ids, mask), plain)
        _strong(toast)
        assert not torch.allclose(toast(ids, mask), plain)


def _capture(modules, store: list) -> list:
    return [m.register_forward_hook(lambda _m, _i, out: store.append(out.detach())) for m in modules]


def test_llama_queries_and_keys_are_unchanged_only_values_move():
    toast = _toast("llama")
    _strong(toast)
    model = toast.frozen_model
    layers = model.model.layers
    ids = _ids()
    seen: list[torch.Tensor] = []
    hooks = _capture([m for layer in layers for m in (layer.self_attn.q_proj, layer.self_attn.k_proj)], seen)
    try:
        with torch.no_grad():
            passes = toast.passes(ids, record_layers=True)
    finally:
        for hook in hooks:
            hook.remove()
    n = 2 * len(layers)
    assert len(seen) == 2 * n                             # pass 1 (base model), then pass 2 (the view)
    with torch.no_grad():
        for i, layer in enumerate(layers):                # pass 2's Q and K are the plain maps of X
            x = layer.input_layernorm(passes.layer_inputs[i])
            assert torch.equal(seen[n + 2 * i], layer.self_attn.q_proj(x))
            assert torch.equal(seen[n + 2 * i + 1], layer.self_attn.k_proj(x))
        plain = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.equal(passes.layer_inputs[0], plain[0])
    for i in range(len(layers) - 1):                      # ... while the values changed every layer's output
        assert not torch.allclose(passes.layer_outputs[i], plain[i + 1])


def test_gpt2_fused_qkv_changes_only_the_value_third():
    from frozenlens.methods.toast.lm import ValueInput

    c_attn = _gpt2().transformer.h[0].attn.c_attn
    x, signal = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    out = ValueInput(c_attn, signal, "fused")(x)
    plain = c_attn(x)
    assert torch.equal(out[..., :64], plain[..., :64])                   # queries and keys
    expected_v = (x + signal) @ c_attn.weight[:, 64:] + c_attn.bias[64:]  # W_v (X + X_td) + b_v
    torch.testing.assert_close(out[..., 64:], expected_v)


def test_llama_value_projection_is_w_v_of_x_plus_signal():
    from frozenlens.methods.toast.lm import ValueInput

    v_proj = _llama().model.layers[1].self_attn.v_proj
    x, signal = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    torch.testing.assert_close(ValueInput(v_proj, signal, "linear")(x), v_proj(x + signal))
    assert torch.equal(ValueInput(v_proj, torch.zeros_like(x), "linear")(x), v_proj(x))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_only_toast_parameters_get_gradients(kind):
    toast = _toast(kind)
    dim, depth = 32, 3
    names = {n for n, p in toast.named_parameters() if p.requires_grad}
    assert names == {"selection.task_embedding", "selection.channel_transform"} | {
        f"feedback.{i}.{m}.weight" for i in range(depth) for m in ("feed_down", "top_down")}
    assert set(toast.state_dict()) == names
    ids = _ids()
    labels = ids.clone()
    labels[:, :4] = -100
    loss = toast.loss(ids, torch.ones_like(ids), labels)
    assert loss.variational > 0
    torch.testing.assert_close(loss.total, loss.next_token + 0.01 * loss.variational)
    loss.total.backward()
    assert all(p.grad is None for p in toast.frozen_model.parameters())
    assert all(not p.requires_grad for p in toast.frozen_model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in toast.parameters() if p.requires_grad)
    lite = _toast(kind, lora_rank=2)
    assert {n for n, p in lite.named_parameters() if p.requires_grad} == {
        "selection.task_embedding", "selection.channel_transform"} | {
        f"feedback.{i}.{m}.lora_{f}" for i in range(depth) for m in ("feed_down", "top_down") for f in "ab"}
    frozen_p = _toast(kind, tune_p=False)
    assert not frozen_p.selection.channel_transform.requires_grad
    assert dim == toast.selection.task_embedding.shape[0]


def test_loss_is_on_response_tokens_and_variational_loss_reconstructs_layer_inputs():
    from frozenlens.methods.toast.lm import next_token_loss

    toast = _toast("llama")
    _strong(toast)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    labels = ids.clone()
    labels[:, :5] = -100
    labels[mask == 0] = -100
    loss = toast.loss(ids, mask, labels)
    passes = toast.passes(ids, mask, record_layers=True)
    logits = passes.logits
    terms = [F.cross_entropy(logits[b, t - 1], ids[b, t], reduction="none")
             for b in range(2) for t in range(5, ids.shape[1]) if mask[b, t]]
    torch.testing.assert_close(loss.next_token, torch.stack(terms).mean())
    torch.testing.assert_close(next_token_loss(logits, labels), loss.next_token)
    keep = mask.bool()
    expected = sum(F.mse_loss(passes.layer_outputs[i][keep] @ toast.feedback[str(i)].feed_down.weight.T,
                              passes.layer_inputs[i][keep]) for i in range(3))
    torch.testing.assert_close(loss.variational, expected)
    assert torch.equal(passes.layer_inputs[0], toast.frozen_model.model.embed_tokens(ids))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_causal_masking_holds_in_both_passes(kind):
    toast = _toast(kind)
    _strong(toast)
    ids = _ids(batch=1, length=10)
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 7) % len(WORDS)
    with torch.no_grad():
        a, b = toast.passes(ids), toast.passes(changed)
    assert torch.equal(a.token_weights[:, :6], b.token_weights[:, :6])   # pass 1 and the selection
    torch.testing.assert_close(a.logits[:, :6], b.logits[:, :6], rtol=0, atol=1e-6)   # pass 2
    assert not torch.allclose(a.logits[:, 6:], b.logits[:, 6:])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cached_generation_equals_recomputing_the_whole_sequence(kind):
    toast = _toast(kind)
    _strong(toast)
    prompt = _ids(batch=1, length=5)
    new = toast.generate(prompt, max_new_tokens=6)
    assert new.shape == (1, 6)
    sequence = prompt
    for _ in range(6):                                   # greedy without any cache
        with torch.no_grad():
            token = toast(sequence)[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, token], dim=1)
    assert torch.equal(sequence[:, 5:], new)


# -- data, adapters, the command ------------------------------------------------------------
def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    core = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")


@pytest.fixture
def model_folder(tmp_path) -> Path:
    folder = tmp_path / "tiny-llama"
    _llama().save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


def _write_jsonl(path: Path, count: int) -> Path:
    lines = []
    for i in range(count):
        colour = ["red", "blue"][i % 2]
        lines.append(json.dumps({"instruction": f"w{i % 7} w{i % 5} {colour}", "response": f"{colour} w{i % 3}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_encoding_labels_only_the_response():
    from frozenlens.methods.toast.lm_train import Instruction, encode

    tokenizer = _tokenizer()
    example = Instruction("w1 w2", "red w3")
    encoded = encode(tokenizer, example, 512)
    prompt = tokenizer(example.prompt)["input_ids"]
    response = tokenizer("red w3", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert encoded.ids == prompt + response
    assert encoded.labels == [-100] * len(prompt) + response
    assert encode(tokenizer, example, len(prompt)) is None       # no response token left


@pytest.mark.parametrize("line, message", [("{not json", "x.jsonl:2: not valid JSON"),
                                           ('{"instruction": "a"}', "x.jsonl:2: 'response' is missing"),
                                           ('[1, 2]', "x.jsonl:2: expected a JSON object")])
def test_bad_jsonl_lines_are_named(tmp_path, line, message):
    from frozenlens.errors import FrozenlensError
    from frozenlens.methods.toast.lm_train import read_instructions

    path = tmp_path / "x.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\n' + line + "\n")
    with pytest.raises(FrozenlensError, match=message):
        read_instructions(path)


def test_unsupported_attention_is_refused_with_its_name():
    from frozenlens.errors import FrozenlensError
    from frozenlens.methods.toast.lm import value_sites

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query_key_value = torch.nn.Linear(8, 24)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attention = Attention()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer(), Layer()])

    with pytest.raises(FrozenlensError, match="Attention of decoder layer 0 has no value projection.*query_key_value"):
        value_sites(Model())


def test_toast_lm_command_trains_saves_evaluates_and_generates(model_folder, tmp_path, capsys):
    from safetensors.torch import load_file

    from frozenlens.cli import main

    train = _write_jsonl(tmp_path / "train.jsonl", 12)
    out = tmp_path / "adapter"
    assert main(["toast-lm", "train", str(train), "--model", str(model_folder), "--out", str(out),
                 "--epochs", "4", "--batch-size", "4", "--lr", "3e-3", "--val", str(train)]) == 0
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["method"] == "toast-lm" and meta["model"]["name"] == str(model_folder)
    assert meta["model"]["class"] == "LlamaForCausalLM" and meta["train"]["examples"] == 12
    losses = meta["train"]["epoch_losses"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert meta["val"]["toast_loss"] < meta["val"]["plain_loss"]          # it learned the responses
    keys = set(load_file(str(out / "adapter.safetensors")))
    assert keys and all(k.split(".")[0] in ("selection", "feedback") for k in keys)
    capsys.readouterr()
    assert main(["toast-lm", "eval", str(out), str(train)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["toast_loss"] == pytest.approx(meta["val"]["toast_loss"], rel=1e-5)
    assert main(["toast-lm", "generate", str(out), "w1 w2 red", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()


def test_adapter_is_refused_on_another_model(model_folder, tmp_path):
    from frozenlens.errors import AdapterError
    from frozenlens.methods.toast.lm import TOASTForCausalLM, load_lm_adapter

    toast = TOASTForCausalLM(_llama(seed=0))
    _strong(toast, seed=4)
    toast.save(tmp_path / "a", model_name=str(model_folder))
    loaded, _, _ = load_lm_adapter(tmp_path / "a")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids), toast(ids))
    other = TOASTForCausalLM(_llama(seed=1))
    with pytest.raises(AdapterError, match="weights differ"):
        other.load_weights(tmp_path / "a")
