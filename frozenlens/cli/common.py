"""Arguments shared by several ``frozenlens`` subcommands."""

from __future__ import annotations

import argparse
from typing import Any


def add_backbone_args(parser: argparse.ArgumentParser, *, text: bool = False) -> None:
    """``--backbone``, ``--arch``, ``--img-size`` and ``--device``; with ``text`` (commands that also
    read text tasks) ``--backbone`` defaults by task: see :func:`default_backbone`."""
    from frozenlens.backbones import DEFAULT_BACKBONE
    from frozenlens.backbones.text import MINILM_BACKBONE

    group = parser.add_argument_group("backbone")
    default = (f"{DEFAULT_BACKBONE} for images, {MINILM_BACKBONE} for text tasks" if text else DEFAULT_BACKBONE)
    group.add_argument("--backbone", default=None if text else DEFAULT_BACKBONE,
                       help=f"backbone name or .safetensors path (default: {default}; "
                            "see `frozenlens backbones`)")
    group.add_argument("--arch", help="timm architecture of a local .safetensors checkpoint")
    group.add_argument("--img-size", type=int, help="input size in pixels (default: the backbone's)")
    group.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")


def add_text_columns(parser: argparse.ArgumentParser) -> None:
    """``--text-column`` and ``--label-column``, for commands that read a text task from files."""
    data = parser.add_argument_group("text tasks (.csv / .jsonl files, or a saved Hugging Face dataset)")
    data.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    data.add_argument("--label-column", default="label", help="column holding the label (default: label)")


def load_task_arg(args: argparse.Namespace) -> Any:
    """The task of ``args.data``: an image task, or a text task read with the column arguments."""
    from frozenlens.data import load_any_task

    return load_any_task(args.data, text_column=args.text_column, label_column=args.label_column)


def default_backbone(task: Any) -> str:
    """The backbone a task runs on when ``--backbone`` is not given."""
    from frozenlens.backbones import DEFAULT_BACKBONE
    from frozenlens.backbones.text import MINILM_BACKBONE
    from frozenlens.data import TextTask

    return MINILM_BACKBONE if isinstance(task, TextTask) else DEFAULT_BACKBONE


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
