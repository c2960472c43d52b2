"""Text tasks: layouts, split conventions, stable keys, errors naming file/row/column; the WordNet task."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from frozenlens.data.split import stratified_indices
from frozenlens.data.text import TextTask, load_text_task
from frozenlens.errors import DataError
from tests.conftest import skip_or_fail_in_ci

CLASSES = ["negative", "positive"]


def rows(n: int, prefix: str = "") -> list[dict]:
    """``n`` rows alternating negative/positive with distinct texts."""
    return [{"text": f"{prefix}example number {i} is {'good' if i % 2 else 'bad'}", "label": CLASSES[i % 2]}
            for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_csv(path: Path, records: list[dict], fields: list[str] | None = None) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields or list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def test_vtab_layout_reads_splits_classes_and_keys(tmp_path):
    write_jsonl(tmp_path / "train800.jsonl", rows(8))
    write_jsonl(tmp_path / "val200.jsonl", rows(4, "v "))
    write_csv(tmp_path / "test.csv", rows(6, "t "))
    (tmp_path / "classes.txt").write_text("positive\nnegative\n")
    task = load_text_task(tmp_path)
    assert isinstance(task, TextTask) and task.layout == "vtab"
    assert task.classes == ["positive", "negative"]  # classes.txt fixes the order
    assert [len(task.split(s)) for s in ("train", "val", "trainval", "test")] == [8, 4, 12, 6]
    first = task.split("train")[0]
    assert (first.text, task.classes[first.label], first.source, first.row) == (
        "example number 0 is bad", "negative", "train800.jsonl", 1)
    assert first.key.startswith("train800.jsonl#1:") and len(first.key.split(":")[1]) == 16
    assert task.split("test")[2].key.startswith("test.csv#3:")
    keys = [item.key for item in task.all_items()]
    assert len(keys) == len(set(keys)) == 18
    assert load_text_task(tmp_path).split("test")[2] == task.split("test")[2]  # stable across loads
    with pytest.raises(DataError, match="no 'holdout' split; available splits: trainval, train, val, test"):
        task.split("holdout")


def test_derived_val_is_the_shared_stratified_split(tmp_path):
    records = rows(30)
    write_csv(tmp_path / "train.csv", records)
    write_jsonl(tmp_path / "test.jsonl", rows(4, "t "))
    task = load_text_task(tmp_path)
    assert task.layout == "split-files"
    labels = [CLASSES.index(r["label"]) for r in records]
    kept, held = stratified_indices(labels, 0.2, 0)
    assert [i.row for i in task.split("train")] == [int(i) + 1 for i in kept]
    assert [i.row for i in task.split("val")] == [int(i) + 1 for i in held]
    assert len(task.split("trainval")) == 30 and Counter(i.label for i in task.split("val")) == {0: 3, 1: 3}


def test_split_files_with_validation_and_integer_labels(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"sentence": f"s{i}", "y": i % 3} for i in range(9)])
    write_jsonl(tmp_path / "validation.jsonl", [{"sentence": f"v{i}", "y": str(i % 3)} for i in range(3)])
    task = load_text_task(tmp_path, text_column="sentence", label_column="y")
    assert task.classes == ["class_0", "class_1", "class_2"]
    assert [i.label for i in task.split("val")] == [0, 1, 2]
    assert len(task.split("trainval")) == 12


def test_one_file_with_and_without_a_split_column(tmp_path):
    records = [dict(r, part="train" if i < 10 else ("dev" if i < 14 else "test")) for i, r in enumerate(rows(20))]
    path = write_csv(tmp_path / "all.csv", records)
    task = load_text_task(path, split_column="part")
    assert task.layout == "file" and task.name == "all"
    assert [len(task.split(s)) for s in ("train", "val", "trainval", "test")] == [10, 4, 14, 6]
    plain = load_text_task(write_jsonl(tmp_path / "plain.jsonl", rows(10)))
    assert [len(plain.split(s)) for s in ("trainval", "train", "val")] == [10, 8, 2]
    assert "test" not in plain.splits


def test_identical_text_in_two_files_gets_two_keys(tmp_path):
    write_jsonl(tmp_path / "train800.jsonl", rows(4))
    write_jsonl(tmp_path / "val200.jsonl", rows(2))  # the same texts as train rows 1-2
    task = load_text_task(tmp_path)
    train, val = task.split("train")[0], task.split("val")[0]
    assert train.digest == val.digest and train.key != val.key


@pytest.mark.parametrize("name, content, message", [
    ("train.csv", "sentence,label\nhello,positive\n", r"train.csv: header has no 'text' column \(header: sentence"),
    ("train.jsonl", '{"text": "fine", "label": "positive"}\n{"label": "negative"}\n',
     r"train.jsonl: row 2 \(line 2\): no 'text' column"),
    ("train.csv", "text,label\nfine,positive\n\"  \",negative\n",
     r"train.csv: row 2 \(line 3\): column 'text' is empty"),
    ("train.jsonl", '{"text": "fine", "label": "positive"}\n{"text": 7, "label": "negative"}\n',
     r"train.jsonl: row 2 \(line 2\): column 'text' holds int 7"),
    ("train.csv", "text,label\nfine,positive\nmeh,neutral\n", r"train.csv: row 2: unknown label 'neutral'"),
    ("train.csv", "text,label\nfine,1\nmeh,5\n", r"train.csv: row 2: label 5 is out of range; there are 2 classes"),
    ("train.csv", "text,label\nfine,positive\nmeh,\n", r"train.csv: row 2: empty label"),
    ("train.jsonl", '{"text": "fine", "label": "positive"}\n{"text": "x", "label"\n',
     r"train.jsonl: line 2: not valid JSON"),
])
def test_bad_rows_are_named_by_file_row_and_column(tmp_path, name, content, message):
    (tmp_path / "classes.txt").write_text("negative\npositive\n")
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_text_task(tmp_path)


def test_non_utf8_and_layout_errors(tmp_path):
    (tmp_path / "train.csv").write_bytes(b"text,label\nfine,positive\ncaf\xe9,negative\n")
    with pytest.raises(DataError, match=r"train.csv: line 3: not UTF-8 \(byte 0xe9 at offset 28\)"):
        load_text_task(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no recognised text layout"):
        load_text_task(empty)
    with pytest.raises(DataError, match="no such text task"):
        load_text_task(tmp_path / "missing")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": "cat"}])
    with pytest.raises(DataError, match="mix integers and class names"):
        load_text_task(mixed)
    vtab = tmp_path / "vtab"
    vtab.mkdir()
    write_jsonl(vtab / "train800.jsonl", rows(4))
    with pytest.raises(DataError, match="lacks val200.csv|jsonl"):
        load_text_task(vtab)
    write_jsonl(vtab / "val200.jsonl", rows(2, "v "))
    write_jsonl(vtab / "train800val200.jsonl", rows(5))
    with pytest.raises(DataError, match="train800val200 must hold exactly the rows"):
        load_text_task(vtab)


def test_hugging_face_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets is optional; frozenlens does not install it")
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    from datasets.table import InMemoryTable

    def dataset(texts: list[str], labels: list[int], name: str):
        # Built from an Arrow table with an explicit fingerprint: no dill hashing of the data.
        table = InMemoryTable.from_pydict({"text": texts, "label": labels}, schema=features.arrow_schema)
        return datasets.Dataset(table, info=datasets.DatasetInfo(features=features), fingerprint=name)

    train = dataset([f"t{i}" for i in range(10)], [i % 2 for i in range(10)], "train")
    test = dataset(["x", "y"], [1, 0], "test")
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "hf"))
    task = load_text_task(tmp_path / "hf")
    assert task.layout == "hf-dataset" and task.classes == ["neg", "pos"]
    assert [len(task.split(s)) for s in ("trainval", "train", "val", "test")] == [10, 8, 2, 2]
    assert task.split("test")[0].key.startswith("hf:test#1:")
    with pytest.raises(DataError, match="no column 'sentence'"):
        load_text_task(tmp_path / "hf", text_column="sentence")


def test_wordnet_supersense_task_from_the_debian_package(tmp_path):
    """The real task: built from the Debian package wordnet-base, read back as a TextTask."""
    from examples.text_data import SUPERSENSES, build_wordnet_task

    try:
        path = build_wordnet_task(tmp_path / "wordnet", n_test=200)
    except DataError as err:
        skip_or_fail_in_ci(f"WordNet (Debian package wordnet-base) is not available here: {err}")
    task = load_text_task(path)
    assert task.layout == "vtab" and task.classes == SUPERSENSES
    assert [len(task.split(s)) for s in ("train", "val", "trainval", "test")] == [800, 200, 1000, 200]
    for split, per_class in (("train", 80), ("val", 20), ("test", 20)):
        assert Counter(i.label for i in task.split(split)) == dict.fromkeys(range(10), per_class)
    texts = [i.text for i in task.all_items()]
    assert len(set(texts)) == len(texts) == 1200  # no gloss in two places
    animal = [i.text for i in task.split("train") if task.classes[i.label] == "noun.animal"]
    assert any(word in " ".join(animal) for word in ("bird", "fish", "genus", "mammal"))
    assert build_wordnet_task(path, n_test=200) == path  # reused as built
    assert (path / "SOURCE.md").read_text().count("WordNet 3.0 Copyright 2006 by Princeton University") == 1
    with pytest.raises(DataError, match="built with other settings"):
        build_wordnet_task(path, n_test=100)
