"""Layer addressing: exact fully-qualified names or ``re:`` regular expressions.

Precedence: an exact name selects that module; a ``re:`` pattern selects every module whose
name it fully matches. A leading ``module.`` (DataParallel) is ignored on both sides. A pattern
that matches nothing is an error listing the nearest layer names.
"""
from __future__ import annotations

import difflib
import re
from typing import Dict, Iterable, Tuple

import torch.nn as nn

from automl.errors import UnknownNameError

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _strip(name: str) -> str:
    return name[len("module."):] if name.startswith("module.") else name


def select_layers(model: nn.Module, patterns: Iterable[str], kinds: Tuple[type, ...] = PRUNABLE
                  ) -> Dict[str, nn.Module]:
    """Modules of ``kinds`` selected by ``patterns``, in model order."""
    candidates = {_strip(n): m for n, m in model.named_modules() if isinstance(m, kinds)}
    chosen: Dict[str, nn.Module] = {}
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                rx = re.compile(pattern[3:])
            except re.error as exc:
                raise UnknownNameError(f"invalid regular expression: {exc}", key="layers",
                                       value=pattern, fix="fix the regex after 're:'") from None
            hits = [n for n in candidates if rx.fullmatch(n) or rx.fullmatch("module." + n)]
        else:
            hits = [n for n in candidates if n == _strip(pattern)]
        if not hits:
            near = difflib.get_close_matches(_strip(pattern.removeprefix("re:")), list(candidates), n=5,
                                             cutoff=0.0)
            raise UnknownNameError(
                "layer pattern matches no prunable layer", key="layers", value=pattern,
                fix=f"nearest layer names: {', '.join(near) or '(none)'}; use an exact name or 're:<regex>'",
            )
        for n in hits:
            chosen[n] = candidates[n]
    order = list(candidates)
    return {n: chosen[n] for n in sorted(chosen, key=order.index)}
