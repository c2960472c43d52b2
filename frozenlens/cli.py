"""The ``frozenlens`` command line.

    frozenlens demo                                   # the built-in demo, end to end
    frozenlens fit DATA --method linear --method head2toe --grid --out runs/mytask
    frozenlens predict runs/mytask/linear photo1.jpg photos/
    frozenlens extract DATA --method head2toe         # fill the activation store only
    frozenlens backbones | frozenlens methods
    frozenlens serve                                  # the backbone as a feature server (separated tuning)
    frozenlens pretune toast DATA... --out DIR        # pre-tune TOAST's top-down modules
    frozenlens explain runs/mytask/toast photo.jpg --out maps/   # TOAST's attention, pass 1 vs 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from frozenlens.cli_toast import add_toast_parsers, run_explain, run_pretune
from frozenlens.errors import FrozenlensError

_DESCRIPTION = """\
Adapt a frozen pretrained transformer to your task without changing a single
backbone weight. The backbone runs once per image; its activations are stored
(under $FROZENLENS_CACHE, default ~/.cache/frozenlens/stores) and every method,
grid point and epoch trains from the store. What you keep is a small adapter
folder (adapter.safetensors + adapter.json) and a results table.
"""

_EPILOG = """\
examples:
  frozenlens demo
  frozenlens fit ../shared/data/cifar10 --method linear --method head2toe --grid --out runs/cifar10
  frozenlens fit mydata/ --method linear:patch_mean=true --seeds 0,1,2
  frozenlens predict runs/cifar10/linear cat.jpg more_images/
  frozenlens predict runs/cifar10/linear runs/cifar10/head2toe cat.jpg   # two tasks, one backbone pass
  frozenlens serve --token s3cret                    # separated tuning: the backbone on a server ...
  frozenlens fit DATA --method mist --remote http://SERVER:8765 --token s3cret --codec int8   # ... the edge

data layouts: a VTAB-1k export (train800.txt, val200.txt, train800val200.txt,
test.txt, classes.txt), an ImageFolder tree (class/img or split/class/img), or a
Hugging Face imagefolder (split folders, optional metadata.csv / metadata.jsonl).
"""


def _add_backbone_args(parser: argparse.ArgumentParser) -> None:
    from frozenlens.backbones import DEFAULT_BACKBONE

    group = parser.add_argument_group("backbone")
    group.add_argument("--backbone", default=DEFAULT_BACKBONE,
                       help=f"backbone name or .safetensors path (default: {DEFAULT_BACKBONE}; "
                            "see `frozenlens backbones`)")
    group.add_argument("--arch", help="timm architecture of a local .safetensors checkpoint")
    group.add_argument("--img-size", type=int, help="input size in pixels (default: the backbone's)")
    group.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: comma-separated integers, e.g. 0,1,2") from err


def _add_fit_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", action="append", dest="methods", metavar="NAME[:key=value,...]",
                        help="method to train, repeatable (default: linear); settings after a colon, "
                             "e.g. head2toe:keep_fraction=0.2 (see `frozenlens methods`); training "
                             "settings and seeds per method too, e.g. vqt:epochs=20,lr=0.01,seeds=0+1")
    parser.add_argument("--grid", action="store_true",
                        help="VTAB protocol: pick lr x weight decay on train/val, then retrain on "
                             "train+val (never selects on test)")
    parser.add_argument("--seeds", type=_seeds, default=[0], help="seeds of the final runs (default: 0)")
    parser.add_argument("--epochs", type=int, help="override the methods' default epochs")
    parser.add_argument("--store-dtype", default="float16", choices=["float16", "float32"],
                        help="precision of stored activations (default: float16)")
    parser.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=None,
                        help="leave stored taps on disk and read each minibatch from the store: "
                             "memory stays at one batch however many images (default: on with "
                             "--remote, off otherwise; epochs are slower when the store is not in "
                             "the OS page cache)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from frozenlens.serve.cli import add_remote_args, add_serve_parser

    parser = argparse.ArgumentParser(prog="frozenlens", description=_DESCRIPTION, epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="build Fashion-MNIST, extract, train every method, print the table",
                          description="The built-in demo: a VTAB-1k-style Fashion-MNIST task (1000 "
                          "training images) built from the Debian package dataset-fashion-mnist, the "
                          "offline DINOv2 ViT-S/14, every method with the VTAB grid.")
    demo.add_argument("--n-test", type=int, default=400, help="test images (default: 400)")
    demo.add_argument("--img-size", type=int, default=224, help="input size (default: 224)")
    demo.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="final-run seeds (default: 0,1,2)")
    demo.add_argument("--out", default="runs/demo", help="results folder (default: runs/demo)")
    demo.add_argument("--fashion-mnist-dir", type=Path, help="folder with the four Fashion-MNIST idx files")
    demo.add_argument("--device", default="cpu")

    fit = sub.add_parser("fit", help="extract once, train methods, save adapters and results",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Train methods on a task and save one adapter folder per method "
                         "plus results.json / results.md in --out.")
    fit.add_argument("data", help="task folder")
    fit.add_argument("--out", help="output folder (default: runs/<task name>)")
    _add_fit_args(fit)
    _add_backbone_args(fit)
    add_remote_args(fit, codec_default="float16")

    extract = sub.add_parser("extract", help="run the backbone once and store the taps methods need")
    extract.add_argument("data", help="task folder")
    extract.add_argument("--method", action="append", dest="methods", metavar="NAME[:key=value,...]",
                         help="store the taps of these methods (default: linear)")
    extract.add_argument("--tap", action="append", dest="taps", metavar="SITE:REDUCE",
                         help="extra tap, e.g. block.3:tokens or final:cls (repeatable)")
    extract.add_argument("--store-dtype", default="float16", choices=["float16", "float32"])
    extract.add_argument("--batch-size", type=int, default=32)
    _add_backbone_args(extract)

    predict = sub.add_parser("predict", help="classify images with one or more adapters",
                             description="Arguments that are adapter folders (they hold adapter.json) "
                             "are adapters; the rest are images or folders of images. Several adapters "
                             "share one backbone pass.")
    predict.add_argument("paths", nargs="+", metavar="ADAPTER_OR_IMAGE")
    predict.add_argument("--backbone", help="override the backbone recorded in the adapter")
    predict.add_argument("--top-k", type=int, default=3)
    predict.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    predict.add_argument("--device", default="cpu")
    add_remote_args(predict, codec_default=None)

    add_serve_parser(sub)
    add_toast_parsers(sub, _add_backbone_args)
    sub.add_parser("backbones", help="list backbones available offline and by name")
    sub.add_parser("methods", help="list methods, their settings and defaults")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``frozenlens`` command."""
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except FrozenlensError as err:
        print(f"frozenlens: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("frozenlens: interrupted; finished work is kept and the next run resumes", file=sys.stderr)
        return 130


def _cmd_fit(args: argparse.Namespace) -> int:
    from frozenlens.api import fit
    from frozenlens.data import load_task

    task = load_task(args.data)
    out = Path(args.out or Path("runs") / task.name)
    backbone = args.backbone
    if args.remote:
        from frozenlens.serve.cli import remote_source

        backbone = remote_source(args, args.codec)
    report = fit(task, args.methods or ["linear"], backbone=backbone, arch=args.arch,
                 img_size=args.img_size, grid=args.grid, seeds=args.seeds, epochs=args.epochs, out=out,
                 device=args.device, store_dtype=args.store_dtype,
                 low_memory=bool(args.remote) if args.low_memory is None else args.low_memory)
    _print_report(report)
    return 0


def _print_report(report) -> None:
    from frozenlens.report import markdown_table

    print()
    print(markdown_table(report.records))
    print(f"\nadapters and results.json / results.md in {report.out_dir}/")
    if report.store is not None:
        print(f"activation store: {report.store.path}")


def _cmd_demo(args: argparse.Namespace) -> int:
    from frozenlens.demo import run_demo

    run_demo(n_test=args.n_test, img_size=args.img_size, seeds=args.seeds, out=Path(args.out),
             fashion_mnist_dir=args.fashion_mnist_dir, device=args.device)
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from frozenlens.api import MethodSpec
    from frozenlens.backbones import Tap, load_backbone
    from frozenlens.data import load_task
    from frozenlens.methods import get_method, make_config
    from frozenlens.store import extract

    task = load_task(args.data)
    net = load_backbone(args.backbone, arch=args.arch, img_size=args.img_size, device=args.device)
    taps = {Tap.parse(t) for t in args.taps or []}
    for spec in map(MethodSpec.parse, args.methods or ([] if taps else ["linear"])):
        taps |= set(get_method(spec.name).taps(make_config(spec.name, spec.settings), net.describe()))
    store = extract(net, [str(i.path) for i in task.all_images()], sorted(taps),
                    dtype=args.store_dtype, batch_size=args.batch_size, device=args.device)
    print(f"store: {store.path} ({store.num_images} images, {store.bytes_per_image / 1024:.1f} KB/img)")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from frozenlens.api import predict
    from frozenlens.data import IMAGE_EXTENSIONS

    adapters = [p for p in args.paths if (Path(p) / "adapter.json").is_file()]
    images: list[Path] = []
    for item in (Path(p) for p in args.paths if p not in adapters):
        if item.is_dir():
            images += sorted(f for f in item.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif item.is_file():
            images.append(item)
        else:
            raise FrozenlensError(f"{item}: no such adapter folder or image file")
    if not adapters:
        raise FrozenlensError("no adapter folder among the arguments (a folder holding adapter.json)")
    if not images:
        raise FrozenlensError("no images to classify among the arguments")
    backbone = args.backbone
    if args.remote:
        from frozenlens.adapter import read_adapter_meta
        from frozenlens.serve.cli import remote_source

        meta = read_adapter_meta(adapters[0])
        codec = args.codec or str(meta.get("features_from", "")).removeprefix("remote:") or "float16"
        backbone = remote_source(args, codec if codec in ("float32", "float16", "int8") else "float16",
                                 expect_weights_hash=meta["backbone"]["weights_hash"])
    for p in predict(adapters, images, backbone=backbone, top_k=args.top_k, device=args.device):
        if args.json:
            print(json.dumps({"image": p.image, "adapter": p.adapter, "top": p.top}))
        else:
            tops = ", ".join(f"{name} {prob:.3f}" for name, prob in p.top)
            prefix = f"[{Path(p.adapter).name}] " if len(adapters) > 1 else ""
            print(f"{prefix}{p.image}: {tops}")
    return 0


def _cmd_backbones(args: argparse.Namespace) -> int:
    from frozenlens.backbones import list_backbones

    listing = list_backbones()
    print("offline (no hub needed):")
    for name, text in listing["offline"].items():
        print(f"  {name:40s} {text}")
    print("\nby timm name (pretrained weights need the Hugging Face hub), for example:")
    for name in listing["hub"]:
        print(f"  {name}")
    print("  ... any timm ViT-family model: python -c \"import timm; print(timm.list_models('vit_*'))\"")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    import dataclasses

    from frozenlens.methods import get_method, method_names

    for name in method_names():
        method = get_method(name)
        print(f"{name}: {method.summary}")
        for f in dataclasses.fields(method.config_class):
            print(f"    {f.name} = {getattr(method.config_class(), f.name)!r}")
        t = method.train_defaults
        print(f"    training: {t.optimizer} lr={t.lr} wd={t.weight_decay} epochs={t.epochs} "
              f"warmup={t.warmup_epochs} batch={t.batch_size}; grid {method.grid}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from frozenlens.serve.cli import run_serve

    return run_serve(args)


_COMMANDS = {"fit": _cmd_fit, "demo": _cmd_demo, "extract": _cmd_extract, "predict": _cmd_predict,
             "backbones": _cmd_backbones, "methods": _cmd_methods, "serve": _cmd_serve,
             "pretune": run_pretune, "explain": run_explain}

if __name__ == "__main__":
    sys.exit(main())
