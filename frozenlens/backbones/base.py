"""The frozen backbone: a timm ViT that cannot learn, and knows how to be tapped."""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from frozenlens.backbones.taps import Tap, check_taps, reduce_tokens, tap_shape


def state_dict_sha256(module: nn.Module) -> str:
    """SHA-256 over every tensor of ``module``'s state dict (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(value.shape)}|{value.dtype}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


class FrozenBackbone(nn.Module):
    """A pretrained ViT whose weights never change.

    Every parameter has ``requires_grad=False`` and the module stays in eval
    mode even when a parent calls ``.train()``. :meth:`forward_taps` returns the
    requested activations (see :mod:`frozenlens.backbones.taps`) from one pass.

    Attributes:
        name: how the backbone was asked for (recorded in adapter files).
        arch: timm architecture name.
        model: the timm ``VisionTransformer``.
        data_config: timm data config (input_size, mean, std, interpolation, crop_pct).
        weights_hash: SHA-256 of the weights; adapters are bound to it.
    """

    def __init__(self, model: nn.Module, name: str, arch: str, data_config: dict[str, Any]):
        super().__init__()
        self.model = model
        self.name = name
        self.arch = arch
        self.data_config = dict(data_config)
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.model.eval()
        self.weights_hash = state_dict_sha256(self.model)

    # -- facts about the architecture ---------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the backbone's weights are (inputs must be moved there)."""
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        """Token width D."""
        return int(self.model.embed_dim)

    @property
    def depth(self) -> int:
        """Number of transformer blocks N."""
        return len(self.model.blocks)

    @property
    def num_heads(self) -> int:
        """Attention heads per block."""
        return int(self.model.blocks[0].attn.num_heads)

    @property
    def num_prefix_tokens(self) -> int:
        """Class + register tokens in front of the patch tokens."""
        return int(self.model.num_prefix_tokens)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, cols) at the configured input size."""
        rows, cols = self.model.patch_embed.grid_size
        return int(rows), int(cols)

    @property
    def num_tokens(self) -> int:
        """Tokens per image: prefix + patches."""
        rows, cols = self.grid_size
        return self.num_prefix_tokens + rows * cols

    @property
    def image_size(self) -> int:
        """Square input size in pixels."""
        return int(self.data_config["input_size"][-1])

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of the backbone: recorded in stores and adapters."""
        return {
            "name": self.name,
            "arch": self.arch,
            "weights_hash": self.weights_hash,
            "dim": self.dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "num_prefix_tokens": self.num_prefix_tokens,
            "grid_size": list(self.grid_size),
            "data_config": _jsonable(self.data_config),
        }

    def tap_shape(self, tap: Tap) -> tuple[int, ...]:
        """Per-image shape of ``tap``'s value."""
        return tap_shape(tap, self.num_tokens, self.num_prefix_tokens, self.dim)

    def transform(self):
        """Evaluation preprocessing (PIL image -> normalised tensor), from the data config."""
        from timm.data import create_transform

        return create_transform(**self.data_config, is_training=False)

    # -- frozen behaviour -----------------------------------------------------------------
    def train(self, mode: bool = True) -> "FrozenBackbone":
        """Ignore ``mode``: a frozen backbone always runs in eval mode."""
        return super().train(False)

    # -- forward --------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens entering block 0: patch embedding, prefix tokens, position embedding."""
        return embed_tokens(self.model, images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Final normed tokens ``(B, T, D)``."""
        return self.model.forward_features(images)

    def forward_taps(self, images: torch.Tensor, taps: Iterable[Tap]) -> dict[str, torch.Tensor]:
        """Values of ``taps`` for a batch of preprocessed images, from one pass.

        Blocks after the last one a tap needs are not run. A method-defined tap
        (:class:`~frozenlens.backbones.taps.MethodSite`, e.g. MIST's ``gather.<k>``)
        is its site's ``combine`` of the input token maps read in the same pass,
        then reduced; inputs nobody asked for are not returned.
        """
        taps = list(taps)
        check_taps(taps, self.depth, self.name)
        derived = _by_method_site(taps)
        inputs = {site: _site_inputs(group[0], self.depth) for site, group in derived.items()}
        read = [t for t in taps if t.site not in derived] + [i for group in inputs.values() for i in group]
        out = self._read(images, _sites_by_position(list(dict.fromkeys(read)), self.depth))
        for site, group in derived.items():
            method_site, k = group[0].method_site
            self._record(out, group, method_site.combine({i.key: out[i.key] for i in inputs[site]}, k))
        asked = {t.key for t in taps}
        return {key: value for key, value in out.items() if key in asked}

    def _read(self, images: torch.Tensor, wanted: dict[int, list[Tap]]) -> dict[str, torch.Tensor]:
        """Run the backbone as far as ``wanted`` needs, recording each tap at its position."""
        out: dict[str, torch.Tensor] = {}
        x = self.embed(images.to(self.device))
        self._record(out, wanted.get(-1, ()), x)
        last = min(max(wanted, default=-1), self.depth - 1)
        for index, block in enumerate(self.model.blocks[: last + 1]):
            x = block(x)
            self._record(out, wanted.get(index, ()), x)
        if self.depth in wanted:
            self._record(out, wanted[self.depth], self.model.norm(x))
        return out

    def _record(self, out: dict[str, torch.Tensor], taps: Sequence[Tap], x: torch.Tensor) -> None:
        for tap in taps:
            out[tap.key] = reduce_tokens(x, tap.reduce, self.num_prefix_tokens, self.grid_size)


def embed_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Tokens entering block 0 of a timm ViT (or an edited view of one, see ``hooks``)."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def _sites_by_position(taps: Sequence[Tap], depth: int) -> dict[int, list[Tap]]:
    """Group taps by the point of the forward pass where they are read (depth = final)."""
    grouped: dict[int, list[Tap]] = {}
    for tap in taps:
        grouped.setdefault(depth if tap.block is None else tap.block, []).append(tap)
    return grouped


def _by_method_site(taps: Sequence[Tap]) -> dict[str, list[Tap]]:
    """Method-defined taps grouped by site (one ``combine`` serves all reductions of a site)."""
    grouped: dict[str, list[Tap]] = {}
    for tap in taps:
        if tap.method_site is not None:
            grouped.setdefault(tap.site, []).append(tap)
    return grouped


def _site_inputs(tap: Tap, depth: int) -> list[Tap]:
    """The backbone taps a method-defined ``tap`` is computed from."""
    site, k = tap.method_site
    return site.inputs(depth, k)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
