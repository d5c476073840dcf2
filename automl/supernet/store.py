"""A supernet directory: ``space.yaml`` (the space it serves), ``supernet.pt`` (the shared tensors, read
with ``torch.load(weights_only=True)``), ``manifest.yaml`` (what was trained, how long, how well, the
weights' sha256) and, while training, ``train_state.pt`` (optimizer and epoch, for resuming)."""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Dict, Tuple

import torch

from automl.arch.user import file_sha256
from automl.errors import ConfigError
from automl.io import load_yaml, write_yaml
from automl.spaces import load_space
from automl.supernet.network import Supernet

MANIFEST, WEIGHTS, STATE, SPACE = "manifest.yaml", "supernet.pt", "train_state.pt", "space.yaml"
MANIFEST_VERSION = 1


def arch_params(space):
    return [p for p in space.params if p.name.startswith("arch.")]


def atomic_torch_save(obj, path: Path):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_weights(out: Path, net: Supernet) -> str:
    """Writes supernet.pt; returns its sha256."""
    atomic_torch_save({k: v.detach() for k, v in net.tensors.items()}, out / WEIGHTS)
    return file_sha256(out / WEIGHTS)


def read_manifest(path) -> Dict:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise ConfigError("not a supernet directory (it has no manifest.yaml)", key="supernet", value=str(path),
                          fix="give the --out directory of 'automl supernet train'")
    manifest = load_yaml(path / MANIFEST)
    version = manifest.get("version") if isinstance(manifest, dict) else None
    if version != MANIFEST_VERSION:
        raise ConfigError(f"unsupported supernet manifest (version {version})",
                          file=str(path / MANIFEST), key="version", fix="train the supernet again with this automl")
    return manifest


def load_supernet(path, sha256: str | None = None) -> Tuple[Supernet, Dict]:
    """(Supernet, manifest) of a trained supernet directory; a ``sha256`` that no longer matches the
    weights is refused (the recipe that recorded it described other weights)."""
    path = Path(path).expanduser().resolve()
    if not (path / WEIGHTS).is_file():
        raise ConfigError("the supernet directory has no supernet.pt", key="supernet", value=str(path),
                          fix="finish its training: 'automl supernet train' resumes it")
    stat = (path / WEIGHTS).stat()
    actual, manifest = _identity(str(path), stat.st_mtime_ns, stat.st_size)
    if sha256 and sha256 != actual:
        raise ConfigError("the supernet's weights changed since this recipe was written (sha256 differs)",
                          key="supernet.sha256", value=str(path),
                          fix=f"restore the supernet whose supernet.pt has sha256 {sha256}, or drop supernet.sha256 to "
                              "accept the new weights (the recorded metrics then no longer describe them)")
    return _load(str(path), actual), manifest


@functools.lru_cache(maxsize=16)
def _identity(path: str, mtime_ns: int, size: int) -> Tuple[str, Dict]:
    """(sha256, manifest), read again only when the weights file changes: candidates load it thousands of times."""
    return file_sha256(Path(path) / WEIGHTS), read_manifest(path)


@functools.lru_cache(maxsize=4)
def _load(path: str, sha256: str) -> Supernet:
    space = load_space(Path(path) / SPACE)
    manifest = read_manifest(path)
    net = Supernet.create(space.family, arch_params(space), manifest["input_shape"], manifest["num_classes"])
    tensors = torch.load(Path(path) / WEIGHTS, map_location="cpu", weights_only=True)
    missing = sorted(set(net.tensors) - set(tensors))
    if missing or any(tuple(tensors[k].shape) != tuple(v.shape) for k, v in net.tensors.items()):
        raise ConfigError("supernet.pt does not match the supernet's space.yaml", key="supernet", value=path,
                          fix="train the supernet again ('automl supernet train --force')")
    for key, tensor in net.tensors.items():
        tensor.data.copy_(tensors[key])
    return net


def write_manifest(out: Path, manifest: Dict):
    write_yaml(out / MANIFEST, {"version": MANIFEST_VERSION, **manifest})


__all__ = ["MANIFEST", "SPACE", "STATE", "WEIGHTS", "arch_params", "atomic_torch_save", "load_supernet",
           "read_manifest", "save_weights", "write_manifest"]
