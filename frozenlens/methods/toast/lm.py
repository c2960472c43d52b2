"""TOAST on a frozen Hugging Face causal language model (the paper's LLaMA case, Section 4.3).

The four steps are those of the ViT variant (:mod:`.model`), on text positions:

1. **Pass 1**: the frozen decoder runs as usual; ``z`` are its final normed hidden
   states ``(B, T, D)`` (``model.base_model(...).last_hidden_state``).
2. **Feature selection** (:class:`~.core.FeatureSelection`): ``z~_t = clamp(cos(z_t, xi), 0, 1) z_t P``.
3. **Feedback path** (:class:`~.core.FeedbackLayer`, one per decoder layer, top down):
   ``h_l = feed_down(h_{l+1})``, top-down signal ``td_l = top_down(h_l)``.
4. **Pass 2**: the model runs again; every attention's *value projection* reads
   ``X + td_l`` (``V = W_v (X + X_td) [+ b_v]``), queries and keys read ``X`` alone.

Step 4 never re-implements a Hugging Face attention: in an edited *view* of the
model (:func:`frozenlens.backbones.hooks.edited_model`, the mechanism every
in-loop method uses) each layer's value projection is replaced by a wrapper
returning ``proj(X) + W_v X_td`` (:class:`~.hf.ValueInput`, shared with the BERT variant,
:mod:`.bert`). Whatever attention kernel, rotary embedding,
grouped-query layout or mask the model uses then runs unchanged. Supported value
projections (:func:`value_sites`): a separate ``v_proj`` ``nn.Linear`` (LLaMA,
Mistral, Qwen2, Gemma, OPT, ...) and GPT-2's fused ``c_attn`` ``Conv1D`` (its value
third). Anything else is refused with an error naming the attention module.

Causality: feature selection and every feedback map act on each position alone,
so the signal at position ``t`` depends on tokens ``<= t`` only, and pass 2 keeps
the model's own causal mask. Generation (:meth:`TOASTForCausalLM.generate`) can
therefore cache both passes (one KV cache each) and feed one new token at a time.

Training (:func:`frozenlens.methods.toast.lm_train.train_lm`) minimises the
next-token loss on the response tokens plus ``variational_weight`` x the
variational loss (:func:`~.core.variational_loss`: each ``feed_down`` reconstructs
its decoder layer's input from its output, on pass 2's non-padding positions).
``docs/methods/toast_lm.md`` has the defaults and the deviations from the paper.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from frozenlens.backbones.hooks import Edits, edited_model
from frozenlens.errors import AdapterError, FrozenlensError
from frozenlens.extras import require
from frozenlens.methods.toast.core import FeatureSelection, FeedbackLayer, run_feedback, variational_loss
from frozenlens.methods.toast.hf import ValueInput, ValueSite, record_edits, value_edits

__all__ = ["IGNORE_INDEX", "LMLoss", "LMPasses", "TOASTForCausalLM", "TOASTLMConfig", "ValueInput", "ValueSite",
           "load_causal_lm", "load_lm_adapter", "model_identity", "next_token_loss", "read_lm_adapter_meta",
           "value_sites"]

_log = logging.getLogger("frozenlens")

TEXT_PURPOSE = "TOAST on language models (frozenlens toast-lm)"
ADAPTER_FORMAT = "frozenlens-toast-lm"
ADAPTER_VERSION = 1
WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter.json"
IGNORE_INDEX = -100
"""Label of positions without a next-token loss (prompt and padding), as Hugging Face uses."""

SUPPORTED_VALUES = ("a separate value projection `v_proj` (nn.Linear: LLaMA, Mistral, Qwen2, Gemma, OPT, ...) "
                    "or GPT-2's fused `c_attn` (Conv1D, values in its last third)")
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")


# -- where the value input goes -------------------------------------------------------------
def _attention_of(layer: nn.Module) -> tuple[str, nn.Module] | None:
    for name in _ATTENTION_NAMES:
        child = getattr(layer, name, None)
        if isinstance(child, nn.Module):
            return name, child
    return None


def _value_kind(attention: nn.Module) -> tuple[str, str] | None:
    """``(child name, kind)`` of ``attention``'s value projection, or None when unsupported."""
    v_proj = getattr(attention, "v_proj", None)
    if isinstance(v_proj, nn.Linear):
        return "v_proj", "linear"
    c_attn = getattr(attention, "c_attn", None)
    weight = getattr(c_attn, "weight", None)
    if (type(c_attn).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and weight.shape[1] == 3 * weight.shape[0]):
        return "c_attn", "fused"
    return None


def value_sites(model: nn.Module) -> list[ValueSite]:
    """The decoder layers of ``model`` (a Hugging Face causal LM) and their value projections.

    The decoder layers are the ``nn.ModuleList`` whose items hold an attention module
    (``self_attn``, ``attn``, ...).

    Raises:
        FrozenlensError: no such list, an encoder-decoder model, or an attention whose
            value projection is not one of :data:`SUPPORTED_VALUES` (the message names it).
    """
    config = getattr(model, "config", None)
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise FrozenlensError(f"{name} is an encoder-decoder model; TOAST-LM needs a decoder-only causal LM "
                              "(LLaMA, Mistral, GPT-2, ...)")
    for path, module in model.named_modules():
        if not (isinstance(module, nn.ModuleList) and len(module) and _attention_of(module[0])):
            continue
        sites = []
        for index, layer in enumerate(module):
            found = _attention_of(layer)
            if found is None:
                raise FrozenlensError(f"{name}: decoder layer {index} ({type(layer).__name__}) has no attention "
                                      f"module named {' or '.join(_ATTENTION_NAMES)}")
            attn_name, attention = found
            kind = _value_kind(attention)
            if kind is None:
                children = ", ".join(n for n, _ in attention.named_children()) or "none"
                raise FrozenlensError(
                    f"{name}: the attention {type(attention).__name__} of decoder layer {index} has no value "
                    f"projection TOAST can take a top-down input into (its submodules: {children}); supported: "
                    f"{SUPPORTED_VALUES}. Use a model with one of those, or open an issue naming {name}")
            layer_path = f"{path}.{index}"
            sites.append(ValueSite(layer_path, f"{layer_path}.{attn_name}.{kind[0]}", kind[1]))
        return sites
    raise FrozenlensError(f"{name}: found no list of decoder layers with attention modules; TOAST-LM needs a "
                          "Hugging Face decoder-only causal LM (LLaMA, Mistral, GPT-2, ...)")


def _cache_kwargs(module: nn.Module, cache: Any) -> dict[str, Any]:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``, whichever ``module.forward`` takes."""
    if cache is None:
        return {"use_cache": False}
    names = inspect.signature(module.forward).parameters
    return {"cache" if "cache" in names else "past_key_values": cache, "use_cache": True}


# -- the method ----------------------------------------------------------------------------
@dataclass
class TOASTLMConfig:
    """TOAST settings for causal language models.

    Attributes:
        variational_weight: weight of the variational loss added to the next-token loss
            (reference LLaMA code: 1 x the sum of per-layer MSEs of values scaled by 1/10,
            i.e. 0.01 x the plain MSEs; the paper states 0.03 for vision pre-tuning only).
        tune_p: train the channel transform ``P`` (paper: the whole top-down module tunes).
        lora_rank: 0 for TOAST; r >= 1 for TOAST-Lite (frozen feedback maps adapted by
            rank-r LoRA factors; paper: r = 4).
        lora_alpha: LoRA scaling numerator (update ``alpha / r * B A``; reference: 1).
    """

    variational_weight: float = 0.01
    tune_p: bool = True
    lora_rank: int = 0
    lora_alpha: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.variational_weight, (int, float)) and self.variational_weight >= 0):
            raise FrozenlensError(f"variational_weight={self.variational_weight!r}: use a number of 0 or more "
                                  "(default 0.01; 0 turns the variational loss off)")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise FrozenlensError(f"lora_rank={self.lora_rank!r}: use 0 (TOAST) or a rank of at least 1 "
                                  "(TOAST-Lite; paper: 4)")


@dataclass
class LMPasses:
    """What one TOAST forward of a causal LM computed.

    Attributes:
        logits: ``(B, T, vocab)`` of pass 2.
        token_weights: ``(B, T)`` feature selection's relevance of each position.
        layer_inputs, layer_outputs: pass 2's hidden states entering and leaving each
            decoder layer (only when asked: the variational loss reads them).
    """

    logits: torch.Tensor
    token_weights: torch.Tensor
    layer_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    layer_outputs: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class LMLoss:
    """``total = next_token + variational_weight x variational`` (all scalars)."""

    total: torch.Tensor
    next_token: torch.Tensor
    variational: torch.Tensor


class TOASTForCausalLM(nn.Module):
    """TOAST's top-down modules on a frozen Hugging Face causal LM.

    The model is held, not registered: :meth:`state_dict` holds only ``selection.*``
    and ``feedback.<layer>.*``. Its parameters stop requiring gradients and it stays
    in eval mode. TOAST's own parameters are float32 on the model's device; the
    top-down signal is cast to the model's dtype where it enters.

    Args:
        model: a ``*ForCausalLM`` (``AutoModelForCausalLM``) with supported value projections.
        config: :class:`TOASTLMConfig` (defaults when None).
    """

    def __init__(self, model: nn.Module, config: TOASTLMConfig | None = None):
        super().__init__()
        self.config = config or TOASTLMConfig()
        self.sites = value_sites(model)
        for param in model.parameters():
            param.requires_grad_(False)
        model.eval()
        self._model = [model]
        dim = int(model.get_input_embeddings().embedding_dim)
        self.selection = FeatureSelection(dim)
        self.feedback = nn.ModuleDict({str(i): FeedbackLayer.linear(dim, self.config.lora_rank,
                                                                     self.config.lora_alpha)
                                       for i in range(len(self.sites))})
        self.selection.channel_transform.requires_grad_(self.config.tune_p)
        self.to(next(model.parameters()).device)

    @property
    def frozen_model(self) -> nn.Module:
        """The frozen causal LM."""
        return self._model[0]

    @property
    def depth(self) -> int:
        """Number of decoder layers (= feedback layers)."""
        return len(self.sites)

    def train(self, mode: bool = True) -> "TOASTForCausalLM":
        """Train mode for TOAST's modules; the frozen model stays in eval mode."""
        super().train(mode)
        self.frozen_model.eval()
        return self

    # -- forward ------------------------------------------------------------------------------
    def feedback_signals(self, z: torch.Tensor) -> dict[int, torch.Tensor]:
        """Top-down signal of every decoder layer from pass 1's final normed hidden states ``z``."""
        return run_feedback(self.feedback, reversed(range(self.depth)), self.selection(z))

    def passes(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               record_layers: bool = False, caches: tuple[Any, Any] | None = None) -> LMPasses:
        """Pass 1, feature selection, feedback and pass 2 for token ids ``(B, T)``.

        ``caches``: one KV cache per pass (e.g. two ``DynamicCache``), for generation:
        ``input_ids`` are then the positions after those already cached.
        """
        model = self.frozen_model
        base = model.base_model
        with torch.no_grad():  # nothing before the feature selection trains
            z = base(input_ids=input_ids, attention_mask=attention_mask,
                     **_cache_kwargs(base, caches[0] if caches else None)).last_hidden_state
        signals = self.feedback_signals(z)
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        edits: dict[str, nn.Module | Callable[[nn.Module], nn.Module]] = value_edits(self.sites, signals)
        if record_layers:
            edits.update(record_edits(self.sites, range(self.depth), inputs, outputs))
        view = edited_model(model, Edits(modules=edits))
        out = view(input_ids=input_ids, attention_mask=attention_mask,
                   **_cache_kwargs(model, caches[1] if caches else None))
        return LMPasses(out.logits, self.selection.token_weights(z), inputs, outputs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, T, vocab)`` of pass 2."""
        return self.passes(input_ids, attention_mask).logits

    def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> LMLoss:
        """Next-token loss on the labelled positions plus the weighted variational loss.

        ``labels`` are ``input_ids`` with :data:`IGNORE_INDEX` where no loss is wanted
        (prompt, padding); position ``t``'s logits predict label ``t + 1``.
        """
        weight = self.config.variational_weight
        passes = self.passes(input_ids, attention_mask, record_layers=weight > 0)
        next_token = next_token_loss(passes.logits, labels)
        if weight > 0:
            variational = variational_loss(self.feedback, passes.layer_inputs, passes.layer_outputs,
                                           attention_mask.bool())
        else:
            variational = next_token.new_zeros(())
        return LMLoss(next_token + weight * variational, next_token, variational)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, *, max_new_tokens: int = 128, temperature: float = 0.0,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue ``input_ids`` ``(B, T)`` (no padding) by up to ``max_new_tokens``; returns the new ids.

        Greedy with ``temperature`` 0, else sampled from ``softmax(logits / temperature)``
        (the paper's evaluation samples at 0.7). Both passes are KV-cached: each step
        runs one position through pass 1 and pass 2.
        """
        from transformers import DynamicCache

        model = self.frozen_model
        caches = (DynamicCache(config=model.config), DynamicCache(config=model.config))
        was_training = self.training
        self.eval()
        step_ids, new, done = input_ids, [], torch.zeros(input_ids.shape[0], dtype=torch.bool,
                                                          device=input_ids.device)
        try:
            for _ in range(max_new_tokens):
                logits = self.passes(step_ids, caches=caches).logits[:, -1].float()
                if temperature > 0:
                    probs = (logits / temperature).softmax(-1)
                    token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                else:
                    token = logits.argmax(-1)
                if eos_token_id is not None:
                    token = torch.where(done, torch.full_like(token, eos_token_id), token)
                    done |= token == eos_token_id
                new.append(token)
                step_ids = token[:, None]
                if eos_token_id is not None and bool(done.all()):
                    break
        finally:
            self.train(was_training)
        return torch.stack(new, dim=1) if new else input_ids.new_zeros(input_ids.shape[0], 0)

    # -- adapters -------------------------------------------------------------------------
    def save(self, folder: str | Path, *, model_name: str, extra: dict[str, Any] | None = None) -> Path:
        """Write ``adapter.safetensors`` (TOAST's modules only) and ``adapter.json``; returns the folder."""
        from frozenlens.atomic import save_safetensors, write_json

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        weights = save_safetensors(out / WEIGHTS_FILE, state, error=AdapterError)
        meta = {"format": ADAPTER_FORMAT, "format_version": ADAPTER_VERSION, "method": "toast-lm",
                "config": asdict(self.config), "model": model_identity(self.frozen_model, model_name),
                "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), **(extra or {})}
        write_json(out / CONFIG_FILE, meta, error=AdapterError)
        return out

    def load_weights(self, folder: str | Path) -> None:
        """Load TOAST's modules from an adapter folder written by :meth:`save` (checked)."""
        from safetensors.torch import load_file

        meta = read_lm_adapter_meta(folder)
        identity = model_identity(self.frozen_model, meta["model"]["name"])
        if meta["model"]["fingerprint"] != identity["fingerprint"]:
            raise AdapterError(f"{folder} was trained on {meta['model']['name']!r} "
                               f"({meta['model']['class']}), whose weights differ from this model's "
                               f"({identity['class']}); load it with the model it was trained on")
        path = Path(folder) / WEIGHTS_FILE
        if hashlib.sha256(path.read_bytes()).hexdigest() != meta.get("weights_sha256"):
            raise AdapterError(f"{path}: its SHA-256 differs from {CONFIG_FILE}'s; the file is damaged or "
                               "was replaced: train the adapter again")
        state = load_file(str(path))
        own = self.state_dict()
        if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
            raise AdapterError(f"{path}: its tensors do not match this TOAST ({len(state)} vs {len(own)} "
                               "tensors, or other shapes); it was made with other settings or another model")
        self.load_state_dict(state)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of position ``t``'s logits against label ``t + 1`` over labelled positions."""
    shifted = logits[:, :-1].float()
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def model_identity(model: nn.Module, name: str) -> dict[str, Any]:
    """JSON identity of a causal LM: name, class, sizes and a fingerprint of its weights.

    The fingerprint is a SHA-256 of the input embedding and of the first and last
    value projections (not of every weight: hashing a 7B model takes minutes).
    """
    sites = value_sites(model)
    modules = dict(model.named_modules())
    digest = hashlib.sha256()
    for tensor in (model.get_input_embeddings().weight, modules[sites[0].proj].weight,
                   modules[sites[-1].proj].weight):
        value = tensor.detach().float().cpu().contiguous()
        digest.update(f"{tuple(value.shape)}|".encode())
        digest.update(value.numpy().tobytes())
    return {"name": name, "class": type(model).__name__, "layers": len(sites),
            "hidden_size": int(model.get_input_embeddings().embedding_dim), "fingerprint": digest.hexdigest()}


def read_lm_adapter_meta(folder: str | Path) -> dict[str, Any]:
    """``adapter.json`` of a TOAST-LM adapter folder, checked.

    Raises:
        AdapterError: not a folder written by ``frozenlens toast-lm train``, or malformed.
    """
    import json

    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{folder}: not an adapter folder (no {CONFIG_FILE}); pass the --out folder of "
                           "`frozenlens toast-lm train`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AdapterError(f"{path}: not valid JSON ({err}); train the adapter again") from err
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise AdapterError(f"{path}: not a TOAST-LM adapter (format {found!r}, expected {ADAPTER_FORMAT!r}); "
                           "image adapters are used with `frozenlens predict`")
    if meta.get("format_version", 0) > ADAPTER_VERSION:
        raise AdapterError(f"{path}: format version {meta['format_version']} is newer than this frozenlens "
                           f"reads ({ADAPTER_VERSION}); upgrade frozenlens")
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("model"), dict):
        raise AdapterError(f"{path}: lacks its config or model entry; train the adapter again")
    return meta


def load_causal_lm(name_or_path: str, *, device: str = "cpu", dtype: str = "float32") -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local folder (offline) or a hub name, the model frozen in eval mode.

    ``dtype``: ``float32``, ``bfloat16`` or ``float16`` (the model's weights; TOAST's
    own stay float32).

    Raises:
        FrozenlensError: transformers is missing, the dtype is unknown, or the model cannot be loaded.
    """
    transformers = require("transformers", TEXT_PURPOSE)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise FrozenlensError(f"dtype={dtype!r}: use one of {', '.join(dtypes)}")
    from frozenlens.backbones import check_device

    target = check_device(device)
    local = Path(name_or_path).is_dir()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
        model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtypes[dtype],
                                                                  local_files_only=local)
    except (OSError, ValueError) as err:
        where = "the folder" if local else "the hub (is there a network? offline, pass a local folder)"
        raise FrozenlensError(f"cannot load causal LM {name_or_path!r} from {where}: {err}") from None
    model.to(target).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    _log.info("loaded %s (%s, %d layers, %s) on %s", name_or_path, type(model).__name__,
              len(value_sites(model)), dtype, target)
    return model, tokenizer


def load_lm_adapter(folder: str | Path, *, model: str | None = None, device: str = "cpu",
                    dtype: str = "float32") -> tuple[TOASTForCausalLM, Any, dict[str, Any]]:
    """``(toast, tokenizer, meta)`` from an adapter folder; the LM is the recorded one unless ``model``."""
    meta = read_lm_adapter_meta(folder)
    lm, tokenizer = load_causal_lm(model or meta["model"]["name"], device=device, dtype=dtype)
    toast = TOASTForCausalLM(lm, TOASTLMConfig(**meta["config"]))
    toast.load_weights(folder)
    return toast, tokenizer, meta
