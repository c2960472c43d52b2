"""Peak resident memory of MIST on the edge, in a process of its own (run by separated_tuning.py).

``train``: fit MIST's edge network (LAE + head) with the shared trainer on the
fetched g_k of every image in the edge's activation store (the training images),
read from the store minibatch by minibatch (``frozenlens fit --low-memory``, the
default with ``--remote``) or, with ``--no-stream``, loaded whole first; save the adapter.
``predict``: load the adapter and classify images whose features a feature server
computes (``frozenlens.predict`` with a :class:`~frozenlens.serve.RemoteTaps`).

Two baselines, both reported apart: the resident set (``VmRSS``) right after
``import torch`` (the interpreter and torch's libraries), and after a warm-up of
torch itself on a 2x3x8 tensor: a LayerNorm, a Linear and attention, forward and
backward plus an Adam step for ``train`` (torch's kernels, thread pools and
autograd engine load on first use: about 170 MB on this machine, whatever the
model), the forward alone under ``inference_mode`` for ``predict``. The high-water mark
(``VmHWM``, what ``getrusage`` reports as ``ru_maxrss``) is then reset (``echo 5 >
/proc/self/clear_refs``), so that a transient peak while torch loads does not hide
the work's own; the peak is read at the end. Resident sets count anonymous and
file-backed pages. Prints one JSON line.

    python benchmarks/edge_memory.py train STORE TASK K ADAPTER_OUT [--epochs 1] [--no-stream] [--threads 2]
    python benchmarks/edge_memory.py predict ADAPTER URL TOKEN IMAGE... [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_mb() -> float:
    """This process's resident set now, in MiB."""
    return _status_mb("VmRSS")


def peak_mb() -> float:
    """High-water mark of the resident set since the last :func:`reset_peak`, in MiB."""
    return _status_mb("VmHWM")


def reset_peak() -> None:
    """Reset the high-water mark to the current resident set (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def warm_up_torch(training: bool) -> None:
    """A tiny forward (and for training backward + Adam step): torch loads kernels and pools on first use."""
    import torch
    from torch.nn import functional as F

    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))
    if not training:
        with torch.inference_mode():
            x = model(torch.randn(2, 3, 8)).view(2, 1, 3, 8)
            F.scaled_dot_product_attention(x, x, x)
        return
    optimizer = torch.optim.Adam(model.parameters())
    x = model(torch.randn(2, 3, 8)).view(2, 1, 3, 8)
    F.scaled_dot_product_attention(x, x, x).sum().backward()
    optimizer.step()


def train(args: argparse.Namespace, marks: dict[str, float]) -> dict:
    from frozenlens.adapter import save_adapter
    from frozenlens.data import load_task
    from frozenlens.methods import build_method
    from frozenlens.store import ActivationStore
    from frozenlens.train.data import TapData

    marks["frozenlens imported"] = rss_mb()
    store, task = ActivationStore(args.store), load_task(args.task)
    model = build_method("mist", {"gather_depth": args.k, "gathered": True}, store.meta["backbone"],
                         len(task.classes))
    labels = {str(item.path): item.label for item in task.all_images()}
    data = TapData.from_store(store, model.tap_keys(), store.image_paths,
                              [labels[p] for p in store.image_paths], len(task.classes), stream=args.stream)
    marks["features loaded" if not args.stream else "features opened (streamed)"] = rss_mb()
    cfg = model.train_defaults.updated(epochs=args.epochs, warmup_epochs=0,
                                       **({"batch_size": args.batch_size} if args.batch_size else {}))
    started = time.perf_counter()
    model.fit(data, cfg)
    seconds = time.perf_counter() - started
    save_adapter(args.adapter_out, model, task.classes,
                 extra={"store_dtype": store.dtype, "features_from": store.meta.get("origin", "local backbone")})
    return {"images": len(data), "feature_dtype": store.dtype, "feature_shape": list(store.shape(model.tap_keys()[0])),
            "features_mb": round(store.bytes_per_image_of(model.tap_keys()) * len(data) / 2**20, 1),
            "features_held": "streamed from the store" if args.stream else "in memory",
            "epochs": args.epochs, "batch_size": cfg.batch_size, "train_seconds": round(seconds, 1)}


def predict(args: argparse.Namespace, marks: dict[str, float]) -> dict:
    from frozenlens.adapter import read_adapter_meta
    from frozenlens.api import predict as predict_images
    from frozenlens.serve.client import RemoteTaps

    marks["frozenlens imported"] = rss_mb()
    meta = read_adapter_meta(args.adapter)
    codec = str(meta.get("features_from", "remote:float16")).removeprefix("remote:")
    source = RemoteTaps.connect(args.url, args.token, codec, expect_weights_hash=meta["backbone"]["weights_hash"])
    started = time.perf_counter()
    predictions = predict_images([args.adapter], args.images, backbone=source, batch_size=args.batch_size)
    return {"images": len(predictions), "codec": codec, "batch_size": args.batch_size,
            "predict_seconds": round(time.perf_counter() - started, 1),
            "bytes_received": source.client.bytes_received}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    fit = sub.add_parser("train")
    fit.add_argument("store")
    fit.add_argument("task")
    fit.add_argument("k", type=int)
    fit.add_argument("adapter_out")
    fit.add_argument("--epochs", type=int, default=1)
    fit.add_argument("--batch-size", type=int, default=0, help="0: MIST's default (the paper's 32)")
    fit.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                     help="read g_k minibatch by minibatch from the store (default), or --no-stream: "
                          "load all of it first")
    use = sub.add_parser("predict")
    use.add_argument("adapter")
    use.add_argument("url")
    use.add_argument("token")
    use.add_argument("images", nargs="+")
    use.add_argument("--batch-size", type=int, default=32)
    for each in (fit, use):
        each.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    marks = {"interpreter": rss_mb()}
    import torch

    torch.set_num_threads(args.threads)
    marks["torch imported (baseline)"] = rss_mb()
    warm_up_torch(args.mode == "train")
    marks["torch warmed up"] = rss_mb()
    reset_peak()
    detail = train(args, marks) if args.mode == "train" else predict(args, marks)
    marks["peak"] = peak_mb()
    baseline, warm = marks["torch imported (baseline)"], marks["torch warmed up"]
    print(json.dumps({"mode": args.mode, "marks_mb": {k: round(v, 1) for k, v in marks.items()},
                      "baseline_mb": round(baseline, 1), "beyond_baseline_mb": round(marks["peak"] - baseline, 1),
                      "warm_baseline_mb": round(warm, 1), "beyond_warm_mb": round(marks["peak"] - warm, 1),
                      **detail}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
