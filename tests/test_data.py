"""Tests of frozenlens.data: task layouts and image decoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from frozenlens.data import ImageItem, load_image, load_task, stratified_split
from frozenlens.errors import DataError, ImageError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
SPLIT_FILES = ("train800.txt", "val200.txt", "train800val200.txt", "test.txt")


# -- helpers ----------------------------------------------------------------------------------


def _img(path: Path, value: int = 128, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, value // 2)).save(path)
    return path


def _vtab(root: Path, classes: bool = True) -> Path:
    """Tiny VTAB task: classes cat/dog, 5 images each (one file name with a space)."""
    names = {0: "cat", 1: "dog"}
    rels = {c: [f"images/{n}/{n} {i}.png" if i == 0 else f"images/{n}/{n}_{i}.jpg" for i in range(5)]
            for c, n in names.items()}  # fmt: skip
    for c, paths in rels.items():
        for i, rel in enumerate(paths):
            _img(root / rel, value=40 * i + c)

    def lines(sel: slice) -> str:
        return "".join(f"{rel} {c}\n" for c, paths in rels.items() for rel in paths[sel])

    (root / "train800.txt").write_text(lines(slice(0, 3)))
    (root / "val200.txt").write_text(lines(slice(3, 4)))
    (root / "train800val200.txt").write_text(lines(slice(0, 4)))
    (root / "test.txt").write_text(lines(slice(4, 5)))
    if classes:
        (root / "classes.txt").write_text("cat\ndog\n")
    return root


def _rewrite(path: Path, lineno: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


def _folder(root: Path, counts: dict[str, int], ext: str = ".png") -> Path:
    for name, n in counts.items():
        for i in range(n):
            _img(root / name / f"img_{i:02d}{ext}", value=i)
    return root


# -- VTAB-1k layout ---------------------------------------------------------------------------


def test_vtab_splits_labels_classes(tmp_path: Path) -> None:
    task = load_task(_vtab(tmp_path / "tiny"))
    assert task.layout == "vtab" and task.name == "tiny"
    assert task.classes == ["cat", "dog"]
    assert {k: len(v) for k, v in task.splits.items()} == {
        "train": 6, "val": 2, "trainval": 8, "test": 2}  # fmt: skip
    first = task.split("train")[0]
    assert first == ImageItem(tmp_path / "tiny" / "images/cat/cat 0.png", 0)  # space in path
    assert first.path.is_absolute() and first.path.is_file()
    assert [i.label for i in task.split("test")] == [0, 1]
    assert all(i.path.parent.name == task.classes[i.label] for i in task.all_images())


def test_vtab_all_images_dedup_in_order(tmp_path: Path) -> None:
    task = load_task(_vtab(tmp_path / "t"))
    images = task.all_images()
    assert len(images) == 10 == len({i.path for i in images})
    assert images[:8] == task.split("trainval") and images[8:] == task.split("test")


def test_vtab_without_classes_txt_uses_folder_names(tmp_path: Path) -> None:
    assert load_task(_vtab(tmp_path / "t", classes=False)).classes == ["cat", "dog"]


def test_vtab_without_classes_txt_ambiguous_folders(tmp_path: Path) -> None:
    root = _vtab(tmp_path / "t", classes=False)
    _img(root / "images/cat/x.png")
    with (root / "test.txt").open("a") as fh:
        fh.write("images/cat/x.png 3\n")  # label 3 also in folder cat; labels 2 unused
    assert load_task(root).classes == ["class_0", "class_1", "class_2", "class_3"]


def test_vtab_malformed_line(tmp_path: Path) -> None:
    root = _vtab(tmp_path / "t")
    _rewrite(root / "train800.txt", 2, "images/cat/cat_1.jpg")
    with pytest.raises(DataError, match=r"train800\.txt:2: malformed line"):
        load_task(root)


def test_vtab_label_not_integer(tmp_path: Path) -> None:
    root = _vtab(tmp_path / "t")
    _rewrite(root / "test.txt", 1, "images/cat/cat_4.jpg cat")
    with pytest.raises(DataError, match=r"test\.txt:1: label 'cat' is not an integer"):
        load_task(root)


def test_vtab_label_out_of_range(tmp_path: Path) -> None:
    root = _vtab(tmp_path / "t")
    _rewrite(root / "val200.txt", 2, "images/dog/dog_3.jpg 2")
    with pytest.raises(DataError, match=r"val200\.txt:2: label 2 is out of range.*2 classes"):
        load_task(root)


def test_vtab_negative_label(tmp_path: Path) -> None:
    root = _vtab(tmp_path / "t", classes=False)
    _rewrite(root / "val200.txt", 1, "images/cat/cat_3.jpg -1")
    with pytest.raises(DataError, match=r"val200\.txt:1: label -1 is negative"):
        load_task(root)


def test_vtab_missing_image(tmp_path: Path) -> None:
    root = _vtab(tmp_path / "t")
    (root / "images/dog/dog_4.jpg").unlink()
    with pytest.raises(DataError, match=r"1 image file\(s\).*test\.txt:2: images/dog/dog_4\.jpg"):
        load_task(root)


def test_vtab_empty_split_file(tmp_path: Path) -> None:
    root = _vtab(tmp_path / "t")
    (root / "val200.txt").write_text("\n")
    with pytest.raises(DataError, match=r"val200\.txt: split file is empty"):
        load_task(root)


def test_vtab_missing_required_file_and_absent_test_split(tmp_path: Path) -> None:
    root = _vtab(tmp_path / "t")
    (root / "test.txt").unlink()
    task = load_task(root)
    with pytest.raises(DataError, match="no 'test' split; available splits: train, val, trainval"):
        task.split("test")
    (root / "val200.txt").unlink()
    with pytest.raises(DataError, match="lacks val200.txt"):
        load_task(root)


def test_vtab_conflicting_labels_across_splits(tmp_path: Path) -> None:
    root = _vtab(tmp_path / "t")
    _rewrite(root / "train800val200.txt", 1, "images/cat/cat 0.png 1")
    with pytest.raises(DataError, match="labelled 0 in split 'train' but 1"):
        load_task(root)


# -- ImageFolder ------------------------------------------------------------------------------


def test_imagefolder_flat_derives_stratified_val(tmp_path: Path) -> None:
    root = _folder(tmp_path / "flat", {"b_dog": 5, "a_cat": 10})
    _img(root / "a_cat" / "sub" / "deep.JPG")  # nested, upper-case extension: counted
    _img(root / ".hidden" / "x.png")
    _img(root / "a_cat" / ".ipynb_checkpoints" / "x.png")
    (root / "a_cat" / ".DS_Store").write_text("x")
    (root / "a_cat" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("readme")
    task = load_task(root)
    assert task.layout == "imagefolder" and task.classes == ["a_cat", "b_dog"]
    assert "test" not in task.splits
    trainval, train, val = task.split("trainval"), task.split("train"), task.split("val")
    assert len(trainval) == 16
    assert [sum(i.label == c for i in val) for c in (0, 1)] == [2, 1]  # round(0.2 * n)
    assert {i.path for i in train} | {i.path for i in val} == {i.path for i in trainval}
    assert not {i.path for i in train} & {i.path for i in val}
    assert load_task(root).split("val") == val  # deterministic


def test_stratified_split_counts_and_determinism() -> None:
    items = [ImageItem(Path(f"/x/{c}/{i}.png"), c) for c in range(3) for i in range(c * 5 + 1)]
    train, val = stratified_split(items)
    assert [sum(i.label == c for i in val) for c in range(3)] == [0, 1, 2]  # n = 1, 6, 11
    assert (train, val) == stratified_split(list(items))
    assert stratified_split(items, seed=1)[1] != val
    assert val == [i for i in items if i in set(val)]  # input order kept


def test_imagefolder_split_folders(tmp_path: Path) -> None:
    root = tmp_path / "split"
    _folder(root / "train", {"cat": 4, "dog": 3})
    _folder(root / "validation", {"cat": 1, "dog": 1})
    _folder(root / "test", {"cat": 2, "eel": 2}, ext=".jpg")
    task = load_task(root)
    assert task.layout == "imagefolder" and task.classes == ["cat", "dog", "eel"]
    assert {k: len(v) for k, v in task.splits.items()} == {
        "trainval": 9, "train": 7, "val": 2, "test": 4}  # fmt: skip
    assert task.split("trainval") == task.split("train") + task.split("val")  # given val
    assert all(i.path.parent.name == task.classes[i.label] for i in task.all_images())
    assert all(i.path.parent.parent.name == "validation" for i in task.split("val"))


def test_imagefolder_split_folders_without_val(tmp_path: Path) -> None:
    root = tmp_path / "noval"
    _folder(root / "train", {"cat": 5, "dog": 10})
    _folder(root / "test", {"cat": 1, "dog": 1})
    task = load_task(root)
    assert [len(task.split(s)) for s in ("trainval", "train", "val", "test")] == [15, 12, 3, 2]
    assert task.split("val") == load_task(root).split("val")
    assert task.split("trainval") == sorted(task.split("train") + task.split("val"),
                                            key=lambda i: (i.label, i.path.name))  # fmt: skip


def test_imagefolder_empty_class_folder(tmp_path: Path) -> None:
    root = _folder(tmp_path / "f", {"cat": 2})
    (root / "dog").mkdir()
    (root / "dog" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"f/dog: class folder holds no images.*remove the folder"):
        load_task(root)


def test_imagefolder_mixed_split_and_class_folders(tmp_path: Path) -> None:
    root = _folder(tmp_path / "m", {"cat": 2, "train": 2})
    with pytest.raises(DataError, match="mixes split folders"):
        load_task(root)


def test_no_layout_lists_accepted_layouts(tmp_path: Path) -> None:
    _img(tmp_path / "loose.png")
    with pytest.raises(DataError, match="no recognised dataset layout.*VTAB-1k.*ImageFolder"):
        load_task(tmp_path)
    with pytest.raises(DataError, match="no such task directory"):
        load_task(tmp_path / "absent")


# -- Hugging Face imagefolder -----------------------------------------------------------------


def test_hf_imagefolder_metadata_csv(tmp_path: Path) -> None:
    root = tmp_path / "hf"
    for split, n in (("train", 5), ("test", 2)):
        rows = ["file_name,label,caption"]
        for i in range(n):
            name = "dog" if i % 2 else "cat"
            _img(root / split / f"{i}.png", value=i)
            rows.append(f"{i}.png,{name},\"a {name}, photo\"")
        (root / split / "metadata.csv").write_text("\n".join(rows) + "\n")
    task = load_task(root)
    assert task.layout == "hf-imagefolder" and task.classes == ["cat", "dog"]
    assert [i.label for i in task.split("test")] == [0, 1]
    assert task.split("test")[1].path == root / "test" / "1.png"
    assert len(task.split("trainval")) == 5 and len(task.split("val")) == 2  # 1 cat, 1 dog


def test_hf_imagefolder_metadata_jsonl_integer_labels(tmp_path: Path) -> None:
    root = tmp_path / "hf"
    rows = []
    for i in range(6):
        _img(root / "train" / "imgs" / f"{i}.png", value=i)
        rows.append(json.dumps({"file_name": f"imgs/{i}.png", "label": i % 3}))
    (root / "train" / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    _folder(root / "validation", {"x": 1})  # folder-labelled split: class *names*
    with pytest.raises(DataError, match="mixes integer labels and class names"):
        load_task(root)
    for p in (root / "validation" / "x").iterdir():
        p.unlink()
    (root / "validation" / "x").rmdir()
    (root / "validation").rmdir()
    task = load_task(root)
    assert task.classes == ["class_0", "class_1", "class_2"]
    assert [i.label for i in task.split("trainval")] == [0, 1, 2, 0, 1, 2]


def test_hf_imagefolder_missing_file(tmp_path: Path) -> None:
    root = tmp_path / "hf"
    _img(root / "train" / "a.png")
    (root / "train" / "metadata.csv").write_text("file_name,label\na.png,cat\nb.png,dog\n")
    with pytest.raises(DataError, match=r"metadata\.csv:3: b\.png"):
        load_task(root)


# -- load_image -------------------------------------------------------------------------------


def _mode_image(mode: str) -> Image.Image:
    if mode == "I;16":
        return Image.fromarray(np.array([[0, 65535], [257 * 100, 1000]], dtype=np.uint16))
    if mode == "RGBA":
        return Image.fromarray(np.array([[[255, 0, 0, 255], [0, 0, 255, 0]]] * 2, dtype=np.uint8))
    if mode == "P":
        img = Image.new("P", (2, 2), 1)
        img.putpalette([0, 0, 0, 10, 200, 30])
        return img
    return Image.new(mode, (2, 2), {"L": 77, "LA": (77, 255), "1": 1, "CMYK": (0, 255, 255, 0)}[mode])


@pytest.mark.parametrize(
    ("mode", "suffix", "pixel"),
    [
        ("L", ".png", (77, 77, 77)),
        ("LA", ".png", (77, 77, 77)),
        ("1", ".png", (255, 255, 255)),
        ("P", ".png", (10, 200, 30)),
        ("RGBA", ".png", (255, 0, 0)),
        ("CMYK", ".jpg", None),  # lossy: checked to be reddish below
        ("I;16", ".png", (0, 0, 0)),
    ],
)
def test_load_image_converts_to_rgb(tmp_path: Path, mode: str, suffix: str, pixel: tuple | None) -> None:
    path = tmp_path / f"img{suffix}"
    _mode_image(mode).save(path)
    assert Image.open(path).mode == mode
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (2, 2)
    if pixel is not None:
        assert img.getpixel((0, 0)) == pixel
    else:
        r, g, b = img.getpixel((0, 0))
        assert r > 200 and g < 60 and b < 60


def test_load_image_alpha_on_white_and_16bit_scaling(tmp_path: Path) -> None:
    _mode_image("RGBA").save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").getpixel((1, 0)) == (255, 255, 255)  # transparent -> white
    _mode_image("I;16").save(tmp_path / "b.png")
    img = load_image(tmp_path / "b.png")
    assert [img.getpixel(p)[0] for p in ((1, 0), (0, 1), (1, 1))] == [255, 100, 4]
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 9, 9, 9])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "c.png", transparency=0)
    img = load_image(tmp_path / "c.png")
    assert [img.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (9, 9, 9)]


def test_load_image_truncated_jpeg(tmp_path: Path) -> None:
    noise = np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)
    full = tmp_path / "full.jpg"
    Image.fromarray(noise).save(full, quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert load_image(full).size == (64, 64)
    with pytest.raises(ImageError, match=rf"{cut}: cannot decode image \(.*\)\. Remove or replace"):
        load_image(cut)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_load_image_not_an_image(tmp_path: Path) -> None:
    fake = tmp_path / "notes.jpg"
    fake.write_text("this is text, not a JPEG\n")
    with pytest.raises(ImageError, match=rf"{fake}: not a supported raster image"):
        load_image(fake)
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "absent.png")
    assert issubclass(ImageError, DataError)


@pytest.mark.parametrize(("name", "n_classes"), [("cifar10", 10), ("aid", 30)])
def test_shared_vtab_tasks(name: str, n_classes: int) -> None:
    root = SHARED_DATA / name
    if not root.is_dir():
        pytest.skip(f"{root} absent (the shared VTAB-1k tasks live in ../shared/data next to the repo)")
    task = load_task(root)
    assert task.layout == "vtab" and len(task.classes) == n_classes
    counts = {k: len(v) for k, v in task.splits.items()}
    assert counts == {"train": 800, "val": 200, "trainval": 1000, "test": 2000}
    assert set(task.split("trainval")) == set(task.split("train")) | set(task.split("val"))
    assert len(task.all_images()) == 3000
    assert {i.label for i in task.split("trainval")} == set(range(n_classes))
    assert load_image(task.split("test")[0].path).mode == "RGB"
