"""Library versions recorded in reports and recipes."""
from __future__ import annotations

import platform
from importlib import metadata


def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("automl", "torch", "ray", "optuna", "onnx", "onnxruntime", "numpy", "scikit-learn"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
