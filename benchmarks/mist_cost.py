"""What a MIST (and LAST) fit from the store costs on this machine, and its gather-depth sweep.

Reads train800 / val200 of a VTAB-1k task from an activation store holding the
embedding output and every block's output tokens (extracted here, or an existing
store given with ``--store``), then:

1. sweeps MIST's candidate gather depths k in {N/3, 2N/3, N}: one fit each of
   ``--sweep-epochs`` epochs on train800, accuracy on val200 (the selection MIST
   makes by default), seconds per epoch;
2. times one full fit (``--epochs``, default the paper's 100) of MIST at the chosen k;
3. times LAST for ``--last-epochs`` epochs (seconds per epoch, val200 accuracy).

Run from the repository root::

    FROZENLENS_CACHE=/tmp/flcache .venv/bin/python benchmarks/mist_cost.py --task cifar10
    .venv/bin/python benchmarks/mist_cost.py --store /path/to/store --epochs 100 --sweep-epochs 10

Writes ``mist_cost.{json,md}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

from common import RESULTS, command_line, machine_context, machine_line, open_task

from frozenlens.backbones import DEFAULT_BACKBONE, load_backbone
from frozenlens.data import Task
from frozenlens.methods import build_method
from frozenlens.methods.mist import gather_candidates, gather_taps
from frozenlens.store import ActivationStore, extract
from frozenlens.train.data import TapData
from frozenlens.train.measure import Measure
from frozenlens.train.trainer import evaluate


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="cifar10", help="task folder or name in ../shared/data")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--store", type=Path, help="existing store with embed + every block's tokens")
    parser.add_argument("--epochs", type=int, default=100, help="epochs of the timed full MIST fit (0: skip)")
    parser.add_argument("--sweep-epochs", type=int, default=10, help="epochs of each k-sweep fit (0: skip)")
    parser.add_argument("--k", type=int, help="gather depth of the full fit (default: the sweep's best)")
    parser.add_argument("--last-epochs", type=int, default=2, help="epochs of the LAST timing (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def open_store(args: argparse.Namespace, task: Task) -> ActivationStore:
    """The given store, or one extracted (or reused) for train800 + val200 with every block's tokens."""
    if args.store:
        return ActivationStore(args.store)
    backbone = load_backbone(args.backbone)
    taps = gather_taps(backbone.depth, backbone.depth)
    return extract(backbone, [str(i.path) for i in task.split("trainval")], taps, progress=True)


def split_taps(store: ActivationStore, task: Task, split: str, keys: Sequence[str]) -> TapData:
    items = task.split(split)
    return TapData.from_store(store, keys, [str(i.path) for i in items], [i.label for i in items],
                              len(task.classes))


def timed_fit(name: str, config: dict[str, Any], backbone: dict[str, Any], train: TapData, val: TapData,
              epochs: int, seed: int) -> dict[str, Any]:
    """Fit once from the store; wall time, seconds per epoch, peak memory added, val accuracy."""
    model = build_method(name, config, backbone, train.num_classes)
    cfg = model.train_defaults.updated(epochs=epochs, warmup_epochs=min(10, max(1, epochs // 10)), seed=seed)
    cpu_started = time.process_time()
    with Measure() as run:
        model.fit(train, cfg, progress=True)
    cpu = time.process_time() - cpu_started
    row = {"method": name, "config": config, "epochs": epochs, "batch_size": cfg.batch_size,
           "seconds": round(run.seconds, 1), "seconds_per_epoch": round(run.seconds / epochs, 2),
           "cpu_seconds": round(cpu, 1), "load_average": os.getloadavg()[0],
           "peak_mb": round(run.peak_mb), "val_accuracy": evaluate(model, val),
           "trainable_params": model.parameter_counts()["total"]}
    print(f"  {name} {config}: {epochs} epochs in {row['seconds']} s, val {row['val_accuracy']:.4f}", flush=True)
    return row


def markdown(result: dict[str, Any], ctx: dict[str, Any]) -> str:
    sweep = result["sweep"]
    lines = ["# MIST and LAST from the activation store: cost and gather-depth sweep", "",
             f"Task `{result['task']}`: {result['train_images']} training images (train800), "
             f"{result['val_images']} validation (val200); backbone `{result['backbone']}`, "
             f"{result['tokens']} tokens x {result['dim']} per map; store {result['store_dtype']}.", "",
             "| run | epochs | k | val200 acc | wall (s) | s/epoch | CPU (s) | load avg | peak mem added (MB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = [("MIST k-sweep", r) for r in sweep] + [("MIST full fit", r) for r in result["full"]]
    rows += [("LAST", r) for r in result["last"]]
    for label, r in rows:
        k = r["config"].get("gather_depth", "all blocks")
        lines.append(f"| {label} | {r['epochs']} | {k} | {100 * r['val_accuracy']:.2f} | {r['seconds']} | "
                     f"{r['seconds_per_epoch']} | {r['cpu_seconds']} | {r['load_average']:.1f} | {r['peak_mb']} |")
    lines += ["", f"k of the full fit: {result['chosen_k']} (the sweep's best on val200 unless given).", "",
              "CPU (s): processor time of the process (all its threads); 'load avg': the machine's "
              "1-minute load when the fit ended (other processes compete for the cores when it "
              "exceeds the core count).", "", machine_line(ctx), "", f"Command: `{ctx['command']}`", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    task = open_task(args.task)
    store = open_store(args, task)
    backbone = store.meta["backbone"]
    depth = backbone["depth"]
    keys = [t.key for t in gather_taps(depth, depth)]
    started = time.perf_counter()
    train, val = split_taps(store, task, "train", keys), split_taps(store, task, "val", keys)
    print(f"loaded {len(train)} + {len(val)} images' taps in {time.perf_counter() - started:.1f} s", flush=True)

    sweep = [timed_fit("mist", {"gather_depth": k}, backbone, train, val, args.sweep_epochs, args.seed)
             for k in gather_candidates(depth)] if args.sweep_epochs else []
    chosen = args.k or (max(sweep, key=lambda r: r["val_accuracy"])["config"]["gather_depth"] if sweep
                        else depth)
    full = ([timed_fit("mist", {"gather_depth": chosen}, backbone, train, val, args.epochs, args.seed)]
            if args.epochs else [])
    last = [timed_fit("last", {}, backbone, train, val, args.last_epochs, args.seed)] if args.last_epochs else []

    shape = store.shape(keys[0])
    result = {"task": args.task, "backbone": backbone["name"], "train_images": len(train),
              "val_images": len(val), "tokens": shape[0], "dim": shape[1], "store_dtype": store.dtype,
              "sweep": sweep, "chosen_k": chosen, "full": full, "last": last}
    ctx = {**machine_context(), "command": command_line(__file__)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mist_cost.json").write_text(json.dumps({"context": ctx, "result": result}, indent=2))
    (args.out / "mist_cost.md").write_text(markdown(result, ctx))
    print(markdown(result, ctx))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
