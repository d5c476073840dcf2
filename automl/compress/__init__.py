"""Compression methods. Importing this package registers every built-in method.

One folder per family: pruning/, quantization/ (int8, low-bit, fp16, k-means), distill/, early_exit/,
factorization/, regularization/, coding/ (storage formats)."""
from automl.compress.base import CATEGORIES, METHODS, ApplyContext, Method, get_method, methods_in
from automl.compress.pruning import elementwise as _elementwise, magnitude as _magnitude  # noqa: F401
from automl.compress.pruning import layerwise as _layerwise, structured as _structured  # noqa: F401  (registers)
from automl.compress.quantization import ptq as _ptq, half as _half, kmeans as _kmeans  # noqa: F401  (registers)
from automl.compress.quantization import int8_methods as _int8, qat_methods as _qat  # noqa: F401  (registers)
from automl.compress.regularization import method as _regularization  # noqa: F401  (registers)
from automl.compress.factorization import method as _lowrank  # noqa: F401  (registers)
from automl.compress.distill import method as _kd  # noqa: F401  (registers)
from automl.compress.early_exit import method as _exits  # noqa: F401  (registers)

__all__ = ["CATEGORIES", "METHODS", "ApplyContext", "Method", "get_method", "methods_in"]
