"""Choosing a method setting on validation data inside ``fit``.

Some methods pick one of a few values of a setting on validation data (MIST
picks its gather depth ``k`` among ``{N/3, 2N/3, N}``). The VTAB protocol gives
``fit`` the val split during the grid search and nothing in the final runs on
train+val, so the same rule applies everywhere:

* with ``val``: train one model per candidate on ``data``, rank them on ``val``,
  keep the best as it is;
* without: train them on a seeded, stratified ``1 - holdout_fraction`` of
  ``data``, rank them on the rest, then retrain the kept one on all of ``data``.

The test split is never involved. :func:`selection_split` is that split rule
on its own, for methods that train their candidates some other way (InCA trains
its per-block adapters stacked in one model).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch.nn import functional as F

from frozenlens.errors import FrozenlensError
from frozenlens.train.data import TapData
from frozenlens.train.trainer import TrainConfig, predict_logits

if TYPE_CHECKING:
    from frozenlens.methods.base import Method


_log = logging.getLogger("frozenlens")

def selection_split(data: TapData, val: TapData | None, holdout_fraction: float,
                    seed: int) -> tuple[TapData, TapData]:
    """``(train on, rank on)``: ``(data, val)`` when ``val`` is given, else a seeded holdout of ``data``."""
    if val is not None:
        return data, val
    if not 0 < holdout_fraction < 1:
        raise FrozenlensError(f"holdout_fraction={holdout_fraction}: must be in (0, 1)")
    return data.holdout(holdout_fraction, seed=seed)


@torch.no_grad()
def accuracy_and_loss(model: torch.nn.Module, data: TapData, batch_size: int = 256,
                      device: str | torch.device = "cpu") -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` on ``data``."""
    logits = predict_logits(model, data, batch_size, device)
    accuracy = float((logits.argmax(1) == data.labels).float().mean())
    return accuracy, float(F.cross_entropy(logits, data.labels))


def best_on(models: dict[Any, torch.nn.Module], data: TapData, cfg: TrainConfig, *, label: str = "",
            progress: bool = False) -> tuple[Any, dict[Any, float], dict[Any, float]]:
    """``(key of the best model, accuracy by key, cross-entropy by key)`` on ``data``: the highest
    accuracy wins, ties go to the lower loss, then to the first key."""
    accuracy: dict[Any, float] = {}
    loss: dict[Any, float] = {}
    for key, model in models.items():
        accuracy[key], loss[key] = accuracy_and_loss(model, data, cfg.batch_size, cfg.device)
        if progress:
            _log.info("  %s%s: held-out accuracy %.4f", label, key, accuracy[key])
    best = min(models, key=lambda k: (-accuracy[k], loss[k]))
    return best, accuracy, loss


@dataclass
class Selection:
    """Outcome of :func:`fit_selecting`.

    Attributes:
        setting: the config field that was chosen.
        chosen: its kept value.
        accuracy: ranking accuracy of each candidate value.
        loss: ranking cross-entropy of each candidate value (breaks accuracy ties).
        losses: training loss per epoch of every run, in order (candidates, then the refit).
    """

    setting: str
    chosen: Any
    accuracy: dict[Any, float] = field(default_factory=dict)
    loss: dict[Any, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)


def fit_selecting(method: "Method", setting: str, candidates: Sequence[Any], data: TapData,
                  cfg: TrainConfig, *, val: TapData | None = None, holdout_fraction: float = 0.2,
                  refit: bool = True, progress: bool = False) -> Selection:
    """Fit ``method`` choosing config field ``setting`` among ``candidates`` on validation data.

    One sibling of ``method`` per candidate (same config but ``setting``) is fitted
    and ranked as the module docstring says (accuracy, then lower loss); ``method``
    then takes the winner's config and learned state, and, without ``val`` and with
    ``refit``, is fitted again on all of ``data``. The candidates' models must have
    the same state-dict shapes (the setting changes what is read, not what is learned).
    """
    if not candidates:
        raise FrozenlensError(f"{method.name}: no candidate values for {setting!r}")
    from frozenlens.methods.base import build_method

    train_on, rank_on = selection_split(data, val, holdout_fraction, cfg.seed)
    selection = Selection(setting, None)
    siblings = [build_method(method.name, dataclasses.replace(method.config, **{setting: value}),
                             method.backbone_source(), method.num_classes) for value in candidates]
    runs = type(method).fit_many(siblings, train_on, [cfg] * len(siblings), progress=progress)  # one pass
    selection.losses = [loss for run in runs for loss in run]
    by_value = dict(zip(candidates, siblings))
    selection.chosen, selection.accuracy, selection.loss = best_on(
        by_value, rank_on, cfg, label=f"{method.name} {setting}=", progress=progress)
    winner = by_value[selection.chosen]
    method.config = winner.config
    method.load_state_dict(winner.state_dict())
    if val is None and refit:
        selection.losses += method.fit(data, cfg, progress=progress)
    return selection
