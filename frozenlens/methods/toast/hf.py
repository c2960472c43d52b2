"""TOAST inside a frozen Hugging Face transformer: the edits shared by the causal-LM and encoder variants.

TOAST never re-implements a Hugging Face attention. Each pass runs the model's own
``forward`` through an edited *view* (:func:`frozenlens.backbones.hooks.edited_model`,
the mechanism every in-loop method uses) in which a few submodules are stand-ins:

* :class:`ValueInput` replaces a layer's value projection: ``proj(X) + W_v X_td``,
  i.e. ``V = W_v (X + X_td) [+ b_v]`` with queries and keys from ``X`` alone (the
  paper's Figure 2(c)). Whatever attention kernel, mask, rotary embedding or
  grouped-query layout the model uses then runs unchanged;
* :class:`Recorded` wraps a layer and records the hidden states entering and
  leaving it (the variational loss reads them), and optionally its raw output;
* :class:`StopAfter` ends a pass after a layer (:class:`StopForward` carries its
  output): early feedback's pass 1 costs only the layers it needs;
* :class:`Replay` stands in for a layer and returns a raw output recorded in pass 1:
  late feedback's pass 2 does not recompute the lower half.

:func:`value_edits` and :func:`record_edits` build the ``Edits.modules`` entries for a
list of :class:`ValueSite`. Which modules are the sites is model-specific:
:func:`frozenlens.methods.toast.lm.value_sites` (decoder-only causal LMs) and
:func:`frozenlens.methods.toast.bert.encoder_value_sites` (BERT-family encoders).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from frozenlens.errors import FrozenlensError

Edit = Callable[[nn.Module], nn.Module]
"""A factory that receives the original submodule and returns its stand-in in the view."""


@dataclass(frozen=True)
class ValueSite:
    """One transformer layer and the module that projects its values.

    Attributes:
        layer: path of the layer inside the model (e.g. ``model.layers.3``, ``encoder.layer.3``).
        proj: path of its value projection (``...self_attn.v_proj``, ``...attention.self.value``)
            or of GPT-2's fused ``c_attn``.
        kind: ``"linear"`` (an ``nn.Linear`` reading the layer's hidden states) or
            ``"fused"`` (GPT-2's ``c_attn``, values in its last third).
    """

    layer: str
    proj: str
    kind: str


class ValueInput(nn.Module):
    """Stand-in for a value projection in a view: ``proj(X) + W_v X_td`` (no second bias).

    For a fused GPT-2 ``c_attn`` (``Conv1D``, ``y = x W + b`` with ``W`` (D, 3D)) only
    the value third of the output changes; queries and keys are ``c_attn(X)``'s own.
    With a zero signal the output equals ``proj(X)`` bit for bit.

    Attributes:
        proj: the frozen projection (used as it is).
        signal: ``X_td`` ``(B, T, D)``, the same positions as the projection's input.
        kind: ``"linear"`` or ``"fused"`` (see :class:`ValueSite`).
    """

    def __init__(self, proj: nn.Module, signal: torch.Tensor, kind: str):
        super().__init__()
        self.proj, self.signal, self.kind = proj, signal, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.signal.shape != x.shape:
            raise FrozenlensError(f"top-down signal of shape {tuple(self.signal.shape)} for a value input of "
                                  f"shape {tuple(x.shape)}: the two passes must see the same positions")
        out = self.proj(x)
        signal = self.signal.to(out.dtype)
        if self.kind == "linear":
            return out + F.linear(signal, self.proj.weight)
        width = out.shape[-1] // 3
        return out + F.pad(signal @ self.proj.weight[:, 2 * width:], (2 * width, 0))


def layer_output(out: Any) -> torch.Tensor:
    """The hidden states a layer returned (a tensor, or the first item of a tuple)."""
    return out if isinstance(out, torch.Tensor) else out[0]


class Recorded(nn.Module):
    """A layer in a view that records its input and output hidden states (and, when asked, its
    raw output, for :class:`Replay`)."""

    def __init__(self, layer: nn.Module, index: int, inputs: dict[int, torch.Tensor] | None,
                 outputs: dict[int, torch.Tensor] | None, raw: dict[int, Any] | None = None):
        super().__init__()
        self.layer, self.index = layer, index
        self._inputs, self._outputs, self._raw = inputs, outputs, raw

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._inputs is not None:
            self._inputs[self.index] = args[0] if args else kwargs["hidden_states"]
        out = self.layer(*args, **kwargs)
        if self._outputs is not None:
            self._outputs[self.index] = layer_output(out)
        if self._raw is not None:
            self._raw[self.index] = out
        return out


class StopForward(Exception):
    """Raised by :class:`StopAfter` to end a pass; ``hidden`` is the last layer's output."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("pass stopped after a layer")
        self.hidden = hidden


class StopAfter(nn.Module):
    """A layer in a view that runs, then ends the pass (:class:`StopForward` with its output)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise StopForward(layer_output(self.layer(*args, **kwargs)))


class Replay(nn.Module):
    """A layer in a view that computes nothing and returns ``output`` (recorded in an earlier pass)."""

    def __init__(self, output: Any):
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


def value_edits(sites: list[ValueSite], signals: Mapping[int, torch.Tensor]) -> dict[str, Edit]:
    """``Edits.modules`` entries adding ``signals[i]`` to the value input of ``sites[i]``."""
    return {sites[i].proj: _value_edit(signal, sites[i].kind) for i, signal in signals.items()}


def record_edits(sites: list[ValueSite], layers: Any, inputs: dict[int, torch.Tensor] | None,
                 outputs: dict[int, torch.Tensor] | None, raw: dict[int, Any] | None = None,
                 ) -> dict[str, Edit]:
    """``Edits.modules`` entries recording layers ``layers`` (indices into ``sites``)."""
    return {sites[i].layer: _record_edit(i, inputs, outputs, raw) for i in layers}


def _value_edit(signal: torch.Tensor, kind: str) -> Edit:
    return lambda proj: ValueInput(proj, signal, kind)


def _record_edit(index: int, inputs: dict[int, torch.Tensor] | None, outputs: dict[int, torch.Tensor] | None,
                 raw: dict[int, Any] | None) -> Edit:
    return lambda layer: Recorded(layer, index, inputs, outputs, raw)


__all__ = ["Edit", "Recorded", "Replay", "StopAfter", "StopForward", "ValueInput", "ValueSite", "layer_output",
           "record_edits", "value_edits"]
