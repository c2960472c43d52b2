"""TOAST's compute against the plain frozen backbone: FLOPs per image and trainable parameters.

For the backbone (default: the offline DINOv2 ViT-S/14 at 224 px) this counts, with
``torch.utils.flop_counter.FlopCounterMode`` on one image:

* the plain forward pass (``FrozenBackbone.forward``),
* the TOAST forward (pass 1, feature selection, feedback, pass 2, head) for
  ``feedback`` = full, early and late, and TOAST-Lite (full),
* one training step (forward + backward of the cross-entropy) of each.

The paper (Section 5, Table 9) reports 2x the backbone's FLOPs for TOAST and ~1.5x
for early and late feedback. Writes ``toast_flops.{json,md}`` into
``benchmarks/results``.

    FROZENLENS_CACHE=/tmp/flcache .venv/bin/python benchmarks/toast_flops.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, machine_context, machine_line  # noqa: E402

from frozenlens.backbones import DEFAULT_BACKBONE, load_backbone  # noqa: E402
from frozenlens.methods import build_method  # noqa: E402
from frozenlens.train.trainer import count_trainable  # noqa: E402

VARIANTS = (("toast", "full"), ("toast", "early"), ("toast", "late"), ("toast-lite", "full"))
PAPER = {"full": 2.0, "early": 1.5, "late": 1.5}


def flops(run: Callable[[], Any]) -> int:
    """FLOPs counted while ``run`` executes."""
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def measure(backbone_name: str, img_size: int | None, num_classes: int) -> dict[str, Any]:
    """FLOPs and trainable parameters of every variant, for one image."""
    net = load_backbone(backbone_name, img_size=img_size)
    image = torch.randn(1, 3, net.image_size, net.image_size, generator=torch.Generator().manual_seed(0))
    label = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        plain = flops(lambda: net(image))
    rows = []
    for name, mode in VARIANTS:
        method = build_method(name, {"feedback": mode}, net, num_classes)
        with torch.no_grad():
            forward = flops(lambda: method({"images": image}))
        train_step = flops(lambda: F.cross_entropy(method({"images": image}), label).backward())
        tokens = torch.zeros(1, net.num_tokens, net.dim)
        with torch.no_grad():
            top_down = flops(lambda: method.feedback_signals(method.selection(tokens)))
        rows.append({"method": name, "feedback": mode, "forward_gflops": forward / 1e9,
                     "selection_feedback_gflops": top_down / 1e9,
                     "train_step_gflops": train_step / 1e9, "forward_vs_backbone": forward / plain,
                     "paper_vs_backbone": PAPER[mode], "trainable_params": count_trainable(method)})
    return {"backbone": net.name, "image_size": net.image_size, "num_classes": num_classes,
            "backbone_forward_gflops": plain / 1e9, "rows": rows}


def markdown(result: dict[str, Any], ctx: dict[str, Any]) -> str:
    """The results as a Markdown table with the command and the machine."""
    lines = [
        "# TOAST FLOPs vs the frozen backbone",
        "",
        f"Backbone `{result['backbone']}` at {result['image_size']} px, one image, "
        f"{result['num_classes']} classes; counted with `torch.utils.flop_counter.FlopCounterMode` "
        f"(matrix products and attention; a multiply-add counts 2). Plain backbone forward: "
        f"{result['backbone_forward_gflops']:.2f} GFLOPs.",
        "",
        "| method | feedback | forward GFLOPs | x backbone | paper | of which selection + feedback path "
        "| train step GFLOPs | trainable params |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['method']} | {row['feedback']} | {row['forward_gflops']:.2f} | "
                     f"{row['forward_vs_backbone']:.2f}x | {row['paper_vs_backbone']:.1f}x | "
                     f"{row['selection_feedback_gflops']:.2f} | {row['train_step_gflops']:.2f} | "
                     f"{row['trainable_params']:,} |")
    lines += ["", "The paper's 2x (1.5x) counts the backbone passes; the rest is TOAST's own work: "
              "the feature selection and feedback maps (column) and the value projection of each "
              "block's top-down input (one D x D product per token and block that gets one).",
              "", f"Command: `{ctx['command']}`", "", machine_line(ctx), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: the backbone's)")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = measure(args.backbone, args.img_size, args.num_classes)
    ctx = {**machine_context(), "command": command_line(__file__)}
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"result": result, "context": ctx}
    (args.out / "toast_flops.json").write_text(json.dumps(payload, indent=2) + "\n")
    text = markdown(result, ctx)
    (args.out / "toast_flops.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
