"""TOAST on a frozen timm ConvNeXt (paper, Section 4.4, "TOAST is adaptable to Convnets").

The paper's three changes for convnets: (i) the feature selection stays as it is,
(ii) the feedback path's linear maps become (de)convolutions so that each layer's
bottom-up and top-down signals have the same shape, (iii) with no self-attention
to steer, the top-down signal is added to the bottom-up input of each layer.
Here:

1. **Pass 1**: the frozen ConvNeXt runs as usual; ``z`` are the positions of its
   last feature map passed through the head's LayerNorm (per position): ``(B, H*W, C)``.
2. **Feature selection** (:class:`~.core.FeatureSelection`), on those positions.
3. **Feedback path**, top down, one :class:`~.core.FeedbackLayer` per forward layer:
   every ConvNeXt block has two bias-free 1x1 convolutions (``feed_down`` maps the
   block's output to its input, ``top_down`` gives the block's signal, the per-position
   linear maps of the ViT variant); every downsampling layer between stages has a
   bias-free transposed convolution (its kernel and stride) that maps the hidden state
   back to the previous stage's channels and resolution, and no signal of its own.
4. **Pass 2**: every block's input is ``x + td`` (the block's residual branch and its
   shortcut both read it); a new linear head reads timm's pooled, normed features
   (``forward_head(..., pre_logits=True)``).

:class:`ConvNeXtTOAST` is used through the Python API (``frozenlens fit`` builds ViT
backbones only); it quacks like a frozenlens in-loop method, so the shared trainer
(:func:`frozenlens.train.trainer.train` / ``evaluate``), :class:`~frozenlens.train.images.ImageData`
and the pre-tuning objective (:func:`.pretune.variational_objective`) work with it.
``docs/methods/toast.md`` ("ConvNeXt") has an example and the deviations.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frozenlens.errors import AdapterError, FrozenlensError
from frozenlens.methods.toast.core import FeatureSelection, FeedbackLayer, run_feedback, variational_loss

ADAPTER_FORMAT = "frozenlens-toast-convnext"
WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter.json"


@dataclass
class ConvNeXtPasses:
    """What one forward computed (the fields :func:`.pretune.variational_objective` reads).

    Attributes:
        logits: ``(B, classes)`` of pass 2.
        features: ``(B, C, H, W)`` pass 2's last feature map (after ``norm_pre``).
        token_weights: ``(B, H*W)`` feature selection's relevance of each position.
        block_inputs, block_outputs: bottom-up input and output of every forward layer
            (blocks and downsamplings, keyed like ``feedback``), only when asked.
    """

    logits: torch.Tensor
    features: torch.Tensor
    token_weights: torch.Tensor
    block_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    block_outputs: dict[str, torch.Tensor] = field(default_factory=dict)


def _downsample_conv(downsample: nn.Module) -> nn.Conv2d | None:
    """The one strided convolution of a stage's downsampling (None for an identity)."""
    convs = [m for m in downsample.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return None
    if len(convs) != 1:
        raise FrozenlensError(f"a ConvNeXt downsampling with {len(convs)} convolutions; TOAST expects one")
    return convs[0]


class ConvNeXtTOAST(nn.Module):
    """TOAST's top-down modules and a linear head on a frozen timm ``ConvNeXt``.

    The ConvNeXt is held, not registered: :meth:`state_dict` holds only ``selection.*``,
    ``feedback.*`` and ``head.*``. Feedback keys: ``"<stage>_<block>"`` for blocks and
    ``"<stage>_down"`` for the downsampling that starts a stage.

    Args:
        model: a timm ConvNeXt (``timm.create_model("convnext_*")``); frozen here.
        num_classes: classes of the new head.
        tune_p: train the channel transform ``P`` (paper: yes).
        name: how the model was asked for (recorded in saved adapters).
        img_size: input size in pixels for :meth:`transform` (default: the model's data config).
    """

    name = "toast-convnext"
    in_loop = True

    def __init__(self, model: nn.Module, num_classes: int, *, tune_p: bool = True, name: str = "",
                 img_size: int | None = None):
        super().__init__()
        from timm.models.convnext import ConvNeXt

        if not isinstance(model, ConvNeXt):
            raise FrozenlensError(f"ConvNeXtTOAST needs a timm ConvNeXt (timm.create_model('convnext_atto'), ...), "
                                  f"not {type(model).__name__}; ViTs use the toast method of frozenlens fit")
        for param in model.parameters():
            param.requires_grad_(False)
        model.eval()
        self._model = [model]
        self.model_name = name or getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
        layers: dict[str, FeedbackLayer] = {}
        self.order: list[str] = []            # forward layers, top first
        channels = []
        for s, stage in enumerate(model.stages):
            conv = _downsample_conv(stage.downsample)
            width = stage.blocks[0].conv_dw.in_channels
            if conv is not None:
                layers[f"{s}_down"] = FeedbackLayer(nn.ConvTranspose2d(conv.out_channels, conv.in_channels,
                                                                       conv.kernel_size, conv.stride, bias=False))
            for b in range(len(stage.blocks)):
                layers[f"{s}_{b}"] = FeedbackLayer(nn.Conv2d(width, width, 1, bias=False),
                                                   nn.Conv2d(width, width, 1, bias=False))
            channels.append(width)
        for s in reversed(range(len(model.stages))):
            self.order += [f"{s}_{b}" for b in reversed(range(len(model.stages[s].blocks)))]
            if f"{s}_down" in layers:
                self.order.append(f"{s}_down")
        dim = channels[-1]
        self.selection = FeatureSelection(dim)
        self.feedback = nn.ModuleDict(layers)
        self.head = nn.Linear(dim, num_classes)
        self.selection.channel_transform.requires_grad_(tune_p)
        self.tune_p = tune_p
        self.num_classes = num_classes
        self.reset_trainable(0)
        from timm.data import resolve_data_config

        self.data_config = resolve_data_config({}, model=model)
        if img_size is not None:
            self.data_config.update(input_size=(3, img_size, img_size), crop_pct=1.0)

    # -- what the shared trainer and ImageData ask for ----------------------------------
    @property
    def frozen_model(self) -> nn.Module:
        """The frozen timm ConvNeXt."""
        return self._model[0]

    @property
    def image_size(self) -> int:
        """Square input size (pixels) of the model's data config."""
        return int(self.data_config["input_size"][-1])

    def transform(self):
        """timm's evaluation transform for this model (what :class:`ImageData` decodes with)."""
        from timm.data import create_transform

        return create_transform(**self.data_config, is_training=False)

    def reset_trainable(self, seed: int) -> None:
        """Fresh modules from ``seed``: xi normal, P identity, feedback truncated normal, head as the ViT's."""
        from frozenlens.methods.toast.model import _init_head
        from frozenlens.train.trainer import seeded

        with seeded(seed):
            self.selection.reset_parameters()
            for layer in self.feedback.values():
                layer.reset_parameters()
            _init_head(self.head)

    def train(self, mode: bool = True) -> "ConvNeXtTOAST":
        """Train mode for TOAST's modules; the ConvNeXt stays in eval mode."""
        super().train(mode)
        self.frozen_model.eval()
        return self

    # -- forward --------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of pass 2 for ``batch["images"]``."""
        return self.passes(batch["images"]).logits

    def passes(self, images: torch.Tensor, *, record_blocks: bool = False) -> ConvNeXtPasses:
        """Pass 1, feature selection, feedback and pass 2 for a batch of preprocessed images."""
        model = self.frozen_model
        with torch.no_grad():
            stem = model.stem(images)
            features = model.norm_pre(model.stages(stem))
            z = model.head.norm(features).flatten(2).transpose(1, 2)          # (B, H*W, C)
        selected = self.selection(z).transpose(1, 2).reshape(features.shape)
        signals = run_feedback(self.feedback, self.order, selected)
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}
        x = stem
        for s, stage in enumerate(model.stages):
            if f"{s}_down" in self.feedback:
                inputs[f"{s}_down"] = x
                x = stage.downsample(x)
                outputs[f"{s}_down"] = x
            else:
                x = stage.downsample(x)
            for b, block in enumerate(stage.blocks):
                key = f"{s}_{b}"
                inputs[key] = x
                x = block(x + signals[key])
                outputs[key] = x
        x = model.norm_pre(x)
        logits = self.head(model.forward_head(x, pre_logits=True))
        if not record_blocks:
            inputs, outputs = {}, {}
        return ConvNeXtPasses(logits, x, self.selection.token_weights(z), inputs, outputs)

    def variational_loss(self, passes: ConvNeXtPasses) -> torch.Tensor:
        """Every feedback layer's ``feed_down`` reconstructs its layer's input from its output."""
        return variational_loss(self.feedback, passes.block_inputs, passes.block_outputs)

    # -- adapters -------------------------------------------------------------------------
    def save(self, folder: str | Path, classes: list[str], extra: dict[str, Any] | None = None) -> Path:
        """``adapter.safetensors`` (TOAST's modules and head) + ``adapter.json``; returns the folder."""
        from frozenlens.atomic import save_safetensors, write_json
        from frozenlens.backbones.base import state_dict_sha256

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        weights = save_safetensors(out / WEIGHTS_FILE, state, error=AdapterError)
        meta = {"format": ADAPTER_FORMAT, "format_version": 1, "method": self.name, "model": self.model_name,
                "model_weights_hash": state_dict_sha256(self.frozen_model), "classes": list(classes),
                "tune_p": self.tune_p, "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                **(extra or {})}
        write_json(out / CONFIG_FILE, meta, error=AdapterError)
        return out

    @classmethod
    def load(cls, folder: str | Path, model: nn.Module) -> tuple["ConvNeXtTOAST", list[str]]:
        """``(toast, classes)`` from a folder written by :meth:`save`, on the same ConvNeXt weights."""
        from safetensors.torch import load_file

        from frozenlens.backbones.base import state_dict_sha256

        path = Path(folder) / CONFIG_FILE
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise AdapterError(f"{path}: cannot read it ({err}); pass a folder written by ConvNeXtTOAST.save") from None
        if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
            raise AdapterError(f"{path}: not a TOAST ConvNeXt adapter (expected format {ADAPTER_FORMAT!r})")
        if meta["model_weights_hash"] != state_dict_sha256(model):
            raise AdapterError(f"{folder} was trained on other ConvNeXt weights ({meta['model']!r}); load it with "
                               "the model it was trained on")
        weights = Path(folder) / WEIGHTS_FILE
        if hashlib.sha256(weights.read_bytes()).hexdigest() != meta["weights_sha256"]:
            raise AdapterError(f"{weights}: its SHA-256 differs from {CONFIG_FILE}'s; the file is damaged")
        toast = cls(model, len(meta["classes"]), tune_p=meta["tune_p"], name=meta["model"])
        toast.load_state_dict(load_file(str(weights)))
        return toast, list(meta["classes"])
