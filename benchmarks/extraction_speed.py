"""Extraction against the bare backbone: does the store fill at the backbone's speed?

On the same images (the first ``--images`` of a task, default 256 of CIFAR-10
at 224 px) and the same batch size this measures, in images per second:

* decoding + preprocessing on the main thread alone (untimed elsewhere: it fills memory),
* the bare backbone forward (``FrozenBackbone.forward``) over preprocessed
  tensors already in memory, and ``forward_taps`` of the stored taps (the
  compute extraction cannot avoid),
* ``frozenlens.store.extract`` into a fresh store with ``num_workers=0``
  (decoding on the main thread between backbone passes) and with each count of
  ``--workers`` (decoding in DataLoader worker processes while the backbone runs).

The taps are those of ``--methods`` (default: every method of the demo, so every
block's tokens, 2.6 MB per image in float16). Each extraction is a whole
``extract`` call (image hashing, shard writes with fsync and hashes, the final
check); the stores of every worker count must hold the same bytes (checked).
Target: extraction >= 90% of the bare forward. Timing needs a quiet machine.
Writes ``extraction_speed.{json,md}`` into ``--out``::

    .venv/bin/python benchmarks/extraction_speed.py
    .venv/bin/python benchmarks/extraction_speed.py --images 64 --img-size 112 --out /tmp/smoke   # smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    command_line,
    machine_context,
    machine_line,
    open_task,
    records_table,
    save_results,
)

from frozenlens.api import MethodSpec  # noqa: E402
from frozenlens.backbones import DEFAULT_BACKBONE, load_backbone  # noqa: E402
from frozenlens.backbones.base import FrozenBackbone  # noqa: E402
from frozenlens.backbones.taps import Tap  # noqa: E402
from frozenlens.data import load_image  # noqa: E402
from frozenlens.methods import get_method  # noqa: E402
from frozenlens.store import extract  # noqa: E402

DEMO_METHODS = "linear,head2toe,vqt,inca,mist,last"
STEM = "extraction_speed"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="cifar10", help="task folder or name in ../shared/data")
    parser.add_argument("--images", type=int, default=256, help="images to extract (default: 256)")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32, help="images per backbone pass (default: 32)")
    parser.add_argument("--methods", default=DEMO_METHODS,
                        help=f"comma-separated methods whose taps are stored (default: {DEMO_METHODS})")
    parser.add_argument("--workers", default="1,2", help="worker counts to try besides 0 (default: 1,2)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each measurement; the best counts")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--root", type=Path, help="folder for the temporary stores (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def taps_of(methods: str, backbone: FrozenBackbone) -> list[Tap]:
    taps: set[Tap] = set()
    for text in methods.split(","):
        spec = MethodSpec.parse(text.strip())
        taps |= set(get_method(spec.name).taps(spec.config(), backbone.describe()))
    return sorted(taps)


def best_of(repeats: int, run: Callable[[], Any]) -> tuple[float, float, float]:
    """Fastest wall time of ``repeats`` runs, with that run's CPU seconds in this process and
    in finished child processes (DataLoader workers)."""
    best = (float("inf"), 0.0, 0.0)
    for _ in range(repeats):
        before, started = os.times(), time.perf_counter()
        run()
        wall, after = time.perf_counter() - started, os.times()
        cpu = (after.user + after.system) - (before.user + before.system)
        children = (after.children_user + after.children_system) - (before.children_user + before.children_system)
        best = min(best, (wall, cpu, children))
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def shard_bytes(store_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store_dir)): p.read_bytes()
            for p in sorted((store_dir / "shards").rglob("*.npy"))}


def row(name: str, n: int, timing: tuple[float, float, float], base: dict[str, float],
        **extra: Any) -> dict[str, Any]:
    wall, cpu, children = timing
    rate = n / wall
    return {"measure": name, "img_per_s": round(rate, 2), "seconds": round(wall, 2),
            "vs_bare_forward": f"{rate / base['forward']:.0%}" if "forward" in base else "",
            "vs_forward_taps": f"{rate / base['forward_taps']:.0%}" if "forward_taps" in base else "",
            "main_cpu_s": round(cpu, 1), "worker_cpu_s": round(children, 1), **extra}


def profile_overhead(backbone: FrozenBackbone, batches: list[torch.Tensor], taps: list[Tap], dtype: str,
                     paths: list[str], root: Path) -> list[dict[str, Any]]:
    """What an extraction does besides ``forward_taps``, each part timed alone on the same data:
    the copy to the store's precision (main thread), writing the shards (the writer thread: np.save
    with fsync, the BLAKE2b of each file, the inf/NaN count) and hashing the image files."""
    from frozenlens.store.fingerprint import images_fingerprint
    from frozenlens.store.shards import _hash_saved, _nonfinite, shard_dir, tap_file, write_shard

    np_dtype = getattr(torch, dtype)
    with torch.inference_mode():
        outputs = [backbone.forward_taps(batch, taps) for batch in batches]
    arrays: list[dict[str, Any]] = []
    parts: list[tuple[str, float]] = []
    started = time.process_time()
    for out in outputs:
        arrays.append({k: v.to(np_dtype).cpu().numpy() for k, v in out.items()})
    parts.append((f"cast + copy to {dtype} numpy (main thread)", time.process_time() - started))
    folder = root / "profile"
    (folder / "shards").mkdir(parents=True)
    started = time.perf_counter()
    for index, shard in enumerate(arrays):
        write_shard(folder, index, shard)
    write_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for index, shard in enumerate(arrays):
        for key, array in shard.items():
            _hash_saved(shard_dir(folder, index) / tap_file(key), array)
    hash_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for shard in arrays:
        for array in shard.values():
            _nonfinite(array)
    nonfinite_seconds = time.perf_counter() - started
    parts += [("write shards, all of it (writer thread)", write_seconds),
              ("  of which BLAKE2b of the written data", hash_seconds),
              ("  of which the inf/NaN count", nonfinite_seconds),
              ("  of which np.save + fsync + manifest", write_seconds - hash_seconds - nonfinite_seconds)]
    cache = folder / "image-hashes.json"
    started = time.perf_counter()
    images_fingerprint(paths, cache_file=cache)
    parts.append(("hash the image files (first extraction; cached after)", time.perf_counter() - started))
    shutil.rmtree(folder, ignore_errors=True)
    total = sum(b.numel() for out in outputs for b in out.values()) * torch.finfo(np_dtype).bits // 8
    return [{"part": name, "seconds": round(seconds, 2), "mib_per_s": round(total / 2**20 / seconds, 0)
             if seconds > 0 and "image files" not in name else ""} for name, seconds in parts]


def markdown(records: list[dict[str, Any]], ctx: dict[str, Any]) -> str:
    best = ctx.get("best_workers")
    lines = [
        "# Extraction vs the bare backbone forward",
        "",
        f"{ctx['images']} images of `{ctx['task']}` at {ctx['img_size']} px, batch {ctx['batch_size']}, "
        f"backbone `{ctx['backbone']}` on {ctx['device']}; {len(ctx['taps'])} taps of "
        f"`{ctx['methods']}` stored as {ctx['dtype']} ({ctx['bytes_per_image'] / 2**20:.2f} MiB per image). "
        "Extraction rows time a whole `frozenlens.store.extract` call into a fresh store "
        "(image hashing, shard writes with fsync and hashes, the final check); the forward rows "
        "run over preprocessed tensors already in memory. Best of "
        f"{ctx['repeats']} run(s). CPU seconds: this process, and the DataLoader workers.",
        "",
        records_table(records),
        "",
    ]
    if best is not None:
        lines.append(f"Best worker count: {best}; extraction at {ctx['best_vs_bare_forward']:.0%} of the bare "
                     f"forward (target >= 90%), {ctx['best_vs_forward_taps']:.0%} of `forward_taps`. "
                     f"Stores of every worker count hold the same bytes: {ctx['same_bytes']}.")
    if ctx.get("profile"):
        lines += ["", "## Where the rest goes (each part timed alone on the same data)", "",
                  f"Extraction took {ctx['overhead_seconds']:.2f} s more than `forward_taps` alone. The writer "
                  "thread overlaps the next batches' forward pass, but on a machine whose cores the forward "
                  "already uses, its CPU time is taken from the forward:", "",
                  records_table(ctx["profile"])]
    lines += ["", f"Command: `{ctx['command']}`", "", machine_line(ctx), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    task = open_task(args.task)
    paths = [str(i.path) for i in task.all_images()][: args.images]
    backbone = load_backbone(args.backbone, img_size=args.img_size, device=args.device)
    device = backbone.device
    taps = taps_of(args.methods, backbone)
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    ctx: dict[str, Any] = {**machine_context(), "command": command_line(__file__), "task": args.task,
                           "images": len(paths), "img_size": args.img_size, "batch_size": args.batch_size,
                           "backbone": backbone.name, "device": str(device), "methods": args.methods,
                           "taps": [t.key for t in taps], "dtype": args.dtype, "repeats": args.repeats,
                           "bytes_per_image": 0}
    records: list[dict[str, Any]] = []
    base: dict[str, float] = {}

    def record(entry: dict[str, Any]) -> None:
        records.append(entry)
        print(f"{entry['measure']}: {entry['img_per_s']} img/s", flush=True)
        save_results(args.out, STEM, ctx, records, markdown(records, ctx))

    transform = backbone.transform()
    batches: list[torch.Tensor] = []
    prep = best_of(1, lambda: batches.extend(
        torch.stack([transform(load_image(Path(p))) for p in paths[s:s + args.batch_size]])
        for s in range(0, len(paths), args.batch_size)))
    record(row("decode + preprocess, main thread", len(paths), prep, base))
    batches = [b.to(device) for b in batches]
    with torch.inference_mode():
        backbone(batches[0][:2])  # warm-up
        backbone.forward_taps(batches[0][:2], taps)

        def forward() -> None:
            for batch in batches:
                backbone(batch)
            sync(device)

        def forward_taps() -> None:
            for batch in batches:
                backbone.forward_taps(batch, taps)
            sync(device)

        timing = best_of(args.repeats, forward)
        base["forward"] = len(paths) / timing[0]
        record(row("bare backbone forward (in memory)", len(paths), timing, base))
        timing = best_of(args.repeats, forward_taps)
        base["forward_taps"] = len(paths) / timing[0]
        record(row("forward_taps of the stored taps (in memory)", len(paths), timing, base))

    root = Path(tempfile.mkdtemp(prefix="extraction-speed-", dir=args.root))
    reference: dict[str, bytes] | None = None
    same, rates = True, {}
    try:
        for workers in [0, *worker_counts]:
            folder = root / f"workers-{workers}"

            def run() -> None:
                shutil.rmtree(folder, ignore_errors=True)
                store = extract(backbone, paths, taps, root=folder, dtype=args.dtype,
                                batch_size=args.batch_size, progress=False, num_workers=workers)
                ctx["bytes_per_image"] = store.bytes_per_image

            timing = best_of(args.repeats, run)
            rates[workers] = len(paths) / timing[0]
            store_dir = next(folder.glob("*/meta.json")).parent
            stored = shard_bytes(store_dir)
            if reference is None:
                reference = stored
            identical = stored == reference
            same &= identical
            shutil.rmtree(folder, ignore_errors=True)
            name = "extract, num_workers=0 (decode on the main thread)" if workers == 0 else \
                f"extract, num_workers={workers}"
            record(row(name, len(paths), timing, base, same_bytes_as_workers_0=identical))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best = max([0, *worker_counts], key=lambda w: rates[w])  # decoding on the main thread is a candidate too
    profile_root = Path(tempfile.mkdtemp(prefix="extraction-profile-", dir=args.root))
    try:
        ctx["profile"] = profile_overhead(backbone, batches, taps, args.dtype, paths, profile_root)
    finally:
        shutil.rmtree(profile_root, ignore_errors=True)
    ctx["overhead_seconds"] = len(paths) / rates[best] - len(paths) / base["forward_taps"]
    ctx.update(best_workers=best, best_img_per_s=round(rates[best], 2),
               best_vs_bare_forward=rates[best] / base["forward"],
               best_vs_forward_taps=rates[best] / base["forward_taps"], same_bytes=same)
    save_results(args.out, STEM, ctx, records, markdown(records, ctx))
    print(markdown(records, ctx))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
