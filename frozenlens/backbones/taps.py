"""Taps: named activations a method reads from one forward pass of the backbone.

A :class:`Tap` names a *site* in the ViT and a *reduction* of its tokens:

===============  =============================================================
site             meaning
===============  =============================================================
``embed``        input of block 0 (patch embedding + position + ``norm_pre``)
``block.<i>``    output of block ``i`` (0-based), i.e. the input of block i+1
``final``        output of the final norm (what timm's ``forward_features`` returns)
``gather.<k>``   MIST's gather g_k: ``embed`` plus the outputs of blocks ``0..k-1``,
                 summed in float32 (one token map however many blocks it sums)
===============  =============================================================

==================  ==========================================================
reduction           shape per image
==================  ==========================================================
``tokens``          ``(T, D)`` every token, prefix tokens first
``cls``             ``(D,)`` the class token
``prefix``          ``(P, D)`` all prefix tokens (class, registers)
``patch_mean``      ``(D,)`` mean of the patch tokens
``pool<g>``         ``(g*g, D)`` patch grid average-pooled to ``g x g``
==================  ==========================================================

A tap's :attr:`Tap.key` (``"block.3:pool2"``) names it in the store, in
adapter files and in the batches methods receive.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

from frozenlens.errors import FrozenlensError

_SITE = re.compile(r"^(embed|final|block\.(\d+)|gather\.([1-9]\d*))$")
_REDUCE = re.compile(r"^(tokens|cls|prefix|patch_mean|pool(\d+))$")


@dataclass(frozen=True, order=True)
class Tap:
    """One activation site of the backbone and how its tokens are reduced."""

    site: str
    reduce: str = "tokens"

    def __post_init__(self) -> None:
        if not _SITE.match(self.site):
            raise FrozenlensError(
                f"unknown tap site {self.site!r}: use 'embed', 'block.<i>', 'final' or 'gather.<k>' (k >= 1)"
            )
        if not _REDUCE.match(self.reduce):
            raise FrozenlensError(
                f"unknown tap reduction {self.reduce!r}: use tokens, cls, prefix, "
                "patch_mean or pool<g>"
            )

    @property
    def key(self) -> str:
        """Stable name of the tap, e.g. ``"block.3:pool2"``."""
        return f"{self.site}:{self.reduce}"

    @classmethod
    def parse(cls, key: str) -> "Tap":
        """Inverse of :attr:`key`; ``"final"`` alone means ``final:tokens``."""
        site, _, reduce = key.partition(":")
        return cls(site, reduce or "tokens")

    @property
    def gather_depth(self) -> int | None:
        """``k`` of a ``gather.<k>`` site (the number of blocks it sums), None for other sites."""
        return int(self.site.split(".")[1]) if self.site.startswith("gather.") else None

    @property
    def block(self) -> int | None:
        """Block index of a ``block.<i>`` site, -1 for ``embed``, None for ``final``.

        A ``gather.<k>`` tap is a sum over blocks, not one site: asking for its
        block is an error (see :attr:`gather_depth`).
        """
        if self.gather_depth is not None:
            raise FrozenlensError(f"tap {self.key} sums blocks 0..{self.gather_depth - 1}: it has no "
                                  "single block; read Tap.gather_depth, or compute it with "
                                  "FrozenBackbone.forward_taps")
        if self.site == "embed":
            return -1
        if self.site == "final":
            return None
        return int(self.site.split(".")[1])


def check_taps(taps: Iterable[Tap], depth: int, backbone: str = "this backbone") -> None:
    """Refuse taps the backbone cannot produce, before anything runs.

    ``block.<i>`` needs ``i < depth`` and ``gather.<k>`` needs ``k <= depth``.

    Raises:
        FrozenlensError: naming the tap and the range the backbone has.
    """
    for tap in taps:
        k = tap.gather_depth
        if k is not None and k > depth:
            raise FrozenlensError(f"tap {tap.key}: {backbone} has {depth} blocks, so gather.<k> takes "
                                  f"k from 1 to {depth}")
        if k is None and tap.block is not None and tap.block >= depth:
            raise FrozenlensError(f"tap {tap.key}: {backbone} has {depth} blocks, block.0 to "
                                  f"block.{depth - 1} (or 'final' for the output of the final norm)")


def block_tap(index: int, reduce: str = "tokens") -> Tap:
    """Tap on the output of block ``index`` (0-based)."""
    return Tap(f"block.{index}", reduce)


def reduce_tokens(
    x: torch.Tensor, reduce: str, num_prefix_tokens: int, grid: tuple[int, int]
) -> torch.Tensor:
    """Apply a tap reduction to tokens ``x`` of shape ``(B, T, D)``."""
    if reduce == "tokens":
        return x
    if reduce == "cls":
        if num_prefix_tokens < 1:
            raise FrozenlensError("this backbone has no class token; use patch_mean instead of cls")
        return x[:, 0]
    if reduce == "prefix":
        return x[:, :num_prefix_tokens]
    patches = x[:, num_prefix_tokens:]
    if reduce == "patch_mean":
        return patches.mean(dim=1)
    size = int(reduce[len("pool"):])
    batch, _, dim = patches.shape
    grid_map = patches.transpose(1, 2).reshape(batch, dim, grid[0], grid[1])
    pooled = F.adaptive_avg_pool2d(grid_map, size)
    return pooled.flatten(2).transpose(1, 2)


def tap_shape(tap: Tap, num_tokens: int, num_prefix_tokens: int, dim: int) -> tuple[int, ...]:
    """Shape of one image's value for ``tap`` (without the batch dimension)."""
    if tap.reduce == "tokens":
        return (num_tokens, dim)
    if tap.reduce in ("cls", "patch_mean"):
        return (dim,)
    if tap.reduce == "prefix":
        return (num_prefix_tokens, dim)
    size = int(tap.reduce[len("pool"):])
    return (size * size, dim)
