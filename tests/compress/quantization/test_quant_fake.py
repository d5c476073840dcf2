"""Fake quantization for training: STE gradients, LSQ step gradients, PACT clipping gradients."""
import math

import pytest
import torch

from automl.compress.quantization import qmath
from automl.compress.quantization.fake_quant import (LSQQuantizer, PACTQuantizer, STEQuantizer, grad_scale,
                                                    round_ste, ste_fake_quantize)
from automl.compress.quantization.observers import make_observer
from automl.errors import ConfigError, LifecycleError


def test_ste_forward_matches_fake_quantize_and_gradient_is_one_inside_zero_outside():
    scale, zp = qmath.qparams(-1.0, 1.0, 8)  # codes -128..127, step 1/127
    x = torch.tensor([-2.0, -1.0, -0.3, 0.0, 0.5, 1.0, 1.5], requires_grad=True)
    y = ste_fake_quantize(x, scale, zp, 8)
    assert torch.equal(y.detach(), qmath.fake_quantize(x.detach(), scale, zp, 8))
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_ste_per_channel_and_unsigned_asymmetric():
    scale, zp = qmath.qparams(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 3.0]), 2, symmetric=False, signed=False)
    x = torch.tensor([[0.4, 2.0], [1.2, -0.1]], requires_grad=True)  # axis 1 holds the channels
    y = ste_fake_quantize(x, scale, zp, 2, signed=False, axis=1)
    assert y.detach().flatten().tolist() == pytest.approx([1 / 3, 2.0, 1.0, 0.0])
    y.sum().backward()
    assert x.grad.tolist() == [[1.0, 1.0], [0.0, 1.0]]  # 1.2 > 1.0 clips; -0.1 rounds to code 0 (inside)


def test_round_ste_and_grad_scale():
    x = torch.tensor([0.4, 1.6], requires_grad=True)
    r = round_ste(x)
    r.sum().backward()
    assert r.tolist() == [0.0, 2.0] and x.grad.tolist() == [1.0, 1.0]
    s = torch.tensor(2.0, requires_grad=True)
    y = grad_scale(s, 0.25)
    (3 * y).backward()
    assert y.item() == 2.0 and s.grad.item() == pytest.approx(0.75)


def _lsq(bits, step, signed=True, channels=None):
    q = LSQQuantizer(bits, signed=signed, channels=channels)
    q._set_step(torch.tensor(step))
    return q


def test_lsq_forward_exact():
    q = _lsq(2, 0.5)  # signed 2 bits: levels -2..1
    x = torch.tensor([-3.0, -0.7, 0.2, 0.3, 2.0])
    assert q(x).tolist() == [-1.0, -0.5, 0.0, 0.5, 0.5]
    u = _lsq(2, 0.5, signed=False)  # unsigned: 0..3
    assert u(torch.tensor([-1.0, 0.6, 1.4, 9.0])).tolist() == [0.0, 0.5, 1.5, 1.5]


def test_lsq_step_gradient_matches_the_paper():
    q = _lsq(2, 0.5)
    x = torch.tensor([-3.0, -0.7, 0.2, 0.3, 2.0], requires_grad=True)
    q(x).sum().backward()
    # d x_q / d s: -Qn below, Qp above, round(x/s) - x/s inside; scaled by g = 1/sqrt(n * Qp)
    per_element = [-2.0, -1 + 1.4, 0 - 0.4, 1 - 0.6, 1.0]
    assert q.step.grad.item() == pytest.approx(sum(per_element) / math.sqrt(5 * 1))
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_lsq_per_channel_steps_get_their_own_gradients():
    torch.manual_seed(0)
    q = LSQQuantizer(4, channels=3)
    w = torch.randn(3, 2, 3, 3) * torch.tensor([0.1, 1.0, 10.0]).view(3, 1, 1, 1)
    q.init_from_tensor(w)
    expected = 2 * w.abs().reshape(3, -1).mean(1) / math.sqrt(7)
    assert q.step.detach().tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    out = q(w.requires_grad_())
    assert out.shape == w.shape
    ((out - 1.0) ** 2).sum().backward()
    assert q.step.grad.shape == (3,) and torch.all(q.step.grad != 0)
    codes = out.detach() / q.step.detach().view(3, 1, 1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.min() >= -8 and codes.max() <= 7


def test_lsq_init_from_observer_uses_the_observed_scale():
    obs = make_observer("minmax")
    obs.update(torch.tensor([-1.0, 3.5]))
    q = LSQQuantizer(4)
    q.init_from_observer(obs)
    assert q.step.item() == pytest.approx(3.5 / 7) and q.initialized
    u = LSQQuantizer(4, signed=False)
    obs = make_observer("minmax")
    obs.update(torch.tensor([0.0, 3.0]))
    u.init_from_observer(obs)
    assert u.step.item() == pytest.approx(3.0 / 15)


def test_lsq_initialises_from_the_first_training_batch_and_refuses_eval_before():
    q = LSQQuantizer(8)
    with pytest.raises(LifecycleError, match="calibrate first"):
        q.eval()(torch.ones(3))
    q.train()(torch.tensor([1.0, -1.0]))
    assert q.initialized and q.step.item() == pytest.approx(2 * 1.0 / math.sqrt(127))


def test_pact_forward_and_alpha_gradient():
    q = PACTQuantizer(2, alpha=1.0)  # unsigned, 3 steps of 1/3
    x = torch.tensor([-0.5, 0.2, 0.5, 1.5, 2.0], requires_grad=True)
    y = q(x)
    assert y.tolist() == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0])
    y.sum().backward()
    assert q.alpha.grad.item() == pytest.approx(2.0)  # dy/dalpha = 1 for the two x >= alpha
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]


def test_signed_pact_clips_both_sides():
    q = PACTQuantizer(3, signed=True, alpha=2.0)  # 3 steps either side, step 2/3
    x = torch.tensor([-5.0, -0.4, 0.9, 3.0], requires_grad=True)
    y = q(x)
    assert y.tolist() == pytest.approx([-2.0, -2 / 3, 2 / 3, 2.0])
    y.sum().backward()
    assert q.alpha.grad.item() == pytest.approx(0.0)  # -1 from the low clip, +1 from the high clip
    (q(torch.tensor([-5.0])).sum()).backward()
    assert q.alpha.grad.item() == pytest.approx(-1.0)


def test_pact_init_from_observer():
    obs = make_observer("minmax")
    obs.update(torch.tensor([0.0, 2.5]))
    q = PACTQuantizer(4)
    q.init_from_observer(obs)
    assert q.alpha.item() == pytest.approx(2.5) and q.initialized
    scale, zp = q.qparams()
    assert scale.item() == pytest.approx(2.5 / 15) and zp.item() == 0


def test_ste_quantizer_dynamic_weights_and_frozen_activations():
    torch.manual_seed(0)
    w = torch.randn(4, 6)
    wq = STEQuantizer(4, axis=0, observer=make_observer("minmax", axis=0), dynamic=True)
    assert torch.equal(wq(w), qmath.fake_quantize_minmax(w, 4, axis=0))
    assert torch.equal(wq.eval()(w * 2), qmath.fake_quantize_minmax(w * 2, 4, axis=0))  # dynamic in eval too
    aq = STEQuantizer(8, signed=False, symmetric=False, observer=make_observer("moving_average", momentum=1.0))
    with pytest.raises(LifecycleError):
        aq.eval()(torch.ones(2))
    aq.train()(torch.tensor([0.0, 2.55]))
    frozen = aq.eval()(torch.tensor([0.0, 5.0]))  # eval keeps the training grid: 5.0 saturates at 2.55
    assert frozen.tolist() == pytest.approx([0.0, 2.55])


@pytest.mark.parametrize("make", [lambda: LSQQuantizer(1), lambda: PACTQuantizer(9), lambda: STEQuantizer(32)])
def test_quantizers_validate_bits(make):
    with pytest.raises(ConfigError) as err:
        make()
    assert err.value.key == "bits"
