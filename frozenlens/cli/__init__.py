"""The ``frozenlens`` command line: one module per command family.

    frozenlens fit DATA --method linear --method head2toe --grid --out runs/mytask   # cli/train.py
    frozenlens extract DATA --method head2toe         # fill the activation store only
    frozenlens predict runs/mytask/linear photo1.jpg photos/                         # cli/predict.py
    frozenlens backbones | frozenlens methods                                        # cli/info.py
    frozenlens serve                                  # feature server                 cli/serve.py
    frozenlens pretune toast DATA... --out DIR        # TOAST's pre-tuning             cli/toast.py
    frozenlens explain runs/mytask/toast photo.jpg --out maps/
    frozenlens bench --tasks DIR... --methods linear,lora --out runs/bench   # cli/bench.py
    frozenlens toast-lm train data.jsonl --model ./llama --out runs/lm   # TOAST on a causal LM  cli/lm.py

The built-in demo is ``make demo`` (``python -m examples.demo``), outside the library.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from frozenlens.cli import bench, info, lm, predict, serve, toast, train
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (each sets ``run`` to its function)."""
    parser = argparse.ArgumentParser(prog="frozenlens", description=_DESCRIPTION, epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="print warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train.add_parsers(sub)
    predict.add_parsers(sub)
    serve.add_parsers(sub)
    toast.add_parsers(sub)
    lm.add_parsers(sub)
    info.add_parsers(sub)
    bench.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``frozenlens`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    try:
        return args.run(args)
    except FrozenlensError as err:
        print(f"frozenlens: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("frozenlens: interrupted; finished work is kept and the next run resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
