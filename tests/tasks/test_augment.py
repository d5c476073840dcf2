"""Shift augmentation of training batches."""
import pytest
import torch

from automl.errors import ConfigError
from automl.recipe import Recipe, apply_recipe
from automl.tasks.augment import AugmentedLoader, augmented, random_shift


def test_random_shift_moves_each_image_by_at_most_one_pixel_with_zero_fill():
    x = torch.zeros(200, 1, 5, 5)
    x[:, :, 2, 2] = 1.0  # one bright pixel in the centre
    out = random_shift(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and float(out.sum()) == 200.0  # the pixel never leaves the image
    rows, cols = torch.nonzero(out[:, 0], as_tuple=True)[1:]
    assert set(rows.tolist()) == {1, 2, 3} and set(cols.tolist()) == {1, 2, 3}  # all 9 offsets occur
    edge = torch.ones(50, 1, 4, 4)
    shifted = random_shift(edge, torch.Generator().manual_seed(1))
    moved = (shifted != edge).flatten(1).any(1)
    assert moved.any() and (shifted[moved] == 0).any()  # vacated border pixels are zeros
    with pytest.raises(ConfigError, match="needs image batches"):
        random_shift(torch.zeros(4, 10), torch.Generator())


def test_augmented_loader_is_reproducible_and_none_is_the_loader_itself():
    data = [(torch.randn(8, 1, 6, 6), torch.arange(8)) for _ in range(3)]
    assert augmented(data, "none") is data
    a = [x for x, _ in AugmentedLoader(data, "shift", seed=3)]
    b = [x for x, _ in AugmentedLoader(data, "shift", seed=3)]
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and len(AugmentedLoader(data, "shift")) == 3
    assert not all(torch.equal(p, x) for p, (x, _) in zip(a, data))


def test_recipe_trains_with_shift_augmentation(tmp_path):
    r = Recipe.loads("""
version: 1
task: digits
arch: {family: cnn, width: 16, depth: 2}
train: {epochs: 2, lr: 0.01, batch_size: 64, augment: shift}
""")
    assert r.train.augment == "shift" and r.to_dict()["train"]["augment"] == "shift"
    assert apply_recipe(r, tmp_path).metrics["accuracy"] > 0.4
