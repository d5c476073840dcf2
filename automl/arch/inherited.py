"""Weights a built-in family's model inherits from a trained supernet, in a space or a recipe::

    arch: {family: cnn, width: 32, depth: 3, kernel: 3, pooling: max}
    supernet:
      path: supernets/digits_cnn       # the --out directory of `automl supernet train`
      sha256: ...                      # written into recipes: changed supernet weights are refused
      bn_samples: 256                  # training samples that re-estimate batch-norm statistics

The model is built from its ``arch`` parameters as usual, takes its slice of the supernet's shared
weights (automl.supernet) and then trains for ``train.epochs`` (0: evaluated as inherited).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

from automl.arch.user import file_sha256
from automl.validate import Where, expect_keys, expect_mapping, expect_range, expect_type

KEYS = ("path", "sha256", "bn_samples")
WEIGHTS_FILE = "supernet.pt"


@dataclass(frozen=True)
class SupernetSource:
    path: str
    sha256: str
    bn_samples: int = 256

    def to_dict(self) -> Dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "bn_samples": self.bn_samples}


def parse_supernet_source(data: Any, where: Where) -> SupernetSource:
    if isinstance(data, str):
        data = {"path": data}
    data = expect_mapping(data, where)
    expect_keys(data, where, KEYS, required=("path",))
    path = Path(expect_type(data["path"], where / "path", str)).expanduser()
    if not (path / WEIGHTS_FILE).is_file():
        raise (where / "path").error("no trained supernet there (no supernet.pt)", data["path"],
                                     "give the --out directory of 'automl supernet train --space SPACE --out DIR'")
    sha = data.get("sha256")  # pinned now: every trial of a search and its recipes use these weights
    sha = file_sha256(path / WEIGHTS_FILE) if sha is None else expect_type(sha, where / "sha256", str)
    samples = expect_range(expect_type(data.get("bn_samples", 256), where / "bn_samples", int), where / "bn_samples",
                           0, 1_000_000)
    return SupernetSource(path=str(path.resolve()), sha256=sha, bn_samples=samples)


__all__ = ["SupernetSource", "parse_supernet_source"]
