"""onnxruntime int8 quantization of an ONNX file: the one static (QDQ) and dynamic path that deployed
models and the int8 layers of hardware profiles both use."""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from automl.runtime.ort import OrtModel, int8_reduce_range


class _Batches:
    """onnxruntime CalibrationDataReader over a list of input arrays."""

    def __init__(self, name, batches):
        self._it = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self._it, None)


def pre_process(src, out) -> None:
    """onnxruntime's quant_pre_process (shape inference + graph optimisation before quantizing).
    Its symbolic shape inference fails on some exported graphs (a Reshape of a shape it cannot follow,
    as in CBAM's spatial gate); ONNX's own shape inference is then enough for the quantizer."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    theirs = Path(SYMBOLIC_LEFTOVER).exists()  # a file of that name the user had is left alone
    try:
        quant_pre_process(str(src), str(out))
    except Exception:  # noqa: BLE001 -- any failure of the symbolic pass: retry without it
        if not theirs:
            _remove_symbolic_leftovers()
        quant_pre_process(str(src), str(out), skip_symbolic_shape=True)


SYMBOLIC_LEFTOVER = "sym_shape_infer_temp.onnx"


def _remove_symbolic_leftovers() -> None:
    """An incomplete symbolic shape inference saves its partial model, with its weights in a file
    named at random, into the current directory: the user's. Remove both."""
    import onnx

    path = Path(SYMBOLIC_LEFTOVER)
    if not path.is_file():
        return
    try:
        model = onnx.load(str(path), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location" and Path(entry.value).name == entry.value:
                    Path(entry.value).unlink(missing_ok=True)
    finally:
        path.unlink(missing_ok=True)


def quantize_static_qdq(src, out, batches, *, per_channel: bool = True, symmetric_activations: bool = False,
                        calibration_method: str = "minmax", nodes_to_quantize=None, nodes_to_exclude=(),
                        calibration_cache=None, force_quantize: bool = False) -> None:
    """QDQ int8 model of ONNX file ``src`` (uint8 activations, int8 weights) calibrated on ``batches``.
    The one static int8 path: deployed models and the int8 layers of hardware profiles both use it.

    ``calibration_cache``: a JSON file of the activation ranges, written by the first call and read by
    the next ones on the same ``src`` (ranges cover every quantizable tensor whichever nodes are
    quantized), so the float-fallback search calibrates once instead of once per try.
    ``force_quantize``: quantize ops whose input is not quantized (a layer cut out of a network)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[calibration_method]
    cached = calibration_cache is not None and Path(calibration_cache).is_file()
    reader = None if cached else _Batches(OrtModel(src).input_name, batches)
    # The histogram calibrators print progress to stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(str(src), str(out), reader, quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
                        calibrate_method=method, reduce_range=int8_reduce_range(),
                        nodes_to_quantize=nodes_to_quantize, nodes_to_exclude=list(nodes_to_exclude),
                        extra_options={"ActivationSymmetric": symmetric_activations,
                                       **({"ForceQuantizeNoInputCheck": True} if force_quantize else {})},
                        calibration_cache_path=None if calibration_cache is None else str(calibration_cache))


def grouped_convs(path) -> list:
    """Names of the Conv nodes with group > 1 in ONNX file ``path``."""
    import onnx

    return [node.name for node in onnx.load(str(path)).graph.node if node.op_type == "Conv"
            and any(a.name == "group" and a.i > 1 for a in node.attribute)]


def quantize_dynamic_int8(src, out, *, per_channel: bool = True, nodes_to_quantize=None, nodes_to_exclude=()) -> int:
    """Dynamic int8 of ONNX file ``src`` with grouped and depthwise convolutions left float (onnxruntime's
    ConvInteger gives wrong results on them: chance accuracy measured on trained ShuffleNetV2 and
    MobileNetV2); returns how many were left."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    grouped = grouped_convs(src)
    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=per_channel,
                     reduce_range=int8_reduce_range(), nodes_to_quantize=nodes_to_quantize,
                     nodes_to_exclude=[*grouped, *nodes_to_exclude])
    return len(grouped)


@contextlib.contextmanager
def quiet_root_logger(level: int = logging.ERROR):
    """The root logger at ``level`` inside the block only, so the user's own logging is untouched."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(max(level, before))
    try:
        yield
    finally:
        root.setLevel(before)
