"""Taps: named activations a method reads from one forward pass of the backbone.

A :class:`Tap` names a *site* in the ViT and a *reduction* of its tokens:

===============  =============================================================
site             meaning
===============  =============================================================
``embed``        input of block 0 (patch embedding + position + ``norm_pre``)
``block.<i>``    output of block ``i`` (0-based), i.e. the input of block i+1
``final``        output of the final norm (what timm's ``forward_features`` returns)
``<prefix>.<k>`` a *method-defined* site (:class:`MethodSite`, :func:`register_site`):
                 a token map a method computes from other sites of the same pass,
                 e.g. MIST's gather ``gather.<k>`` (k >= 1)
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
from importlib import import_module
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

from frozenlens.errors import FrozenlensError

_SITE = re.compile(r"^(embed|final|block\.(\d+))$")
_METHOD_SITE = re.compile(r"^([a-z][a-z0-9_]*)\.([1-9]\d{0,8})$")  # k >= 1, never a 5000-digit int()
_REDUCE = re.compile(r"^(tokens|cls|prefix|patch_mean|pool(\d+))$")
GENERIC_SITES = ("embed", "block.<i>", "final")
"""Sites every backbone has; methods add their own with :func:`register_site`."""


@dataclass(frozen=True)
class MethodSite:
    """A site a method defines: one token map computed from backbone taps of the same pass.

    Its taps are named ``<prefix>.<k>`` (k >= 1) with any reduction; the reduction
    applies to the combined ``(B, T, D)`` token map.

    Attributes:
        prefix: the site name before the dot, e.g. ``"gather"``.
        method: the method that registered it (for messages), e.g. ``"mist"``.
        meaning: one line on what the site is.
        valid_k: backbone depth -> the k this backbone allows.
        inputs: ``(depth, k)`` -> the backbone taps (token maps) the site is computed from.
        combine: ``(values of those inputs by key, k)`` -> the site's ``(B, T, D)`` tokens.
    """

    prefix: str
    method: str
    meaning: str
    valid_k: Callable[[int], range]
    inputs: Callable[[int, int], list["Tap"]]
    combine: Callable[[Mapping[str, torch.Tensor], int], torch.Tensor]


_METHOD_SITES: dict[str, MethodSite] = {}


def register_site(site: MethodSite) -> MethodSite:
    """Add a method-defined site; its prefix may not be a generic site's name or another method's."""
    clash = _METHOD_SITES.get(site.prefix)
    generic = {name.split(".")[0] for name in GENERIC_SITES}
    if site.prefix in generic or (clash is not None and clash.method != site.method):
        raise FrozenlensError(f"tap site prefix {site.prefix!r} is taken; choose another for {site.method}")
    _METHOD_SITES[site.prefix] = site
    return site


def method_sites() -> dict[str, MethodSite]:
    """Registered method-defined sites by prefix (the methods are imported first: they register)."""
    import_module("frozenlens.methods")  # methods register their sites when imported
    return dict(_METHOD_SITES)


def _method_site(site: str) -> tuple[MethodSite, int] | None:
    match = _METHOD_SITE.match(site)
    if match is None:
        return None
    registered = _METHOD_SITES.get(match.group(1)) or method_sites().get(match.group(1))
    return (registered, int(match.group(2))) if registered else None


def _site_help() -> str:
    generic = ", ".join(repr(s) for s in GENERIC_SITES)
    methods = "; ".join(f"'{s.prefix}.<k>' (k >= 1, {s.method}: {s.meaning})" for s in method_sites().values())
    return f"use {generic}" + (f", or a method's site: {methods}" if methods else "")


@dataclass(frozen=True, order=True)
class Tap:
    """One activation site of the backbone and how its tokens are reduced."""

    site: str
    reduce: str = "tokens"

    def __post_init__(self) -> None:
        if not _SITE.match(self.site) and _method_site(self.site) is None:
            raise FrozenlensError(f"unknown tap site {self.site!r}: {_site_help()}")
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
    def method_site(self) -> tuple[MethodSite, int] | None:
        """``(site, k)`` of a method-defined ``<prefix>.<k>`` tap, None for a generic site."""
        return _method_site(self.site)

    @property
    def block(self) -> int | None:
        """Block index of a ``block.<i>`` site, -1 for ``embed``, None for ``final``.

        A method-defined tap is computed from several sites, not read at one:
        asking for its block is an error (see :attr:`method_site`).
        """
        derived = self.method_site
        if derived is not None:
            site, k = derived
            raise FrozenlensError(f"tap {self.key} is {site.method}'s {site.prefix}.<k> (k={k}), computed "
                                  "from several sites: it has no single block; read Tap.method_site, or "
                                  "compute it with FrozenBackbone.forward_taps")
        if self.site == "embed":
            return -1
        if self.site == "final":
            return None
        return int(self.site.split(".")[1])


def check_taps(taps: Iterable[Tap], depth: int, backbone: str = "this backbone") -> None:
    """Refuse taps the backbone cannot produce, before anything runs.

    ``block.<i>`` needs ``i < depth``; a method-defined ``<prefix>.<k>`` needs k in
    its :attr:`MethodSite.valid_k`.

    Raises:
        FrozenlensError: naming the tap and the range the backbone has.
    """
    for tap in taps:
        derived = tap.method_site
        if derived is not None:
            site, k = derived
            allowed = site.valid_k(depth)
            if k not in allowed:
                raise FrozenlensError(f"tap {tap.key}: {backbone} has {depth} blocks, so {site.prefix}.<k> "
                                      f"takes k from {allowed.start} to {allowed.stop - 1}")
        elif tap.block is not None and tap.block >= depth:
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
