"""Early exit: segmentation of our families, exits really taken, calibration, cost, ONNX runner parity."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from automl.compress.early_exit.calibrate import calibrate_thresholds
from automl.compress.early_exit.model import (EarlyExitModel, check_thresholds, confidence, early_exit_loss,
                                              exit_indices, expected_cost, segments_of)
from automl.errors import ConfigError


@pytest.fixture(scope="module")
def trained(task):
    """A small cnn with exits after blocks 0 and 1, trained jointly for a few epochs."""
    torch.manual_seed(0)
    model = task.build_model("cnn", {"width": 16, "depth": 3})
    ee = EarlyExitModel.from_model(model, exits=[0, 1], example=task.example_input(2), head_pool=2)
    opt = torch.optim.Adam(ee.parameters(), 3e-3)
    for epoch in range(4):
        ee.train()
        for x, y in task.train_loader(64, epoch):
            opt.zero_grad()
            early_exit_loss(ee(x), y).backward()
            opt.step()
    return ee.eval()


@pytest.mark.parametrize("family,params,n_blocks", [
    ("cnn", {"width": 4, "depth": 3}, 3),
    ("resnet", {"width": 4, "stages": 2, "blocks": 2}, 5),
    ("mobilenetv2", {"width_mult": 0.25, "stages": 2, "blocks": 1, "expansion": 2}, 3),
])
def test_segments_reproduce_the_model(task, family, params, n_blocks):
    torch.manual_seed(0)
    model = task.build_model(family, params).eval()
    blocks, head = segments_of(model)
    assert len(blocks) == n_blocks
    x = task.example_input(4)
    h = x
    for block in blocks:
        h = block(h)
    assert torch.allclose(head(h), model(x), atol=1e-6)


def test_segments_of_unknown_model_says_how_to_provide_them():
    with pytest.raises(ConfigError, match=r"early_exit.model: .*\(got 'Sequential'\).*EarlyExitModel\(blocks, head"):
        segments_of(nn.Sequential(nn.Linear(2, 2)))


def test_forward_returns_every_exit_and_shares_modules(task):
    torch.manual_seed(0)
    model = task.build_model("resnet", {"width": 4, "stages": 2, "blocks": 2})
    ee = EarlyExitModel.from_model(model, exits=[0, 2], example=task.example_input(2), head_size=8)
    outs = ee.eval()(task.example_input(3))
    assert [tuple(o.shape) for o in outs] == [(3, 10)] * 3
    assert ee.blocks_per_segment == [1, 2, 2]
    assert torch.allclose(outs[-1], model.eval()(task.example_input(3)), atol=1e-6)


@pytest.mark.parametrize("exits", [[3], [-1], [1, 1]])
def test_bad_exit_positions(task, exits):
    model = task.build_model("cnn", {"width": 4, "depth": 3})
    with pytest.raises(ConfigError, match="early_exit.positions"):
        EarlyExitModel.from_model(model, exits=exits, example=task.example_input(2))


def test_early_exit_loss_is_weighted_sum():
    torch.manual_seed(0)
    outs, y = [torch.randn(5, 3) for _ in range(2)], torch.tensor([0, 1, 2, 0, 1])
    expected = 0.3 * F.cross_entropy(outs[0], y) + 1.0 * F.cross_entropy(outs[1], y)
    assert torch.isclose(early_exit_loss(outs, y, [0.3, 1.0]), expected)
    with pytest.raises(ConfigError, match="expected 2 exit weights"):
        early_exit_loss(outs, y, [1.0])


def test_confidence_criteria_hand_cases():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0, 0.0]])
    assert torch.allclose(confidence(logits, "max_softmax"), torch.tensor([0.25, 0.5]))
    p = torch.tensor([0.5, 1 / 6, 1 / 6, 1 / 6])
    entropy = -(p * p.log()).sum()
    assert torch.allclose(confidence(logits, "entropy"), torch.stack([torch.tensor(0.0), 1 - entropy / math.log(4)]),
                          atol=1e-6)
    with pytest.raises(ConfigError, match="unknown exit criterion"):
        confidence(logits, "margin")


def test_exit_indices_and_threshold_checks():
    conf = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.5], [0.3, 0.3, 0.3]])
    assert exit_indices(conf, [0.5, 0.5]).tolist() == [0, 1, 2]  # 0.5 is not > 0.5
    assert check_thresholds(0.7, 2) == [0.7, 0.7]
    with pytest.raises(ConfigError, match="expected 2 thresholds"):
        check_thresholds([0.5], 2)
    with pytest.raises(ConfigError, match=r"\[0, 1\].*\(got 1.5\)"):
        check_thresholds([0.5, 1.5], 2)


def test_expected_cost_exact():
    # reach probabilities 1, 0.5, 0.2 -> 1*1 + 0.5*2 + 0.2*3
    assert expected_cost([1.0, 2.0, 3.0], [0.5, 0.3, 0.2]) == pytest.approx(2.6)
    assert expected_cost([4.0, 6.0], [0.0, 1.0]) == pytest.approx(10.0)
    assert expected_cost([4.0, 6.0], [1.0, 0.0]) == pytest.approx(4.0)
    with pytest.raises(ConfigError, match="sum to 1"):
        expected_cost([1.0, 2.0], [0.5, 0.4])
    with pytest.raises(ConfigError, match="one exit probability per segment"):
        expected_cost([1.0, 2.0], [1.0])


def test_exits_are_taken_and_skip_blocks(task, trained):
    x = task.splits["test"][0][:20]
    full = trained(x)[-1]
    trained.reset_counters()
    logits, taken = trained.infer(x, [1.0, 1.0])  # max softmax never exceeds 1: no exit taken
    assert taken.tolist() == [2] * 20
    assert trained.blocks_executed == 3 * 20
    assert torch.allclose(logits, full, atol=1e-5)
    trained.reset_counters()
    logits, taken = trained.infer(x, [0.0, 0.0])  # every sample leaves at the first exit
    assert taken.tolist() == [0] * 20
    assert trained.blocks_executed == 1 * 20
    trained.reset_counters()
    _, taken = trained.infer(x[:1], [0.0, 0.0])  # batch-1 fast path
    assert taken.tolist() == [0] and trained.blocks_executed == 1


@pytest.mark.parametrize("criterion", ["max_softmax", "entropy"])
def test_batched_inference_equals_per_sample(task, trained, criterion):
    x = task.splits["test"][0][:60]
    with torch.no_grad():
        conf = [confidence(o, criterion) for o in trained(x)]
    thresholds = [float(conf[0].median()), float(conf[1].median())]  # a real mix of exits
    trained.reset_counters()
    logits, taken = trained.infer(x, thresholds, criterion)
    batched_blocks = trained.blocks_executed
    trained.reset_counters()
    singles = [trained.infer(x[i:i + 1], thresholds, criterion) for i in range(len(x))]
    assert len(set(taken.tolist())) == 3
    assert taken.tolist() == [int(t) for _, t in singles]
    assert torch.allclose(logits, torch.cat([lg for lg, _ in singles]), atol=1e-5)
    assert batched_blocks == trained.blocks_executed < 3 * len(x)


def test_calibration_meets_its_target(task, trained):
    cal = calibrate_thresholds(trained, task.val_loader(), 0.005)
    assert cal.accuracy >= cal.final_accuracy - 0.005
    assert sum(cal.exit_fractions) == pytest.approx(1.0)
    assert cal.exit_fractions[0] + cal.exit_fractions[1] > 0.5  # exits do the work
    # The real inference path reproduces the calibrated accuracy and exit distribution.
    x, y = task.splits["val"]
    logits, taken = trained.infer(x, cal.thresholds)
    assert float((logits.argmax(1) == y).float().mean()) == pytest.approx(cal.accuracy, abs=1e-6)
    assert (torch.bincount(taken, minlength=3).float() / len(y)).tolist() == pytest.approx(cal.exit_fractions)
    with pytest.raises(ConfigError, match="max_accuracy_drop"):
        calibrate_thresholds(trained, task.val_loader(), 5.0)


def test_onnx_runner_agrees_with_pytorch(task, trained, tmp_path):
    from automl.compress.early_exit.export import EarlyExitRunner, export_early_exit

    thresholds = calibrate_thresholds(trained, task.val_loader(), 0.005).thresholds
    export_early_exit(trained, task.example_input(2), tmp_path, thresholds)
    runner = EarlyExitRunner.load(tmp_path)
    assert runner.thresholds == pytest.approx(list(thresholds))
    x = task.splits["test"][0]
    logits, taken = trained.infer(x, thresholds)
    ort_logits, ort_taken = runner(x)
    assert len(set(taken.tolist())) >= 2
    assert np.mean(ort_logits.argmax(1) == logits.argmax(1).numpy()) >= 0.99
    assert np.mean(ort_taken == taken.numpy()) >= 0.99
    assert np.abs(ort_logits - logits.numpy()).max() < 1e-3
    runner.segments_executed = 0
    single = [runner(x[i:i + 1].numpy()) for i in range(len(x))]
    assert np.mean(np.array([int(t[0]) for _, t in single]) == ort_taken) >= 0.99
    assert runner.segments_executed == int((ort_taken + 1).sum())
    never = EarlyExitRunner.load(tmp_path, thresholds=[1.0, 1.0])
    assert (never(x)[1] == 2).all()


def test_segment_macs_add_up_to_the_backbone(task):
    from automl.compress.early_exit.model import segment_macs
    from automl.modelstats import count_macs

    torch.manual_seed(0)
    model = task.build_model("cnn", {"width": 4, "depth": 3})
    ee = EarlyExitModel.from_model(model, exits=[0, 1], example=task.example_input(2))
    costs = segment_macs(ee, task.example_input(1))
    heads = sum(h.net[-1].in_features * 10 for h in ee.exit_heads[:-1])  # pool -> Linear exit heads
    assert sum(costs) - heads == count_macs(model, task.example_input(1))
    assert expected_cost(costs, [1.0, 0.0, 0.0]) == costs[0]


def test_positions_from_config(task):
    from automl.compress.early_exit.model import EarlyExitConfig, default_positions, early_exit_from_config
    from automl.configs import parse_config
    from automl.validate import Where

    assert default_positions(3, 1) == [1] and default_positions(3, 2) == [0, 1]
    assert default_positions(7, 2) == [1, 4] and default_positions(4, 0) == []
    with pytest.raises(ConfigError, match="at most 2 early exits"):
        default_positions(3, 3)
    model = task.build_model("resnet", {"width": 4, "stages": 2, "blocks": 2})
    config = parse_config(EarlyExitConfig, {"exits": 2, "head_pool": 2}, Where(key="early_exit"))
    assert early_exit_from_config(config, model, task.example_input(2)).exit_after == [1, 2]
    config = parse_config(EarlyExitConfig, {"positions": ["0", "3"]}, Where(key="early_exit"))
    assert early_exit_from_config(config, model, task.example_input(2)).exit_after == [0, 3]
    with pytest.raises(ConfigError, match=r"early_exit.positions: exit positions are block indices \(got \['x'\]\)"):
        early_exit_from_config(EarlyExitConfig(positions=("x",)), model, task.example_input(2))
