"""BN folding: the fused model equals the unfused one within 1e-5 and really has fewer layers."""
import pytest
import torch
import torch.nn as nn

from automl.compress.quantization.fusion import fold_bn_into, fuse_bn
from automl.tasks import get_task


def _randomise_bn(model):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def test_fold_conv_bn_exact_small_case():
    conv = nn.Conv2d(1, 1, 1, bias=False)
    conv.weight.data.fill_(2.0)
    bn = nn.BatchNorm2d(1).eval()
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(4.0 - bn.eps)
    bn.weight.data.fill_(3.0)
    bn.bias.data.fill_(0.5)
    fused = fold_bn_into(conv, bn)
    # y = 3 * (2x - 1) / 2 + 0.5 = 3x - 1
    assert fused.weight.item() == pytest.approx(3.0)
    assert fused.bias.item() == pytest.approx(-1.0)


@pytest.mark.parametrize("params", [{"width": 8, "depth": 3, "pooling": "max"}, {"width": 4, "depth": 2, "pooling": "stride"}])
def test_fuse_cnn_matches_unfused(params):
    model = _randomise_bn(get_task("digits").build_model("cnn", params))
    fused, folded = fuse_bn(model)
    assert len(folded) == params["depth"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


def test_linear_bn1d_and_unfoldable_bn():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4)
            self.bn = nn.BatchNorm1d(4)
            self.fc2 = nn.Linear(4, 4)
            self.bn2 = nn.BatchNorm1d(4)  # fc2's output is also read by the residual: not foldable

        def forward(self, x):
            h = torch.relu(self.bn(self.fc(x)))
            y = self.fc2(h)
            return self.bn2(y) + y

    model = _randomise_bn(Net())
    fused, folded = fuse_bn(model)
    assert folded == ["bn"]
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)
