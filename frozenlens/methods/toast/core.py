"""TOAST's architecture-independent pieces, shared by the ViT, language-model and ConvNeXt variants.

Every TOAST variant has the same four steps (Shi et al., 2023, Section 3.1); only
the backbone's passes differ. What does not depend on the backbone lives here:

* :class:`FeatureSelection`: ``z~_i = clamp(cos(z_i, xi), 0, 1) * z_i P`` on tokens
  ``(B, T, D)`` (image patches, text positions, or the positions of a feature map);
* :class:`FeedbackLayer`: one layer of the feedback path, ``h = feed_down(h_above)``
  and the layer's top-down signal ``top_down(h)``. The maps are bias-free linear
  maps for transformers (:meth:`FeedbackLayer.linear`, optionally with LoRA for
  TOAST-Lite) and (transposed) convolutions for convnets;
* :func:`run_feedback`: the feedback path, run from the top layer down;
* :func:`variational_loss`: every ``feed_down`` reconstructs its layer's input from
  its output (the variational loss of Shi et al., 2023 and its reference [26]);
* :func:`init_toast_weight`: the truncated-normal (std 0.02) start of every feedback map.

The backbone-specific parts (which passes run, where a top-down signal enters)
are in :mod:`.model` (timm ViT), :mod:`.lm` (Hugging Face causal LMs) and
:mod:`.convnext` (timm ConvNeXt).
"""

from __future__ import annotations

from typing import Hashable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from frozenlens.methods.layers import LoRALinear


class FeatureSelection(nn.Module):
    """Token and channel selection: ``z~ = clamp(cos(z, xi), 0, 1) * z P``.

    Attributes:
        task_embedding: ``xi`` (D,), initialised from a standard normal (reference code).
        channel_transform: ``P`` (D, D), initialised to the identity; it multiplies the
            token row vectors from the right, as in the reference code.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.task_embedding = nn.Parameter(torch.empty(dim))
        self.channel_transform = nn.Parameter(torch.empty(dim, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``xi ~ N(0, I)``, ``P = I``."""
        nn.init.normal_(self.task_embedding)
        with torch.no_grad():
            self.channel_transform.copy_(torch.eye(self.channel_transform.shape[0]))

    def token_weights(self, z: torch.Tensor) -> torch.Tensor:
        """Relevance of each token to the task, ``clamp(cos(z_i, xi), 0, 1)``: ``(B, T)``."""
        xi = self.task_embedding
        return (F.normalize(z.to(xi.dtype), dim=-1) @ F.normalize(xi, dim=0)).clamp(0, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Selected tokens ``(B, T, D)`` in the parameters' dtype."""
        z = z.to(self.task_embedding.dtype)
        return (z * self.token_weights(z).unsqueeze(-1)) @ self.channel_transform


def init_toast_weight(module: nn.Module) -> None:
    """Truncated normal (std 0.02) weights, as timm and the reference initialise linears and
    convolutions; LoRA factors as :meth:`LoRALinear.reset_lora`."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.trunc_normal_(sub.weight, std=0.02)
            if isinstance(sub, LoRALinear):
                sub.reset_lora()


class FeedbackLayer(nn.Module):
    """One layer of the feedback path: ``h = feed_down(x)``, signal ``top_down(h)``.

    ``h`` goes to the next lower layer; ``top_down(h)`` is this layer's top-down
    signal (the reference code's ``linear`` and ``linear2``). ``feed_down`` alone is
    also the variational decoder: it maps the layer's output back to its input.
    A layer without ``top_down`` only carries the path down (e.g. across a convnet's
    downsampling, which gets no signal of its own).

    Build transformer layers with :meth:`linear`; any pair of bias-free modules
    mapping ``h`` to the shape of the layer's input works.
    """

    def __init__(self, feed_down: nn.Module, top_down: nn.Module | None = None):
        super().__init__()
        self.feed_down = feed_down
        self.top_down = top_down
        self.reset_parameters()

    @classmethod
    def linear(cls, dim: int, lora_rank: int = 0, lora_alpha: float = 1.0) -> "FeedbackLayer":
        """Two bias-free ``dim x dim`` linear maps; with ``lora_rank`` both are frozen and
        adapted by LoRA factors of that rank (TOAST-Lite)."""
        if lora_rank:
            return cls(LoRALinear(dim, dim, lora_rank, lora_alpha), LoRALinear(dim, dim, lora_rank, lora_alpha))
        return cls(nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False))

    def reset_parameters(self) -> None:
        """Truncated normal (std 0.02) weights (:func:`init_toast_weight`)."""
        init_toast_weight(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(input of the next lower layer, this layer's top-down signal or None)``."""
        hidden = self.feed_down(x)
        return hidden, (self.top_down(hidden) if self.top_down is not None else None)


def run_feedback(layers: nn.ModuleDict, order: Iterable[Hashable], selected: torch.Tensor,
                 ) -> dict[Hashable, torch.Tensor]:
    """Run the feedback path from ``selected`` through ``layers[str(key)]`` for each key of
    ``order`` (top layer first): key -> that layer's top-down signal (layers without
    ``top_down`` carry the path and give none)."""
    signals, hidden = {}, selected
    for key in order:
        hidden, signal = layers[str(key)](hidden)
        if signal is not None:
            signals[key] = signal
    return signals


def variational_loss(layers: nn.ModuleDict, inputs: dict[Hashable, torch.Tensor],
                     outputs: dict[Hashable, torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over recorded layers of ``MSE(feed_down(output of layer l), input of layer l)``.

    Both sides are detached: the loss trains only the feedback maps to invert their
    layer (the variational loss of Shi et al., 2023, as in the reference code).
    ``mask`` (``(B, T)`` boolean, True = real token) restricts the MSE to the real
    positions of padded text batches ``(B, T, D)``; padding never enters the loss.
    """
    terms = []
    for key in inputs:
        feed_down = layers[str(key)].feed_down
        target, output = inputs[key].detach(), outputs[key].detach()
        if mask is not None:
            target, output = target[mask], output[mask]
        reconstruction = feed_down(output.to(_dtype_of(feed_down, target.dtype)))
        terms.append(F.mse_loss(reconstruction.float(), target.float()))
    return torch.stack(terms).sum()


def _dtype_of(module: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype of ``module``'s first parameter (``default`` without any)."""
    for param in module.parameters():
        return param.dtype
    return default
