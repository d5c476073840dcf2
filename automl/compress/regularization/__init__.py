"""Sparsity regularizers: the penalties (penalties) and their registered methods (method)."""
