"""int8_ptq on residual nets: every conv and residual add runs in int8 in onnxruntime, accuracy holds."""
import collections
import copy
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from automl.compress import ApplyContext, get_method
from automl.configs import parse_config
from automl.recipe import Recipe
from automl.recipe.apply import train_with_stages
from automl.runtime import OrtModel, export_onnx
from automl.validate import Where

RESNET = {"width": 8, "stages": 2, "blocks": 1}


@pytest.fixture(scope="module")
def resnet(task):
    """A tiny ResNet (one identity and one projection shortcut) trained for 3 epochs."""
    recipe = Recipe.from_dict({"version": 1, "task": "digits", "arch": {"family": "resnet", **RESNET},
                               "train": {"epochs": 3, "lr": 0.01, "seed": 0}, "stages": []})
    model, _ = train_with_stages(recipe, task, ApplyContext(task=task, work_dir=".", epochs=3))
    return model.eval()


@pytest.fixture(scope="module")
def fp32(resnet, task, tmp_path_factory):
    return export_onnx(resnet, task.example_input(1), tmp_path_factory.mktemp("fp32") / "model.onnx")


def deploy(fp32_artifact, task, tmp_path, **config):
    info = get_method("int8_ptq")
    handler = info.handler_cls(parse_config(info.config_cls, config, Where(key="int8_ptq")))
    ctx = ApplyContext(task=task, work_dir=tmp_path, epochs=0)
    handler.prepare(None, ctx)
    handler.finalize(None, ctx)
    art = copy.copy(fp32_artifact)
    art.path = tmp_path / "model.onnx"
    art.path.write_bytes(fp32_artifact.path.read_bytes())
    return handler.deploy(art, ctx)


def ops(path):
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def optimized_ops(path):
    """Op counts of the graph onnxruntime runs after its fusions."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return ops(options.optimized_model_filepath)


def predictions(run, loader):
    return np.concatenate([np.asarray(run(x)).argmax(1) for x, _ in loader])


def test_residual_adds_have_quantized_inputs_and_output(fp32, task, tmp_path):
    art = deploy(fp32, task, tmp_path)
    graph = onnx.load(str(art.path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    adds = [n for n in graph.node if n.op_type == "Add"]
    assert len(adds) == RESNET["stages"] * RESNET["blocks"]
    for add in adds:
        assert [producer[i].op_type for i in add.input] == ["DequantizeLinear"] * 2
        assert [n.op_type for n in consumers[add.output[0]]] == ["QuantizeLinear"]
    # uint8 activations: the Q/DQ pairs onnxruntime's x86 int8 kernels fuse
    zero_points = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    q_types = {zero_points[n.input[2]].dtype for n in graph.node if n.op_type == "QuantizeLinear"}
    assert q_types == {np.dtype(np.uint8)}


def test_no_conv_or_add_stays_float_in_onnxruntime(fp32, task, tmp_path):
    float_ops = ops(fp32.path)
    art = deploy(fp32, task, tmp_path)
    run = optimized_ops(art.path)
    assert run["QLinearConv"] == float_ops["Conv"] == 6  # stem, 2 per block, 1 projection
    assert run["QLinearAdd"] == float_ops["Add"] == 2
    assert run["Conv"] == run["Add"] == run["FusedConv"] == 0
    assert "QLinearConv:6" in art.notes["int8_ops"] and "QLinearAdd:2" in art.notes["int8_ops"]
    assert art.notes["float_ops"] == "none"


def test_accuracy_and_agreement_with_fp32(fp32, resnet, task, tmp_path):
    art = deploy(fp32, task, tmp_path)
    int8, ref = OrtModel(art.path), OrtModel(fp32.path)
    fp32_acc, int8_acc = task.evaluate(ref, task.test_loader()), task.evaluate(int8, task.test_loader())
    assert fp32_acc >= 0.85
    assert int8_acc >= fp32_acc - 0.01
    agree = (predictions(int8, task.test_loader()) == predictions(ref, task.test_loader())).mean()
    assert agree >= 0.98


def test_fused_kernels_match_reference_qdq(fp32, task, tmp_path):
    """The fused int8 kernels compute what the QDQ graph says (no int16 saturation): one output step."""
    art = deploy(fp32, task, tmp_path)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    reference = ort.InferenceSession(str(art.path), plain, providers=["CPUExecutionProvider"])
    x = task.example_input(64).numpy()
    expected = reference.run(None, {"input": x})[0]
    graph = onnx.load(str(art.path)).graph
    step = next(float(numpy_helper.to_array(i)) for i in graph.initializer if i.name == "logits_scale")
    assert np.abs(OrtModel(art.path)(x) - expected).max() <= step * 1.01


@pytest.mark.parametrize("config", [{"per_channel": False}, {"calibration_method": "percentile"},
                                    {"calibration_method": "entropy", "calibration_batches": 2}])
def test_options_keep_the_int8_residual_graph(fp32, task, tmp_path, config, capsys):
    art = deploy(fp32, task, tmp_path, **config)
    run = optimized_ops(art.path)
    assert run["QLinearConv"] == 6 and run["QLinearAdd"] == 2 and run["Conv"] == 0
    assert capsys.readouterr().out == ""  # the histogram calibrators' progress prints are kept quiet
    weight_scales = [numpy_helper.to_array(i) for i in onnx.load(str(art.path)).graph.initializer
                     if i.name.endswith("weight_scale")]
    assert all(s.size == 1 for s in weight_scales) == (config.get("per_channel") is False)


def test_symmetric_activations_put_the_zero_point_mid_range(fp32, task, tmp_path):
    art = deploy(fp32, task, tmp_path, symmetric_activations=True)
    graph = onnx.load(str(art.path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    zps = {int(inits[n.input[2]]) for n in graph.node if n.op_type == "QuantizeLinear"}
    assert zps == {128}
    assert optimized_ops(art.path)["QLinearAdd"] == 2
    agree = (predictions(OrtModel(art.path), task.test_loader()) ==
             predictions(OrtModel(fp32.path), task.test_loader())).mean()
    assert agree >= 0.97


def test_dynamic_mode_still_runs_integer_convs(fp32, task, tmp_path):
    art = deploy(fp32, task, tmp_path, mode="dynamic")
    assert art.precision == "int8_dynamic"
    assert ops(art.path)["ConvInteger"] == 6
    assert "ConvInteger:6" in art.notes["int8_ops"]
