"""``frozenlens fit`` and ``frozenlens extract``: fill the activation store, train methods."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from frozenlens.cli.common import (
    add_backbone_args,
    add_text_columns,
    default_backbone,
    load_task_arg,
    positive_int,
    seed_list,
)

_FIT_DESCRIPTION = """\
Train methods on a task and save one adapter folder per method plus
results.json / results.md in --out. The backbone runs once per image; every
method, grid point and seed trains from the activation store."""


def add_parsers(sub: Any) -> None:
    """Register ``fit`` and ``extract``."""
    from frozenlens.cli.serve import add_remote_args

    fit = sub.add_parser("fit", help="extract once, train methods, save adapters and results",
                         formatter_class=argparse.RawDescriptionHelpFormatter, description=_FIT_DESCRIPTION)
    fit.add_argument("data", help="task folder (images), or text task folder/file (.csv, .jsonl)")
    fit.add_argument("--out", help="output folder (default: runs/<task name>)")
    _add_fit_args(fit)
    add_backbone_args(fit, text=True)
    add_text_columns(fit)
    add_remote_args(fit, codec_default="float16")
    fit.set_defaults(run=run_fit)

    extract = sub.add_parser("extract", help="run the backbone once over the training images and store "
                                             "what `fit` will train from")
    extract.add_argument("data", help="task folder (images), or text task folder/file (.csv, .jsonl)")
    extract.add_argument("--method", action="append", dest="methods", metavar="NAME[:key=value,...]",
                         help="store the taps of these methods (default: linear); training settings "
                              "in the spec (epochs=..., lr=...) are accepted and ignored")
    extract.add_argument("--tap", action="append", dest="taps", metavar="SITE:REDUCE",
                         help="extra tap, e.g. block.3:tokens or final:cls (repeatable)")
    extract.add_argument("--store-dtype", default="float16", choices=["float16", "float32"])
    extract.add_argument("--batch-size", type=positive_int, default=32,
                         help="images per backbone pass (default: 32)")
    _add_workers_arg(extract)
    _add_store_taps_arg(extract)
    extract.add_argument("--verify", action="store_true",
                         help="check every shard of an existing store against the hashes recorded "
                              "when it was written (and for NaN/inf); damaged shards are set aside "
                              "in quarantine/ and re-extracted")
    add_backbone_args(extract, text=True)
    add_text_columns(extract)
    extract.set_defaults(run=run_extract)


def _add_fit_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", action="append", dest="methods", metavar="NAME[:key=value,...]",
                        help="method to train, repeatable (default: linear); settings after a colon, "
                             "e.g. head2toe:keep_fraction=0.2 (see `frozenlens methods`); training "
                             "settings and seeds per method too, e.g. vqt:epochs=20,lr=0.01,seeds=0+1; "
                             "a tuple setting joins its values with +, e.g. inca:layers=6+8+11")
    parser.add_argument("--grid", action="store_true",
                        help="VTAB protocol: pick lr x weight decay on train/val, then retrain on "
                             "train+val (never selects on test)")
    parser.add_argument("--seeds", type=seed_list, default=[0], help="seeds of the final runs (default: 0)")
    parser.add_argument("--epochs", type=int, help="override the methods' default epochs")
    parser.add_argument("--store-dtype", default="float16", choices=["float16", "float32"],
                        help="precision of stored activations (default: float16)")
    _add_workers_arg(parser)
    _add_store_taps_arg(parser)
    parser.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=None,
                        help="leave stored taps on disk and read each minibatch from the store: "
                             "memory stays at one batch however many images (default: on with "
                             "--remote, off otherwise; epochs are slower when the store is not in "
                             "the OS page cache)")


def _worker_count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number (0: no worker processes)")
    return int(text)


def _add_workers_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=_worker_count, metavar="N",
                        help="processes decoding images while the backbone runs during extraction "
                             "(default: the cores the backbone leaves free, at most 4 - none on a "
                             "2-core CPU, one per core with --device cuda; 0: decode between passes)")


def _add_store_taps_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store-taps", choices=["all", "needed"], default="all",
                        help="all (default): store every token map of the training images (embed, each "
                             "block, final; ~2.8 MB per image for ViT-S at 224 px in float16, logged "
                             "before the pass), so any method added to this task later trains without "
                             "running the backbone again; needed: only the taps of these methods. Test "
                             "images are never stored: they are scored in one streaming pass")


def run_fit(args: argparse.Namespace) -> int:
    """``frozenlens fit``."""
    from frozenlens.api import fit

    task = load_task_arg(args)
    out = Path(args.out or Path("runs") / task.name)
    backbone = args.backbone or default_backbone(task)
    if args.remote:
        from frozenlens.cli.serve import remote_source

        backbone = remote_source(args, args.codec)
    report = fit(task, args.methods or ["linear"], backbone=backbone, arch=args.arch,
                 img_size=args.img_size, grid=args.grid, seeds=args.seeds, epochs=args.epochs, out=out,
                 device=args.device, store_dtype=args.store_dtype, num_workers=args.workers,
                 store_taps=args.store_taps,
                 low_memory=bool(args.remote) if args.low_memory is None else args.low_memory)
    print_report(report)
    return 0


def print_report(report: Any) -> None:
    """The results table of a fit and where its files are."""
    from frozenlens.report import markdown_table

    print()
    print(markdown_table(report.records))
    if report.out_dir is not None:
        print(f"\nresults.json / results.md in {report.out_dir}/; adapters:")
        for record in report.records:
            print(f"  {record.get('spec', record['label'])}: {report.out_dir / record['label']}/")
    if report.store is not None:
        print(f"activation store: {report.store.path}")


def run_extract(args: argparse.Namespace) -> int:
    """``frozenlens extract``."""
    from frozenlens.api import MethodSpec, extract_task
    from frozenlens.backbones import Tap, load_backbone
    from frozenlens.methods import get_method

    task = load_task_arg(args)
    taps = {Tap.parse(t) for t in args.taps or []}
    specs = [MethodSpec.parse(m) for m in args.methods or ([] if taps else ["linear"])]
    net = load_backbone(args.backbone or default_backbone(task), arch=args.arch, img_size=args.img_size,
                        device=args.device)
    for spec in specs:
        taps |= set(get_method(spec.name).taps(spec.config(), net.describe()))
    store = extract_task(task, net, sorted(taps), store_taps=args.store_taps, dtype=args.store_dtype,
                         batch_size=args.batch_size, device=args.device, num_workers=args.workers,
                         verify=args.verify)
    unit, units = ("text", "texts") if store.modality == "text" else ("img", "images")
    print(f"store: {store.path} ({store.num_images} {units}, {store.bytes_per_image / 1024:.1f} KB/{unit})")
    return 0
