"""The modelled energy against hand-computed cases."""
import pytest

from automl.errors import ConfigError
from automl.hardware.energy import LayerCost, layer_energy_pj, mac_pj, model_energy_mj


def test_mac_energies():
    assert mac_pj("fp32") == pytest.approx(3.7 + 0.9)
    assert mac_pj("fp16") == pytest.approx(1.1 + 0.4)
    assert mac_pj("int8") == pytest.approx(0.2 + 0.1)          # int8 multiply, int32 accumulate
    assert mac_pj((4, 8)) == pytest.approx(0.1 + 0.1)          # half the multiplier bits
    assert mac_pj((2, 2)) == pytest.approx(0.2 / 16 + 0.1)


def test_layer_energy_by_hand():
    cost = LayerCost(macs=1000, weights=100, input_elems=64, output_elems=32)
    fp32 = layer_energy_pj(cost, "fp32")
    assert fp32["compute_pj"] == pytest.approx(1000 * 4.6)
    assert fp32["weights_pj"] == pytest.approx(100 * 640.0)
    assert fp32["activations_pj"] == pytest.approx(96 * 5.0)
    assert fp32["total_pj"] == pytest.approx(4600 + 64000 + 480)
    int8 = layer_energy_pj(cost, "int8")
    assert int8["weights_pj"] == pytest.approx(100 * 640.0 / 4)
    assert int8["activations_pj"] == pytest.approx(96 * 5.0 / 4)
    assert model_energy_mj([cost, cost], "fp32") == pytest.approx(2 * 69080 * 1e-9)


@pytest.mark.parametrize("bad", ["int4", (0, 8), (16, 8)])
def test_bad_precision(bad):
    with pytest.raises(ConfigError, match="precision"):
        mac_pj(bad)
