"""Deployable int8 through torchao's pt2e flow: export -> prepare -> calibrate (or QAT) -> convert.

Two targets, because the two int8 back ends want the Q/DQ pairs in different places:

- ``onnx`` (default; the deployed form): the x86 recipe plus quantized residual adds, so every
  conv, and every add, reads and writes int8. onnxruntime then fuses each DQ-op-Q group into
  QLinearConv / QLinearAdd. The stock recipe leaves a conv that feeds a residual add in float
  (it counts on Inductor's conv+add fusion); onnxruntime runs those convs in fp32 between extra
  Q/DQ/Transpose nodes, which measured slower than the fp32 model.
- ``inductor``: the stock X86InductorQuantizer recipe, for ``torch.compile`` (oneDNN int8 kernels).

The converted model run eagerly computes reference Q/DQ in float: it is an accuracy reference
only, never a speed-up.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import tempfile
import types
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from automl.errors import ConfigError
from automl.runtime import Artifact, QuantInfo, export_onnx

TARGETS = ("onnx", "inductor")
_ADD = (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)
_RELU = (torch.ops.aten.relu.default, torch.ops.aten.relu_.default)
# onnxruntime ops that run in int8 once the QDQ groups are fused.
_INT8_OPS = ("QLinearConv", "QLinearAdd", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger",
             "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearMul", "QLinearConcat")
_FLOAT_COMPUTE_OPS = ("Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul", "Add", "Mul")

INT8 = QuantInfo("int8_static", w_bits=8, a_bits=8)  # what a pt2e int8 model is priced as


@contextlib.contextmanager
def _quiet(*names):
    """Silence import-time chatter (torchao's optional CUDA kernels, torch deprecation notes)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@functools.lru_cache(maxsize=None)
def _ao() -> types.SimpleNamespace:
    """torchao's pt2e API, imported on first use (the import takes seconds)."""
    try:
        with _quiet("torchao", "torch.utils._pytree"):
            from torchao.quantization import pt2e as ao
            from torchao.quantization.pt2e import quantize_pt2e
            from torchao.quantization.pt2e.quantizer import QuantizationSpec
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError as exc:
        raise ConfigError(f"pt2e quantization needs torchao ({exc})", key="quantization",
                          value="pt2e", fix="pip install torchao==0.18.0") from None

    class OnnxQDQQuantizer(x86.X86InductorQuantizer):
        """x86 recipe without conv/linear+add fusions; residual adds get int8 inputs and output."""

        def _annotate_conv2d_binary_unary(self, *args, **kwargs):
            pass

        def _annotate_conv2d_binary(self, *args, **kwargs):
            pass

        def _annotate_linear_binary_unary(self, *args, **kwargs):
            pass

        def annotate(self, model):
            super().annotate(model)
            act = self.global_config.input_activation
            for node in model.graph.nodes:
                if (node.op != "call_function" or node.target not in _ADD or x86.QUANT_ANNOTATION_KEY in node.meta
                        or not all(isinstance(a, torch.fx.Node) for a in node.args[:2])):
                    continue
                users = list(node.users)
                # add+relu is one int8 group: quantize after the relu (onnxruntime folds the relu into Q).
                relu = users[0] if len(users) == 1 and users[0].target in _RELU else None
                node.meta[x86.QUANT_ANNOTATION_KEY] = x86._X86InductorQuantizationAnnotation(
                    input_qspec_map={a: act for a in node.args[:2]}, output_qspec=None if relu else act,
                    _annotated=True, _is_output_of_quantized_pattern=relu is None)
                if relu is not None:
                    relu.meta[x86.QUANT_ANNOTATION_KEY] = x86._X86InductorQuantizationAnnotation(
                        output_qspec=act, _annotated=True, _is_output_of_quantized_pattern=True)
            _int8_outputs(model, act, x86.QUANT_ANNOTATION_KEY)
            return model

    return types.SimpleNamespace(
        x86=x86, OnnxQDQQuantizer=OnnxQDQQuantizer, QuantizationSpec=QuantizationSpec,
        MinMaxObserver=ao.MinMaxObserver, MovingAverageMinMaxObserver=ao.MovingAverageMinMaxObserver,
        FusedMovingAvgObsFakeQuantize=ao.FusedMovingAvgObsFakeQuantize,
        move_exported_model_to_eval=ao.move_exported_model_to_eval,
        move_exported_model_to_train=ao.move_exported_model_to_train,
        convert_pt2e=quantize_pt2e.convert_pt2e, prepare_pt2e=quantize_pt2e.prepare_pt2e,
        prepare_qat_pt2e=quantize_pt2e.prepare_qat_pt2e)


def _int8_outputs(model, act, key):
    """Quantize the output of every int8 pattern (a conv, a conv + ReLU, a linear) that the x86 recipe
    leaves float because no int8 op reads it next (Inductor fuses the float epilogue; onnxruntime cannot):
    a conv whose output goes to a float op -- hard-swish written as x * relu6(x + 3) / 6, a sigmoid gate
    -- would otherwise run in float between DQ and Q nodes. The model's own outputs stay float."""
    for node in model.graph.nodes:
        annotation = node.meta.get(key)
        if (annotation is None or not annotation._is_output_of_quantized_pattern
                or annotation.output_qspec is not None or any(u.op == "output" for u in node.users)):
            continue
        annotation.output_qspec = act


def quantization_config(*, per_channel: bool = True, qat: bool = False):
    """The x86 int8 config (uint8 activations, int8 symmetric weights); per-tensor weights on request.
    Activations keep 7 bits on x86 CPUs without VNNI (see runtime.int8_reduce_range)."""
    from automl.runtime import int8_reduce_range

    ao = _ao()
    config = ao.x86.get_default_x86_inductor_quantization_config(is_qat=qat, reduce_range=int8_reduce_range())
    if per_channel:
        return config
    extra = {"eps": 2 ** -12}
    observer = (ao.FusedMovingAvgObsFakeQuantize.with_args(observer=ao.MovingAverageMinMaxObserver, **extra)
                if qat else ao.MinMaxObserver.with_args(**extra))
    weight = ao.QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127,
                                 qscheme=torch.per_tensor_symmetric, is_dynamic=False,
                                 observer_or_fake_quant_ctr=observer)
    return dataclasses.replace(config, weight=weight)


def _allow_train_eval(gm: nn.Module) -> nn.Module:
    """Let ``.train()`` / ``.eval()`` work (and return the model) on an exported graph module.

    torchao's own helper returns None from ``eval()``, which breaks ``model = model.eval()``.
    """
    ao = _ao()

    def train(self, mode: bool = True):
        (ao.move_exported_model_to_train if mode else ao.move_exported_model_to_eval)(self)
        return self

    gm.train = types.MethodType(train, gm)
    gm.eval = types.MethodType(lambda self: self.train(False), gm)
    return gm


def _inputs(batches: Iterable) -> Iterable[torch.Tensor]:
    for batch in batches:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def export_for_quantization(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """``torch.export`` with a dynamic batch dimension, ready for a pt2e quantizer."""
    if not isinstance(example, torch.Tensor) or example.dim() < 1:
        raise ConfigError("the example input must be a batched tensor", key="example",
                          value=type(example).__name__, fix="pass e.g. task.example_input(2)")
    if example.shape[0] < 2:  # a batch of 1 would be specialised as a constant
        example = example.expand(2, *example.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1, max=4096)
    gm = torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()
    # A module called twice (ResNet's shared ReLU) must form two partitions: the quantizer groups
    # nodes by module name and rejects a partition with two outputs. Export tags the second call
    # "name@1" in the stack key; carry that tag into the name.
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op == "call_function" and stack:
            key, (fqn, cls) = list(stack.items())[-1]
            if "@" in key:
                stack[key] = (f"{fqn}@{key.rsplit('@', 1)[1]}", cls)
    return gm


def prepare_pt2e_model(model: nn.Module, example: torch.Tensor, *, per_channel: bool = True,
                       qat: bool = False, target: str = "onnx") -> torch.fx.GraphModule:
    """Export and insert observers (PTQ) or fake quantization (QAT, model left in train mode)."""
    if target not in TARGETS:
        raise ConfigError("unknown pt2e target", key="target", value=target,
                          fix=f"use one of {', '.join(TARGETS)}")
    ao = _ao()
    model = model.eval()
    gm = export_for_quantization(model, example)
    quantizer = (ao.OnnxQDQQuantizer() if target == "onnx" else ao.x86.X86InductorQuantizer())
    quantizer.set_global(quantization_config(per_channel=per_channel, qat=qat))
    with _quiet("torchao"):
        prepared = (ao.prepare_qat_pt2e if qat else ao.prepare_pt2e)(gm, quantizer)
    prepared = _allow_train_eval(prepared)
    return prepared.train() if qat else prepared.eval()


def convert_pt2e_model(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Observed (or QAT-trained) model -> int8 reference model (Q/DQ ops, int8 weights), eval mode."""
    ao = _ao()
    prepared.eval()
    with _quiet("torchao"):
        converted = ao.convert_pt2e(prepared)
    return _allow_train_eval(converted).eval()


def quantize_pt2e(model: nn.Module, example: torch.Tensor, calib_batches: Iterable, *,
                  per_channel: bool = True, qat: bool = False,
                  train: Optional[Callable[[nn.Module], None]] = None,
                  target: str = "onnx") -> torch.fx.GraphModule:
    """pt2e int8: PTQ calibrated on ``calib_batches`` (tensors or (x, y) pairs), or QAT.

    With ``qat=True``, ``train(prepared)`` fine-tunes the fake-quantized model in place (the
    caller's loop), and the calibration batches are not used.
    """
    if qat and train is None:
        raise ConfigError("QAT needs a training function", key="train", value=None,
                          fix="pass train=callable that fine-tunes the prepared model, or qat=False")
    prepared = prepare_pt2e_model(model, example, per_channel=per_channel, qat=qat, target=target)
    if qat:
        train(prepared)
    else:
        seen = 0
        with torch.no_grad():
            for x in _inputs(calib_batches):
                prepared(x)
                seen += 1
        if seen == 0:
            raise ConfigError("no calibration batches were given", key="calib_batches", value=0,
                              fix="pass a few training batches (a DataLoader or a list of tensors)")
    return convert_pt2e_model(prepared)


def compile_inductor(converted: torch.fx.GraphModule, example: torch.Tensor) -> Callable:
    """torch.compile a converted (``target='inductor'``) model; Inductor lowers Q/DQ to oneDNN int8.

    Static shapes: a dynamic batch fails in Inductor's qconv lowering (torch 2.13), so each new
    batch size recompiles (seconds). The warm-up call compiles under weight freezing, which the
    int8 lowering needs.
    """
    import torch._inductor.config as inductor_config

    compiled = torch.compile(converted, dynamic=False)
    with inductor_config.patch(freezing=True), torch.no_grad():
        compiled(example)
    return compiled


def onnx_op_counts(path) -> Tuple[Dict[str, int], Dict[str, int]]:
    """(int8 ops, float compute ops) in the graph onnxruntime actually runs (after its fusions)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ops = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return ({k: v for k, v in ops.items() if k in _INT8_OPS},
            {k: v for k, v in ops.items() if k in _FLOAT_COMPUTE_OPS})


def deploy_pt2e(model: nn.Module, example: torch.Tensor, calib_batches: Iterable, path, *,
                per_channel: bool = True, runtime: str = "onnxruntime",
                converted: Optional[torch.fx.GraphModule] = None) -> Artifact:
    """A deployable int8 file whose kernels really run in int8.

    ``onnxruntime`` (default): pt2e ONNX (QLinearConv / QLinearAdd), any batch size; the notes list
    the int8 and float compute ops onnxruntime kept, so a model that stayed mostly float shows.
    ``aoti``: an AOTInductor package (.pt2, oneDNN int8 kernels, needs torch to run) compiled for
    the batch size of ``example``; measured fastest at batch 32 on a ResNet, slower at batch 1.
    Pass ``converted`` to reuse a quantized model (made with the matching target).
    """
    if runtime not in ("onnxruntime", "aoti"):
        raise ConfigError("unknown int8 runtime", key="runtime", value=runtime, fix="use onnxruntime or aoti")
    if converted is None:
        converted = quantize_pt2e(model, example, calib_batches, per_channel=per_channel,
                                  target="onnx" if runtime == "onnxruntime" else "inductor")
    per_channel = any(n.target == torch.ops.quantized_decomposed.dequantize_per_channel.default
                      for n in converted.graph.nodes)
    weights = "per_channel" if per_channel else "per_tensor"
    if runtime == "aoti":
        import torch._inductor.config as inductor_config

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with inductor_config.patch(freezing=True), torch.no_grad():
            program = torch.export.export(converted, (example,))
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))
        return Artifact(path=path, runtime="aoti", precision="int8_pt2e", quant=INT8,
                        notes={"kernels": "oneDNN int8 (AOTInductor)", "batch": str(example.shape[0]),
                               "weights": weights})
    artifact = export_onnx(converted, example, path)
    int8_ops, float_ops = onnx_op_counts(artifact.path)
    if not int8_ops:
        raise ConfigError("onnxruntime fused no int8 op in the exported model", key="quantization",
                          value=str(artifact.path), fix="check that the model has Conv/Linear layers")
    fmt = lambda ops: ",".join(f"{k}:{v}" for k, v in sorted(ops.items())) or "none"  # noqa: E731
    return Artifact(path=artifact.path, precision="int8_pt2e", quant=INT8,
                    notes={"kernels": "onnxruntime int8", "int8_ops": fmt(int8_ops), "float_ops": fmt(float_ops),
                           "weights": weights})


def load_aoti(path) -> Callable:
    """Load an ``aoti`` artifact: a callable batch -> logits (fixed batch size)."""
    return torch._inductor.aoti_load_package(str(path))


def _labels(predict: Callable, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = predict(x)
    return np.asarray(out.detach() if isinstance(out, torch.Tensor) else out).argmax(axis=1)


def parity(a: Callable, b: Callable, loader: Iterable) -> float:
    """Share of inputs on which ``a`` and ``b`` (modules or ONNX sessions) predict the same class."""
    same = total = 0
    for x in _inputs(loader):
        pa, pb = _labels(a, x), _labels(b, x)
        same += int((pa == pb).sum())
        total += len(pa)
    if total == 0:
        raise ConfigError("parity needs at least one batch", key="loader", value=0, fix="pass a non-empty loader")
    return same / total
