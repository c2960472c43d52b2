"""VQT trained from the activation store vs with the backbone in the loop, side by side.

Both sides train the same VQT configuration with the same seed on the 1000
training images (train800val200) of a VTAB-1k task, with the default backbone
(DINOv2 ViT-S/14 at 224 px):

* **store**: one backbone pass per training image (extraction, timed), then all
  ``--epochs`` epochs for real from the stored block inputs;
* **loop**: the way reference implementations train: decode, preprocess and run the
  frozen backbone on every image of every epoch (:class:`benchmarks.live_taps.LiveTaps`).
  On a CPU this takes hours, so it runs ``--loop-epochs`` epochs; its 100-epoch time
  is extrapolated from the measured per-epoch time (labelled as such). Run it in full
  on a GPU with ``--loop-epochs 100 --device cuda``.

To show both sides compute the same thing, the store side also trains for
``--loop-epochs`` epochs (same schedule) and the two short runs are compared: the
largest logit difference on the test set and both test accuracies (the loop side
evaluated with the backbone in the loop too). Test evaluation is a single backbone
pass on either side; it is timed and reported apart from training.

Because the store holds every block's tokens, the same run also reports MIST's
gather-depth sweep and InCA's per-layer accuracies (train800 -> val200, then test).

Run from the repository root::

    FROZENLENS_CACHE=/tmp/flcache .venv/bin/python benchmarks/vqt_store_vs_loop.py
    .venv/bin/python benchmarks/vqt_store_vs_loop.py --task aid --loop-epochs 1 --no-extras

Writes ``vqt_store_vs_loop.{json,md}`` into ``--out`` (JSON has a ``speedup`` field).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from common import RESULTS, command_line, machine_context, machine_line, open_task
from live_taps import LiveTaps

from frozenlens.backbones import DEFAULT_BACKBONE, FrozenBackbone, Tap, block_tap, load_backbone
from frozenlens.data import Task
from frozenlens.methods import build_method
from frozenlens.paths import cache_dir
from frozenlens.store import ActivationStore, extract
from frozenlens.train.data import TapData
from frozenlens.train.measure import Measure
from frozenlens.train.trainer import evaluate, predict_logits

TARGET = 50.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="cifar10", help="task folder or name in ../shared/data")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--epochs", type=int, default=100, help="epochs of the full store run")
    parser.add_argument("--loop-epochs", type=int, default=2, help="epochs run for real in the loop")
    parser.add_argument("--num-queries", type=int, default=1, help="VQT query tokens per block")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--extras", action=argparse.BooleanOptionalAction, default=True,
                        help="also run MIST's k-sweep and InCA's per-layer accuracies")
    parser.add_argument("--test-limit", type=int, default=0,
                        help="evaluate on this many test images, evenly spaced through test.txt "
                             "(default 0: all); test evaluation is timed apart from training")
    parser.add_argument("--extras-epochs", type=int, default=20,
                        help="epochs of each MIST and InCA fit in the extras (default: 20)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep-store", action="store_true",
                        help="keep the benchmark's fresh store (default: delete it at the end)")
    return parser.parse_args(argv)


def paths(task: Task, split: str) -> list[str]:
    return [str(i.path) for i in task.split(split)]


def timed_extract(backbone: FrozenBackbone, images: list[str], taps: list[Tap], root: Path,
                  device: str) -> tuple[ActivationStore, Measure]:
    """Extract into a fresh store under ``root`` (never reused: extraction is part of the cost)."""
    with Measure(device) as run:
        store = extract(backbone, images, taps, root=root, progress=True, device=device)
    return store, run


def cost(run: Measure) -> dict[str, float]:
    """Wall and CPU seconds of a measured piece of work."""
    return {"wall": round(run.seconds, 1), "cpu": round(run.cpu_seconds, 1)}


def split_taps(store: ActivationStore, task: Task, split: str, keys: Sequence[str]) -> TapData:
    items = task.split(split)
    return TapData.from_store(store, keys, [str(i.path) for i in items], [i.label for i in items],
                              len(task.classes))


def chunked_logits(model: torch.nn.Module, store: ActivationStore, task: Task, split: str,
                   keys: Sequence[str], chunk: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a split, loading its taps ``chunk`` images at a time (bounded memory)."""
    items = task.split(split)
    logits = []
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        data = TapData.from_store(store, keys, [str(i.path) for i in part], [i.label for i in part],
                                  len(task.classes))
        logits.append(predict_logits(model, data))
    return torch.cat(logits), torch.as_tensor([i.label for i in items])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def vqt_side_by_side(args: argparse.Namespace, backbone: FrozenBackbone, task: Task,
                     train_store: ActivationStore, test_store: ActivationStore,
                     extract_train: Measure, extract_test: Measure) -> dict[str, Any]:
    """The full store run, the short store and loop runs, and their comparison."""
    classes = len(task.classes)
    config = {"num_queries": args.num_queries}
    probe = build_method("vqt", config, backbone, classes)
    keys = probe.tap_keys()
    cfg = probe.train_defaults.updated(epochs=args.epochs, seed=args.seed, device=args.device)
    short = cfg.updated(epochs=args.loop_epochs, warmup_epochs=min(cfg.warmup_epochs, args.loop_epochs - 1) or 0)
    train_data = split_taps(train_store, task, "trainval", keys)

    print(f"store: {args.epochs} epochs from the store", flush=True)
    full = build_method("vqt", config, backbone, classes)
    with Measure(args.device) as full_run:
        full.fit(train_data, cfg, progress=True)
    with Measure(args.device) as eval_store:
        full_logits, labels = chunked_logits(full, test_store, task, "test", keys)

    print(f"store: {args.loop_epochs} epochs (for the comparison)", flush=True)
    store_short = build_method("vqt", config, backbone, classes)
    with Measure(args.device) as store_short_run:
        store_short.fit(train_data, short)
    store_short_logits, _ = chunked_logits(store_short, test_store, task, "test", keys)
    del train_data

    print(f"loop: {args.loop_epochs} epochs with the backbone in the loop", flush=True)
    live_train = LiveTaps.from_task(backbone, task, "trainval", keys, cast=train_store.dtype)
    loop_short = build_method("vqt", config, backbone, classes)
    with Measure(args.device) as loop_run:
        loop_short.fit(live_train, short, progress=True)
    loop_same_features, _ = chunked_logits(loop_short, test_store, task, "test", keys)
    print("loop: test evaluation with the backbone in the loop", flush=True)
    live_test = LiveTaps.from_task(backbone, task, "test", keys, cast=test_store.dtype)
    with Measure(args.device) as eval_loop:
        loop_test_logits = predict_logits(loop_short, live_test, batch_size=cfg.batch_size,
                                          device=args.device)

    scale = args.epochs / args.loop_epochs
    store_train = {k: cost(extract_train)[k] + cost(full_run)[k] for k in ("wall", "cpu")}
    loop_train = {k: cost(loop_run)[k] * scale for k in ("wall", "cpu")}
    store_test = {k: cost(extract_test)[k] + cost(eval_store)[k] for k in ("wall", "cpu")}
    ratio = {k: loop_train[k] / store_train[k] for k in ("wall", "cpu")}
    ratio_with_test = {k: (loop_train[k] + cost(eval_loop)[k]) / (store_train[k] + store_test[k])
                       for k in ("wall", "cpu")}
    return {
        "config": dataclasses.asdict(full.config),
        "train_config": cfg.to_dict(),
        "train_images": len(live_train), "test_images": len(live_test),
        "store": {
            "extract_train_seconds": cost(extract_train),
            "train_seconds": cost(full_run),
            "epoch_seconds": {k: v / args.epochs for k, v in cost(full_run).items()},
            "train_peak_memory_mb": round(full_run.peak_mb),
            "end_to_end_train_seconds": store_train,
            "extract_test_seconds": cost(extract_test),
            "eval_test_seconds": cost(eval_store),
            "test_accuracy": accuracy(full_logits, labels),
            "bytes_per_image": train_store.bytes_per_image_of(keys),
        },
        "loop": {
            "epochs_run": args.loop_epochs,
            "epoch_seconds": {k: v / args.loop_epochs for k, v in cost(loop_run).items()},
            "train_peak_memory_mb": round(loop_run.peak_mb),
            "end_to_end_train_seconds": loop_train,
            "extrapolated": args.loop_epochs < args.epochs,
            "eval_test_seconds": cost(eval_loop),
        },
        "speedup": round(ratio["cpu"], 1),
        "speedup_wall": round(ratio["wall"], 1),
        "speedup_with_test": round(ratio_with_test["cpu"], 1),
        "target_speedup": TARGET,
        "equivalence": {
            "epochs": args.loop_epochs,
            "store_test_accuracy": accuracy(store_short_logits, labels),
            "loop_test_accuracy": accuracy(loop_test_logits, labels),
            "loop_test_accuracy_on_stored_features": accuracy(loop_same_features, labels),
            "max_abs_logit_difference": float((store_short_logits - loop_same_features).abs().max()),
            "max_abs_logit_difference_live_eval": float((store_short_logits - loop_test_logits).abs().max()),
            "store_epoch_seconds": {k: v / args.loop_epochs for k, v in cost(store_short_run).items()},
        },
    }


def mist_sweep(backbone: FrozenBackbone, task: Task, train_store: ActivationStore,
               test_store: ActivationStore, seed: int, epochs: int) -> dict[str, Any]:
    """MIST at every candidate gather depth: val200 accuracy (selection) and test accuracy."""
    try:  # imported here: the sweep runs whatever MIST the checkout has when it gets here
        from frozenlens.methods.mist import gather_candidates
    except ImportError:
        return {"skipped": "the mist method is not available in this checkout"}

    rows = []
    for k in gather_candidates(backbone.depth):
        model = build_method("mist", {"gather_depth": k}, backbone, len(task.classes))
        cfg = model.train_defaults.updated(seed=seed, epochs=epochs, warmup_epochs=max(1, epochs // 10))
        with Measure() as run:
            model.fit(split_taps(train_store, task, "train", model.tap_keys()), cfg, progress=True)
        val = evaluate(model, split_taps(train_store, task, "val", model.tap_keys()))
        test_logits, labels = chunked_logits(model, test_store, task, "test", model.tap_keys())
        rows.append({"k": k, "val_accuracy": val, "test_accuracy": accuracy(test_logits, labels),
                     "train_seconds": round(run.seconds, 1)})
        print(f"  mist k={k}: val {val:.4f}", flush=True)
    best = max(rows, key=lambda r: r["val_accuracy"])
    return {"rows": rows, "selected_k": best["k"], "epochs": cfg.epochs}


def inca_layers(backbone: FrozenBackbone, task: Task, train_store: ActivationStore,
                test_store: ActivationStore, seed: int, epochs: int) -> dict[str, Any]:
    """One InCA adapter per block, trained in parallel; val200 accuracy of each, test of the best."""
    model = build_method("inca", {"layers": "all"}, backbone, len(task.classes))
    keys = model.tap_keys()
    cfg = model.train_defaults.updated(seed=seed, epochs=epochs, warmup_epochs=max(1, epochs // 10))
    with Measure() as run:
        model.fit(split_taps(train_store, task, "train", keys), cfg,
                  val=split_taps(train_store, task, "val", keys), progress=True)
    test_logits, labels = chunked_logits(model, test_store, task, "test", model.tap_keys())
    return {"val_accuracy_by_block": model.layer_accuracies, "selected_block": list(model.config.layers),
            "test_accuracy": accuracy(test_logits, labels), "train_seconds": round(run.seconds, 1),
            "epochs": cfg.epochs}


def markdown(result: dict[str, Any], ctx: dict[str, Any]) -> str:
    vqt, store, loop, eq = result["vqt"], result["vqt"]["store"], result["vqt"]["loop"], result["vqt"]["equivalence"]
    label = f"extrapolated from {loop['epochs_run']} measured epochs" if loop["extrapolated"] else "measured"
    epochs = vqt["train_config"]["epochs"]

    def pair(seconds: dict[str, float], digits: int = 0) -> str:
        return f"{seconds['cpu']:.{digits}f} / {seconds['wall']:.{digits}f}"

    lines = [
        "# VQT: activation store vs backbone in the loop", "",
        f"Task `{ctx['task']}` ({vqt['train_images']} training images, {vqt['test_images']} test), "
        f"backbone `{ctx['backbone']}` at {ctx['image_size']} px, VQT with "
        f"{vqt['config']['num_queries']} query token(s) per block, {epochs} epochs, "
        f"batch {vqt['train_config']['batch_size']}, seed {vqt['train_config']['seed']}.", "",
        "Times are CPU seconds / wall seconds. CPU time (all threads of the process) is the "
        "comparison that holds on a shared machine; wall time is what you wait on a quiet one.", "",
        "| | store | backbone in the loop |", "|---|---|---|",
        f"| backbone passes over the training images | 1 | {epochs} |",
        f"| extraction of the training images | {pair(store['extract_train_seconds'])} | — |",
        f"| seconds per epoch | {pair(store['epoch_seconds'], 2)} | {pair(loop['epoch_seconds'], 1)} |",
        f"| training, end to end | {pair(store['end_to_end_train_seconds'])} "
        f"| {pair(loop['end_to_end_train_seconds'])} ({label}) |",
        "| test evaluation (one pass) | "
        f"{pair({k: store['extract_test_seconds'][k] + store['eval_test_seconds'][k] for k in ('cpu', 'wall')})} "
        f"| {pair(loop['eval_test_seconds'])} |",
        f"| peak training memory (MB) | {store['train_peak_memory_mb']} | {loop['train_peak_memory_mb']} |",
        f"| test accuracy after {epochs} epochs | {100 * store['test_accuracy']:.2f} "
        f"| the same computation (below) |", "",
        f"**Speed-up, training end to end: {vqt['speedup']}x in CPU time** ({vqt['speedup_wall']}x in wall "
        f"time; target {vqt['target_speedup']:.0f}x); including the test evaluation on both sides: "
        f"{vqt['speedup_with_test']}x.", "",
        f"Same computation: after {eq['epochs']} epochs with the same seed and schedule, the store run "
        f"reaches {100 * eq['store_test_accuracy']:.2f} % test accuracy and the loop run "
        f"{100 * eq['loop_test_accuracy']:.2f} % (evaluated with the backbone in the loop); the largest "
        f"test-logit difference between the two models is {eq['max_abs_logit_difference']:.2e} "
        f"(on the same stored features; {eq['max_abs_logit_difference_live_eval']:.2e} with live "
        "features, which the store rounds to float16). Each loop epoch repeats the same arithmetic on "
        "the same numbers, so the extrapolated loop run ends where the store run does.", "",
        f"Store: {store['bytes_per_image'] / 1e6:.2f} MB per image for VQT's taps (float16).", "",
    ]
    mist = result.get("mist")
    if mist and "rows" in mist:
        lines += ["## MIST gather depth k (train800 -> val200)", "", "| k | val acc | test acc | train s |",
                  "|---|---|---|---|"]
        lines += [f"| {r['k']} | {100 * r['val_accuracy']:.2f} | {100 * r['test_accuracy']:.2f} "
                  f"| {r['train_seconds']:.0f} |" for r in mist["rows"]]
        lines += ["", f"Selected on validation: k = {mist['selected_k']} ({mist['epochs']} epochs each).", ""]
    elif mist:
        lines += ["## MIST", "", f"Skipped: {mist['skipped']}.", ""]
    inca = result.get("inca")
    if inca:
        lines += ["## InCA: one adapter per block, trained in parallel (train800 -> val200)", "",
                  "| block | " + " | ".join(str(b) for b in inca["val_accuracy_by_block"]) + " |",
                  "|---|" + "---|" * len(inca["val_accuracy_by_block"]),
                  "| val acc | " + " | ".join(f"{100 * v:.1f}" for v in inca["val_accuracy_by_block"].values())
                  + " |", "",
                  f"Selected block {inca['selected_block'][0]}: test accuracy {100 * inca['test_accuracy']:.2f} %; "
                  f"all adapters trained together in {inca['train_seconds']:.0f} s ({inca['epochs']} epochs).", ""]
    lines += [machine_line(ctx), "", "## Reproduce", "", "```", ctx["command"], "```", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    task = open_task(args.task, args.test_limit)
    backbone = load_backbone(args.backbone, device=args.device)
    depth = backbone.depth
    vqt = build_method("vqt", {"num_queries": args.num_queries}, backbone, len(task.classes))
    taps = sorted(set(vqt.taps(vqt.config, backbone.describe())))
    if args.extras:
        taps = sorted(set(taps) | {block_tap(i) for i in range(depth)})
    cache_dir().mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="vqt-benchmark-", dir=cache_dir()))
    try:
        print(f"extracting {len(task.split('trainval'))} training images into a fresh store", flush=True)
        train_store, extract_train = timed_extract(backbone, paths(task, "trainval"), taps, root, args.device)
        print(f"extracting {len(task.split('test'))} test images", flush=True)
        test_store, extract_test = timed_extract(backbone, paths(task, "test"), taps, root, args.device)
        result = {"vqt": vqt_side_by_side(args, backbone, task, train_store, test_store,
                                          extract_train, extract_test)}
        if args.extras:
            result["mist"] = mist_sweep(backbone, task, train_store, test_store, args.seed, args.extras_epochs)
            result["inca"] = inca_layers(backbone, task, train_store, test_store, args.seed, args.extras_epochs)
    finally:
        if not args.keep_store:
            shutil.rmtree(root, ignore_errors=True)
    ctx = {**machine_context(), "task": task.name, "backbone": backbone.name,
           "image_size": backbone.image_size, "command": command_line(__file__)}
    payload = {"speedup": result["vqt"]["speedup"], "context": ctx, **result}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vqt_store_vs_loop.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / "vqt_store_vs_loop.md").write_text(markdown(result, ctx))
    print(markdown(result, ctx))
    return 0


if __name__ == "__main__":
    sys.exit(main())
