"""Many configurations of one method trained together: each minibatch read once, every configuration computes on it.

The VTAB protocol trains a method once per grid point and once per seed. From the
store these runs differ only in their trainable parameters and optimiser
settings, never in the data, so :func:`train_many` runs them in lockstep over one
minibatch order:

* **stacked** (the fast path): when every training view's class can
  :meth:`~Stackable.stack` them, their parameters become tensors with a leading
  configuration axis and one module computes every configuration's logits from
  the shared batch (a linear head becomes one ``(B, F) @ (F, C*K)`` matmul; VQT's
  query tokens of every configuration attend over the stored tokens together).
  :class:`StackedOptimizer` then applies Adam, AdamW or SGD with each
  configuration's own learning rate and weight decay.
* **lockstep** (every other method): one ordinary optimiser per configuration,
  each stepping on the same minibatch in turn; each configuration keeps its own
  random stream, so it trains exactly as it would alone.

Each configuration keeps its own initialisation (its seed), learning rate,
weight decay and schedule. They share the minibatch order, drawn from
``TrainConfig.order_seed`` (the first configuration's), and whatever
:data:`SHARED_SETTINGS` names; configurations that differ there train in
separate groups. Each configuration also keeps its own random stream (seeded
from its ``seed``, as training alone seeds torch's), so its dropout draws do not
depend on which configurations share its stack. With the same order seed, a
configuration trained in a stack ends with the same weights as trained alone
(``tests/test_stacked.py``), up to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from frozenlens.train.data import minibatch_indices
from frozenlens.train.trainer import (
    Objective,
    TrainConfig,
    cross_entropy_objective,
    lr_factor,
    make_optimizer,
    trainable_parameters,
    warmup_cosine,
)

SHARED_SETTINGS = ("epochs", "batch_size", "optimizer", "warmup_epochs", "momentum", "label_smoothing",
                   "device", "order_seed")
"""Training settings every configuration of one stack must share (lr, weight decay and seed may differ)."""


class StackedView(nn.Module):
    """Every configuration's training view at once (built by :meth:`Stackable.stack`)."""

    random_streams: "list[_RandomStream] | None" = None
    """Each configuration's random stream while :func:`train_many` trains the stack (None otherwise)."""

    def per_config_dropout(self, inputs: Sequence[torch.Tensor], p: float) -> list[torch.Tensor]:
        """Dropout on ``inputs[c]`` for each configuration ``c``, drawn from configuration ``c``'s own
        random stream: the draws that configuration makes when it trains alone, whatever shares its stack."""
        if self.random_streams is None:
            return [F.dropout(x, p, self.training) for x in inputs]
        dropped = []
        for x, stream in zip(inputs, self.random_streams, strict=True):
            with stream:
                dropped.append(F.dropout(x, p, self.training))
        return dropped

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        """Logits ``(C, B, K)`` of every configuration for one shared batch."""
        raise NotImplementedError

    def regularization(self) -> torch.Tensor:
        """Extra loss per configuration, ``(C,)`` (none by default)."""
        return torch.zeros(())

    def unstack(self) -> None:  # pragma: no cover
        """Copy the trained parameters back into the views it was built from."""
        raise NotImplementedError


@runtime_checkable
class Stackable(Protocol):
    """A training view whose class can stack several of its instances into one :class:`StackedView`."""

    @classmethod
    def stack(cls, views: Sequence[nn.Module]) -> StackedView | None:
        """The stacked view of ``views``, or None when these cannot be stacked."""


def order_seed(cfg: TrainConfig) -> int:
    """Seed of the minibatch order of ``cfg``: ``cfg.order_seed``, else its ``seed``."""
    return cfg.seed if cfg.order_seed is None else cfg.order_seed


def shared_settings(cfg: TrainConfig) -> tuple:
    """What configurations of one stack must have in common."""
    return tuple(order_seed(cfg) if name == "order_seed" else getattr(cfg, name) for name in SHARED_SETTINGS)


def groups(cfgs: Sequence[TrainConfig]) -> list[list[int]]:
    """Indices of ``cfgs`` grouped by :func:`shared_settings`, in first-seen order."""
    found: dict[tuple, list[int]] = {}
    for index, cfg in enumerate(cfgs):
        found.setdefault(shared_settings(cfg), []).append(index)
    return list(found.values())


def train_many(views: Sequence[nn.Module], data: Any, cfgs: Sequence[TrainConfig], *,
               progress: bool = False, desc: str = "training",
               objective: Objective = cross_entropy_objective) -> list[list[float]]:
    """Train each view with its config; returns each view's per-epoch losses.

    ``data`` is shared by every view (anything with ``batches`` and ``len``, e.g.
    :class:`~frozenlens.train.data.TapData`), or a list with one per view holding
    the same examples in the same order (e.g. MIST's candidate gathers): every
    view then reads the same rows of its own data at each step.
    """
    losses: list[list[float]] = [[] for _ in views]
    for group in groups(cfgs):
        members = [views[i] for i in group]
        member_data = [data[i] for i in group] if isinstance(data, (list, tuple)) else data
        member_cfgs = [cfgs[i] for i in group]
        stacked = stack_views(members) if objective is cross_entropy_objective and len(members) > 1 else None
        if stacked is not None and not isinstance(member_data, list):
            result = _train_stacked(stacked, member_data, member_cfgs, progress, desc)
        else:
            result = _train_lockstep(members, member_data, member_cfgs, progress, desc, objective)
        for i, run in zip(group, result):
            losses[i] = run
    return losses


def stack_views(views: Sequence[nn.Module]) -> StackedView | None:
    """The stacked view of ``views`` (all of one :class:`Stackable` class), or None."""
    kind = type(views[0])
    if not all(type(v) is kind for v in views) or not isinstance(views[0], Stackable):
        return None
    return kind.stack(views)


def _batches(data: Any, cfg: TrainConfig, generator: torch.Generator):
    """One epoch of ``(per-view batches, labels)``: shared data yields one batch for every view."""
    if not isinstance(data, list):
        yield from data.batches(cfg.batch_size, shuffle=True, generator=generator, device=cfg.device)
        return
    for idx in minibatch_indices(len(data[0]), cfg.batch_size, shuffle=True, generator=generator):
        parts = [d.batch(idx, cfg.device) for d in data]
        yield [features for features, _ in parts], parts[0][1]


class _RandomStream:
    """A private copy of torch's global random state (CPU and, when in use, CUDA), swapped in around
    each configuration's step so that interleaved configurations draw as if each ran alone."""

    def __init__(self, seed: int):
        with torch.random.fork_rng(devices=self._devices()):
            torch.manual_seed(seed)
            self.state = self._get()

    @staticmethod
    def _devices() -> list[int]:
        return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []

    def _get(self) -> tuple:
        cuda = [torch.cuda.get_rng_state(d) for d in self._devices()]
        return torch.get_rng_state(), cuda

    def _set(self, state: tuple) -> None:
        torch.set_rng_state(state[0])
        for device, cuda in zip(self._devices(), state[1]):
            torch.cuda.set_rng_state(cuda, device)

    def __enter__(self) -> None:
        self._outer = self._get()
        self._set(self.state)

    def __exit__(self, *exc: Any) -> None:
        self.state = self._get()
        self._set(self._outer)


def _train_lockstep(views: Sequence[nn.Module], data: Any, cfgs: Sequence[TrainConfig], progress: bool,
                    desc: str, objective: Objective) -> list[list[float]]:
    first = cfgs[0]
    size = len(data[0]) if isinstance(data, list) else len(data)
    steps = math.ceil(size / first.batch_size)
    optimizers = [make_optimizer(trainable_parameters(v.to(c.device).train()), c) for v, c in zip(views, cfgs)]
    schedulers = [warmup_cosine(o, c.warmup_epochs * steps, c.epochs * steps) for o, c in zip(optimizers, cfgs)]
    streams = [_RandomStream(c.seed) for c in cfgs]
    generator = torch.Generator().manual_seed(order_seed(first))
    losses: list[list[float]] = [[] for _ in views]
    for _ in _epochs(first, progress, desc, len(views)):
        totals = [0.0] * len(views)
        for features, labels in _batches(data, first, generator):
            for i, view in enumerate(views):
                with streams[i]:
                    view_features = features[i] if isinstance(data, list) else features
                    loss, reported = objective(view, view_features, labels, cfgs[i].label_smoothing)
                    optimizers[i].zero_grad(set_to_none=True)
                    loss.backward()
                    optimizers[i].step()
                schedulers[i].step()
                totals[i] += reported * len(labels)
        for i, total in enumerate(totals):
            losses[i].append(total / size)
    for view in views:
        view.eval()
    return losses


def _epochs(cfg: TrainConfig, progress: bool, desc: str, configs: int):
    label = f"{desc} ({configs} configs)" if configs > 1 else desc
    return tqdm(range(cfg.epochs), desc=label, unit="epoch", disable=not progress, leave=False)


def _train_stacked(stacked: StackedView, data: Any, cfgs: Sequence[TrainConfig], progress: bool,
                   desc: str) -> list[list[float]]:
    first = cfgs[0]
    stacked.to(first.device).train()
    steps = math.ceil(len(data) / first.batch_size)
    optimizer = StackedOptimizer(trainable_parameters(stacked), cfgs)
    factor = lr_factor(first.warmup_epochs * steps, first.epochs * steps)
    generator = torch.Generator().manual_seed(order_seed(first))
    count = len(cfgs)
    losses: list[list[float]] = [[] for _ in cfgs]
    step = 0
    stacked.random_streams = [_RandomStream(c.seed) for c in cfgs]    # dropout draws, as each alone
    try:
        for _ in _epochs(first, progress, desc, count):
            totals = torch.zeros(count, dtype=torch.float64)
            for features, labels in _batches(data, first, generator):
                logits = stacked(features)                                       # (C, B, K)
                per_config = F.cross_entropy(logits.flatten(0, 1), labels.repeat(count),
                                             label_smoothing=first.label_smoothing,
                                             reduction="none").view(count, -1).mean(1)
                per_config = per_config + stacked.regularization()
                optimizer.zero_grad()
                per_config.sum().backward()
                optimizer.step(factor(step))
                step += 1
                totals += per_config.detach().double().cpu() * len(labels)
            for i in range(count):
                losses[i].append(float(totals[i]) / len(data))
    finally:
        stacked.random_streams = None
    stacked.eval()
    stacked.unstack()
    return losses


@dataclass
class _Slot:
    lr: torch.Tensor
    weight_decay: torch.Tensor


class StackedOptimizer:
    """Adam, AdamW or SGD (momentum) over parameters whose first axis is the configuration.

    Each configuration ``c`` has its own learning rate ``cfgs[c].lr`` (times the
    schedule's factor at each step) and weight decay; the update of each slice is
    the one ``torch.optim`` computes for that configuration alone (same formulas:
    bias-corrected moments, ``eps`` added to the corrected root, decoupled decay
    for AdamW, L2 decay added to the gradient for Adam and SGD).
    """

    def __init__(self, params: Sequence[nn.Parameter], cfgs: Sequence[TrainConfig],
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.kind = cfgs[0].optimizer
        self.momentum = cfgs[0].momentum
        self.betas, self.eps, self.steps = betas, eps, 0
        device = self.params[0].device
        self.lr = torch.tensor([c.lr for c in cfgs], dtype=torch.float64, device=device)
        self.weight_decay = torch.tensor([c.weight_decay for c in cfgs], dtype=torch.float64, device=device)
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in self.params]

    def zero_grad(self) -> None:
        """Drop every gradient."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, factor: float) -> None:
        """One update with learning rates ``lr * factor``."""
        self.steps += 1
        for p, state in zip(self.params, self.state):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            lr = (self.lr * factor).to(p.dtype).view(shape)
            wd = self.weight_decay.to(p.dtype).view(shape)
            if self.kind == "sgd":
                self._sgd(p, state, lr, wd)
            else:
                self._adam(p, state, lr, wd)

    def _sgd(self, p: torch.Tensor, state: dict[str, torch.Tensor], lr: torch.Tensor, wd: torch.Tensor) -> None:
        grad = p.grad + wd * p
        if self.momentum:
            buf = state.get("momentum")
            buf = grad.clone() if buf is None else buf.mul_(self.momentum).add_(grad)
            state["momentum"] = buf
            grad = buf
        p.sub_(lr * grad)

    def _adam(self, p: torch.Tensor, state: dict[str, torch.Tensor], lr: torch.Tensor, wd: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        grad = p.grad
        if self.kind == "adamw":
            p.mul_(1 - lr * wd)
        else:
            grad = grad + wd * p
        exp_avg = state.setdefault("exp_avg", torch.zeros_like(p))
        exp_avg_sq = state.setdefault("exp_avg_sq", torch.zeros_like(p))
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        correction1 = 1 - beta1 ** self.steps
        correction2 = 1 - beta2 ** self.steps
        denom = (exp_avg_sq.sqrt() / math.sqrt(correction2)).add_(self.eps)
        p.sub_((lr / correction1) * exp_avg / denom)


def stack_parameters(tensors: Sequence[torch.Tensor]) -> nn.Parameter:
    """One trainable tensor holding ``tensors`` along a new first axis."""
    return nn.Parameter(torch.stack([t.detach() for t in tensors]).clone())


@torch.no_grad()
def copy_back(stacked: torch.Tensor, targets: Sequence[torch.Tensor]) -> None:
    """Write each slice of ``stacked`` into the matching target tensor."""
    for value, target in zip(stacked, targets):
        target.copy_(value)
