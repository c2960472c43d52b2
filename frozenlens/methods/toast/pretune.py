"""Pre-tuning TOAST's top-down modules on a general image collection (paper, Section 3.2).

The backbone stays frozen; TOAST's feature selection, feedback path and a head
over the collection's classes train with

    loss = cross-entropy + 0.03 x variational loss

where the variational loss asks every feedback layer's ``feed_down`` map to
reconstruct its block's input from the block's output (pass 2, both detached).
The result is an ordinary TOAST adapter folder; ``toast:pretuned=<folder>`` (or
``toast-lite:pretuned=<folder>``) starts a downstream fit from its feature
selection and feedback maps.

The paper pre-tunes on ImageNet-1k (30 epochs, AdamW, lr 5e-4, 3 warm-up epochs).
Offline there is no ImageNet, so :func:`pooled_images` pools the training images
(train800val200) of the given tasks, each task's classes kept distinct: a small
stand-in. Pre-tune on a large general collection when you have one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from frozenlens.backbones.base import FrozenBackbone
from frozenlens.data import Task
from frozenlens.errors import FrozenlensError
from frozenlens.methods.base import build_method
from frozenlens.methods.toast.model import TOAST
from frozenlens.train.images import IMAGES_KEY, ImageData
from frozenlens.train.trainer import TrainConfig, train

VARIATIONAL_WEIGHT = 0.03
"""Weight of the variational loss during pre-tuning (paper, Appendix A.2)."""

PRETUNE_DEFAULTS = TrainConfig(optimizer="adamw", lr=5e-4, weight_decay=0.05, epochs=30, warmup_epochs=3,
                               batch_size=64)
"""Paper A.2: AdamW, lr 5e-4, 30 epochs, 3 warm-up; weight decay 0.05 and batch 64 are ours
(DeiT's weight decay, which the paper's backbone recipe follows; a CPU-sized batch)."""

POOLED_SPLIT = "trainval"


@dataclass
class PretuneResult:
    """What :func:`pretune` produced.

    Attributes:
        method: the pre-tuned TOAST method (head over the pooled classes).
        classes: the pooled classes, ``"<task>/<class>"``.
        losses: mean training loss of each epoch.
        images: number of pooled training images.
        seconds: wall time of the training.
        out_dir: the adapter folder written, or None.
    """

    method: TOAST
    classes: list[str]
    losses: list[float]
    images: int
    seconds: float
    out_dir: Path | None


def pooled_images(tasks: Sequence[Task], backbone: FrozenBackbone, *, progress: bool = False,
                  ) -> tuple[ImageData, list[str]]:
    """The training images of every task as one labelled set; each task's classes stay distinct."""
    paths: list[Path] = []
    labels: list[int] = []
    classes: list[str] = []
    for task in tasks:
        offset = len(classes)
        for item in task.split(POOLED_SPLIT):
            paths.append(item.path)
            labels.append(offset + item.label)
        classes += [f"{task.name}/{name}" for name in task.classes]
    if not paths:
        raise FrozenlensError("pre-tuning needs at least one task with training images")
    data = ImageData.from_paths(paths, labels, len(classes), backbone, progress=progress,
                                desc="decoding pre-tuning images")
    return data, classes


def variational_objective(model: nn.Module, features: dict[str, torch.Tensor], labels: torch.Tensor,
                          label_smoothing: float) -> tuple[torch.Tensor, float]:
    """Cross-entropy of pass 2 plus ``VARIATIONAL_WEIGHT`` x the variational loss."""
    passes = model.passes(features[IMAGES_KEY], record_blocks=True)
    task_loss = F.cross_entropy(passes.logits, labels, label_smoothing=label_smoothing)
    loss = task_loss + VARIATIONAL_WEIGHT * model.variational_loss(passes)
    return loss, float(loss.detach())


def pretune(tasks: Sequence[Task], backbone: FrozenBackbone, *, config: Any = None,
            train_config: TrainConfig = PRETUNE_DEFAULTS, out: str | Path | None = None,
            progress: bool = True) -> PretuneResult:
    """Pre-tune TOAST on the pooled training images of ``tasks`` with the backbone frozen.

    ``config`` is a :class:`~frozenlens.methods.toast.TOASTConfig` (or dict); the
    default (full feedback) gives a feedback layer for every block, which every
    downstream feedback mode can start from. ``out`` writes the adapter folder.
    """
    data, classes = pooled_images(tasks, backbone, progress=progress)
    method = build_method("toast", config, backbone, len(classes))
    method.reset_trainable(train_config.seed)
    started = time.perf_counter()
    losses = train(method, data, train_config, progress=progress, desc="toast pre-tuning",
                   objective=variational_objective)
    seconds = time.perf_counter() - started
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        from frozenlens.adapter import save_adapter

        record = {"tasks": [str(t.root) for t in tasks], "split": POOLED_SPLIT, "images": len(data),
                  "variational_weight": VARIATIONAL_WEIGHT, "train_config": train_config.to_dict(),
                  "epoch_losses": losses, "seconds": round(seconds, 1)}
        save_adapter(out_dir, method, classes, extra={"pretune": record})
    return PretuneResult(method, classes, losses, len(data), seconds, out_dir)


def pretune_from_cli(spec: str, data: Sequence[str | Path], out: Path, *, backbone: str,
                     arch: str | None = None, img_size: int | None = None, epochs: int | None = None,
                     seed: int = 0, device: str = "cpu") -> Path:
    """``frozenlens pretune toast[:settings] DATA... --out OUT``: returns the adapter folder."""
    from frozenlens.api import MethodSpec
    from frozenlens.backbones import load_backbone
    from frozenlens.data import load_task

    parsed = MethodSpec.parse(spec)
    if parsed.name != "toast":
        raise FrozenlensError(f"pretune {parsed.name!r}: only toast is pre-tuned; toast-lite starts from "
                              "the same modules (--method toast-lite:pretuned=DIR)")
    if "seeds" in parsed.settings:
        raise FrozenlensError("pretune runs once: use --seed instead of seeds=")
    tasks = [load_task(path) for path in data]
    net = load_backbone(backbone, arch=arch, img_size=img_size, device=device)
    overrides = {**parsed.train_overrides(), **({"epochs": epochs} if epochs else {})}
    cfg = PRETUNE_DEFAULTS.updated(seed=seed, device=device, **overrides)
    result = pretune(tasks, net, config=parsed.method_settings, train_config=cfg, out=out)
    logging.getLogger("frozenlens").info(
        "pre-tuned on %d images of %d task(s), %d classes, %d epochs in %.0fs; final loss %.4f",
        result.images, len(tasks), len(result.classes), cfg.epochs, result.seconds, result.losses[-1])
    return out
