"""The digits task, the CNN family, model statistics and user tasks given as 'module:function'."""
import itertools
import textwrap

import pytest
import torch
import torch.nn as nn

from automl.arch import ARCHS
from automl.errors import ConfigError, UnknownNameError
from automl.modelstats import count_macs, count_nonzero, count_params
from automl.tasks import DigitsTask, TensorClassificationTask, get_task


@pytest.fixture(scope="module")
def digits():
    return get_task("digits")


def test_digits_split_sizes(digits):
    sizes = {name: (len(x), len(y)) for name, (x, y) in digits.splits.items()}
    assert sizes == {"train": (1077, 1077), "val": (360, 360), "test": (360, 360)}
    assert digits.input_shape == (1, 8, 8)
    assert digits.num_classes == 10
    assert digits.name == "digits"


def test_digits_split_is_stratified(digits):
    for name, (_, y) in digits.splits.items():
        counts = torch.bincount(y, minlength=10)
        assert (counts > 0).all(), name
        share = counts.float() / len(y)
        assert share.min() > 0.08 and share.max() < 0.12, (name, counts.tolist())


def test_digits_splits_are_disjoint_and_standardised(digits):
    flat = {name: {tuple(row.flatten().tolist()) for row in x} for name, (x, _) in digits.splits.items()}
    # (a few digit images are exact duplicates in the data set; almost no row is shared)
    assert len(flat["train"] & flat["test"]) <= 5 and len(flat["train"] & flat["val"]) <= 5
    x_train = digits.splits["train"][0]
    assert abs(float(x_train.mean())) < 1e-4 and abs(float(x_train.std()) - 1.0) < 1e-3


def test_digits32_is_digits_as_rgb_32px(digits):
    big = get_task("digits32")
    assert big.input_shape == (3, 32, 32) and big.num_classes == 10
    for name in ("train", "val", "test"):
        (x, y), (x8, y8) = big.splits[name], digits.splits[name]
        assert torch.equal(y, y8) and x.shape == (len(x8), 3, 32, 32)
        # every pixel a 4x4 block in 3 equal channels, standardised like the 8x8 images
        assert torch.equal(x[:, 0], x[:, 2]) and torch.allclose(x[:, 1, ::4, ::4], x8[:, 0], atol=1e-5)
        assert torch.equal(x[:, :, 1::4, 3::4], x[:, :, ::4, ::4])


def test_digits_is_deterministic():
    a, b = DigitsTask(), DigitsTask()
    for name in ("train", "val", "test"):
        assert torch.equal(a.splits[name][0], b.splits[name][0])
        assert torch.equal(a.splits[name][1], b.splits[name][1])


def test_loaders(digits):
    batches = list(digits.train_loader(batch_size=100, seed=3))
    assert len(batches) == 11 and batches[0][0].shape == (100, 1, 8, 8)
    again = next(iter(digits.train_loader(batch_size=100, seed=3)))
    assert torch.equal(batches[0][1], again[1])  # the seed fixes the shuffle
    other = next(iter(digits.train_loader(batch_size=100, seed=4)))
    assert not torch.equal(batches[0][1], other[1])
    assert sum(len(y) for _, y in digits.val_loader()) == 360
    assert digits.example_input(3).shape == (3, 1, 8, 8)


@pytest.mark.parametrize("pooling, depth", itertools.product(["max", "avg", "stride", "none"], [1, 2, 3, 4]))
def test_cnn_builds_every_pooling_and_depth(digits, pooling, depth):
    model = digits.build_model("cnn", {"width": 8, "depth": depth, "pooling": pooling, "kernel": 3})
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth
    assert model(digits.example_input(5)).shape == (5, 10)


def test_cnn_width_growth_and_kernel(digits):
    model = digits.build_model("cnn", {"width": 8, "depth": 3, "pooling": "max", "kernel": 5, "growth": 2.0})
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 16]  # grows after each downsampling
    assert all(c.kernel_size == (5, 5) for c in convs)
    assert model.head.in_features == 16
    dropout = digits.build_model("cnn", {"dropout": 0.5})
    assert isinstance(dropout.head[0], nn.Dropout)


def test_cnn_rejects_bad_params(digits):
    with pytest.raises(ConfigError, match=r"arch\.kernel: not one of the allowed values"):
        digits.build_model("cnn", {"kernel": 4})
    with pytest.raises(ConfigError, match=r"arch\.widht: unknown key"):
        digits.build_model("cnn", {"widht": 4})
    with pytest.raises(UnknownNameError, match="unknown architecture family"):
        digits.build_model("resnett", {})
    assert ARCHS.names() == ["cnn", "mlp", "mobilenetv2", "resnet"]


def test_train_epoch_and_evaluate(digits):
    model = digits.build_model("cnn", {"width": 8, "depth": 1})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = next(iter(digits.train_loader(batch_size=64, seed=0)))
    calls = []
    loader = [(x, y)]
    loss = digits.train_epoch(model, optimizer, loader, after_step=lambda: calls.append(1))
    assert calls == [1] and torch.isfinite(torch.tensor(loss))
    acc = digits.evaluate(model, digits.val_loader())
    assert 0.0 <= acc <= 1.0
    # evaluate also takes a plain callable returning numpy logits
    perfect = digits.evaluate(lambda xb: torch.nn.functional.one_hot(torch.zeros(len(xb), dtype=torch.long), 10)
                              .numpy(), [(x, torch.zeros(len(x), dtype=torch.long))])
    assert perfect == 1.0


# --- model statistics ------------------------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1, bias=True)   # 2x5x5 -> 3x5x5
        self.conv2 = nn.Conv2d(3, 6, kernel_size=(1, 3), stride=(1, 2), groups=3, bias=False)  # -> 6x5x2
        self.fc = nn.Linear(6 * 5 * 2, 4)

    def forward(self, x):
        return self.fc(self.conv2(self.conv(x)).flatten(1))


def test_count_params_by_hand():
    model = Tiny()
    conv = 3 * 2 * 3 * 3 + 3          # 57
    conv2 = 6 * (3 // 3) * 1 * 3      # 18, no bias
    fc = 60 * 4 + 4                   # 244
    assert count_params(model) == conv + conv2 + fc == 319


def test_count_macs_by_hand():
    model = Tiny()
    conv = (3 * 5 * 5) * (2 * 3 * 3)       # outputs x (in_channels x kernel) = 75 x 18 = 1350
    conv2 = (6 * 5 * 2) * (1 * 1 * 3)      # grouped: in_channels / groups = 1; 60 x 3 = 180
    fc = 4 * 60                            # 240
    assert count_macs(model, torch.zeros(1, 2, 5, 5)) == conv + conv2 + fc == 1770
    assert count_macs(model, torch.zeros(4, 2, 5, 5)) == 1770  # per sample


def test_count_macs_single_layers():
    assert count_macs(nn.Linear(7, 3), torch.zeros(2, 7)) == 21
    assert count_macs(nn.Conv2d(1, 1, 3), torch.zeros(1, 1, 4, 4)) == 2 * 2 * 9
    assert count_macs(nn.Conv1d(2, 4, 3, padding=1), torch.zeros(1, 2, 10)) == 4 * 10 * 2 * 3


class TwoMapConv(nn.Conv2d):
    """An octave conv (pytorchcv): a Conv2d subclass returning two maps."""

    def forward(self, x):
        y = super().forward(x)
        return y, y[:, :, ::2, ::2]


def test_count_macs_of_a_conv_returning_several_maps():
    outputs = 4 * 4 * 4 + 4 * 2 * 2            # both maps' elements, each costing in_channels x kernel
    assert count_macs(TwoMapConv(1, 4, 3, padding=1), torch.zeros(1, 1, 4, 4)) == outputs * 9


def test_count_macs_keeps_mode_and_hooks():
    model = Tiny().train()
    count_macs(model, torch.zeros(1, 2, 5, 5))
    assert model.training
    assert not model.conv._forward_hooks and not model.fc._forward_hooks
    model.eval()
    count_macs(model, torch.zeros(1, 2, 5, 5))
    assert not model.training


def test_count_nonzero():
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, 1] = 3.0
        model.bias.fill_(1.0)
    assert count_nonzero(model) == 3
    assert count_params(model) == 10


def test_digits_cnn_macs(digits):
    # width 4, depth 1, kernel 3, pooling none: conv 4x8x8 outputs x 1x3x3, head 10 x 4.
    model = digits.build_model("cnn", {"width": 4, "depth": 1, "pooling": "none", "kernel": 3})
    assert count_macs(model, digits.example_input(1)) == 4 * 64 * 9 + 10 * 4
    assert count_params(model) == 4 * 9 + 2 * 4 + (4 * 10 + 10)  # conv (no bias), BN, head


# --- user tasks ------------------------------------------------------------------------------

USER_MODULE = """
import numpy as np
from automl.tasks import TensorClassificationTask


class Blobs(TensorClassificationTask):
    name = "blobs"

    def __init__(self):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(30, 1, 4, 4)).astype("float32")
        y = np.arange(30) % 3
        super().__init__(x[:20], y[:20], x[20:25], y[20:25], x[25:], y[25:])


def make():
    return Blobs()


def not_a_task():
    return {"name": "nope"}


def broken():
    raise RuntimeError("data file missing")


value = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"user_task_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_get_task_from_module_function(user_module):
    task = get_task(f"{user_module}:make")
    assert isinstance(task, TensorClassificationTask)
    assert task.name == "blobs" and task.input_shape == (1, 4, 4) and task.num_classes == 3
    model = task.build_model("cnn", {"width": 4, "depth": 2})
    assert model(task.example_input(2)).shape == (2, 3)


def test_get_task_bad_module():
    with pytest.raises(ConfigError) as info:
        get_task("no_such_module_xyz:make", file="s.yaml")
    msg = str(info.value)
    assert msg.startswith("s.yaml: task: cannot import task module 'no_such_module_xyz'")
    assert "(got 'no_such_module_xyz:make')" in msg
    assert "make the module importable" in msg


@pytest.mark.parametrize("attr", ["missing", "value", ""])
def test_get_task_missing_function(user_module, attr):
    with pytest.raises(ConfigError) as info:
        get_task(f"{user_module}:{attr}")
    msg = str(info.value)
    assert f"module '{user_module}' has no callable '{attr}'" in msg
    assert "name a function that returns a Task" in msg


def test_get_task_returning_non_task(user_module):
    with pytest.raises(ConfigError) as info:
        get_task(f"{user_module}:not_a_task")
    msg = str(info.value)
    assert "returned an object that is not a Task" in msg
    assert "build_model" in msg and "num_classes" in msg
    assert "(got 'dict')" in msg
    assert "TensorClassificationTask" in msg


def test_get_task_builtin_names():
    with pytest.raises(UnknownNameError) as info:
        get_task("digit")
    assert "did you mean 'digits'?" in str(info.value)
    for bad in ("", None, 5):
        with pytest.raises(ConfigError, match="expected a task name"):
            get_task(bad)


def test_get_task_factory_error_is_a_config_error(user_module):
    with pytest.raises(ConfigError, match=r"task factory '.*:broken' raised RuntimeError: data file missing"):
        get_task(f"{user_module}:broken")


def test_get_task_module_with_syntax_error(tmp_path, monkeypatch):
    (tmp_path / "bad_syntax_task.py").write_text("def make(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="cannot import task module 'bad_syntax_task'"):
        get_task("bad_syntax_task:make")
