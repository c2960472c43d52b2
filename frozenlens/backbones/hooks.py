"""Changing what happens inside a frozen timm ViT for one forward pass: the one mechanism.

Methods that train with the backbone in the loop (the PETL baselines, TOAST)
never fork the ViT and never modify the shared :class:`FrozenBackbone`. They
describe what they change as :class:`Edits` and run timm's own modules through
an *edited view* of the model (:func:`edited_model`): a shallow copy in which
only the modules on edited paths are new Python objects. Every weight, and
every module nothing edits, is the shared one. Because the view is built per
forward and the shared modules are never written to, the same backbone gives
plain outputs before, after and (from another thread) during an edited pass.

An :class:`Edits` has three kinds of change:

``modules``
    ``{"blocks.3.attn": replacement}``: the submodule at that path (relative to
    the timm model) is replaced in the view. The replacement is a module, or a
    factory called with the original (the view of it, when deeper paths are
    edited too) that returns one. Deeper paths are applied first, so
    ``"blocks.3.attn.qkv"`` and ``"blocks.3.attn"`` compose.
``params``
    ``{"blocks.3.attn.qkv.bias": tensor}``: a parameter replaced by a tensor
    (e.g. a trainable copy, BitFit). The tensor may require gradients.
``block_input``
    ``f(index, tokens) -> tokens``, called on the token sequence entering block
    ``index`` (e.g. VPT's prompt tokens, inserted after the prefix tokens).

Ready-made replacements:

* :class:`AddBranch` -- ``base(x) + branch(x)``; LoRA on ``attn.qkv``.
* :func:`mlp_branch` -- a branch parallel to a block's MLP sub-layer, reading
  the block's residual stream before the MLP and added to the block's output
  (AdaptFormer). It works through timm's own ``Block.forward`` and through any
  code that follows the pre-norm block's structure (e.g. VQT's query tokens).
* :class:`ValueInputAttention` -- attention whose values get an extra input,
  ``V = W_v (X + X_td)`` with ``Q, K`` from ``X`` alone (TOAST's top-down
  signal); it can also keep the attention probabilities (attention maps). The
  attention itself is :func:`frozenlens.backbones.attention.attention`, the one
  re-implementation of timm's ``Attention.forward`` (re-exported here).

Running:

* :func:`forward_edited` -- final normed tokens of images through the edited
  view (optionally recording every block's input and output);
* :func:`run_blocks` -- blocks ``start..stop-1`` on given tokens (e.g. TOAST's
  second pass over the upper half only, reusing the first pass's lower half).

Example (TOAST's second pass; ``signals[i]`` is block ``i``'s top-down input)::

    edits = Edits(modules={f"blocks.{i}.attn": value_input(signal)
                           for i, signal in signals.items()})
    tokens = forward_edited(backbone, images, edits)

One view is meant for one forward pass; build a new one for the next (it costs
a few shallow copies). Gradients flow into the edit tensors and modules, never
into the backbone, whose parameters do not require gradients.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from frozenlens.backbones.attention import attention, check_attention
from frozenlens.backbones.base import FrozenBackbone, embed_tokens
from frozenlens.errors import FrozenlensError

__all__ = ["AddBranch", "Edits", "ValueInputAttention", "add_branch", "attention", "edited_model",
           "forward_edited", "mlp_branch", "run_blocks", "shallow_module_copy", "value_input"]

BlockInput = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class Edits:
    """What one forward pass changes inside the model (see the module docstring)."""

    modules: dict[str, nn.Module | Callable[[nn.Module], nn.Module]] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    block_input: BlockInput | None = None

    def merged(self, other: "Edits") -> "Edits":
        """Both sets of edits (the same path in both is an error; block inputs chain)."""
        clash = (set(self.modules) & set(other.modules)) | (set(self.params) & set(other.params))
        if clash:
            raise FrozenlensError(f"two edits change the same place: {', '.join(sorted(clash))}")
        first, second = self.block_input, other.block_input
        if first and second:
            def chained(index: int, x: torch.Tensor) -> torch.Tensor:
                return second(index, first(index, x))
            block_input = chained
        else:
            block_input = first or second
        return Edits({**self.modules, **other.modules}, {**self.params, **other.params}, block_input)


# -- the view ----------------------------------------------------------------------------
def shallow_module_copy(module: nn.Module) -> nn.Module:
    """A new module object sharing ``module``'s submodules, parameters and buffers.

    Its own ``_modules`` / ``_parameters`` / ``_buffers`` dicts are copies, so
    replacing an entry in them never touches ``module``.
    """
    clone = copy.copy(module)
    clone.__dict__["_modules"] = dict(module._modules)
    clone.__dict__["_parameters"] = dict(module._parameters)
    clone.__dict__["_buffers"] = dict(module._buffers)
    return clone


def edited_model(model: nn.Module, edits: Edits | None) -> nn.Module:
    """A view of ``model`` with ``edits`` applied; ``model`` itself is left as it is.

    Without module or parameter edits the model itself is returned.
    """
    if edits is None or not (edits.modules or edits.params):
        return model
    views: dict[str, nn.Module] = {}

    def view(path: str) -> nn.Module:
        if path not in views:
            if not path:
                views[path] = shallow_module_copy(model)
            else:
                parent_path, _, name = path.rpartition(".")
                parent = view(parent_path)
                if name not in parent._modules:
                    raise FrozenlensError(f"edit path {path!r}: {type(parent).__name__} has no submodule "
                                          f"{name!r}")
                views[path] = parent._modules[name] = shallow_module_copy(parent._modules[name])
        return views[path]

    for path, tensor in edits.params.items():
        owner_path, _, name = path.rpartition(".")
        owner = view(owner_path)
        if name not in owner._parameters:
            raise FrozenlensError(f"edit path {path!r}: {type(owner).__name__} has no parameter {name!r}")
        owner._parameters[name] = tensor
    for path in sorted(edits.modules, key=lambda p: p.count("."), reverse=True):
        parent_path, _, name = path.rpartition(".")
        parent = view(parent_path)
        if name not in parent._modules:
            raise FrozenlensError(f"edit path {path!r}: {type(parent).__name__} has no submodule {name!r}")
        replacement = edits.modules[path]
        if not isinstance(replacement, nn.Module):
            replacement = replacement(parent._modules[name])
        parent._modules[name] = replacement
    return view("")


# -- running -----------------------------------------------------------------------------
def run_blocks(model: nn.Module, x: torch.Tensor, *, start: int = 0, stop: int | None = None,
               block_input: BlockInput | None = None, inputs: dict[int, torch.Tensor] | None = None,
               outputs: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Blocks ``start .. stop-1`` of ``model`` (a timm ViT or a view of one) on tokens ``x``.

    ``block_input`` changes each block's input first; ``inputs`` / ``outputs``, when
    given, receive every block's input and output tokens by block index.
    """
    blocks = model.blocks
    stop = len(blocks) if stop is None else stop
    for index in range(start, stop):
        if block_input is not None:
            x = block_input(index, x)
        if inputs is not None:
            inputs[index] = x
        x = blocks[index](x)
        if outputs is not None:
            outputs[index] = x
    return x


def forward_edited(backbone: FrozenBackbone, images: torch.Tensor, edits: Edits | None = None, *,
                   inputs: dict[int, torch.Tensor] | None = None,
                   outputs: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Final normed tokens ``(B, T, D)`` of ``images`` through the backbone with ``edits``.

    With no edits this is :meth:`FrozenBackbone.forward` (timm's ``forward_features``).
    """
    model = edited_model(backbone.model, edits)
    x = embed_tokens(model, images)
    x = run_blocks(model, x, block_input=edits.block_input if edits else None,
                   inputs=inputs, outputs=outputs)
    return model.norm(x)


# -- replacements ------------------------------------------------------------------------
class AddBranch(nn.Module):
    """``base(x) + branch(x)``: e.g. LoRA's low-rank update next to a frozen linear map.

    ``branch`` is held in a list, not as a submodule, so that a view holding this
    wrapper does not re-register the method's parameters.
    """

    def __init__(self, base: nn.Module, branch: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.base = base
        self._branch = [branch]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self._branch[0](x)


def add_branch(branch: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[nn.Module], nn.Module]:
    """Module edit: ``original(x) + branch(x)``."""
    return lambda original: AddBranch(original, branch)


class _Seen:
    """The residual stream entering a block's MLP sub-layer, handed from ``norm2`` to ``drop_path2``."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None


class _Tee(nn.Module):
    """``module(x)``, remembering ``x``."""

    def __init__(self, module: nn.Module, seen: _Seen):
        super().__init__()
        self.module, self._seen = module, seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._seen.value = x
        return self.module(x)


class _AddBranchOfSeen(nn.Module):
    """``module(y) + branch(seen)``: closes the MLP sub-layer with the parallel branch."""

    def __init__(self, module: nn.Module, seen: _Seen, branch: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.module = module
        self._seen, self._branch = seen, [branch]

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        seen = self._seen.value
        if seen is None:
            raise FrozenlensError("mlp_branch: the block's norm2 did not run before its drop_path2")
        self._seen.value = None
        return self.module(y) + self._branch[0](seen)


def mlp_branch(index: int, branch: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Callable]:
    """Module edits adding ``branch(h)`` parallel to block ``index``'s MLP sub-layer.

    For timm's pre-norm block ``out = h + drop_path2(ls2(mlp(norm2(h))))`` the
    edited block computes ``out = h + drop_path2(ls2(mlp(norm2(h)))) + branch(h)``,
    where ``h`` is the residual stream after attention. It wraps ``norm2`` (to see
    ``h``) and ``drop_path2`` (to add the branch), so timm's own ``Block.forward``
    still runs, and so does any code that calls the sub-layers in that order
    (:func:`frozenlens.methods.vqt.query_attention.query_block`).
    """
    seen = _Seen()
    return {f"blocks.{index}.norm2": lambda norm2: _Tee(norm2, seen),
            f"blocks.{index}.drop_path2": lambda drop_path2: _AddBranchOfSeen(drop_path2, seen, branch)}


class ValueInputAttention(nn.Module):
    """Stand-in for a block's ``attn`` in a view: :func:`attention` with a value input.

    The attention is re-done by :mod:`frozenlens.backbones.attention`, which checks
    that ``attn`` is the timm ``Attention`` it re-does (:func:`check_attention`).

    Attributes:
        attn: the original timm ``Attention`` (its weights are used as they are).
        value_input: ``X_td`` ``(B, N, D)`` added to the values' input, or None.
        keep_weights: list receiving the attention probabilities, or None.
    """

    def __init__(self, attn: nn.Module, value_input: torch.Tensor | None = None,
                 keep_weights: list[torch.Tensor] | None = None):
        super().__init__()
        check_attention(attn)
        self.attn = attn
        self.value_input = value_input
        self.keep_weights = keep_weights

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise FrozenlensError("ValueInputAttention supports unmasked, non-causal attention only")
        return attention(self.attn, x, value_input=self.value_input, keep_weights=self.keep_weights)


def value_input(signal: torch.Tensor | None, keep_weights: list[torch.Tensor] | None = None,
                ) -> Callable[[nn.Module], nn.Module]:
    """Module edit for ``blocks.<i>.attn``: values read ``X + signal`` (see :func:`attention`)."""
    return lambda attn: ValueInputAttention(attn, signal, keep_weights)
