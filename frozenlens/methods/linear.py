"""Linear probe, and the standardised linear head that Head2Toe builds on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from frozenlens.backbones.taps import Tap
from frozenlens.methods.base import Method, register
from frozenlens.methods.layers import FeatureHead, Standardize, concat_taps
from frozenlens.train.data import TapData
from frozenlens.train.stacked import train_many
from frozenlens.train.trainer import TrainConfig, train

LINEAR_GRID = {"lr": [1e-2, 1e-3, 1e-4], "weight_decay": [1e-2, 1e-3, 1e-4, 0.0]}
"""Search space of the heads trained on fixed features (AdamW)."""


class LinearHeadMethod(Method):
    """A linear classifier on concatenated taps, standardised with training statistics.

    Subclasses choose the taps; :meth:`feature_count` is their flattened width.
    """

    train_defaults = TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=1e-4, epochs=100,
                                 warmup_epochs=10, batch_size=128)
    grid = LINEAR_GRID
    trains_together = True

    def __init__(self, config: Any, backbone: dict[str, Any], num_classes: int):
        super().__init__(config, backbone, num_classes)
        width = self.feature_count()
        self.standardize = Standardize(width)
        self.head = nn.Linear(width, num_classes)

    def feature_count(self) -> int:
        """Width of the concatenated, flattened taps."""
        return sum(_flat_size(t, self.backbone_info) for t in self.taps(self.config, self.backbone_info))

    def feature_keys(self) -> list[str]:
        """Keys of the pooled taps concatenated into the feature vector (a text backbone's padding
        mask is not one: the pooled taps were masked when they were computed)."""
        return [t.key for t in self.taps(self.config, self.backbone_info)]

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Standardised feature vectors of a batch."""
        return self.standardize(concat_taps(batch, self.feature_keys()))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from standardised feature vectors (the trainable part)."""
        return self.head(x)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classify(self.features(batch))

    def fit(self, data: TapData, cfg: TrainConfig, *, val: TapData | None = None,
            progress: bool = False) -> list[float]:
        """Fit the standardisation on ``data``, then train the head."""
        features = self.prepare_features(data)
        self.reset_trainable(cfg.seed)
        return self.train_head(features, cfg, progress, self.name)

    def prepare_features(self, data: TapData) -> TapData:
        """Fit the standardisation on ``data`` and return its feature vectors, computed once.

        The features do not change during training, so every epoch reads the
        same matrix instead of re-concatenating and re-standardising taps.
        """
        features = data.subset(self.feature_keys()).float_features()
        self.standardize.fit(concat_taps(features, self.feature_keys()))
        with torch.no_grad():
            matrix = self.features(features)
        return TapData({"features": matrix}, data.labels, data.num_classes)

    def train_head(self, features: TapData, cfg: TrainConfig, progress: bool, desc: str) -> list[float]:
        """Train :meth:`classify` on precomputed feature vectors."""
        return train(FeatureHead(self.head), features, cfg, progress=progress, desc=desc)

    @classmethod
    def fit_many(cls, models: Sequence["LinearHeadMethod"], data: TapData, cfgs: Sequence[TrainConfig], *,
                 val: TapData | None = None, progress: bool = False) -> list[list[float]]:
        """:meth:`fit` for every model: the features standardised once, the heads trained stacked."""
        if cls.fit is not LinearHeadMethod.fit:
            return super().fit_many(models, data, cfgs, val=val, progress=progress)
        features = share_features(models, data)
        for model, cfg in zip(models, cfgs):
            model.reset_trainable(cfg.seed)
        return train_many([FeatureHead(m.head) for m in models], features, cfgs, progress=progress,
                          desc=cls.name)


def share_features(models: Sequence[LinearHeadMethod], data: TapData) -> TapData:
    """The first model's standardised features of ``data``; the others get its statistics
    (the same data gives the same statistics, so they are computed once)."""
    features = models[0].prepare_features(data)
    for model in models[1:]:
        model.standardize.load_state_dict(models[0].standardize.state_dict())
    return features


def _flat_size(tap: Tap, backbone: dict[str, Any]) -> int:
    dim = backbone["dim"]
    if tap.reduce in ("cls", "patch_mean"):
        return dim
    if tap.reduce.startswith("pool"):
        return int(tap.reduce[4:]) ** 2 * dim
    raise ValueError(f"linear heads read pooled taps, not {tap.key}")


@dataclass
class LinearProbeConfig:
    """Linear probe on the final normed tokens.

    Attributes:
        patch_mean: also use the mean of the patch tokens (``[CLS, mean]``), as in
            the DINOv2 linear evaluation; False reads CLS alone.
    """

    patch_mean: bool = False


@register
class LinearProbe(LinearHeadMethod):
    """Linear probe: a linear head on the final CLS token (optionally + mean patch token)."""

    name = "linear"
    modalities = ("image", "text")
    config_class = LinearProbeConfig
    summary = "linear head on the final CLS token (patch_mean=true adds the mean patch token)"

    @classmethod
    def taps(cls, config: LinearProbeConfig, backbone: dict[str, Any]) -> list[Tap]:
        taps = [Tap("final", "cls")]
        if config.patch_mean:
            taps.append(Tap("final", "patch_mean"))
        return taps
