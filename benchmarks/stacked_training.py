"""Stacked vs one-at-a-time training of each store method's VTAB grid, side by side in one run.

For every store-trained method, its own lr x weight-decay grid trains on the stored
taps of train800 (the VTAB grid pass) twice, from the same store and seeds:

* **alone**: one configuration after another (``Method.fit``), as the papers' code does;
* **stacked**: all configurations in one pass (``Method.fit_many``): each minibatch read
  once, linear heads and VQT's queries as one fat matmul, the rest in lockstep.

Both sides are then scored on val200 and must pick the same configuration; the
table reports seconds, the ratio, the largest val-accuracy difference and both
winners. The runs are shortened (``--epochs``, default 3) and labelled so: the ratio
is per epoch and does not depend on the epoch count.

The VQT rows also give what the full protocol costs (its 16-point grid, then 3
seeds, 100 epochs each): from the store with stacking (extraction + 100 stacked grid
epochs + 100 stacked seed epochs, extrapolated from the measured epochs) against
the backbone in the loop configuration by configuration as the papers' code does
(19 runs x 100 epochs x one measured loop epoch, extrapolated). And how fast a
stacked VQT epoch computes: its FLOPs (torch's FlopCounterMode on one step) per
second, as a fraction of this machine's measured fp32 matmul throughput.

Run alone on a quiet machine, from the repository root::

    FROZENLENS_CACHE=/tmp/flcache .venv/bin/python benchmarks/stacked_training.py
    .venv/bin/python benchmarks/stacked_training.py --methods linear,vqt --img-size 112 --epochs 1   # smoke

Writes ``stacked_training.{json,md}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from common import RESULTS, command_line, machine_context, machine_line, open_task, save_results
from live_taps import LiveTaps
from torch.utils.flop_counter import FlopCounterMode

from frozenlens.backbones import DEFAULT_BACKBONE, load_backbone
from frozenlens.methods import build_method, get_method
from frozenlens.protocol import grid_points, split_data
from frozenlens.store import extract
from frozenlens.train.trainer import TrainConfig, evaluate

METHODS = ("linear", "head2toe", "vqt", "mist", "last", "inca")
SETTINGS = {"mist": {"gather_depth": 12}, "inca": {"layers": "6+8+10+11"}}
"""Method settings: MIST at one depth (its k-candidates are measured by the grid-free sweep
elsewhere); InCA on four blocks, as in the demo."""
TARGETS = {"stacked_vqt": 5.0, "protocol": 50.0, "matmul_fraction": 0.5}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="cifar10")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each grid run (default: 3)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--loop-images", type=int, default=128,
                        help="images of the measured backbone-in-the-loop VQT epoch (default: 128)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def grid_configs(name: str, epochs: int) -> list[TrainConfig]:
    """The method's own grid as training configs, shortened to ``epochs`` (warm-up: 1 epoch)."""
    method = get_method(name)
    base = method.train_defaults.updated(epochs=epochs, warmup_epochs=min(1, epochs - 1), seed=0)
    return [base.updated(**point) for point in grid_points(method.grid)]


def time_grid(name: str, net: Any, task: Any, train: Any, val: Any, cfgs: list[TrainConfig],
              stacked: bool) -> tuple[float, list[float]]:
    """Seconds to train every config on ``train`` (stacked or one by one) and their val accuracies."""
    models = [build_method(name, SETTINGS.get(name), net, len(task.classes)) for _ in cfgs]
    started = time.perf_counter()
    if stacked:
        type(models[0]).fit_many(models, train, cfgs, val=val)
    else:
        for model, cfg in zip(models, cfgs):
            model.fit(train, cfg, val=val)
    seconds = time.perf_counter() - started
    return seconds, [evaluate(m, val) for m in models]


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """This machine's fp32 matmul throughput (GFLOP/s) on square matrices."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.perf_counter() - started) / 1e9


def vqt_step_flops(net: Any, task: Any, train: Any, cfgs: list[TrainConfig]) -> tuple[float, int]:
    """FLOPs of one stacked VQT training step over the grid (forward + backward)."""
    from frozenlens.methods.vqt.model import NormedInputs
    from frozenlens.train.stacked import stack_views

    models = [build_method("vqt", None, net, len(task.classes)) for _ in cfgs]
    stacked = stack_views([NormedInputs(m) for m in models])
    source = models[0].normed_inputs(train)
    batch, labels = next(source.batches(cfgs[0].batch_size))
    with FlopCounterMode(display=False) as counter:
        logits = stacked(batch)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.repeat(len(cfgs))).backward()
    return float(counter.get_total_flops()), len(labels)


def loop_epoch_seconds(net: Any, task: Any, images: int) -> float:
    """Seconds of one backbone-in-the-loop VQT epoch over the 1000 training images (measured on
    ``images`` of them, scaled)."""
    items = task.split("trainval")[:images]
    live = LiveTaps(net, [str(i.path) for i in items], [i.label for i in items], len(task.classes),
                    [t.key for t in get_method("vqt").taps(get_method("vqt").config_class(), net.describe())])
    model = build_method("vqt", None, net, len(task.classes))
    cfg = get_method("vqt").train_defaults.updated(epochs=1, warmup_epochs=0)
    started = time.perf_counter()
    model.fit(live, cfg)
    return (time.perf_counter() - started) * len(task.split("trainval")) / images


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    task = open_task(args.task)
    net = load_backbone(args.backbone, img_size=args.img_size)
    names = [n for n in args.methods.split(",") if n]
    models = {n: build_method(n, SETTINGS.get(n), net, len(task.classes)) for n in names}
    taps = sorted({t for n, m in models.items() for t in m.taps(m.config, net.describe())})
    started = time.perf_counter()
    store = extract(net, [str(i.path) for i in task.split("trainval")], taps)
    extract_seconds = time.perf_counter() - started
    ctx = {**machine_context(), "command": command_line(__file__), "task": task.name, "img_size": args.img_size,
           "epochs": args.epochs, "extract_seconds": extract_seconds}
    records: list[dict[str, Any]] = []
    for name in names:
        keys = models[name].tap_keys()
        train, val = split_data(store, task, "train", keys), split_data(store, task, "val", keys)
        cfgs = grid_configs(name, args.epochs)
        stacked_s, stacked_acc = time_grid(name, net, task, train, val, cfgs, stacked=True)
        alone_s, alone_acc = time_grid(name, net, task, train, val, cfgs, stacked=False)
        records.append({
            "method": name, "configs": len(cfgs), "epochs": args.epochs,
            "alone_seconds": round(alone_s, 2), "stacked_seconds": round(stacked_s, 2),
            "speedup": round(alone_s / stacked_s, 2),
            "max_val_accuracy_difference": max(abs(a - b) for a, b in zip(alone_acc, stacked_acc)),
            "winner_alone": _winner(cfgs, alone_acc), "winner_stacked": _winner(cfgs, stacked_acc),
        })
        if name == "vqt":
            ctx["vqt"] = vqt_protocol(net, task, train, cfgs, stacked_s, args, extract_seconds)
        save_results(args.out, "stacked_training", ctx, records, markdown(ctx, records))
        print(records[-1])
    print(markdown(ctx, records))


def vqt_protocol(net: Any, task: Any, train: Any, cfgs: list[TrainConfig], stacked_seconds: float,
                 args: argparse.Namespace, extract_seconds: float) -> dict[str, Any]:
    """The full VQT protocol's cost, store + stacking vs loop, and the store epoch's FLOP rate."""
    grid_epoch = stacked_seconds / args.epochs * 1000 / len(train)    # per epoch of 1000 images
    seeds = [cfgs[0].updated(seed=s, order_seed=0) for s in range(3)]
    seed_models = [build_method("vqt", None, net, len(task.classes)) for _ in seeds]
    started = time.perf_counter()
    type(seed_models[0]).fit_many(seed_models, train, [c.updated(epochs=1, warmup_epochs=0) for c in seeds])
    seeds_epoch = (time.perf_counter() - started) * 1000 / len(train)
    loop_epoch = loop_epoch_seconds(net, task, args.loop_images)
    store_total = extract_seconds + 100 * (grid_epoch + seeds_epoch)
    loop_total = (len(cfgs) + len(seeds)) * 100 * loop_epoch
    flops, batch = vqt_step_flops(net, task, train, cfgs)
    one, _ = vqt_step_flops(net, task, train, cfgs[:1])
    own = (flops - one) / (len(cfgs) - 1)          # FLOPs each configuration adds to a stacked step
    shared = one - own                              # FLOPs every configuration of a stack shares
    steps = -(-len(train) // cfgs[0].batch_size)
    achieved = flops * steps / (stacked_seconds / args.epochs) / 1e9
    peak = matmul_gflops()
    return {"grid_epoch_seconds_1000_images": round(grid_epoch, 2), "seeds_epoch_seconds_1000_images":
            round(seeds_epoch, 2), "loop_epoch_seconds_1000_images": round(loop_epoch, 1),
            "store_protocol_seconds": round(store_total), "loop_protocol_seconds": round(loop_total),
            "protocol_speedup": round(loop_total / store_total, 1), "step_gflop": round(flops / 1e9, 1),
            "achieved_gflops": round(achieved, 1), "matmul_gflops": round(peak, 1),
            "matmul_fraction": round(achieved / peak, 2), "one_config_step_gflop": round(one / 1e9, 2),
            "shared_fraction_of_one_config": round(shared / one, 3),
            "stacking_ceiling": round(len(cfgs) * one / flops, 2), "configs": len(cfgs)}


def _winner(cfgs: list[TrainConfig], accuracies: list[float]) -> str:
    best = max(range(len(cfgs)), key=lambda i: accuracies[i])
    return f"lr={cfgs[best].lr:g}, wd={cfgs[best].weight_decay:g}"


def markdown(ctx: dict[str, Any], records: list[dict[str, Any]]) -> str:
    lines = ["# Stacked vs one-at-a-time training of each method's VTAB grid", "",
             f"Command: `{ctx['command']}`", "", machine_line(ctx), "",
             f"Task {ctx['task']} at {ctx['img_size']} px: each grid point trained on the stored taps of "
             f"train800 for {ctx['epochs']} epochs (shortened; the ratio is per epoch), scored on val200. "
             f"Extraction of the 1000 training images: {ctx['extract_seconds']:.0f} s.", "",
             "| method | configs | alone (s) | stacked (s) | speed-up | max val acc diff | winner alone | "
             "winner stacked |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['method']} | {r['configs']} | {r['alone_seconds']} | {r['stacked_seconds']} | "
                     f"{r['speedup']}x | {r['max_val_accuracy_difference']:.4f} | {r['winner_alone']} | "
                     f"{r['winner_stacked']} |")
    vqt = ctx.get("vqt")
    if vqt:
        lines += ["", "## VQT's full protocol (16-point grid, then 3 seeds, 100 epochs each; extrapolated)", "",
                  f"- store with stacking: extraction {ctx['extract_seconds']:.0f} s + 100 x "
                  f"({vqt['grid_epoch_seconds_1000_images']} s grid epoch + {vqt['seeds_epoch_seconds_1000_images']}"
                  f" s seeds epoch) = **{vqt['store_protocol_seconds']} s**",
                  f"- backbone in the loop, one configuration at a time: 19 runs x 100 epochs x "
                  f"{vqt['loop_epoch_seconds_1000_images']} s = **{vqt['loop_protocol_seconds']} s**",
                  f"- speed-up **{vqt['protocol_speedup']}x** (target {TARGETS['protocol']:.0f}x)",
                  f"- stacked store epoch: {vqt['achieved_gflops']} GFLOP/s against {vqt['matmul_gflops']} GFLOP/s "
                  f"for a 2048^2 fp32 matmul on this machine: **{vqt['matmul_fraction']:.0%}** "
                  f"(target {TARGETS['matmul_fraction']:.0%}); one step is {vqt['step_gflop']} GFLOP"]
        if "stacking_ceiling" in vqt:
            lines += [f"- FLOP profile (FlopCounterMode): one configuration's step is {vqt['one_config_step_gflop']}"
                      f" GFLOP, of which {vqt['shared_fraction_of_one_config']:.0%} is shared by every configuration"
                      f" of a stack; so {vqt['configs']} configurations stacked can do at most "
                      f"**{vqt['stacking_ceiling']}x** less arithmetic than one at a time (the ceiling of the "
                      "stacked speed-up above)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
