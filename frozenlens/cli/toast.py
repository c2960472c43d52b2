"""The TOAST subcommands of ``frozenlens``: ``pretune`` and ``explain``.

    frozenlens pretune toast DATA [DATA ...] --out runs/pretuned   # pre-tune TOAST's modules
    frozenlens fit DATA --method toast:pretuned=runs/pretuned       # start from them
    frozenlens explain runs/mytask/toast photo.jpg --out maps/      # pass-1 / pass-2 attention PNGs
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from frozenlens.cli.common import add_backbone_args


def add_parsers(sub: Any) -> None:
    """Register ``pretune`` and ``explain``."""
    pretune = sub.add_parser(
        "pretune", help="pre-tune TOAST's top-down modules on a general image collection",
        description="Train TOAST's feature selection and feedback path with the backbone frozen on "
        "the union of the training images (train800val200) of the given tasks, each task's classes "
        "kept distinct; loss = cross-entropy + 0.03 x the variational loss. Saves an adapter folder "
        "that `frozenlens fit DATA --method toast:pretuned=OUT` starts from. Pre-tune on a large "
        "general collection (the paper uses ImageNet-1k) for the best start.")
    pretune.add_argument("method", metavar="toast[:key=value,...]",
                         help="toast, optionally with settings, e.g. toast:feedback=late,epochs=5")
    pretune.add_argument("data", nargs="+", help="task folders whose training images are pooled")
    pretune.add_argument("--out", required=True, help="adapter folder to write")
    pretune.add_argument("--epochs", type=int, help="override the pre-tuning epochs (default: 30)")
    pretune.add_argument("--seed", type=int, default=0)
    add_backbone_args(pretune)
    pretune.set_defaults(run=run_pretune)

    explain = sub.add_parser(
        "explain", help="save TOAST's pass-1 and pass-2 attention maps of images as PNG",
        description="For each image: the class token's attention (last block, mean over heads) in "
        "pass 1 and pass 2 and the feature selection's token weights, over the image the backbone "
        "saw. Writes <image>_pass1.png, <image>_pass2.png and <image>_steps.png into --out.")
    explain.add_argument("adapter", help="a toast or toast-lite adapter folder")
    explain.add_argument("images", nargs="+", help="image files")
    explain.add_argument("--out", required=True, help="folder for the PNG files")
    explain.add_argument("--backbone", help="override the backbone recorded in the adapter")
    explain.add_argument("--device", default="cpu")
    explain.set_defaults(run=run_explain)


def run_pretune(args: argparse.Namespace) -> int:
    """``frozenlens pretune``."""
    from frozenlens.methods.toast.pretune import pretune_from_cli

    out = pretune_from_cli(args.method, args.data, Path(args.out), backbone=args.backbone, arch=args.arch,
                           img_size=args.img_size, epochs=args.epochs, seed=args.seed, device=args.device)
    print(f"pre-tuned TOAST modules in {out}/; use them with --method toast:pretuned={out}")
    return 0


def run_explain(args: argparse.Namespace) -> int:
    """``frozenlens explain``."""
    from frozenlens.methods.toast.explain import explain

    for path in explain(args.adapter, args.images, args.out, backbone=args.backbone, device=args.device):
        print(path)
    return 0
