"""The one trainer for everything that learns from stored taps.

Optimisers Adam, AdamW and SGD (momentum), linear warm-up then cosine decay
per step, seeded shuffling and initialisation so that a run is repeatable, and
an ``evaluate`` that returns accuracy and logits.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from frozenlens.errors import ConfigError
from frozenlens.train.data import TapData

OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass
class TrainConfig:
    """Optimisation settings; ``lr`` is the rate for a batch of ``batch_size``."""

    epochs: int = 100
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 10
    momentum: float = 0.9
    label_smoothing: float = 0.0
    seed: int = 0
    device: str = "cpu"
    order_seed: int | None = None
    """Seed of the minibatch order (None: ``seed``). Configurations trained together
    (:mod:`frozenlens.train.stacked`) share one order; ``seed`` still draws each one's
    initialisation and dropout."""

    def __post_init__(self) -> None:
        """Refuse values that cannot train (the one place training values are checked).

        Raises:
            ConfigError: naming the setting and its value (also a ``ValueError``).
        """
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        _check_int("epochs", self.epochs, 1, "train for at least 1 epoch")
        _check_int("batch_size", self.batch_size, 1, "use at least 1 example per batch")
        _check_int("warmup_epochs", self.warmup_epochs, 0, "use 0 for no warm-up")
        _check_float("lr", self.lr, "a finite learning rate above 0, e.g. lr=0.001", positive=True)
        _check_float("weight_decay", self.weight_decay, "a finite value of 0 or more, e.g. weight_decay=1e-4")
        _check_float("momentum", self.momentum, "a finite value of 0 or more, e.g. momentum=0.9")
        _check_float("label_smoothing", self.label_smoothing, "a value from 0 to 1, e.g. label_smoothing=0.1")
        if self.label_smoothing > 1:
            raise ConfigError(f"label_smoothing={self.label_smoothing!r}: use a value from 0 to 1")
        _check_int("seed", self.seed, None, "use a whole number")

    def short_run_warmup(self) -> "tuple[TrainConfig, str | None]":
        """This config with a warm-up that fits in the run, and a warning when it had to shrink.

        A run of ``epochs <= warmup_epochs`` never leaves the linear warm-up (the rate
        never reaches ``lr``, and a 2-epoch run with a 10-epoch warm-up learns nothing),
        so the warm-up becomes ``epochs // 10`` epochs.
        """
        if self.warmup_epochs == 0 or self.epochs > self.warmup_epochs:
            return self, None
        scaled = max(0, self.epochs // 10)
        return self.updated(warmup_epochs=scaled), (
            f"epochs={self.epochs} does not exceed warmup_epochs={self.warmup_epochs}: the learning rate "
            f"would never leave the warm-up, so the warm-up is {scaled} epochs for this run (set "
            "warmup_epochs below epochs to choose it yourself)")

    def updated(self, **changes: Any) -> "TrainConfig":
        """A copy with ``changes`` applied (unknown names are an error)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON reports."""
        return asdict(self)


def _check_int(name: str, value: Any, minimum: int | None, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name}={value!r}: expected a whole number; {hint}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value!r}: must be at least {minimum}; {hint}")


def _check_float(name: str, value: Any, hint: str, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name}={value!r}: expected a number; use {hint}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ConfigError(f"{name}={value!r}: use {hint}")


@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch's global generators for the block, then restore them (no process-wide effect)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.optimizer``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier of each step: linear warm-up from 0 over ``warmup_steps``,
    then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """The :func:`lr_factor` schedule as a ``LambdaLR`` on ``optimizer``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(warmup_steps, total_steps))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that require gradients."""
    return [p for p in model.parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in trainable_parameters(model))


Objective = Callable[[nn.Module, Any, torch.Tensor, float], tuple[torch.Tensor, float]]
"""``(model, features, labels, label_smoothing) -> (loss to minimise, loss to report)``."""


def cross_entropy_objective(model: nn.Module, features: Any, labels: torch.Tensor,
                            label_smoothing: float) -> tuple[torch.Tensor, float]:
    """Cross-entropy of ``model(features)`` plus ``model.regularization()`` when defined."""
    loss = F.cross_entropy(model(features), labels, label_smoothing=label_smoothing)
    regularization = getattr(model, "regularization", None)
    if regularization is not None:
        loss = loss + regularization()
    return loss, float(loss.detach())


def train(model: nn.Module, data: TapData, cfg: TrainConfig, *, progress: bool = False,
          desc: str = "training", objective: Objective = cross_entropy_objective) -> list[float]:
    """Train ``model`` on ``data``; returns the mean reported loss of each epoch.

    The default objective is cross-entropy plus ``model.regularization()`` when
    the model defines it (e.g. Head2Toe's group lasso); InCA passes its own
    (the sum of per-adapter losses). ``data`` is anything with ``batches`` and
    ``len`` (:class:`TapData`, or a source that computes taps live).
    """
    with seeded(cfg.seed):  # dropout and other in-model randomness; the caller's state is restored
        return _train(model, data, cfg, progress, desc, objective)


def _train(model: nn.Module, data: TapData, cfg: TrainConfig, progress: bool, desc: str,
           objective: Objective) -> list[float]:
    generator = torch.Generator().manual_seed(cfg.seed if cfg.order_seed is None else cfg.order_seed)
    model.to(cfg.device).train()
    optimizer = make_optimizer(trainable_parameters(model), cfg)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    scheduler = warmup_cosine(optimizer, cfg.warmup_epochs * steps_per_epoch,
                              cfg.epochs * steps_per_epoch)
    losses = []
    for _ in tqdm(range(cfg.epochs), desc=desc, unit="epoch", disable=not progress, leave=False):
        total = 0.0
        for features, labels in data.batches(cfg.batch_size, shuffle=True, generator=generator,
                                             device=cfg.device):
            loss, reported = objective(model, features, labels, cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += reported * len(labels)
        losses.append(total / len(data))
    model.eval()
    return losses


@torch.no_grad()
def predict_logits(model: nn.Module, data: TapData, batch_size: int = 256,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Logits for every example of ``data``, in order."""
    model.to(device).eval()
    outs = [model(features).float().cpu() for features, _ in data.batches(batch_size, device=device)]
    return torch.cat(outs)


def evaluate(model: nn.Module, data: TapData, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` on ``data``."""
    logits = predict_logits(model, data, device=device)
    return float((logits.argmax(1) == data.labels).float().mean())
