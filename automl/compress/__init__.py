"""Compression methods. Importing this package registers every built-in method."""
from automl.compress.base import CATEGORIES, METHODS, ApplyContext, Method, get_method, methods_in
from automl.compress.pruning import elementwise as _elementwise, magnitude as _magnitude  # noqa: F401
from automl.compress import regularization as _regularization  # noqa: F401
from automl.compress.pruning import layerwise as _layerwise  # noqa: F401  (registers)
from automl.compress.pruning import structured as _structured  # noqa: F401  (registers)
from automl.compress.quantization import ptq as _ptq  # noqa: F401  (registers)
from automl.compress.quantization import int8_methods as _int8, qat_methods as _qat  # noqa: F401  (registers)
from automl.compress.quantization import half as _half  # noqa: F401  (registers)
from automl.compress import coding_methods as _coding, factorization_method as _lowrank  # noqa: F401  (registers)
from automl.compress import distill_method as _kd, early_exit_method as _exits  # noqa: F401  (registers)

__all__ = ["CATEGORIES", "METHODS", "ApplyContext", "Method", "get_method", "methods_in"]
