"""Build a real, offline text-classification task: WordNet noun supersenses, VTAB-1k style.

Each example is the gloss (definition, and usage examples where WordNet has them) of one
WordNet 3.0 noun synset; its label is the synset's *supersense*, the lexicographer file
WordNet's authors filed it under (``noun.animal``, ``noun.artifact``, ...). Ten supersenses,
so ten classes: 80 train + 20 val per class (train800 / val200) and ``n_test`` test examples,
all drawn with ``numpy.random.RandomState(0)`` through :func:`frozenlens.data.split.class_permutations`.

The source is the Debian package ``wordnet-base`` (``/usr/share/wordnet/data.noun``):
installed (``apt-get install wordnet-base``), or, when it is not, fetched with ``apt-get
download wordnet-base`` and unpacked with ``dpkg-deb -x`` into a temporary folder (no root
needed), or a folder given with ``--wordnet-dir``. Nothing is stored in the repository.

The built folder holds ``train800.jsonl``, ``val200.jsonl``, ``test.jsonl`` (one JSON object
per line: ``text``, ``label`` (class name), ``synset`` (``n<offset>``), ``lemmas``),
``classes.txt`` and ``SOURCE.md``; :func:`frozenlens.data.text.load_text_task` reads it.

    python -m examples.text_data                    # build into <cache>/data/, print the path
    frozenlens fit <that path> --method linear:patch_mean=true --grid --seeds 0,1,2   # all-MiniLM-L6-v2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from examples.built_task import build_once
from frozenlens.data.split import class_permutations
from frozenlens.errors import DataError
from frozenlens.paths import cache_dir

logger = logging.getLogger(__name__)

DEBIAN_PACKAGE = "wordnet-base"
DEBIAN_DIR = Path("/usr/share/wordnet")
"""Where the Debian package ``wordnet-base`` installs the WordNet 3.0 database."""

SUPERSENSES: list[str] = [
    "noun.animal",
    "noun.artifact",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.food",
    "noun.location",
    "noun.person",
    "noun.plant",
    "noun.substance",
]
"""The classes, label = index: ten noun lexicographer files of WordNet 3.0."""

LEX_FILE_NUMBERS = {"noun.animal": 5, "noun.artifact": 6, "noun.body": 8, "noun.cognition": 9,
                    "noun.communication": 10, "noun.food": 13, "noun.location": 15, "noun.person": 18,
                    "noun.plant": 20, "noun.substance": 27}
"""Lexicographer file numbers (lexnames(5WN)) of :data:`SUPERSENSES`."""

TRAIN_PER_CLASS = 80
VAL_PER_CLASS = 20
SEED = 0
FORMAT_VERSION = 1

_HOW_TO_GET = (
    "Get WordNet 3.0 one of these ways: (1) `apt-get install wordnet-base` (Debian/Ubuntu; "
    "installs /usr/share/wordnet/data.noun); (2) let this builder run `apt-get download wordnet-base` "
    "(needs apt's package lists: `apt-get update`); (3) pass --wordnet-dir DIR holding data.noun."
)


# -- reading WordNet --------------------------------------------------------------------------


def read_noun_synsets(data_noun: Path) -> list[dict[str, Any]]:
    """Synsets of WordNet's ``data.noun`` (wndb(5WN) format): offset, lexicographer file number,
    lemmas and gloss, in file order. The licence header (lines starting with spaces) is skipped.

    Raises:
        DataError: a line that does not follow the format (named by line number).
    """
    synsets = []
    with open(data_noun, encoding="utf-8", errors="strict") as handle:
        for line_number, line in enumerate(handle, 1):
            if line.startswith(" "):
                continue
            head, bar, gloss = line.partition(" | ")
            fields = head.split()
            try:
                offset, lex_file, kind, count = fields[0], int(fields[1]), fields[2], int(fields[3], 16)
                lemmas = [fields[4 + 2 * i].replace("_", " ") for i in range(count)]
            except (IndexError, ValueError):
                raise DataError(f"{data_noun}: line {line_number}: not a wndb synset line") from None
            if kind != "n" or not bar:
                raise DataError(f"{data_noun}: line {line_number}: expected a noun synset with a gloss")
            synsets.append({"synset": f"n{offset}", "lex_file": lex_file, "lemmas": lemmas,
                            "gloss": gloss.strip()})
    return synsets


def find_wordnet_source(scratch: Path) -> tuple[Path, str]:
    """``data.noun`` and a one-line description of where it came from (see the module docstring)."""
    installed = DEBIAN_DIR / "data.noun"
    if installed.is_file():
        return installed, f"`{installed}` (Debian package `{DEBIAN_PACKAGE}`, installed)"
    if shutil.which("apt-get") and shutil.which("dpkg-deb"):
        try:
            subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=scratch, check=True,
                           capture_output=True, timeout=300)
            deb = next(scratch.glob(f"{DEBIAN_PACKAGE}_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(scratch / "root")], check=True,
                           capture_output=True, timeout=300)
        except (subprocess.SubprocessError, StopIteration, OSError) as err:
            detail = getattr(err, "stderr", b"") or b""
            raise DataError(f"WordNet not installed in {DEBIAN_DIR} and `apt-get download {DEBIAN_PACKAGE}` "
                            f"failed ({type(err).__name__}: {detail.decode(errors='replace')[-300:]}). "
                            f"{_HOW_TO_GET}") from None
        unpacked = scratch / "root" / "usr" / "share" / "wordnet" / "data.noun"
        if unpacked.is_file():
            return unpacked, f"`{deb.name}` (Debian package `{DEBIAN_PACKAGE}`, apt-get download)"
    raise DataError(f"WordNet not found in {DEBIAN_DIR}. {_HOW_TO_GET}")


# -- selection --------------------------------------------------------------------------------


def select_examples(synsets: list[dict[str, Any]], n_test: int) -> dict[str, list[dict[str, Any]]]:
    """Split name -> examples for train/val/test, per class drawn from :func:`class_permutations`.

    Only synsets of :data:`SUPERSENSES` count, and a gloss that occurs more than once among
    them is dropped altogether (identical texts must not straddle splits or classes).
    """
    wanted = {number: label for label, number in enumerate(LEX_FILE_NUMBERS[name] for name in SUPERSENSES)}
    candidates = [s for s in synsets if s["lex_file"] in wanted]
    counts: dict[str, int] = {}
    for synset in candidates:
        counts[synset["gloss"]] = counts.get(synset["gloss"], 0) + 1
    pool = [s for s in candidates if counts[s["gloss"]] == 1]
    labels = np.array([wanted[s["lex_file"]] for s in pool])
    per_class_test = _per_class(n_test, len(SUPERSENSES))
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    permutations = class_permutations(labels, SEED)
    for label, name in enumerate(SUPERSENSES):
        order = permutations.get(label, np.zeros(0, dtype=np.int64))
        need = TRAIN_PER_CLASS + VAL_PER_CLASS + per_class_test[label]
        if len(order) < need:
            raise DataError(f"WordNet has {len(order)} usable {name} synsets, {need} needed (n_test={n_test}).")
        chosen = [pool[int(i)] for i in order[:need]]
        ends = (TRAIN_PER_CLASS, TRAIN_PER_CLASS + VAL_PER_CLASS, need)
        for split, start, end in zip(("train", "val", "test"), (0, *ends[:2]), ends):
            splits[split] += [_example(s, name) for s in chosen[start:end]]
    return splits


def _per_class(total: int, n_classes: int) -> list[int]:
    base, extra = divmod(total, n_classes)
    return [base + (1 if c < extra else 0) for c in range(n_classes)]


def _example(synset: dict[str, Any], label: str) -> dict[str, Any]:
    return {"text": synset["gloss"], "label": label, "synset": synset["synset"], "lemmas": synset["lemmas"]}


# -- building ---------------------------------------------------------------------------------


def build_wordnet_task(out_dir: Path | None = None, n_test: int = 1000, wordnet_dir: Path | None = None) -> Path:
    """Build (or reuse) the WordNet-supersense task in ``out_dir`` and return its path.

    Args:
        out_dir: folder to create; default ``<cache>/data/wordnet-supersense-vtab-<n_test>``.
        n_test: test examples (class-balanced, the remainder to the first classes).
        wordnet_dir: a folder holding WordNet 3.0's ``data.noun``; default: the Debian package.

    Raises:
        DataError: no WordNet (the message says how to get it), a malformed database, too few
            synsets, or ``out_dir`` holds something else.
    """
    if isinstance(n_test, bool) or not isinstance(n_test, int) or n_test < 1:
        raise DataError(f"n_test must be a whole number of at least 1, got {n_test!r}.")
    out_dir = Path(out_dir or cache_dir() / "data" / f"wordnet-supersense-vtab-{n_test}").expanduser().absolute()

    def write(folder: Path) -> None:
        with tempfile.TemporaryDirectory(prefix=".wordnet-", dir=out_dir.parent) as scratch:
            if wordnet_dir is not None:
                data_noun = Path(wordnet_dir) / "data.noun"
                if not data_noun.is_file():
                    raise DataError(f"{wordnet_dir}: no data.noun in it. {_HOW_TO_GET}")
                source, where = data_noun, f"`{data_noun.resolve()}` (given folder)"
            else:
                source, where = find_wordnet_source(Path(scratch))
            _write_task(folder, source, where, n_test)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return build_once(out_dir, _marker(n_test), "WordNet task", write)


def _write_task(tmp: Path, data_noun: Path, where: str, n_test: int) -> None:
    splits = select_examples(read_noun_synsets(data_noun), n_test)
    for split, stem in (("train", "train800"), ("val", "val200"), ("test", "test")):
        lines = [json.dumps(example, ensure_ascii=False) + "\n" for example in splits[split]]
        (tmp / f"{stem}.jsonl").write_text("".join(lines), encoding="utf-8")
    (tmp / "classes.txt").write_text("".join(f"{name}\n" for name in SUPERSENSES), encoding="utf-8")
    (tmp / "SOURCE.md").write_text(_source_md(data_noun, where, splits, n_test), encoding="utf-8")


def _marker(n_test: int) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "n_test": n_test, "seed": SEED, "classes": SUPERSENSES}


def _source_md(data_noun: Path, where: str, splits: dict[str, list[dict[str, Any]]], n_test: int) -> str:
    digest = hashlib.sha256(data_noun.read_bytes()).hexdigest()
    rows = "\n".join(f"| {label} | {name} | " + " | ".join(
        str(sum(e["label"] == name for e in splits[s])) for s in ("train", "val", "test")) + " |"
        for label, name in enumerate(SUPERSENSES))
    return f"""# wordnet-supersense: WordNet 3.0 noun glosses, 10 supersense classes

## Source

- WordNet 3.0 (Princeton University; Miller 1995, Fellbaum 1998), from the Debian package
  `{DEBIAN_PACKAGE}`. Licence: the WordNet 3.0 licence (permissive: use, copy, modify and
  distribute with the copyright notice; "WordNet 3.0 Copyright 2006 by Princeton University.
  All rights reserved."; provided "as is").
- Read from: {where}; `data.noun` sha256 `{digest}`

## Method

Built by `examples.text_data.build_wordnet_task(n_test={n_test})` in the frozenlens repository
(format version {FORMAT_VERSION}), deterministic:

- Text: the synset's gloss as WordNet prints it (definition; usage examples in quotes after `;`).
  The synset's own words are not part of the text (they are in `lemmas`, for reference).
- Label: the synset's lexicographer file (supersense), one of {len(SUPERSENSES)} noun files.
- Glosses that occur more than once among these synsets are dropped.
- Per class in label order, one `numpy.random.RandomState({SEED})` permutes the class's synsets
  (`frozenlens.data.split.class_permutations`): the first {TRAIN_PER_CLASS} -> train800, the next
  {VAL_PER_CLASS} -> val200, the next ones -> test ({n_test} in all, as even per class as possible).

## Counts

| label | class | train800 | val200 | test |
|---|---|---|---|---|
{rows}
"""


def main(argv: list[str] | None = None) -> None:
    """Command line: build the task and print its path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="task folder (default: in the frozenlens cache)")
    parser.add_argument("--n-test", type=int, default=1000, help="test examples (default 1000)")
    parser.add_argument("--wordnet-dir", type=Path, default=None, help="folder holding WordNet 3.0's data.noun")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = build_wordnet_task(args.out, args.n_test, args.wordnet_dir)
    logger.info("task: %s", path)
    logger.info("train on it: frozenlens fit %s --method linear:patch_mean=true --grid --seeds 0,1,2", path)

if __name__ == "__main__":
    main()
