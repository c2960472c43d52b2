"""What every benchmark records: the command that ran it and the machine it ran on."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from allocator import reuse_freed_memory

from frozenlens.backbones import DEFAULT_BACKBONE, load_backbone
from frozenlens.backbones.base import FrozenBackbone
from frozenlens.data import Task, load_task

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
RESULTS = REPO_ROOT / "benchmarks" / "results"

# Benchmarks opt in to glibc keeping freed memory (per-batch tensors then do not
# page-fault every step; see allocator.py). The library never changes the process's
# malloc policy; a CLI user gets the same with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824.
reuse_freed_memory()


def command_line(script: str | Path) -> str:
    """The command that ran ``script``, as typed from the repository root."""
    env = f"FROZENLENS_CACHE={shlex.quote(os.environ['FROZENLENS_CACHE'])} " \
        if "FROZENLENS_CACHE" in os.environ else ""
    relative = os.path.relpath(Path(script).resolve(), REPO_ROOT)
    return f"{env}.venv/bin/python {shlex.join([relative, *sys.argv[1:]])}"


def machine_context() -> dict[str, Any]:
    """Date, processor, core count and library versions."""
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"processor": platform.processor() or platform.machine(),
                    "platform": platform.platform(), "cpu_count": os.cpu_count()},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def machine_line(ctx: dict[str, Any]) -> str:
    """One Markdown line describing the machine of ``machine_context``."""
    gpu = f", GPU {ctx['cuda']}" if ctx.get("cuda") else ", no GPU"
    return (f"Machine: {ctx['machine']['processor']}, {ctx['machine']['cpu_count']} CPUs{gpu}; "
            f"torch {ctx['torch']} ({ctx['torch_threads']} threads); date {ctx['date']}.")


def small_run_head(title: str, ctx: dict[str, Any], recipe: str) -> list[str]:
    """The opening lines of a small run's Markdown report: its title, the task, its image counts, backbone
    and input size followed by ``recipe``, the machine, and the command that ran it."""
    return [f"# {title}", "",
            f"Task `{ctx['task']}` ({ctx['train_images']} training images, {ctx['test_images']} test images "
            f"evenly spaced through test.txt), backbone {ctx['backbone']} at {ctx['image_size']} px, {recipe}",
            machine_line(ctx), "", f"Command: `{ctx['command']}`", ""]


def resolve_task(name: str) -> Path | None:
    """A task folder: a path, or the name of a task in ``../shared/data``; None when absent."""
    path = Path(name)
    if (path / "test.txt").is_file():
        return path
    shared = SHARED_DATA / name
    return shared if (shared / "test.txt").is_file() else None


def limit_test(task: Task, limit: int) -> Task:
    """``task`` with at most ``limit`` test images, evenly spaced (all when ``limit`` is 0)."""
    test = task.splits.get("test", [])
    if not limit or limit >= len(test):
        return task
    step = len(test) / limit
    subset = [test[int(i * step)] for i in range(limit)]
    return dataclasses.replace(task, splits={**task.splits, "test": subset})


def open_task(name: str, test_limit: int = 0) -> Task:
    """Task ``name`` (a folder, or a name in ``../shared/data``) with at most ``test_limit`` test
    images (:func:`limit_test`); exits with the reason when it is absent."""
    folder = resolve_task(name)
    if folder is None:
        raise SystemExit(f"task {name!r} not found: give a task folder or the name of one in "
                         f"{SHARED_DATA} (is ../shared absent?)")
    return limit_test(load_task(folder), test_limit)


def records_table(records: list[dict[str, Any]]) -> str:
    """A Markdown table with one column per key of the first record and one row per record."""
    keys = list(records[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in records]
    return "\n".join(lines)


def save_results(out: Path, stem: str, ctx: dict[str, Any], records: list[dict[str, Any]],
                 markdown: str) -> None:
    """Write ``{stem}.json`` (context and records) and ``{stem}.md`` into ``out``; benchmarks
    call it after every record, so an interrupted run keeps what finished."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"context": ctx, "results": records}, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)


def small_run_parser(doc: str) -> argparse.ArgumentParser:
    """Options of the small accuracy runs on a shared task: task, backbone, input size,
    test limit, seed, device and output folder (each benchmark adds its own)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--task", default="cifar10", help="task folder or name in ../shared/data")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--img-size", type=int, default=112, help="input size in pixels (default: 112)")
    parser.add_argument("--test-limit", type=int, default=500,
                        help="test images, evenly spaced through test.txt (default: 500; 0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser


def open_small_run(args: argparse.Namespace) -> tuple[Task, FrozenBackbone]:
    """The task (test split limited) and the backbone that ``small_run_parser``'s options name."""
    task = open_task(args.task, args.test_limit)
    return task, load_backbone(args.backbone, img_size=args.img_size, device=args.device)
