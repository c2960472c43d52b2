"""``frozenlens backbones`` and ``frozenlens methods``: what is available."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def add_parsers(sub: Any) -> None:
    """Register ``backbones`` and ``methods``."""
    sub.add_parser("backbones", help="list backbones available offline and by name").set_defaults(run=run_backbones)
    sub.add_parser("methods", help="list methods, their settings and defaults").set_defaults(run=run_methods)


def run_backbones(args: argparse.Namespace) -> int:
    """``frozenlens backbones``."""
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


def run_methods(args: argparse.Namespace) -> int:
    """``frozenlens methods``."""
    from frozenlens.methods import get_method, method_names

    for name in method_names():
        method = get_method(name)
        print(f"{name}: {method.summary}")
        for f in dataclasses.fields(method.config_class):
            print(f"    {f.name} = {getattr(method.config_class(), f.name)!r}")
        t = method.train_defaults
        print(f"    training: {t.optimizer} lr={t.lr} wd={t.weight_decay} epochs={t.epochs} "
              f"warmup={t.warmup_epochs} batch={t.batch_size}; grid {method.grid}")
        print(f"    backbones: {', '.join(method.modalities)}; "
              f"{'runs the backbone in the training loop' if method.in_loop else 'trains from the store'}")
    return 0
