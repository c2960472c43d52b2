"""Arguments shared by several ``frozenlens`` subcommands."""

from __future__ import annotations

import argparse


def add_backbone_args(parser: argparse.ArgumentParser) -> None:
    """``--backbone``, ``--arch``, ``--img-size`` and ``--device``."""
    from frozenlens.backbones import DEFAULT_BACKBONE

    group = parser.add_argument_group("backbone")
    group.add_argument("--backbone", default=DEFAULT_BACKBONE,
                       help=f"backbone name or .safetensors path (default: {DEFAULT_BACKBONE}; "
                            "see `frozenlens backbones`)")
    group.add_argument("--arch", help="timm architecture of a local .safetensors checkpoint")
    group.add_argument("--img-size", type=int, help="input size in pixels (default: the backbone's)")
    group.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")


def seed_list(text: str) -> list[int]:
    """``"0,1,2"`` as ``[0, 1, 2]``; an argparse error for anything else (``","`` included)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: comma-separated integers, e.g. 0,1,2") from err
    if not seeds:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give at least one seed, e.g. 0 or 0,1,2")
    return seeds


def positive_int(text: str) -> int:
    """A whole number of at least 1; an argparse error (exit 2) for anything else."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of at least 1")
    return value
