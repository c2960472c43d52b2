"""``frozenlens predict``: classify images with one or more adapters, one backbone pass."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from frozenlens.cli.common import positive_int
from frozenlens.errors import FrozenlensError


def add_parsers(sub: Any) -> None:
    """Register ``predict``."""
    from frozenlens.cli.serve import add_remote_args

    predict = sub.add_parser("predict", help="classify images (or texts) with one or more adapters",
                             description="Arguments that are adapter folders (they hold adapter.json) "
                             "are adapters; the rest are images or folders of images, or, for adapters "
                             "trained on a text backbone, the texts to classify. Several adapters "
                             "share one backbone pass.")
    predict.add_argument("paths", nargs="+", metavar="ADAPTER_OR_INPUT")
    predict.add_argument("--texts-from", type=Path, metavar="FILE",
                         help="text adapters: also classify each non-empty line of FILE (UTF-8)")
    predict.add_argument("--backbone", help="override the backbone recorded in the adapter")
    predict.add_argument("--top-k", type=positive_int, default=3, help="classes to show per image (default: 3)")
    predict.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    predict.add_argument("--device", default="cpu")
    add_remote_args(predict, codec_default=None)
    predict.set_defaults(run=run_predict)


def split_arguments(paths: list[str]) -> tuple[list[str], list[Path]]:
    """Adapter folders and image files among ``paths`` (folders of images are expanded)."""
    from frozenlens.data import IMAGE_EXTENSIONS

    adapters = [p for p in paths if (Path(p) / "adapter.json").is_file()]
    images: list[Path] = []
    for item in (Path(p) for p in paths if p not in adapters):
        if item.is_dir():
            images += sorted(f for f in item.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        elif item.is_file():
            images.append(item)
        else:
            raise FrozenlensError(f"{item}: no such adapter folder or image file")
    if not adapters:
        raise FrozenlensError("no adapter folder among the arguments (a folder holding adapter.json)")
    if not images:
        raise FrozenlensError("no images to classify among the arguments")
    return adapters, images


def text_arguments(paths: list[str], adapters: list[str], texts_from: Path | None) -> list[str]:
    """The texts to classify: every argument that is not an adapter, then ``texts_from``'s lines."""
    texts = [p for p in paths if p not in adapters]
    if texts_from is not None:
        try:
            lines = texts_from.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise FrozenlensError(f"--texts-from {texts_from}: cannot read it as UTF-8 text ({err})") from err
        texts += [line for line in lines if line.strip()]
    if not texts:
        raise FrozenlensError("no texts to classify: give them as arguments or with --texts-from FILE")
    return texts


def run_predict(args: argparse.Namespace) -> int:
    """``frozenlens predict``."""
    from frozenlens.adapter import read_adapter_meta
    from frozenlens.api import predict

    adapters = [p for p in args.paths if (Path(p) / "adapter.json").is_file()]
    if adapters and read_adapter_meta(adapters[0])["backbone"].get("modality") == "text":
        inputs: list[Any] = text_arguments(args.paths, adapters, args.texts_from)
    else:
        adapters, inputs = split_arguments(args.paths)
    backbone = args.backbone
    if args.remote:
        from frozenlens.cli.serve import remote_source

        meta = read_adapter_meta(adapters[0])
        codec = args.codec or str(meta.get("features_from", "")).removeprefix("remote:") or "float16"
        backbone = remote_source(args, codec if codec in ("float32", "float16", "int8") else "float16",
                                 expect_weights_hash=meta["backbone"]["weights_hash"])
    for p in predict(adapters, inputs, backbone=backbone, top_k=args.top_k, device=args.device):
        if args.json:
            print(json.dumps({"image": p.image, "adapter": p.adapter, "top": p.top}))
        else:
            tops = ", ".join(f"{name} {prob:.3f}" for name, prob in p.top)
            prefix = f"[{Path(p.adapter).name}] " if len(adapters) > 1 else ""
            print(f"{prefix}{p.image}: {tops}")
    return 0
