"""Image-classification tasks: load a directory in one of three layouts as a :class:`Task`.

Accepted layouts (detected by :func:`load_task`, tried in this order):

``vtab``
    A VTAB-1k export: ``train800.txt``, ``val200.txt``, ``train800val200.txt`` (required) and
    ``test.txt`` (optional) with lines ``relative/path label`` (paths relative to the task
    root, split on the last whitespace so paths may hold spaces), and optionally
    ``classes.txt`` (one class name per line, label = line index).
``imagefolder``
    ``root/<class>/<image>`` (everything is ``trainval``; ``train``/``val`` are derived), or
    ``root/{train,val|validation|valid,test}/<class>/<image>``.
``hf-imagefolder``
    The Hugging Face ``imagefolder`` layout: as above, but a split folder (or the root) holds a
    ``metadata.csv`` or ``metadata.jsonl`` with a ``file_name`` column (relative to that folder)
    and a ``label`` column (class name or integer).

Where a validation split must be derived it is a stratified 80/20 split of the training images
(per class, ``round(0.2 * n)`` images, at least 1 and at most ``n - 1`` when ``n >= 2``) drawn
with ``numpy.random.RandomState(0)``, so it is the same on every machine.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from frozenlens.data.images import IMAGE_EXTENSIONS, is_image_file
from frozenlens.data.split import stratified_indices
from frozenlens.errors import DataError

logger = logging.getLogger(__name__)
VTAB_SPLIT_FILES: dict[str, str] = {
    "train": "train800.txt",
    "val": "val200.txt",
    "trainval": "train800val200.txt",
    "test": "test.txt",
}
"""Split name -> file name in a VTAB-1k export (``test.txt`` is optional)."""

SPLIT_FOLDER_NAMES: dict[str, str] = {
    "train": "train",
    "val": "val",
    "validation": "val",
    "valid": "val",
    "test": "test",
}
"""Split folder name (case-insensitive) -> split name in ImageFolder / HF layouts."""

METADATA_FILES = ("metadata.csv", "metadata.jsonl")
SPLIT_ORDER = ("trainval", "train", "val", "test")
VAL_FRACTION = 0.2
SPLIT_SEED = 0

ACCEPTED_LAYOUTS = (
    "Accepted layouts: (1) VTAB-1k export: train800.txt, val200.txt, train800val200.txt "
    "[, test.txt] with 'relative/path label' lines [, classes.txt]; (2) ImageFolder tree: "
    "ROOT/<class>/<image> or ROOT/{train,val,test}/<class>/<image>; (3) Hugging Face "
    "imagefolder: ROOT/{train,validation,test}/ holding metadata.csv or metadata.jsonl with "
    "'file_name' and 'label' columns."
)
_MAX_LISTED = 5
_INT_RE = re.compile(r"^[+-]?\d+$")


def _read_text(path: Path) -> str:
    """A text file's content (UTF-8, BOM allowed); DataError naming the file otherwise."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
            "save the file as UTF-8."
        ) from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({err.strerror or err}).") from None


def _regular_file_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable regular file (None if it is); never opens it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        return "does not exist" if err.errno == errno.ENOENT else f"cannot be read ({err.strerror or err})"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a folder, FIFO, socket or device)"
    return None


@dataclass(frozen=True)
class ImageItem:
    """One labelled image: an absolute ``path`` and an integer ``label`` (index into classes)."""

    path: Path
    label: int


@dataclass
class Task:
    """A labelled image-classification task.

    Attributes:
        name: the task directory's name.
        root: absolute path of the task directory.
        classes: class names; an item's label indexes this list.
        splits: ``"train"``, ``"val"``, ``"trainval"`` and possibly ``"test"`` -> items.
        layout: ``"vtab"``, ``"imagefolder"`` or ``"hf-imagefolder"``.
    """

    name: str
    root: Path
    classes: list[str]
    splits: dict[str, list[ImageItem]] = field(repr=False)
    layout: str

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def split(self, name: str) -> list[ImageItem]:
        """The items of split ``name``; :class:`DataError` naming the available splits if absent."""
        try:
            return self.splits[name]
        except KeyError:
            available = ", ".join(self.splits) or "none"
            raise DataError(
                f"Task {self.name!r} ({self.root}) has no {name!r} split; "
                f"available splits: {available}."
            ) from None

    def all_images(self) -> list[ImageItem]:
        """Every item of every split once (by path), trainval/train/val first, then test."""
        order = [s for s in SPLIT_ORDER if s in self.splits]
        order += [s for s in self.splits if s not in order]
        seen: set[Path] = set()
        out: list[ImageItem] = []
        for split in order:
            for item in self.splits[split]:
                if item.path not in seen:
                    seen.add(item.path)
                    out.append(item)
        return out

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        return (
            f"Task(name={self.name!r}, root={str(self.root)!r}, layout={self.layout!r}, "
            f"classes={len(self.classes)}, {counts})"
        )


def load_task(path: str | Path) -> Task:
    """Load the task directory at ``path``, detecting its layout (see the module docstring).

    Raises:
        DataError: the directory is missing, matches no layout (the message lists the accepted
            ones), or is malformed (the message names the file, line or folder at fault).
    """
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{root}: no such task directory. {ACCEPTED_LAYOUTS}")
    if any((root / f).is_file() for f in VTAB_SPLIT_FILES.values()):
        return _load_vtab(root)
    split_dirs = _split_dirs(root)
    if split_dirs:
        return _load_split_folders(root, split_dirs)
    if _metadata_file(root) is not None or _subdirs(root):
        return _load_unsplit_folder(root)
    raise DataError(f"{root}: no recognised dataset layout. {ACCEPTED_LAYOUTS}")


# -- VTAB-1k export ---------------------------------------------------------------------------


def _load_vtab(root: Path) -> Task:
    """Load a VTAB-1k export (split files of ``relative/path label`` lines)."""
    required = [f for s, f in VTAB_SPLIT_FILES.items() if s != "test"]
    missing = [f for f in required if not (root / f).is_file()]
    if missing:
        raise DataError(
            f"{root}: looks like a VTAB-1k export but lacks {', '.join(missing)}. "
            f"A VTAB-1k export needs {', '.join(required)} (and optionally test.txt, classes.txt)."
        )
    classes = _read_classes(root / "classes.txt") if (root / "classes.txt").is_file() else None
    n_classes = len(classes) if classes is not None else None
    raw: dict[str, list[tuple[str, int, int]]] = {}
    for split, fname in VTAB_SPLIT_FILES.items():
        if (root / fname).is_file():
            raw[split] = _read_split_file(root / fname, n_classes)
    _check_vtab_files(root, raw)
    splits = {s: [ImageItem(root / rel, label) for rel, label, _ in rows] for s, rows in raw.items()}
    _check_consistent_labels(splits)
    if classes is None:
        classes = _classes_from_items(splits)
    return Task(root.name, root, classes, splits, "vtab")


def _read_classes(path: Path) -> list[str]:
    """Read ``classes.txt``: one non-empty, unique class name per line (trailing blanks allowed)."""
    lines = [line.strip() for line in _read_text(path).splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise DataError(f"{path}: classes file is empty (expected one class name per line).")
    for lineno, name in enumerate(lines, 1):
        if not name:
            raise DataError(f"{path}:{lineno}: empty class name (expected one name per line).")
    seen: dict[str, int] = {}
    for lineno, name in enumerate(lines, 1):
        if name in seen:
            raise DataError(f"{path}:{lineno}: class {name!r} repeats line {seen[name]}.")
        seen[name] = lineno
    return lines


def _read_split_file(path: Path, n_classes: int | None) -> list[tuple[str, int, int]]:
    """Parse a split file into ``(relative path, label, line number)`` rows."""
    rows: list[tuple[str, int, int]] = []
    seen: dict[str, int] = {}
    text = _read_text(path)
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        rel, label = _parse_split_line(path, lineno, line, n_classes)
        if rel in seen:
            raise DataError(f"{path}:{lineno}: {rel!r} is already listed on line {seen[rel]}.")
        seen[rel] = lineno
        rows.append((rel, label, lineno))
    if not rows:
        raise DataError(f"{path}: split file is empty (expected 'relative/path label' lines).")
    return rows


def _parse_split_line(path: Path, lineno: int, line: str, n_classes: int | None) -> tuple[str, int]:
    """Split one line on its last whitespace into a path and a validated integer label."""
    parts = line.strip().rsplit(None, 1)
    if len(parts) != 2:
        raise DataError(
            f"{path}:{lineno}: malformed line {line!r}; expected '<relative/path> <label>'."
        )
    rel, token = parts
    if not _INT_RE.match(token):
        raise DataError(f"{path}:{lineno}: label {token!r} is not an integer (line {line!r}).")
    label = int(token)
    if label < 0:
        raise DataError(f"{path}:{lineno}: label {label} is negative; labels start at 0.")
    if n_classes is not None and label >= n_classes:
        raise DataError(
            f"{path}:{lineno}: label {label} is out of range: classes.txt lists {n_classes} "
            f"classes (labels 0..{n_classes - 1})."
        )
    return rel, label


def _check_vtab_files(root: Path, raw: dict[str, list[tuple[str, int, int]]]) -> None:
    """DataError naming the first few split-file entries whose image file does not exist."""
    missing: list[str] = []
    checked: set[str] = set()
    for split, rows in raw.items():
        for rel, _, lineno in rows:
            if rel in checked:
                continue
            checked.add(rel)
            problem = _regular_file_problem(root / rel)
            if problem:
                missing.append(f"{VTAB_SPLIT_FILES[split]}:{lineno}: {rel} {problem}")
    if missing:
        raise DataError(
            f"{root}: {len(missing)} image file(s) listed in the split files are missing or not "
            "regular files, "
            f"e.g. {'; '.join(missing[:_MAX_LISTED])}. Paths are relative to the task root; "
            "fix them or drop those lines."
        )


def _check_consistent_labels(splits: dict[str, list[ImageItem]]) -> None:
    """DataError if one image file carries different labels in different splits."""
    labels: dict[Path, tuple[int, str]] = {}
    for split, items in splits.items():
        for item in items:
            first = labels.setdefault(item.path, (item.label, split))
            if first[0] != item.label:
                raise DataError(
                    f"{item.path}: labelled {first[0]} in split {first[1]!r} "
                    f"but {item.label} in split {split!r}."
                )


def _classes_from_items(splits: dict[str, list[ImageItem]]) -> list[str]:
    """Class names without classes.txt: parent folder names if they map 1:1 to labels."""
    n = 1 + max(item.label for items in splits.values() for item in items)
    folders: dict[int, set[str]] = {}
    for items in splits.values():
        for item in items:
            folders.setdefault(item.label, set()).add(item.path.parent.name)
    names = [next(iter(folders[i])) if len(folders.get(i, ())) == 1 else None for i in range(n)]
    if None not in names and len(set(names)) == n:
        return [str(name) for name in names]
    return [f"class_{i}" for i in range(n)]


# -- ImageFolder and Hugging Face imagefolder ------------------------------------------------


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name == "__MACOSX"


def _subdirs(path: Path) -> list[Path]:
    """Non-hidden sub-directories of ``path``, sorted by name."""
    return sorted((p for p in path.iterdir() if p.is_dir() and not _is_hidden(p)), key=lambda p: p.name)


def _split_dirs(root: Path) -> dict[str, Path]:
    """Split name -> folder when ``root`` holds train/val/test folders; {} when it holds none."""
    dirs = _subdirs(root)
    named = [d for d in dirs if d.name.lower() in SPLIT_FOLDER_NAMES]
    if not named:
        return {}
    others = [d.name for d in dirs if d not in named]
    if others:
        raise DataError(
            f"{root}: mixes split folders ({', '.join(d.name for d in named)}) with other "
            f"folders ({', '.join(others[:_MAX_LISTED])}). Put class folders inside the split "
            "folders (ROOT/train/<class>/...), or use no split folders at all."
        )
    out: dict[str, Path] = {}
    for d in named:
        split = SPLIT_FOLDER_NAMES[d.name.lower()]
        if split in out:
            raise DataError(f"{root}: both {out[split].name}/ and {d.name}/ are {split} folders.")
        out[split] = d
    if "train" not in out:
        raise DataError(f"{root}: has split folders ({', '.join(d.name for d in named)}) but no train/.")
    return out


def _metadata_file(folder: Path) -> Path | None:
    """The folder's metadata.csv / metadata.jsonl (DataError if both exist)."""
    found = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
    if len(found) > 1:
        raise DataError(f"{folder}: has both metadata.csv and metadata.jsonl; keep one.")
    return found[0] if found else None


RawItems = list[tuple[Path, Any]]  # (absolute path, class name or integer label)


def _scan_split(folder: Path) -> tuple[RawItems, bool]:
    """Raw items of one split folder and whether they came from a metadata file."""
    meta = _metadata_file(folder)
    if meta is not None:
        return _read_metadata(meta), True
    return _scan_class_folders(folder), False


def _scan_class_folders(folder: Path) -> RawItems:
    """``folder/<class>/**/<image>`` -> raw items (class name labels), sorted by path."""
    classes = _subdirs(folder)
    if not classes:
        raise DataError(
            f"{folder}: no class folders (expected {folder}/<class>/<image>) and no "
            f"metadata.csv/metadata.jsonl. {ACCEPTED_LAYOUTS}"
        )
    items: RawItems = []
    for class_dir in classes:
        images = _images_under(class_dir)
        if not images:
            raise DataError(
                f"{class_dir}: class folder holds no images "
                f"({' '.join(sorted(IMAGE_EXTENSIONS))}); remove the folder or add images."
            )
        items.extend((path, class_dir.name) for path in images)
    return items


def _images_under(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder`` (hidden files/folders skipped), sorted by path."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not _is_hidden(Path(d))]
        candidates = (Path(dirpath) / f for f in filenames if is_image_file(Path(f)))
        found.extend(p for p in candidates if _usable_image(p))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _usable_image(path: Path) -> bool:
    """False (with a logged warning) for image-named entries that are not regular files."""
    problem = _regular_file_problem(path)
    if problem:
        logger.warning("%s: skipped, it %s", path, problem.replace("does not exist", "is a broken link"))
    return problem is None


def _read_metadata(meta: Path) -> RawItems:
    """Read an HF ``metadata.csv``/``metadata.jsonl`` into raw items, checking files exist."""
    rows = _metadata_rows(meta)
    if not rows:
        raise DataError(f"{meta}: metadata file has no rows.")
    items: RawItems = []
    missing: list[str] = []
    seen: dict[str, int] = {}
    for lineno, row in rows:
        name, label = _metadata_entry(meta, lineno, row)
        if name in seen:
            raise DataError(f"{meta}:{lineno}: file_name {name!r} already listed on line {seen[name]}.")
        seen[name] = lineno
        path = meta.parent / name
        problem = _regular_file_problem(path)
        if problem:
            missing.append(f"{meta.name}:{lineno}: {name} {problem}")
        items.append((path, label))
    if missing:
        raise DataError(
            f"{meta}: {len(missing)} file(s) listed are missing or not regular files, e.g. "
            f"{'; '.join(missing[:_MAX_LISTED])}. file_name is relative to {meta.parent}."
        )
    return items


def _metadata_rows(meta: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row dict)`` pairs of a metadata.csv or metadata.jsonl file."""
    if meta.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(_read_text(meta), newline=""))
        if not reader.fieldnames or "file_name" not in reader.fieldnames:
            raise DataError(f"{meta}: needs a 'file_name' column (header: {reader.fieldnames}).")
        return [(reader.line_num, row) for row in reader]
    rows: list[tuple[int, dict[str, Any]]] = []
    for lineno, line in enumerate(_read_text(meta).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{meta}:{lineno}: not valid JSON ({exc}).") from None
        if not isinstance(row, dict):
            raise DataError(f"{meta}:{lineno}: expected a JSON object per line.")
        rows.append((lineno, row))
    return rows


def _metadata_entry(meta: Path, lineno: int, row: dict[str, Any]) -> tuple[str, Any]:
    """``(file_name, label)`` of one metadata row; label is a class name or an int.

    Without a ``label`` column the label is the first folder of ``file_name`` (as in HF).
    """
    name = row.get("file_name")
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{meta}:{lineno}: missing or empty 'file_name'.")
    name = name.strip()
    if "label" not in row:
        parts = Path(name).parts
        if len(parts) < 2:
            raise DataError(
                f"{meta}:{lineno}: no 'label' column and {name!r} is not inside a class "
                "folder; add a 'label' column (class name or integer)."
            )
        return name, parts[0]
    return name, _parse_label(meta, lineno, row["label"])


def _parse_label(meta: Path, lineno: int, value: Any) -> Any:
    """A metadata label as an int (integers and digit strings) or a class name (other strings)."""
    if isinstance(value, bool) or value is None:
        raise DataError(f"{meta}:{lineno}: label {value!r} is neither a class name nor an integer.")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise DataError(f"{meta}:{lineno}: empty label.")
        if not _INT_RE.match(value):
            return value
        value = int(value)
    if not isinstance(value, int):
        raise DataError(f"{meta}:{lineno}: label {value!r} is neither a class name nor an integer.")
    if value < 0:
        raise DataError(f"{meta}:{lineno}: label {value} is negative; labels start at 0.")
    return value


def _label_mapping(raw: dict[str, RawItems]) -> tuple[list[str], dict[Any, int]]:
    """Classes and raw-label -> index: sorted class names, or ``class_i`` for integer labels."""
    values = {label for items in raw.values() for _, label in items}
    ints = {v for v in values if isinstance(v, int)}
    if ints and len(ints) != len(values):
        raise DataError(
            "The dataset mixes integer labels and class names "
            f"(e.g. {min(ints)} and {sorted(values - ints)[0]!r}); use one kind."
        )
    if ints:
        n = max(ints) + 1
        return [f"class_{i}" for i in range(n)], {i: i for i in range(n)}
    classes = sorted(values)
    return classes, {name: i for i, name in enumerate(classes)}


def _to_items(raw: RawItems, mapping: dict[Any, int]) -> list[ImageItem]:
    return [ImageItem(path, mapping[label]) for path, label in raw]


def _load_split_folders(root: Path, split_dirs: dict[str, Path]) -> Task:
    """Load ``root/{train,val,test}/...`` (ImageFolder or HF imagefolder)."""
    raw: dict[str, RawItems] = {}
    any_meta = False
    for split in ("train", "val", "test"):
        if split in split_dirs:
            raw[split], used_meta = _scan_split(split_dirs[split])
            any_meta |= used_meta
    classes, mapping = _label_mapping(raw)
    splits = {split: _to_items(items, mapping) for split, items in raw.items()}
    if "val" in splits:
        splits["trainval"] = splits["train"] + splits["val"]
    else:
        splits["trainval"] = splits["train"]
        splits["train"], splits["val"] = stratified_split(splits["trainval"])
    splits = {s: splits[s] for s in SPLIT_ORDER if s in splits}
    _check_consistent_labels(splits)
    return Task(root.name, root, classes, splits, "hf-imagefolder" if any_meta else "imagefolder")


def _load_unsplit_folder(root: Path) -> Task:
    """Load ``root/<class>/<image>`` or ``root/metadata.*``: all trainval, train/val derived."""
    raw, used_meta = _scan_split(root)
    classes, mapping = _label_mapping({"trainval": raw})
    trainval = _to_items(raw, mapping)
    train, val = stratified_split(trainval)
    splits = {"trainval": trainval, "train": train, "val": val}
    return Task(root.name, root, classes, splits, "hf-imagefolder" if used_meta else "imagefolder")


def stratified_split(
    items: Sequence[ImageItem], val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED
) -> tuple[list[ImageItem], list[ImageItem]]:
    """Deterministic per-class split of ``items`` into ``(train, val)``, both in input order.

    The one stratified split, :func:`frozenlens.data.split.stratified_indices`: for each class
    in label order, one shared ``numpy.random.RandomState(seed)`` permutes the class's items
    and the first ``round(val_fraction * n)`` go to val (at least 1 and at most ``n - 1``
    when ``n >= 2``; a class with one image stays in train).
    """
    kept, held = stratified_indices([item.label for item in items], val_fraction, seed)
    return [items[i] for i in kept], [items[i] for i in held]
