"""Head2Toe (Evci et al., 2022): a sparse linear head on pooled features of every block.

Every block's output tokens are average-pooled (CLS kept, the patch grid pooled
to 1x1 and 2x2 by default) and concatenated. A linear head is trained with a
group-lasso penalty on its input features; the top ``keep_fraction`` of the
features by the L2 norm of their weights are kept, and a fresh head is trained
on them alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from frozenlens.backbones.taps import Tap, block_tap
from frozenlens.methods.base import backbone_modality, register
from frozenlens.methods.layers import FeatureHead, strongest_features
from frozenlens.methods.linear import LinearHeadMethod, share_features
from frozenlens.train.data import TapData
from frozenlens.train.stacked import train_many
from frozenlens.train.trainer import TrainConfig, seeded


@dataclass
class Head2ToeConfig:
    """Head2Toe settings.

    Attributes:
        pool_sizes: patch-grid pooling sizes per block (``g`` gives ``g*g`` vectors).
        include_cls: also read each block's CLS token.
        keep_fraction: fraction of features kept after the group-lasso stage.
        group_lasso: coefficient of the group-lasso penalty in the selection stage.
    """

    pool_sizes: tuple[int, ...] = (1, 2)
    include_cls: bool = True
    keep_fraction: float = 0.1
    group_lasso: float = 1e-4


@register
class Head2Toe(LinearHeadMethod):
    """Head2Toe: group-lasso feature selection over pooled taps of every block."""

    name = "head2toe"
    modalities = ("image", "text")
    config_class = Head2ToeConfig
    summary = "pooled tokens of every block, group-lasso selection, linear head on the kept features"

    def __init__(self, config: Head2ToeConfig, backbone: dict[str, Any], num_classes: int):
        if not 0 < config.keep_fraction <= 1:
            raise ValueError(f"keep_fraction={config.keep_fraction}: must be in (0, 1]")
        super().__init__(config, backbone, num_classes)
        width = self.feature_count()
        self.num_kept = max(1, round(config.keep_fraction * width))
        self.register_buffer("selected", torch.arange(self.num_kept))
        self.head = nn.Linear(self.num_kept, num_classes)

    @classmethod
    def taps(cls, config: Head2ToeConfig, backbone: dict[str, Any]) -> list[Tap]:
        """Each block's CLS and patch grid pooled to each of ``pool_sizes``; on a text backbone (no
        grid) each block's CLS and masked mean token instead (``pool_sizes`` does not apply)."""
        pools = ["patch_mean"] if backbone_modality(backbone) == "text" else [f"pool{g}" for g in config.pool_sizes]
        reductions = (["cls"] if config.include_cls else []) + pools
        return [block_tap(i, r) for i in range(backbone["depth"]) for r in reductions]

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the kept features."""
        return self.head(x[:, self.selected])

    def fit(self, data: TapData, cfg: TrainConfig, *, val: TapData | None = None,
            progress: bool = False) -> list[float]:
        """Selection stage (all features, group lasso), keep the top rows, retrain the head."""
        return self.fit_many([self], data, [cfg], val=val, progress=progress)[0]

    @classmethod
    def fit_many(cls, models: Sequence["Head2Toe"], data: TapData, cfgs: Sequence[TrainConfig], *,
                 val: TapData | None = None, progress: bool = False) -> list[list[float]]:
        """Both stages for every model: selection heads stacked on the shared features, then each
        head retrained on its own kept columns (in lockstep: one minibatch order for all)."""
        features = share_features(models, data)
        selectors = []
        for model, cfg in zip(models, cfgs):
            model.reset_trainable(cfg.seed)
            with seeded(cfg.seed):
                selectors.append(FeatureHead(nn.Linear(model.feature_count(), model.num_classes),
                                             model.config.group_lasso))
        losses = train_many(selectors, features, cfgs, progress=progress, desc=f"{cls.name} select")
        kept = []
        for model, selector, cfg in zip(models, selectors, cfgs):
            model.selected.copy_(strongest_features(selector.linear.weight, model.num_kept))
            with seeded(cfg.seed):
                model.head.reset_parameters()
            kept.append(TapData({"features": features.features["features"][:, model.selected]}, features.labels,
                                features.num_classes))   # the kept columns once, not gathered every step
        retrain = train_many([FeatureHead(m.head) for m in models], kept, cfgs, progress=progress,
                             desc=f"{cls.name} retrain")
        return [a + b for a, b in zip(losses, retrain)]
