"""Methods with the backbone in the training loop: protocol, fit, adapters and predict.

A small in-loop method defined here (a trainable offset on the last block's MLP
bias plus a linear head) exercises the infrastructure independently of the
PETL baselines and TOAST.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import frozenlens.api as api
from frozenlens.backbones.hooks import Edits, forward_edited
from frozenlens.data import load_task
from frozenlens.errors import FrozenlensError
from frozenlens.methods import base as method_base
from frozenlens.methods import build_method
from frozenlens.protocol import run_protocol
from frozenlens.train.images import ImageData
from frozenlens.train.trainer import TrainConfig, count_trainable
from tests.conftest import adapter_folder


@dataclass
class _OffsetConfig:
    scale: float = 1.0


class _BiasOffsetProbe(method_base.Method):
    name = "test-inloop-offset"
    in_loop = True
    config_class = _OffsetConfig
    train_defaults = TrainConfig(optimizer="adamw", lr=1e-2, epochs=2, warmup_epochs=0, batch_size=8)

    def __init__(self, config: _OffsetConfig, backbone: dict[str, Any], num_classes: int):
        super().__init__(config, backbone, num_classes)
        self.offset = nn.Parameter(torch.zeros(backbone["dim"]))
        self.head = nn.Linear(backbone["dim"], num_classes)

    @classmethod
    def taps(cls, config, backbone):
        return []

    def forward(self, batch):
        net = self.frozen_backbone
        last = net.depth - 1
        bias = net.model.blocks[last].mlp.fc2.bias + self.config.scale * self.offset
        tokens = forward_edited(net, batch["images"], Edits(params={f"blocks.{last}.mlp.fc2.bias": bias}))
        return self.head(tokens[:, 0])


@pytest.fixture
def offset_method():
    method_base._REGISTRY[_BiasOffsetProbe.name] = _BiasOffsetProbe
    yield _BiasOffsetProbe.name
    del method_base._REGISTRY[_BiasOffsetProbe.name]


def test_in_loop_methods_need_the_backbone_itself(offset_method, tiny_backbone):
    with pytest.raises(FrozenlensError, match="in the training loop"):
        build_method(offset_method, None, tiny_backbone.describe(), 3)


def test_protocol_trains_on_images_decoded_once(offset_method, tiny_task, tiny_backbone, monkeypatch):
    decoded = []
    original = ImageData.from_task.__func__

    def counting(cls, task, split, backbone, **kwargs):
        decoded.append(split)
        return original(cls, task, split, backbone, **kwargs)

    monkeypatch.setattr(ImageData, "from_task", classmethod(counting))
    before = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    cfg = _BiasOffsetProbe.train_defaults
    result = run_protocol(offset_method, None, None, load_task(tiny_task), tiny_backbone, train_config=cfg,
                          grid={"lr": [1e-2, 1e-3]}, seeds=(0,))
    assert sorted(decoded) == ["test", "trainval"]          # train/val come from trainval's images
    assert len(result.grid) == 2 and len(result.test_accuracies) == 1
    assert result.trainable_params == count_trainable(result.model) == tiny_backbone.dim * 4 + 3
    assert result.model.offset.abs().sum() > 0              # it trained
    assert all(p.grad is None for p in tiny_backbone.parameters())
    assert all(torch.equal(tiny_backbone.state_dict()[k], v) for k, v in before.items())


def test_fit_without_stored_taps_extracts_nothing_and_predict_feeds_images(
        offset_method, tiny_task, tiny_backbone, tmp_path, monkeypatch):
    def no_extraction(*args, **kwargs):
        raise AssertionError("an in-loop method alone must not extract taps")

    monkeypatch.setattr(api, "extract", no_extraction)
    report = api.fit(tiny_task, [offset_method], backbone=tiny_backbone, out=tmp_path / "run", progress=False)
    assert report.store is None and report.records[0]["store_bytes_per_image"] == 0
    folder = tmp_path / "run" / offset_method
    weights = load_file(str(folder / "adapter.safetensors"))
    assert set(weights) == {"offset", "head.weight", "head.bias"}   # nothing of the backbone
    assert json.loads((folder / "adapter.json").read_text())["taps"] == []
    assert json.loads((tmp_path / "run" / "results.json").read_text())["context"]["store"] is None

    monkeypatch.undo()
    linear = api.fit(tiny_task, ["linear:epochs=3"], backbone=tiny_backbone, out=tmp_path / "lin", progress=False)
    images = [i.path for i in load_task(tiny_task).split("test")[:5]]
    decoded, decode = [], api.preprocess
    monkeypatch.setattr(api, "preprocess", lambda *args: decoded.append(args) or decode(*args))
    both = api.predict([folder, adapter_folder(tmp_path / "lin", "linear:epochs=3")], images, backbone=tiny_backbone,
                       top_k=3)
    assert len(both) == 10
    assert len(decoded) == 1            # one decode per batch feeds both the taps and the in-loop adapter
    data = ImageData.from_paths(images, [0] * 5, 3, tiny_backbone)
    model = report.results[offset_method].model.eval()
    with torch.no_grad():
        expected = model({"images": data.images(torch.arange(5))}).softmax(-1)
    mine = [p for p in both if p.adapter == str(folder)]
    for row, prediction in zip(expected, mine):
        name, prob = prediction.top[0]
        assert prob == pytest.approx(float(row.max()), abs=1e-6)
        assert name == load_task(tiny_task).classes[int(row.argmax())]
    assert linear.store is not None


def test_fit_refuses_in_loop_methods_on_a_feature_server(offset_method, tiny_task, tiny_backbone):
    from frozenlens.store import TapSource

    class _Remote(TapSource):
        def describe(self):
            return tiny_backbone.describe()

        def compute_taps(self, paths, taps):  # pragma: no cover - never reached
            raise AssertionError

    with pytest.raises(FrozenlensError, match="--remote"):
        api.fit(tiny_task, [offset_method], backbone=_Remote(), progress=False)
