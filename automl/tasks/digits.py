"""scikit-learn's bundled 8x8 digits (1,797 images): the embedded default task. No download."""
from __future__ import annotations

import numpy as np

from automl.tasks.base import TensorClassificationTask

SPLIT_SEED = 0  # the split is fixed: every trial and every `apply` sees the same samples


class DigitsTask(TensorClassificationTask):
    """60/20/20 stratified train/val/test split, standardised with training statistics."""

    name = "digits"

    def __init__(self, val_fraction: float = 0.2, test_fraction: float = 0.2):
        # imported here: scikit-learn (with scipy) costs about 0.8 s, which every Ray trial worker
        # that receives a built task would otherwise pay on start-up
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        data = load_digits()
        x = self.images(data.images.astype(np.float32) / 16.0)
        y = data.target.astype(np.int64)
        x_rest, x_test, y_rest, y_test = train_test_split(
            x, y, test_size=test_fraction, stratify=y, random_state=SPLIT_SEED)
        x_train, x_val, y_train, y_val = train_test_split(
            x_rest, y_rest, test_size=val_fraction / (1.0 - test_fraction), stratify=y_rest,
            random_state=SPLIT_SEED)
        mean, std = float(x_train.mean()), float(x_train.std())
        norm = lambda a: (a - mean) / std  # noqa: E731
        super().__init__(norm(x_train), y_train, norm(x_val), y_val, norm(x_test), y_test)

    @staticmethod
    def images(x: np.ndarray) -> np.ndarray:
        return x[:, None, :, :]


class Digits32Task(DigitsTask):
    """The same digits and split as RGB 32x32 images (each pixel a 4x4 block, in 3 equal channels): a
    real task whose inputs are large enough for layer costs to outweigh a runtime's per-call overhead,
    e.g. to profile and validate MobileNetV2-style spaces."""

    name = "digits32"

    @staticmethod
    def images(x: np.ndarray) -> np.ndarray:
        big = x.repeat(4, axis=1).repeat(4, axis=2)[:, None, :, :]
        return np.ascontiguousarray(np.repeat(big, 3, axis=1))
