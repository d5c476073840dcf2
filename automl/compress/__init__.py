"""Compression methods. Importing this package registers every built-in method."""
from automl.compress.base import CATEGORIES, METHODS, ApplyContext, Method, get_method, methods_in
from automl.compress.pruning import magnitude as _magnitude  # noqa: F401  (registers)
from automl.compress.quantization import ptq as _ptq  # noqa: F401  (registers)

__all__ = ["CATEGORIES", "METHODS", "ApplyContext", "Method", "get_method", "methods_in"]
