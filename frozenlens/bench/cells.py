"""Cells: the units of work of a bench, each saved (atomically, as JSON) the moment it finishes.

A cell is one task view x one method x one stage:

* ``search``: the whole grid of a method that trains from the store, trained on train in
  one stacked pass over the store and ranked on val (:func:`frozenlens.protocol.search_grid`);
* ``grid``: one grid point of a method that runs the backbone in the loop (trained on
  train, scored on val; those train one point at a time anyway);
* ``final``: the selected point retrained on train+val and tested once: every seed together
  for a store method (one stacked pass; seed after seed for MIST and LAST, which gain
  nothing from lockstep), one seed per cell for an in-loop method.

A finished cell is ``<out>/cells/<task>/<method label>/<view>/<stage>-<id>.json``
holding the cell, its key (a hash of everything its result depends on) and the
result. A rerun skips every cell whose file holds the same key, so an interrupted
bench resumes without recomputing anything finished; a cell whose inputs changed
(other epochs, data, backbone) is computed again and its file replaced.

A cell of a method that fits its configurations one by one anyway (MIST, LAST:
:attr:`~frozenlens.methods.Method.trains_together` false) also saves each part as it
finishes, under ``<out>/parts/`` with the cell's key (:class:`PartFiles`): each grid point
of its ``search``, each seed of its ``final`` cell. A search or a final cell interrupted
after hours loses at most the part in progress. The parts are removed once the cell
itself is saved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from frozenlens.atomic import write_json

_log = logging.getLogger("frozenlens")

STAGES = ("search", "grid", "final")


@dataclass(frozen=True)
class Cell:
    """One unit of work of a bench.

    Attributes:
        task: the task's name (unique within a bench).
        method: the method spec as written (``linear``, ``vqt:num_queries=2``).
        label: the method's folder-safe label (:attr:`frozenlens.api.MethodSpec.label`).
        stage: ``search``, ``grid`` or ``final`` (see the module docstring).
        shots: images per class of a few-shot view (None: the VTAB-1k splits).
        draw: seed of the few-shot draw (None for VTAB-1k).
        point: the grid point (``grid``), or the selected one a ``final`` cell trains with, as
            sorted ``(name, value)`` pairs; empty for defaults.
        seeds: seeds of the final runs this cell trains (``final``).
    """

    task: str
    method: str
    label: str
    stage: str
    shots: int | None = None
    draw: int | None = None
    point: tuple[tuple[str, Any], ...] = ()
    seeds: tuple[int, ...] = ()

    @property
    def view(self) -> str:
        """``vtab``, or ``shots<k>-draw<d>`` for a few-shot view."""
        return "vtab" if self.shots is None else f"shots{self.shots}-draw{self.draw}"

    @property
    def point_dict(self) -> dict[str, Any]:
        """:attr:`point` as a dict."""
        return dict(self.point)

    def describe(self) -> str:
        """One line for progress displays: task, view, method, stage and point or seeds."""
        what = {"search": "the whole grid", "grid": _point_text(self.point),
                "final": f"seed {','.join(map(str, self.seeds))} with {_point_text(self.point)}"}[self.stage]
        view = "" if self.shots is None else f" {self.view}"
        return f"{self.task}{view} {self.method} {self.stage} {what}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (tuples become lists)."""
        out = asdict(self)
        out["point"] = [list(pair) for pair in self.point]
        out["seeds"] = list(self.seeds)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Cell":
        """The cell :meth:`to_dict` wrote."""
        return cls(**{**data, "point": tuple(tuple(p) for p in data["point"]), "seeds": tuple(data["seeds"])})

    def file_name(self) -> str:
        """The cell's file name within its method/view folder."""
        if self.stage == "search":
            return "search.json"
        tail = _slug(_point_text(self.point)) if self.stage == "grid" else "seed" + "+".join(map(str, self.seeds))
        digest = hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:6]
        return f"{self.stage}-{tail}-{digest}.json"


def _point_text(point: tuple[tuple[str, Any], ...]) -> str:
    return ",".join(f"{k}={v}" for k, v in point) or "defaults"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+,-]+", "_", text)[:60]


def cell_key(cell: Cell, material: dict[str, Any]) -> str:
    """Hash of the cell and of everything else its result depends on (``material``)."""
    blob = json.dumps({"cell": cell.to_dict(), **material}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def read_keyed(path: Path, key: str, field: str, otherwise: str) -> dict[str, Any] | None:
    """``field`` of the JSON file at ``path`` when the file holds the same ``key``, else None. A file that
    cannot be read or parsed (it cannot be half-written: writes are atomic, but it may have been edited)
    is logged with ``otherwise`` (what happens instead) and treated as missing."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        _log.warning("%s: unreadable (%s); %s", path, err, otherwise)
        return None
    if not isinstance(saved, dict) or saved.get("key") != key or not isinstance(saved.get(field), dict):
        return None
    return saved[field]


class Ledger:
    """The finished cells of a bench under ``<out>/cells/``."""

    def __init__(self, out_dir: Path):
        self.root = Path(out_dir) / "cells"

    def path(self, cell: Cell) -> Path:
        """Where ``cell``'s result is (or will be) saved."""
        return self.root / _slug(cell.task) / cell.label / cell.view / cell.file_name()

    def load(self, cell: Cell, key: str) -> dict[str, Any] | None:
        """The saved result of ``cell`` when it was computed with the same ``key``, else None.

        A file that cannot be read or parsed (it cannot be half-written: writes are atomic,
        but it may have been edited) is logged and treated as not finished.
        """
        return read_keyed(self.path(cell), key, "result", "the cell will be computed again")

    @staticmethod
    def as_saved(result: dict[str, Any]) -> dict[str, Any]:
        """``result`` as its saved file holds it (JSON types: mapping keys become strings), so a
        fresh bench and a resumed one report the same values."""
        return json.loads(json.dumps(result))

    def save(self, cell: Cell, key: str, result: dict[str, Any]) -> Path:
        """Save a finished cell atomically, then drop its saved parts; returns its file."""
        path = self.path(cell)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"cell": cell.to_dict(), "key": key, "result": result})
        self.parts(cell, key).clear()
        return path

    def parts(self, cell: Cell, key: str) -> "PartFiles":
        """The parts of ``cell`` (grid points of a ``search``, seeds of a ``final``) saved so far with ``key``."""
        parts = self.root.parent / "parts"
        return PartFiles(parts, parts / _slug(cell.task) / cell.label / cell.view / Path(cell.file_name()).stem, key)


class PartFiles:
    """The finished parts of one cell (grid points of a search, seeds of a final cell), a JSON
    file each holding the cell's key (a :class:`~frozenlens.protocol.PointMemo`: a part saved
    with another key is not finished), in ``folder`` under ``root`` (``<out>/parts``). A part
    is named by a dict: its grid point, or ``{"seed": s}``."""

    def __init__(self, root: Path, folder: Path, key: str):
        self.root, self.folder, self.key = Path(root), Path(folder), key

    def _path(self, point: dict[str, Any]) -> Path:
        pairs = tuple(sorted(point.items()))
        digest = hashlib.sha1(json.dumps(pairs, default=str).encode()).hexdigest()[:6]
        return self.folder / f"{_slug(_point_text(pairs))}-{digest}.json"

    def load(self, point: dict[str, Any]) -> dict[str, Any] | None:
        """The saved outcome of part ``point``, or None (not saved, another key, or unreadable)."""
        outcome = read_keyed(self._path(point), self.key, "outcome", "that part will be trained again")
        if outcome is not None:
            _log.info("%s already finished in %s", _point_text(tuple(sorted(point.items()))), self.folder)
        return outcome

    def save(self, point: dict[str, Any], outcome: dict[str, Any]) -> None:
        """Save the outcome of part ``point`` atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self._path(point), {"point": sorted(point.items()), "key": self.key, "outcome": outcome})

    def clear(self) -> None:
        """Remove every saved part (their cell is saved), and the folders left empty."""
        if self.folder.is_dir():
            shutil.rmtree(self.folder)
        for parent in self.folder.parents:
            if not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()
            if parent == self.root:
                break
