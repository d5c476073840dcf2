"""The deployed form: what an artifact is (artifact), ONNX export (export), onnxruntime sessions and the
latency protocol (ort), onnxruntime int8 quantization (ort_quantize)."""
from automl.runtime.artifact import Artifact, QuantInfo
from automl.runtime.export import export_onnx, onnx_export, warm_onnx_exporter
from automl.runtime.ort import VNNI_FLAGS, OrtModel, int8_reduce_range, measure_latency
from automl.runtime.ort_quantize import (grouped_convs, quantize_dynamic_int8, quantize_static_qdq,
                                         quiet_root_logger)

__all__ = ["Artifact", "QuantInfo", "export_onnx", "onnx_export", "warm_onnx_exporter", "VNNI_FLAGS", "OrtModel",
           "int8_reduce_range", "measure_latency", "grouped_convs", "quantize_dynamic_int8", "quantize_static_qdq",
           "quiet_root_logger"]
