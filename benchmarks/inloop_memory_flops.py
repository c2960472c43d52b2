"""Training memory, step time, trainable parameters and FLOPs of every method, side by side.

At one batch size and image size on the default backbone (DINOv2 ViT-S/14 at
224 px), for every method with the backbone in the loop (read from the method
registry: the PETL baselines, TOAST and its variants when registered) and for
the methods that train from the activation store (``--store-methods``, default
``linear`` and ``vqt``), plus VQT trained the way its reference code does, with
the frozen backbone run on every batch (``vqt (loop)``):

* **peak training memory**: growth above the state before the first step, over
  one warm-up step and ``--steps`` timed steps (forward, cross-entropy, backward,
  optimiser step; the optimiser's state included). On CPU it is the process's
  resident-set growth (``frozenlens.train.measure.Measure``), on CUDA
  ``max_memory_allocated`` growth. The frozen backbone's own weights are loaded
  before and not counted. Each method runs in its own process, so one method's
  freed memory cannot hide another's growth;
* **seconds per training step** (mean of the timed steps);
* **trainable parameters** (``count_trainable``);
* **FLOPs per image** (``torch.utils.flop_counter.FlopCounterMode``): the forward
  pass and a training step (forward + backward), as the batch's count divided by
  the batch size. Store methods count only what they compute from the stored
  taps; ``vqt (loop)`` and in-loop methods include the backbone.

Inputs are random images (memory, time and FLOPs do not depend on pixel values)
and random tap values for store methods, in the shapes the backbone gives.
Ratios are against VQT (the paper reports VPT 3.8x and AdaptFormer 5.9x VQT's
memory, ViT-B on a GPU) and FLOPs against the plain backbone's forward (TOAST's
paper: 2x; early / late feedback ~1.5x).

    FROZENLENS_CACHE=/tmp/flcache .venv/bin/python benchmarks/inloop_memory_flops.py
    .venv/bin/python benchmarks/inloop_memory_flops.py --device cuda --batch-size 64

Writes ``inloop_memory_flops.{json,md}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, machine_context, machine_line  # noqa: E402

from frozenlens.api import MethodSpec  # noqa: E402
from frozenlens.backbones import DEFAULT_BACKBONE, FrozenBackbone, Tap, load_backbone  # noqa: E402
from frozenlens.bench.flops import flop_counter, flops_per_image  # noqa: E402
from frozenlens.methods import build_method, get_method, method_names  # noqa: E402
from frozenlens.methods.petl.combos import VQTOnPETL  # noqa: E402
from frozenlens.train.measure import Measure  # noqa: E402
from frozenlens.train.trainer import count_trainable, make_optimizer  # noqa: E402

VARIANTS = {"toast": ["toast:feedback=early", "toast:feedback=late"]}
"""Extra settings measured for a registered method (TOAST's early and late feedback)."""
LOOP_SUFFIX = " (loop)"
STORE_SUFFIX = " (store)"
PAPER_MEMORY_VS_VQT = {"vpt-deep": 3.8, "adaptformer": 5.9}
PAPER_FLOPS_VS_BACKBONE = {"toast": 2.0, "toast:feedback=early": 1.5, "toast:feedback=late": 1.5}
NUM_CLASSES = 10
FLOP_IMAGES = 2


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--img-size", type=int, help="input size (default: the backbone's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per method")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--store-methods", default="linear,vqt",
                        help="comma-separated methods measured from stored taps")
    parser.add_argument("--only", help="measure these labels only (comma-separated), e.g. lora,vqt (loop)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one", help=argparse.SUPPRESS)        # internal: measure one label, print JSON
    return parser.parse_args(argv)


def labels(store_methods: Sequence[str]) -> list[str]:
    """Every row: store methods, VQT in the loop, then each in-loop method and its variants."""
    rows = [m + STORE_SUFFIX for m in store_methods]
    if "vqt" in store_methods:
        rows.append("vqt" + LOOP_SUFFIX)
    for name in method_names():
        if get_method(name).in_loop:
            rows += [name] + VARIANTS.get(name, [])
    return rows


# -- what one training step runs --------------------------------------------------------
class LiveTapsModel(nn.Module):
    """A store method trained with the frozen backbone computing its taps on every batch."""

    def __init__(self, method: nn.Module, backbone: FrozenBackbone):
        super().__init__()
        self.method = method
        self._backbone = [backbone]
        self.taps = [Tap.parse(k) for k in method.tap_keys()]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            taps = self._backbone[0].forward_taps(batch["images"], self.taps)
        return self.method(taps)


def model_and_batch(label: str, backbone: FrozenBackbone, batch_size: int, device: str,
                    ) -> tuple[int, nn.Module, dict[str, torch.Tensor]]:
    """Trainable parameters of ``label``'s method, the module one training step runs, a random batch.

    For VQT on a PETL method the step is stage 2's (VQT's queries on the frozen, adapted
    features); stage 1 is the PETL method's own row.
    """
    generator = torch.Generator().manual_seed(0)
    size = backbone.image_size
    images = torch.randn(batch_size, 3, size, size, generator=generator).to(device)
    name = label.removesuffix(STORE_SUFFIX).removesuffix(LOOP_SUFFIX)
    spec = MethodSpec.parse(name)
    method = build_method(spec.name, spec.method_settings, backbone, NUM_CLASSES).to(device)
    trainable = count_trainable(method)
    if label.endswith(STORE_SUFFIX):
        taps = {key: torch.randn(batch_size, *backbone.tap_shape(Tap.parse(key)), generator=generator).to(device)
                for key in method.tap_keys()}
        return trainable, method, taps
    if label.endswith(LOOP_SUFFIX):
        return trainable, LiveTapsModel(method, backbone), {"images": images}
    if isinstance(method, VQTOnPETL):
        method.petl.requires_grad_(False)
        return trainable, method.query_stage(), {"images": images}
    return trainable, method, {"images": images}


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                  labels: torch.Tensor) -> None:
    loss = F.cross_entropy(model(batch), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_one(label: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every number of one row, measured in this process."""
    torch.manual_seed(0)
    backbone = load_backbone(args.backbone, img_size=args.img_size, device=args.device)
    trainable, model, batch = model_and_batch(label, backbone, args.batch_size, args.device)
    labels = torch.arange(args.batch_size, device=args.device) % NUM_CLASSES
    model.train()
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad],
                               get_method(MethodSpec.parse(label.split(" ")[0]).name).train_defaults)
    with Measure(args.device) as memory:
        training_step(model, optimizer, batch, labels)          # warm-up: allocates optimiser state
        synchronize(args.device)
        started = time.perf_counter()
        for _ in range(args.steps):
            training_step(model, optimizer, batch, labels)
        synchronize(args.device)
        step_seconds = (time.perf_counter() - started) / args.steps
    few = min(FLOP_IMAGES, args.batch_size)     # FLOPs grow linearly with the batch: count a few images
    forward_flops, step_flops = flops_per_image(model, {k: v[:few] for k, v in batch.items()}, labels[:few])
    return {"label": label, "peak_memory_mb": round(memory.peak_mb, 1), "step_seconds": round(step_seconds, 3),
            "trainable_params": trainable, "forward_gflops_per_image": round(forward_flops / 1e9, 3),
            "train_step_gflops_per_image": round(step_flops / 1e9, 3)}


def backbone_flops(args: argparse.Namespace) -> float:
    """FLOPs per image of the plain frozen backbone's forward pass."""
    backbone = load_backbone(args.backbone, img_size=args.img_size, device=args.device)
    images = torch.randn(FLOP_IMAGES, 3, backbone.image_size, backbone.image_size, device=args.device)
    with torch.no_grad(), flop_counter() as counter:
        backbone(images)
    return counter.get_total_flops() / FLOP_IMAGES


def run_isolated(label: str, argv: Sequence[str]) -> dict[str, Any]:
    """``measure_one(label)`` in a fresh Python process."""
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--one", label]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"label": label, "error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the table ------------------------------------------------------------------------------
def add_ratios(rows: list[dict[str, Any]], plain_flops: float) -> None:
    """Memory against VQT (both ways of training it) and FLOPs against the plain backbone."""
    by_label = {r["label"]: r for r in rows if "error" not in r}
    for row in rows:
        if "error" in row:
            continue
        for vqt in ("vqt" + LOOP_SUFFIX, "vqt" + STORE_SUFFIX):
            base = by_label.get(vqt, {}).get("peak_memory_mb")
            key = "memory_vs_" + vqt.replace(" ", "_").replace("(", "").replace(")", "")
            row[key] = round(row["peak_memory_mb"] / base, 1) if base else None
        row["forward_flops_vs_backbone"] = round(row["forward_gflops_per_image"] * 1e9 / plain_flops, 2)
        row["paper_memory_vs_vqt"] = PAPER_MEMORY_VS_VQT.get(row["label"])
        row["paper_flops_vs_backbone"] = PAPER_FLOPS_VS_BACKBONE.get(row["label"])


def markdown(result: dict[str, Any]) -> str:
    ctx, rows = result["context"], result["rows"]
    lines = ["# Training memory, step time, parameters and FLOPs per method", "",
             f"Backbone {ctx['backbone']} at {ctx['image_size']} px, batch {ctx['batch_size']}, "
             f"{ctx['steps']} timed steps (+1 warm-up), device {ctx['device']}. "
             f"Plain backbone forward: {ctx['backbone_gflops_per_image']:.2f} GFLOPs/image.",
             machine_line(ctx["machine"]) + f" Load average (1 min) before / after: "
             f"{ctx['load_average_1min_before_after'][0]} / {ctx['load_average_1min_before_after'][1]} "
             "(other jobs shared the CPU: seconds per step are noisy, memory and FLOPs are not).",
             "", f"Command: `{ctx['command']}`", "",
             "| method | peak train mem (MB) | x VQT (loop) | x VQT (store) | s/step | trainable params "
             "| fwd GFLOPs/img | x backbone | train-step GFLOPs/img | paper |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error']} |" + " |" * 8)
            continue
        paper = []
        if r["paper_memory_vs_vqt"]:
            paper.append(f"{r['paper_memory_vs_vqt']}x VQT mem")
        if r["paper_flops_vs_backbone"]:
            paper.append(f"{r['paper_flops_vs_backbone']}x FLOPs")
        lines.append(
            f"| {r['label']} | {r['peak_memory_mb']:.0f} | {_ratio(r['memory_vs_vqt_loop'])} | "
            f"{_ratio(r['memory_vs_vqt_store'])} | {r['step_seconds']:.2f} | {r['trainable_params']:,} | "
            f"{r['forward_gflops_per_image']:.2f} | {r['forward_flops_vs_backbone']:.2f} | "
            f"{r['train_step_gflops_per_image']:.2f} | {', '.join(paper) or '—'} |")
    lines += ["", "Memory: growth above the state before training (frozen backbone weights excluded); "
              "CPU: resident-set growth, CUDA: max_memory_allocated growth. Store rows count only what "
              "trains from the stored taps (the taps of one batch are given); `vqt (loop)` runs the frozen "
              "backbone on every batch without gradients, as VQT's reference code. `vqt+...` rows: the "
              "second stage's step (VQT's queries on the frozen adapted features; the first stage is the "
              "PETL method's own row); their parameters count both stages. Paper ratios are for "
              "ViT-B/16 on a GPU, total memory.", ""]
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one, args)))
        return 0
    store_methods = [m for m in args.store_methods.split(",") if m]
    wanted = labels(store_methods)
    if args.only:
        wanted = [w for w in wanted if w in args.only.split(",")]
    started, load_before = time.perf_counter(), os.getloadavg()
    rows = []
    for label in wanted:
        row = run_isolated(label, argv)
        rows.append(row)
        print(json.dumps(row), flush=True)
    plain = backbone_flops(args)
    add_ratios(rows, plain)
    backbone = load_backbone(args.backbone, img_size=args.img_size)
    context = {"backbone": backbone.name, "image_size": backbone.image_size, "batch_size": args.batch_size,
               "steps": args.steps, "device": args.device, "backbone_gflops_per_image": plain / 1e9,
               "command": command_line(__file__), "machine": machine_context(),
               "wall_seconds": round(time.perf_counter() - started, 1),
               "load_average_1min_before_after": [round(load_before[0], 1), round(os.getloadavg()[0], 1)]}
    result = {"context": context, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "inloop_memory_flops.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (args.out / "inloop_memory_flops.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
