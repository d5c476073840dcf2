"""pt2e int8: accuracy vs fp32 on digits, ONNX/pt2e parity, int8 kernels really chosen by onnxruntime."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from automl.compress.quantization import pt2e
from automl.errors import ConfigError
from automl.runtime import OrtModel
from automl.tasks import get_task


@pytest.fixture(scope="module")
def digits():
    """A trained digits CNN, its calibration batches and its pt2e int8 (onnx target) version."""
    task = get_task("digits")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is faster on a shared machine
    try:
        torch.manual_seed(0)
        model = task.build_model("cnn", {"width": 16, "depth": 3})
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        for epoch in range(4):
            task.train_epoch(model, opt, task.train_loader(64, epoch))
        model.eval()
        calib = [x for _, (x, _) in zip(range(8), task.train_loader(32, seed=1))]
        converted = pt2e.quantize_pt2e(model, task.example_input(2), calib)
        yield task, model, calib, converted
    finally:
        torch.set_num_threads(threads)


def test_int8_accuracy_within_half_point_of_fp32(digits):
    task, model, _, converted = digits
    fp32 = task.evaluate(model, task.test_loader())
    int8 = task.evaluate(converted, task.test_loader())
    assert fp32 > 0.95
    assert abs(int8 - fp32) <= 0.005
    # Real int8 weights inside, not a float copy.
    assert any(p.dtype == torch.int8 for p in converted.state_dict().values())


def test_onnx_int8_matches_pt2e_and_uses_int8_kernels(digits, tmp_path):
    task, model, calib, converted = digits
    artifact = pt2e.deploy_pt2e(model, task.example_input(2), calib, tmp_path / "m.onnx", converted=converted)
    assert artifact.precision == "int8_pt2e" and artifact.runtime == "onnxruntime"
    assert artifact.notes["int8_ops"] == "QLinearConv:3"
    assert "Conv" not in artifact.notes["float_ops"]
    session = OrtModel(artifact.path)
    assert pt2e.parity(converted, session, task.test_loader(batch_size=64)) >= 0.99
    assert pt2e.parity(model, session, task.test_loader()) >= 0.98


def test_resnet_residual_adds_stay_int8(tmp_path):
    """A shared ReLU module and residual adds: every conv and add becomes a QLinear op."""
    torch.manual_seed(0)
    model = get_task("digits").build_model("resnet", {"width": 4, "stages": 2, "blocks": 1})
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8))  # realistic BN statistics
    model.eval()
    calib = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    converted = pt2e.quantize_pt2e(model, torch.randn(2, 1, 8, 8), calib)
    artifact = pt2e.deploy_pt2e(model, torch.randn(2, 1, 8, 8), calib, tmp_path / "r.onnx", converted=converted)
    assert artifact.notes["int8_ops"] == "QLinearAdd:2,QLinearConv:6"  # stem, 2 x 2 block convs, 1 projection
    assert artifact.notes["float_ops"] == "Gemm:1"  # only the tiny head stays float
    x = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        ref, fp32 = converted(x).numpy(), model(x).numpy()
    got = OrtModel(artifact.path)(x)
    spread = float(np.abs(fp32).max())
    assert np.abs(got - ref).max() < 0.05 * spread
    assert np.abs(ref - fp32).max() < 0.1 * spread


def test_per_tensor_weights(digits):
    task, model, calib, _ = digits
    converted = pt2e.quantize_pt2e(model, task.example_input(2), calib[:2], per_channel=False)
    targets = {n.target for n in converted.graph.nodes if n.op == "call_function"}
    assert torch.ops.quantized_decomposed.dequantize_per_channel.default not in targets
    assert abs(task.evaluate(converted, task.test_loader()) - task.evaluate(model, task.test_loader())) <= 0.01


def test_parity_counts_equal_argmax():
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    flipped = lambda x: -x  # noqa: E731
    loader = [(logits[:2], None), (logits[2:], None)]
    assert pt2e.parity(lambda x: x, lambda x: x.numpy(), loader) == 1.0
    assert pt2e.parity(lambda x: x, flipped, [logits[:1]]) == 0.0
    always_first = lambda x: torch.tensor([[1.0, 0.0]]).expand(len(x), 2)  # noqa: E731
    assert pt2e.parity(lambda x: x, always_first, [logits]) == 0.5
    with pytest.raises(ConfigError, match="loader"):
        pt2e.parity(lambda x: x, lambda x: x, [])


def test_user_errors(digits):
    task, model, calib, _ = digits
    with pytest.raises(ConfigError, match="target.*'tflite'.*onnx, inductor"):
        pt2e.quantize_pt2e(model, task.example_input(2), calib, target="tflite")
    with pytest.raises(ConfigError, match="QAT needs a training function"):
        pt2e.quantize_pt2e(model, task.example_input(2), calib, qat=True)
    with pytest.raises(ConfigError, match="no calibration batches"):
        pt2e.quantize_pt2e(model, task.example_input(2), [])
    with pytest.raises(ConfigError, match="runtime.*'tensorrt'"):
        pt2e.deploy_pt2e(model, task.example_input(2), calib, "x.onnx", runtime="tensorrt")


@pytest.mark.slow
def test_qat_fine_tune_keeps_accuracy(digits):
    task, model, _, _ = digits

    def fine_tune(prepared):
        opt = torch.optim.SGD(prepared.parameters(), lr=1e-3, momentum=0.9)
        for _, (x, y) in zip(range(10), task.train_loader(64, seed=2)):
            opt.zero_grad()
            nn.functional.cross_entropy(prepared(x), y).backward()
            opt.step()

    converted = pt2e.quantize_pt2e(model, task.example_input(2), None, qat=True, train=fine_tune)
    assert abs(task.evaluate(converted, task.test_loader()) - task.evaluate(model, task.test_loader())) <= 0.01


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")  # inside Inductor's oneDNN lowering
def test_inductor_and_aoti_forms_match_reference(digits, tmp_path):
    task, model, calib, _ = digits
    converted = pt2e.quantize_pt2e(model, task.example_input(2), calib, target="inductor")
    batch = 8
    compiled = pt2e.compile_inductor(converted, task.example_input(batch))
    artifact = pt2e.deploy_pt2e(model, task.example_input(batch), calib, tmp_path / "m.pt2", runtime="aoti",
                                converted=converted)
    assert artifact.runtime == "aoti" and artifact.notes["batch"] == "8"
    packaged = pt2e.load_aoti(artifact.path)
    loader = task.test_loader(batch_size=batch)  # 360 test images: every batch is full
    assert pt2e.parity(converted, compiled, loader) >= 0.99
    assert pt2e.parity(converted, packaged, loader) >= 0.99


class HSwishSE(nn.Module):
    """A conv read by float ops only: hard-swish written out (x * relu6(x + 3) / 6, as model zoos do) and
    a sigmoid channel gate; then a conv and the head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.conv2, self.head = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 10)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        x = x * nn.functional.relu6(x + 3.0) / 6.0
        x = x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.head(torch.relu(self.conv2(x)).mean((2, 3)))


def test_convs_read_by_float_ops_still_run_int8(tmp_path):
    """Their outputs are quantized too, so onnxruntime fuses every conv into QLinearConv (before, the
    hard-swish and gate convs ran in float between DQ and Q and the model deployed slower than fp32)."""
    torch.manual_seed(0)
    model = HSwishSE().eval()
    calib = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    artifact = pt2e.deploy_pt2e(model, torch.randn(2, 1, 8, 8), calib, tmp_path / "h.onnx")
    assert "QLinearConv:4" in artifact.notes["int8_ops"]
    assert "Conv" not in artifact.notes["float_ops"]
    x = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        fp32 = model(x).numpy()
    got = OrtModel(artifact.path)(x)
    assert np.abs(got - fp32).max() < 0.1 * float(np.abs(fp32).max())
