"""TOAST's two passes on a frozen BERT-family text encoder (:class:`~frozenlens.backbones.text.TextBackbone`).

The registered ``toast`` / ``toast-lite`` methods (:mod:`.model`) run on text backbones
through this module; everything that is not BERT-specific (feature selection, the
feedback path, the variational loss, the head) is theirs and :mod:`.core`'s. The four
steps on a tokenized batch (``input_ids``, ``attention_mask``, optionally
``token_type_ids``; right-padded):

1. **Pass 1** (:meth:`EncoderSteering.first_pass`, no autograd): the encoder runs as
   usual; ``z`` are the output states of the feedback source layer (the last layer:
   ``last_hidden_state``). BERT is post-LN: every layer's output already ends in a
   LayerNorm, so ``z`` is normed like the ViT's final tokens and no extra norm applies.
2. **Feature selection** on ``z`` with the padded positions set to zero first, so
   padding never reaches it (its token weight is 0 and its selected features are 0).
3. **Feedback path**, top layer first, as for every TOAST.
4. **Pass 2** (:meth:`EncoderSteering.second_pass`): the encoder runs again through an
   edited view in which every self-attention's value projection (BERT's
   ``attention.self.value``) reads ``X + X_td``: ``V = W_v (X + X_td) + b_v``, ``Q, K``
   from ``X`` alone (:class:`~.hf.ValueInput`, shared with the causal-LM variant). The
   model's own attention (SDPA or eager) and padding mask run unchanged, so a padded
   key is never attended to in either pass.

Early feedback ends pass 1 after the source layer (:class:`~.hf.StopAfter`); late
feedback replays pass 1's lower half in pass 2 (:class:`~.hf.Replay`), so both cost
~1.5 passes, as on images. The supported value projections
(:func:`encoder_value_sites`) are an ``nn.Linear`` named ``value`` (BERT, RoBERTa,
ELECTRA, MiniLM), ``v_lin`` (DistilBERT), ``v`` (MPNet) or ``value_proj`` / ``v_proj``
(DeBERTa-v2, others), one per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from frozenlens.backbones.hooks import Edits, edited_model
from frozenlens.backbones.text import MASK_KEY
from frozenlens.errors import FrozenlensError
from frozenlens.methods.toast.hf import Edit, Replay, StopAfter, StopForward, ValueSite, record_edits, value_edits

ENCODER_VALUE_NAMES = ("value", "v_lin", "v", "value_proj", "v_proj")
"""Names of the value projection (an ``nn.Linear``) in the encoders TOAST supports."""

INPUT_KEYS = ("input_ids", MASK_KEY, "token_type_ids")
"""Keys of a tokenized batch the encoder reads (``token_type_ids`` optional)."""


def encoder_value_sites(model: nn.Module) -> list[ValueSite]:
    """The layers of a BERT-family encoder and their value projections, bottom first.

    The layers are the first ``nn.ModuleList`` of ``model`` whose every item holds exactly
    one ``nn.Linear`` named as in :data:`ENCODER_VALUE_NAMES`.

    Raises:
        FrozenlensError: no such list (the message names the model and what is supported).
    """
    for path, module in model.named_modules():
        if not (isinstance(module, nn.ModuleList) and len(module)):
            continue
        found = [_value_path(layer) for layer in module]
        if all(found):
            prefix = f"{path}." if path else ""
            return [ValueSite(f"{prefix}{i}", f"{prefix}{i}.{name}", "linear") for i, name in enumerate(found)]
    raise FrozenlensError(
        f"{type(model).__name__}: found no list of encoder layers with one value projection each; TOAST on "
        f"text needs a BERT-family encoder whose self-attention projects values with an nn.Linear named "
        f"{' / '.join(ENCODER_VALUE_NAMES)} (BERT, RoBERTa, ELECTRA, MiniLM, DistilBERT, MPNet, DeBERTa-v2)")


def _value_path(layer: nn.Module) -> str | None:
    """Path of ``layer``'s value projection when it has exactly one, else None."""
    paths = [name for name, sub in layer.named_modules()
             if isinstance(sub, nn.Linear) and name.rpartition(".")[2] in ENCODER_VALUE_NAMES]
    return paths[0] if len(paths) == 1 else None


@dataclass
class FirstPass:
    """What pass 1 hands on.

    Attributes:
        z: ``(B, T, D)`` output states of the feedback source layer (padding not yet zeroed).
        lower: the raw output of the layer below pass 2's first layer (late feedback), else None.
    """

    z: torch.Tensor
    lower: Any = None


class EncoderSteering:
    """TOAST's two passes through one frozen encoder (not a module: it holds no weights).

    Args:
        model: the encoder (``TextBackbone.model``).

    Raises:
        FrozenlensError: the encoder's value projections are not supported (:func:`encoder_value_sites`).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.sites = encoder_value_sites(model)

    def inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The encoder's inputs from a tokenized batch, on the encoder's device."""
        if "input_ids" not in batch or MASK_KEY not in batch:
            raise FrozenlensError(f"TOAST on a text backbone reads 'input_ids' and '{MASK_KEY}' (from "
                                  f"frozenlens.train.texts.text_batch or TextData); got {sorted(batch)}")
        device = next(self.model.parameters()).device
        return {k: torch.as_tensor(batch[k]).to(device) for k in INPUT_KEYS if k in batch}

    @torch.no_grad()
    def first_pass(self, inputs: dict[str, torch.Tensor], source: int, start: int) -> FirstPass:
        """Pass 1 up to layer ``source``, keeping the output of layer ``start - 1`` when ``start > 0``.

        Nothing before the feature selection trains, so it runs without autograd.
        """
        raw: dict[int, Any] = {}
        edits: dict[str, nn.Module | Edit] = {}
        if start > 0:
            edits.update(record_edits(self.sites, [start - 1], None, None, raw))
        if source < len(self.sites) - 1:
            edits[self.sites[source].layer] = StopAfter
        try:
            z = edited_model(self.model, Edits(modules=edits))(**inputs).last_hidden_state
        except StopForward as stop:
            z = stop.hidden
        return FirstPass(z, raw.get(start - 1))

    def second_pass(self, inputs: dict[str, torch.Tensor], signals: Mapping[int, torch.Tensor], first: FirstPass,
                    start: int, block_inputs: dict[int, torch.Tensor] | None = None,
                    block_outputs: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Pass 2 with ``signals[i]`` added to layer ``i``'s value input: ``last_hidden_state``.

        Layers below ``start`` replay pass 1 (``first.lower``). With ``block_inputs`` /
        ``block_outputs``, the hidden states entering and leaving each signalled layer are
        recorded there (the variational loss reads them).
        """
        edits: dict[str, nn.Module | Edit] = dict(value_edits(self.sites, signals))
        if block_inputs is not None or block_outputs is not None:
            edits.update(record_edits(self.sites, signals, block_inputs, block_outputs))
        edits.update({self.sites[i].layer: Replay(first.lower) for i in range(start)})
        return edited_model(self.model, Edits(modules=edits))(**inputs).last_hidden_state


__all__ = ["ENCODER_VALUE_NAMES", "EncoderSteering", "FirstPass", "encoder_value_sites"]
