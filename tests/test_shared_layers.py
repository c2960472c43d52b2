"""The mechanisms methods share: one LoRA, one group-lasso selection, one stratified split."""

from __future__ import annotations

import numpy as np
import torch

from frozenlens.data.split import class_permutations, holdout_count, stratified_indices
from frozenlens.methods.layers import FeatureHead, LoRALinear, lora_delta, strongest_features
from frozenlens.methods.petl.adapters import LoRAUpdate
from frozenlens.train.data import stratified_holdout


def test_petl_lora_and_lora_linear_are_the_same_update() -> None:
    generator = torch.Generator().manual_seed(0)
    dim, rank = 8, 2
    update = LoRAUpdate(dim, rank, alpha=4.0, targets="qv")
    with torch.no_grad():
        update.up.copy_(torch.randn(update.up.shape, generator=generator))
    x = torch.randn(3, 5, dim, generator=generator)
    out = update(x)
    assert out.shape == (3, 5, 3 * dim) and torch.equal(out[..., dim:2 * dim], torch.zeros(3, 5, dim))
    for index, part in enumerate("qv"):
        linear = LoRALinear(dim, dim, rank, alpha=4.0)
        with torch.no_grad():
            linear.weight.zero_()
            linear.lora_a.copy_(update.down[index])
            linear.lora_b.copy_(update.up[index])
        start = "qkv".index(part) * dim
        torch.testing.assert_close(out[..., start:start + dim], linear(x))
        torch.testing.assert_close(linear(x), lora_delta(x, linear.lora_a, linear.lora_b, 2.0))
    fresh = LoRAUpdate(dim, rank, alpha=4.0, targets="qkv")
    assert torch.equal(fresh(x), torch.zeros(3, 5, 3 * dim))   # B = 0 at the start
    assert not LoRALinear(dim, dim, rank).lora_b.any() and not LoRALinear(dim, dim, rank).weight.requires_grad


def test_strongest_features_and_feature_head() -> None:
    weight = torch.tensor([[0.0, 3.0, 0.1, -2.0], [0.0, 0.0, 0.1, 2.0]])
    assert strongest_features(weight, 2).tolist() == [1, 3]
    head = FeatureHead(torch.nn.Linear(4, 2), lasso=0.5, selected=None)
    assert torch.isclose(head.regularization(), 0.5 * head.linear.weight.norm(dim=0).sum())
    kept = FeatureHead(torch.nn.Linear(2, 2), selected=torch.tensor([1, 3]))
    x = torch.randn(5, 4)
    assert torch.equal(kept({"features": x}), kept.linear(x[:, [1, 3]]))
    assert kept.regularization() == 0


def test_one_stratified_split() -> None:
    labels = np.array([0] * 10 + [1] * 5 + [2] * 1 + [1] * 5)
    kept, held = stratified_indices(labels, 0.25, seed=3)
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[held], minlength=3).tolist() == [holdout_count(10, 0.25), holdout_count(10, 0.25), 0]
    assert holdout_count(10, 0.25) == 3 and holdout_count(1, 0.5) == 0 and holdout_count(2, 0.01) == 1
    permutations = class_permutations(labels, 3)
    assert held.tolist() == sorted(p for perm in permutations.values() for p in perm[:holdout_count(len(perm), 0.25)])
    t_kept, t_held = stratified_holdout(torch.as_tensor(labels), 0.25, 3)
    assert t_kept.tolist() == kept.tolist() and t_held.tolist() == held.tolist()


def test_task_loader_split_is_the_same_split() -> None:
    """frozenlens.data.tasks.stratified_split (derived val splits) draws exactly as stratified_indices."""
    from pathlib import Path

    from frozenlens.data import ImageItem, stratified_split

    labels = np.random.RandomState(0).randint(0, 4, 50)
    items = [ImageItem(Path(f"{i}.png"), int(label)) for i, label in enumerate(labels)]
    train, val = stratified_split(items, 0.2, seed=7)
    kept, held = stratified_indices(labels, 0.2, seed=7)
    assert [int(i.path.stem) for i in val] == held.tolist() and [int(i.path.stem) for i in train] == kept.tolist()
