"""Text-classification tasks: CSV / JSONL files or a saved Hugging Face dataset as a :class:`TextTask`.

Accepted layouts (detected by :func:`load_text_task`, tried in this order):

``vtab``
    A folder with ``train800.<ext>`` and ``val200.<ext>`` (required), ``test.<ext>`` (optional)
    and ``train800val200.<ext>`` (optional: when present it must hold exactly the rows of the
    other two), ``<ext>`` being ``csv`` or ``jsonl``. ``trainval`` is train800 + val200.
``split-files``
    A folder with ``train.<ext>``, optionally ``val.<ext>`` (or ``validation``/``valid``/
    ``dev``) and ``test.<ext>``. Without a validation file, ``val`` is a stratified 20% of
    ``train`` (:func:`frozenlens.data.split.stratified_indices`, seed 0: the split the image
    tasks use) and ``trainval`` is all of train.
``file``
    One ``.csv``/``.jsonl`` file (or a folder holding exactly one). With a split column
    (default ``split``; values ``train``, ``val``/``validation``/``valid``/``dev``, ``test``)
    its rows go to those splits; without one every row is ``trainval`` and train/val are
    derived as above.
``hf-dataset``
    A folder written by ``datasets``' ``save_to_disk`` (a ``DatasetDict`` with
    ``train``/``validation``/``test`` splits, or one ``Dataset``), read with ``load_from_disk``
    when the ``datasets`` package is installed (it is not a dependency of frozenlens). A
    ``ClassLabel`` label column gives the class names.

Rows: a text column (default ``text``) and a label column (default ``label``); both names are
arguments. A label is a class name or a non-negative integer (digit strings count as
integers). A ``classes.txt`` in the folder (one name per line, label = line index) fixes the
classes; otherwise they are the sorted names, or ``class_<i>`` for integer labels.

Examples are not files, so each :class:`TextItem` carries a stable identity for stores:
``key = "<file>#<row>:<sha256 of the text, 16 hex>"`` (``row`` is the 1-based record number
in that file, header excluded; for a saved dataset ``<file>`` is ``hf:<split>``).

Every error names the file, the row (and line) and the column at fault.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from frozenlens.data.split import stratified_indices
from frozenlens.errors import DataError

logger = logging.getLogger(__name__)

TEXT_EXTENSIONS = (".csv", ".jsonl")
"""File types a text task reads."""

VTAB_TEXT_SPLITS: dict[str, str] = {"train": "train800", "val": "val200", "trainval": "train800val200",
                                    "test": "test"}
"""Split name -> file stem in the VTAB-style layout."""

SPLIT_NAMES: dict[str, str] = {"train": "train", "val": "val", "validation": "val", "valid": "val",
                               "dev": "val", "test": "test"}
"""File stem or split-column value (case-insensitive) -> split name."""

SPLIT_ORDER = ("trainval", "train", "val", "test")
VAL_FRACTION = 0.2
SPLIT_SEED = 0
_INT = re.compile(r"^[+-]?\d+$")
_ACCEPTED = (
    "Accepted text layouts: (1) train800.csv|jsonl + val200.csv|jsonl [+ test.*]; (2) train.csv|jsonl "
    "[+ val|validation|valid|dev.*] [+ test.*]; (3) one .csv/.jsonl file (optionally with a split column); "
    "(4) a Hugging Face dataset saved with save_to_disk. Rows need a text and a label column."
)


@dataclass(frozen=True)
class TextItem:
    """One labelled text.

    Attributes:
        text: the text, as read (UTF-8 decoded, not stripped).
        label: class index (into :attr:`TextTask.classes`).
        source: where it came from: file name relative to the task root, or ``hf:<split>``.
        row: 1-based record number in ``source`` (a CSV's header excluded).
        digest: SHA-256 of the UTF-8 text (hex).
    """

    text: str
    label: int
    source: str
    row: int
    digest: str

    @property
    def key(self) -> str:
        """Stable identity ``"<source>#<row>:<digest[:16]>"``: what a store keys the example by."""
        return f"{self.source}#{self.row}:{self.digest[:16]}"


@dataclass
class TextTask:
    """A labelled text-classification task (the text counterpart of :class:`frozenlens.data.Task`).

    Attributes:
        name: the task folder's (or file's) name.
        root: absolute path of the folder (or file) it was read from.
        classes: class names; an item's label indexes this list.
        splits: ``"trainval"``, ``"train"``, ``"val"`` and possibly ``"test"`` -> items.
        layout: ``"vtab"``, ``"split-files"``, ``"file"`` or ``"hf-dataset"``.
    """

    name: str
    root: Path
    classes: list[str]
    splits: dict[str, list[TextItem]] = field(repr=False)
    layout: str

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def split(self, name: str) -> list[TextItem]:
        """The items of split ``name``; :class:`DataError` naming the available splits if absent."""
        try:
            return self.splits[name]
        except KeyError:
            raise DataError(f"text task {self.name!r} ({self.root}) has no {name!r} split; available "
                            f"splits: {', '.join(self.splits) or 'none'}.") from None

    def all_items(self) -> list[TextItem]:
        """Every item of every split once (by key), trainval/train/val first, then test."""
        seen: set[str] = set()
        out: list[TextItem] = []
        for split in [s for s in SPLIT_ORDER if s in self.splits]:
            for item in self.splits[split]:
                if item.key not in seen:
                    seen.add(item.key)
                    out.append(item)
        return out

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        return (f"TextTask(name={self.name!r}, root={str(self.root)!r}, layout={self.layout!r}, "
                f"classes={len(self.classes)}, {counts})")


def load_text_task(path: str | Path, *, text_column: str = "text", label_column: str = "label",
                   split_column: str = "split") -> TextTask:
    """Load the text task at ``path`` (a folder or one file), detecting its layout.

    Args:
        path: task folder, one ``.csv``/``.jsonl`` file, or a ``save_to_disk`` folder.
        text_column: name of the text column.
        label_column: name of the label column (class name or integer).
        split_column: name of the optional split column of a single file.

    Raises:
        DataError: no such path, no recognised layout (the message lists them), or a bad row:
            missing column, empty text, unknown label, non-UTF-8 bytes (named by file, row,
            line and column).
    """
    root = Path(path).expanduser().resolve()
    columns = _Columns(text_column, label_column, split_column)
    if root.is_file():
        return _load_single_file(root, root.parent, columns)
    if not root.is_dir():
        raise DataError(f"{root}: no such text task file or folder. {_ACCEPTED}")
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        return _load_hf_dataset(root, columns)
    files = _text_files(root)
    classes = _read_classes(root / "classes.txt") if (root / "classes.txt").is_file() else None
    if "train800" in files or "val200" in files:
        return _load_vtab(root, files, columns, classes)
    named = {SPLIT_NAMES[stem]: stem for stem in files if stem in SPLIT_NAMES}
    if "train" in named:
        return _load_split_files(root, files, named, columns, classes)
    if len(files) == 1:
        return _load_single_file(next(iter(files.values())), root, columns, classes)
    found = ", ".join(sorted(p.name for p in files.values())) or "no .csv/.jsonl file"
    raise DataError(f"{root}: no recognised text layout (found {found}). {_ACCEPTED}")


def looks_like_text_task(path: str | Path) -> bool:
    """True when ``path`` is a text task rather than an image one: a ``.csv``/``.jsonl`` file, a
    saved Hugging Face dataset, or a folder of ``.csv``/``.jsonl`` files with no sub-folders (an
    image task keeps its images in folders; an HF imagefolder's ``metadata.csv`` does not count)."""
    root = Path(path).expanduser()
    if root.is_file():
        return root.suffix.lower() in TEXT_EXTENSIONS
    if not root.is_dir():
        return False
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        return True
    children = [c for c in root.iterdir() if not c.name.startswith(".")]
    texts = [c for c in children if c.is_file() and c.suffix.lower() in TEXT_EXTENSIONS and c.stem != "metadata"]
    return bool(texts) and not any(c.is_dir() for c in children)


# -- layouts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Columns:
    text: str
    label: str
    split: str


RawRow = tuple[str, Any, str, int]  # (text, raw label, source file, row)


def _text_files(root: Path) -> dict[str, Path]:
    """Lower-case stem -> ``.csv``/``.jsonl`` file in ``root`` (DataError on a stem in both formats)."""
    files: dict[str, Path] = {}
    for child in sorted(root.iterdir()):
        if child.is_file() and child.suffix.lower() in TEXT_EXTENSIONS and not child.name.startswith("."):
            stem = child.stem.lower()
            if stem in files:
                raise DataError(f"{root}: both {files[stem].name} and {child.name} exist; keep one.")
            files[stem] = child
    return files


def _load_vtab(root: Path, files: dict[str, Path], columns: _Columns, classes: list[str] | None) -> TextTask:
    missing = [f"{stem}.csv|jsonl" for stem in ("train800", "val200") if stem not in files]
    if missing:
        raise DataError(f"{root}: looks like a VTAB-style text task but lacks {', '.join(missing)}.")
    raw = {split: _read_rows(files[stem], root, columns)
           for split, stem in VTAB_TEXT_SPLITS.items() if stem in files}
    if "trainval" in raw:
        _check_same_rows(files["train800val200"], raw["trainval"], raw["train"] + raw["val"])
    else:
        raw["trainval"] = raw["train"] + raw["val"]
    return _task(root, raw, classes, "vtab")


def _load_split_files(root: Path, files: dict[str, Path], named: dict[str, str], columns: _Columns,
                      classes: list[str] | None) -> TextTask:
    doubles = [f"{split}: {', '.join(files[s].name for s in files if SPLIT_NAMES.get(s) == split)}"
               for split in set(named.values()) if sum(SPLIT_NAMES.get(s) == split for s in files) > 1]
    if doubles:
        raise DataError(f"{root}: more than one file per split ({'; '.join(doubles)}); keep one each.")
    raw = {split: _read_rows(files[stem], root, columns) for split, stem in named.items()}
    return _task(root, _with_trainval(raw), classes, "split-files")


def _load_single_file(path: Path, root: Path, columns: _Columns, classes: list[str] | None = None) -> TextTask:
    if path.suffix.lower() not in TEXT_EXTENSIONS:
        raise DataError(f"{path}: not a .csv or .jsonl file. {_ACCEPTED}")
    if classes is None and (root / "classes.txt").is_file():
        classes = _read_classes(root / "classes.txt")
    rows = _read_rows(path, root, columns, split_column=columns.split)
    by_split: dict[str, list[RawRow]] = {}
    for text, label, source, row, split in rows:
        by_split.setdefault(split, []).append((text, label, source, row))
    if set(by_split) == {None}:
        raw = {"trainval": by_split[None]}
    elif None in by_split:
        first = by_split[None][0]
        raise DataError(f"{path}: row {first[3]}: column {columns.split!r} is empty while other rows name a "
                        "split; give every row one (train, val, test).")
    else:
        if "train" not in by_split:
            raise DataError(f"{path}: column {columns.split!r} names no 'train' rows (found "
                            f"{', '.join(sorted(by_split))}).")
        raw = _with_trainval(by_split)
    task = _task(root, raw, classes, "file")
    task.name, task.root = path.stem, path
    return task


def _load_hf_dataset(root: Path, columns: _Columns) -> TextTask:
    try:
        from datasets import ClassLabel, Dataset, DatasetDict, load_from_disk
    except ImportError:
        raise DataError(f"{root}: a Hugging Face dataset saved with save_to_disk; reading it needs the "
                        "'datasets' package (pip install datasets), which frozenlens does not install.") from None
    try:
        loaded = load_from_disk(str(root))
    except Exception as err:  # corrupt arrow files, version mismatch: many types, one meaning here
        raise DataError(f"{root}: datasets.load_from_disk failed ({type(err).__name__}: {err}).") from err
    parts = dict(loaded) if isinstance(loaded, DatasetDict) else {"trainval": loaded}
    raw: dict[str, list[RawRow]] = {}
    names: list[str] | None = None
    for part, dataset in parts.items():
        assert isinstance(dataset, Dataset)
        split = "trainval" if part == "trainval" else SPLIT_NAMES.get(part.lower())
        if split is None:
            raise DataError(f"{root}: split {part!r} is not one of train, validation/val/valid/dev, test.")
        for column in (columns.text, columns.label):
            if column not in dataset.column_names:
                raise DataError(f"{root} (split {part!r}): no column {column!r}; columns: "
                                f"{', '.join(dataset.column_names)}. Choose them with text_column/label_column.")
        feature = dataset.features[columns.label]
        if isinstance(feature, ClassLabel):
            if names is not None and names != list(feature.names):
                raise DataError(f"{root}: split {part!r} has other ClassLabel names than the previous split.")
            names = list(feature.names)
        source = f"hf:{part}"
        rows = []
        for index, (text, label) in enumerate(zip(dataset[columns.text], dataset[columns.label]), 1):
            rows.append((_check_text(text, f"{root} [{source}]", index, None, columns.text), label, source, index))
        raw[split] = rows
    if "train" not in raw and "trainval" not in raw:
        raise DataError(f"{root}: the saved dataset has no train split (splits: {', '.join(parts)}).")
    return _task(root, _with_trainval(raw) if "trainval" not in raw else raw, names, "hf-dataset")


# -- rows ---------------------------------------------------------------------------------------


def _read_rows(path: Path, root: Path, columns: _Columns, split_column: str | None = None) -> list:
    """``(text, raw label, source, row)`` rows of a CSV/JSONL file (``+ split`` with ``split_column``)."""
    content = _read_utf8(path)
    source = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
    records = _csv_records(path, content, columns) if path.suffix.lower() == ".csv" else _jsonl_records(path, content)
    rows: list = []
    for row, (line, record) in enumerate(records, 1):
        where = f"{path}: row {row} (line {line})"
        for column in (columns.text, columns.label):
            if column not in record:
                raise DataError(f"{where}: no {column!r} column; this row has {', '.join(map(str, record)) or 'none'}.")
        text = _check_text(record[columns.text], str(path), row, line, columns.text)
        label = record[columns.label]
        if split_column is None:
            rows.append((text, label, source, row))
            continue
        rows.append((text, label, source, row, _split_value(record.get(split_column), where, split_column)))
    if not rows:
        raise DataError(f"{path}: no rows.")
    return rows


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}: line {line}: not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}); "
                        "save the file as UTF-8.") from None


def _csv_records(path: Path, content: str, columns: _Columns) -> Iterable[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(content, newline=""))
    header = reader.fieldnames or []
    missing = [c for c in (columns.text, columns.label) if c not in header]
    if missing:
        raise DataError(f"{path}: header has no {' or '.join(repr(c) for c in missing)} column (header: "
                        f"{', '.join(header) or 'empty'}). Choose the columns with text_column/label_column.")
    try:
        for record in reader:
            if None in record:
                raise DataError(f"{path}: line {reader.line_num}: more fields than the header's {len(header)}.")
            yield reader.line_num, {k: v for k, v in record.items() if v is not None}
    except csv.Error as err:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({err}).") from None


def _jsonl_records(path: Path, content: str) -> Iterable[tuple[int, dict[str, Any]]]:
    for line_number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {line_number}: not valid JSON ({err.msg}).") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {line_number}: expected a JSON object per line.")
        yield line_number, record


def _check_text(value: Any, source: str, row: int, line: int | None, column: str) -> str:
    where = f"{source}: row {row}" + (f" (line {line})" if line is not None else "")
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} holds {type(value).__name__} {value!r}, not a text.")
    if not value.strip():
        raise DataError(f"{where}: column {column!r} is empty; every example needs a text.")
    return value


def _split_value(value: Any, where: str, column: str) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    split = SPLIT_NAMES.get(str(value).strip().lower())
    if split is None:
        raise DataError(f"{where}: column {column!r} is {value!r}; use train, val (validation/valid/dev) or test.")
    return split


def _check_same_rows(path: Path, trainval: list[RawRow], parts: list[RawRow]) -> None:
    def content(rows: list[RawRow]) -> list[tuple[str, str]]:
        return sorted((text, str(label)) for text, label, _, _ in rows)

    if content(trainval) != content(parts):
        raise DataError(f"{path}: train800val200 must hold exactly the rows of train800 and val200 "
                        f"({len(trainval)} rows vs {len(parts)}); rebuild it or delete it (it is derived).")


# -- labels and splits ----------------------------------------------------------------------------


def _read_classes(path: Path) -> list[str]:
    names = [line.strip() for line in _read_utf8(path).splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise DataError(f"{path}: classes file is empty (expected one class name per line).")
    seen: dict[str, int] = {}
    for line, name in enumerate(names, 1):
        if not name:
            raise DataError(f"{path}:{line}: empty class name.")
        if name in seen:
            raise DataError(f"{path}:{line}: class {name!r} repeats line {seen[name]}.")
        seen[name] = line
    return names


def _label_value(value: Any, source: str, row: int) -> int | str:
    """A raw label as an int (integers, digit strings) or a class name."""
    if isinstance(value, bool) or value is None:
        raise DataError(f"{source}: row {row}: label {value!r} is neither a class name nor an integer.")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise DataError(f"{source}: row {row}: empty label.")
        if not _INT.match(value):
            return value
        value = int(value)
    if not isinstance(value, (int, np.integer)):
        raise DataError(f"{source}: row {row}: label {value!r} is neither a class name nor an integer.")
    if value < 0:
        raise DataError(f"{source}: row {row}: label {value} is negative; labels start at 0.")
    return int(value)


def _task(root: Path, raw: dict[str, list[RawRow]], classes: list[str] | None, layout: str) -> TextTask:
    """Map raw labels to indices (classes given, or derived), build items, derive train/val if needed."""
    def place(source: str) -> str:
        return f"{root} [{source}]" if source.startswith("hf:") else str(root / source)

    values = {split: [_label_value(label, place(source), row) for _, label, source, row in rows]
              for split, rows in raw.items()}
    if classes is None:
        classes = _derive_classes(values)
    index = {name: i for i, name in enumerate(classes)}
    splits: dict[str, list[TextItem]] = {}
    for split, rows in raw.items():
        items = []
        for (text, _, source, row), value in zip(rows, values[split]):
            if isinstance(value, int):
                if value >= len(classes):
                    raise DataError(f"{place(source)}: row {row}: label {value} is out of range; there are "
                                    f"{len(classes)} classes (0..{len(classes) - 1}).")
                label = value
            elif value in index:
                label = index[value]
            else:
                shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
                raise DataError(f"{place(source)}: row {row}: unknown label {value!r}; the classes are {shown}.")
            items.append(TextItem(text, label, source, row, hashlib.sha256(text.encode("utf-8")).hexdigest()))
        splits[split] = items
    if "train" not in splits:
        splits["train"], splits["val"] = stratified_text_split(splits["trainval"])
    splits = {s: splits[s] for s in SPLIT_ORDER if s in splits}
    _warn_on_overlap(splits)
    return TextTask(root.name, root, list(classes), splits, layout)


def _derive_classes(values: dict[str, list[int | str]]) -> list[str]:
    every = {v for labels in values.values() for v in labels}
    ints = {v for v in every if isinstance(v, int)}
    if ints and len(ints) != len(every):
        names = sorted(str(v) for v in every - ints)
        raise DataError(f"the labels mix integers and class names (e.g. {min(ints)} and {names[0]!r}); use one "
                        "kind, or add a classes.txt.")
    if ints:
        return [f"class_{i}" for i in range(max(ints) + 1)]
    return sorted(str(v) for v in every)


def _with_trainval(raw: dict[str, list[RawRow]]) -> dict[str, list[RawRow]]:
    """``trainval`` = train + val when both exist, else all of train (val derived later)."""
    out = dict(raw)
    if "val" in raw:
        out["trainval"] = raw["train"] + raw["val"]
    else:
        out["trainval"] = out.pop("train")
    return out


def stratified_text_split(items: Sequence[TextItem], val_fraction: float = VAL_FRACTION,
                          seed: int = SPLIT_SEED) -> tuple[list[TextItem], list[TextItem]]:
    """``(train, val)`` of ``items``: per class ``val_fraction`` held out, drawn with ``seed`` by
    :func:`frozenlens.data.split.stratified_indices` (the image tasks' split); input order kept."""
    kept, held = stratified_indices([item.label for item in items], val_fraction, seed)
    return [items[i] for i in kept], [items[i] for i in held]


def _warn_on_overlap(splits: dict[str, list[TextItem]]) -> None:
    if "test" not in splits:
        return
    train_texts = {item.digest for item in splits["trainval"]}
    shared = sum(item.digest in train_texts for item in splits["test"])
    if shared:
        logger.warning("%d test text(s) also occur in train/val: test accuracy will be optimistic", shared)


__all__ = ["TEXT_EXTENSIONS", "TextItem", "TextTask", "load_text_task", "stratified_text_split"]
