"""torch's thread count as a scoped setting: automl's own work runs with the threads its recipe names, and
a caller of the Python API gets its own setting back."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch


@contextlib.contextmanager
def torch_threads(threads: Optional[int]):
    """torch's intra-op threads at ``threads`` inside the block (unchanged for None or 0), restored after."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
