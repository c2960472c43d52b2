"""Why VPT trains with AdamW and a zero head here: its own recipe, step by step, on DINOv2.

VPT's code trains prompts and a Kaiming-initialised linear head with SGD
(momentum 0.9, base lr {50 ... 0.05} x batch/256). This script trains
``vpt-shallow`` (or ``--method vpt-deep``) on a few hundred real training images
with that recipe and with the variants that isolate each cause, and records the
loss of every step, how far the prompts moved and the test accuracy:

1. VPT's code: Kaiming-normal (fan-out) head, SGD at VPT's default lr;
2. zero head, SGD at VPT's default lr;
3. zero head, SGD at the smallest lr of VPT's grid;
4. zero head, AdamW 1e-3 (frozenlens's default, the VQT paper's optimiser for VPT);
5. as 4 with the prompts frozen (the head alone), to show what the prompts add.

Run from the repository root::

    FROZENLENS_CACHE=/tmp/flcache .venv/bin/python benchmarks/vpt_recipes.py

Writes ``vpt_recipes_<method>.{json,md}`` (e.g. ``vpt_recipes_vpt_shallow.md``) into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from common import (
    command_line,
    machine_context,
    machine_line,
    open_small_run,
    records_table,
    save_results,
    small_run_parser,
)
from torch.nn import functional as F

from frozenlens.methods import build_method
from frozenlens.methods.layers import init_kaiming_head
from frozenlens.methods.petl.common import BATCH
from frozenlens.train.images import ImageData
from frozenlens.train.trainer import evaluate, train

VPT_DEFAULT_SGD_LR = 1.0 / 256 * BATCH
VPT_SMALLEST_SGD_LR = 0.05 / 256 * BATCH


@dataclass
class Recipe:
    """One way of training VPT."""

    label: str
    optimizer: str
    lr: float
    kaiming_head: bool = False
    train_prompts: bool = True


RECIPES = [
    Recipe("VPT code: Kaiming head, SGD lr 0.25", "sgd", VPT_DEFAULT_SGD_LR, kaiming_head=True),
    Recipe("zero head, SGD lr 0.25", "sgd", VPT_DEFAULT_SGD_LR),
    Recipe("zero head, SGD lr 0.0125 (grid's smallest)", "sgd", VPT_SMALLEST_SGD_LR),
    Recipe("zero head, AdamW lr 1e-3 (default)", "adamw", 1e-3),
    Recipe("zero head, AdamW lr 1e-3, prompts frozen", "adamw", 1e-3, train_prompts=False),
]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = small_run_parser(__doc__)
    parser.add_argument("--method", default="vpt-shallow", choices=["vpt-shallow", "vpt-deep"])
    parser.add_argument("--train-images", type=int, default=384, help="first N of train800 (default: 384)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    return parser.parse_args(argv)


def run_recipe(recipe: Recipe, backbone, train_data: ImageData, test_data: ImageData,
               args: argparse.Namespace) -> dict[str, Any]:
    """Train one VPT with ``recipe``; its step losses, prompt movement and test accuracy."""
    method = build_method(args.method, None, backbone, train_data.num_classes)
    method.reset_trainable(args.seed)
    if recipe.kaiming_head:
        init_kaiming_head(method.head)
    method.prompts.requires_grad_(recipe.train_prompts)
    start = method.prompts.detach().clone()
    cfg = method.train_defaults.updated(optimizer=recipe.optimizer, lr=recipe.lr, epochs=args.epochs,
                                        warmup_epochs=args.warmup_epochs, seed=args.seed,
                                        device=args.device)
    steps: list[float] = []

    def recorded_loss(model, features, labels, label_smoothing):
        loss = F.cross_entropy(model(features), labels, label_smoothing=label_smoothing)
        steps.append(float(loss.detach()))
        return loss, steps[-1]

    started = time.perf_counter()
    epoch_losses = train(method, train_data, cfg, objective=recorded_loss)
    return {
        "recipe": recipe.label, "optimizer": recipe.optimizer, "lr": recipe.lr,
        "first_step_loss": round(steps[0], 3), "max_step_loss": round(max(steps), 3),
        "last_epoch_loss": round(epoch_losses[-1], 3),
        "prompt_change_max": float(f"{(method.prompts.detach() - start).abs().max():.4g}"),
        "test_accuracy": round(100 * evaluate(method, test_data, args.device), 2),
        "train_seconds": round(time.perf_counter() - started, 1),
        "step_losses": [round(s, 3) for s in steps],
    }


def markdown(records: list[dict[str, Any]], ctx: dict[str, Any]) -> str:
    table = [{k: v for k, v in r.items() if k != "step_losses"} for r in records]
    return "\n".join([
        f"# {ctx['method']}: VPT's own recipe against frozenlens's, step by step",
        "",
        f"Task `{ctx['task']}` (first {ctx['train_images']} images of train800, {ctx['test_images']} test "
        f"images evenly spaced through test.txt), backbone {ctx['backbone']} at {ctx['image_size']} px, "
        f"batch 64, {ctx['epochs']} epochs with {ctx['warmup_epochs']} warm-up, cosine, seed {ctx['seed']}.",
        machine_line(ctx),
        "",
        f"Command: `{ctx['command']}`",
        "",
        records_table(table),
        "",
        "Loss of every step in the JSON. A loss of log 10 = 2.30 is chance; "
        "`prompt_change_max` is the largest change of any prompt value.",
        "",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    task, backbone = open_small_run(args)
    train_data = ImageData.from_task(task, "train", backbone)
    train_data = train_data.rows(torch.arange(min(args.train_images, len(train_data))))
    test_data = ImageData.from_task(task, "test", backbone)
    ctx = {**machine_context(), "task": task.name, "method": args.method, "backbone": backbone.name,
           "image_size": backbone.image_size, "train_images": len(train_data), "test_images": len(test_data),
           "epochs": args.epochs, "warmup_epochs": args.warmup_epochs, "seed": args.seed,
           "command": command_line(__file__)}
    records, stem = [], f"vpt_recipes_{args.method.replace('-', '_')}"
    for recipe in RECIPES:
        print(f"== {recipe.label}", flush=True)
        records.append(run_recipe(recipe, backbone, train_data, test_data, args))
        save_results(args.out, stem, ctx, records, markdown(records, ctx))
    print(markdown(records, ctx))
    return 0


if __name__ == "__main__":
    sys.exit(main())
