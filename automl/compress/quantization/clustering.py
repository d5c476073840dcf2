"""Weight sharing (Han et al., Deep Compression 2016): per-layer 1-D k-means of the weights.

A clustered weight is ``centroids[index]``. In a sparse layer (one holding exact zeros, e.g. after
pruning) slot 0 of the table is reserved for 0.0 and the nonzeros share the other ``2**bits``
centroids, so pruned weights stay pruned through clustering and centroid fine-tuning. k-means
starts from centroids spaced linearly over [min, max] (the initialisation Han et al. found best) and
is deterministic. :class:`SharedWeights` holds trainable centroids and a fixed index so that
fine-tuning moves whole clusters: the gradient of a centroid is the sum of its weights' gradients.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from automl.compress.layers import select_layers
from automl.errors import ConfigError

INITS = ("linear", "density")


@dataclass
class Clustered:
    """``centroids[index]`` is the clustered weight; ``zero_slot``: centroids[0] is a fixed 0.0."""

    centroids: torch.Tensor
    index: torch.Tensor
    zero_slot: bool

    def weight(self) -> torch.Tensor:
        return self.centroids[self.index]


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ConfigError("bits must be an integer in [1, 16]", key="bits", value=bits,
                          fix="use 4 or 5 bits for Linear layers, 8 for convolutions (Han et al.)")
    return bits


def kmeans_1d(values: torch.Tensor, k: int, *, init: str = "linear", iters: int = 50
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on a 1-D tensor: (sorted centroids, assignment per value).

    Runs in float64; assignment is by nearest centroid (midpoint search, ties to the lower one).
    Clusters that end up empty are dropped, so fewer than ``k`` centroids may come back.
    """
    if init not in INITS:
        raise ConfigError("unknown k-means initialisation", key="init", value=init,
                          fix=f"use one of {', '.join(INITS)}")
    x = values.detach().reshape(-1).to(torch.float64)
    if x.numel() == 0:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    if init == "linear":
        centroids = torch.linspace(float(x.min()), float(x.max()), k, dtype=torch.float64)
    else:  # density: quantiles, more centroids where weights are dense (sorting has no size cap)
        ranks = torch.linspace(0, x.numel() - 1, k, dtype=torch.float64).round().long()
        centroids = torch.sort(x).values[ranks]
    centroids = torch.unique(centroids)  # sorted; a constant tensor needs a single centroid
    assign = None
    for _ in range(iters):
        new = torch.searchsorted((centroids[1:] + centroids[:-1]) / 2, x)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centroids).scatter_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=len(centroids)).to(torch.float64)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        centroids, _ = torch.sort(centroids)
    assign = torch.searchsorted((centroids[1:] + centroids[:-1]) / 2, x)
    used = torch.bincount(assign, minlength=len(centroids)) > 0
    remap = torch.cumsum(used.long(), 0) - 1
    return centroids[used], remap[assign]


def cluster_weight(weight: torch.Tensor, bits: int, *, keep_zeros: Optional[bool] = None,
                   init: str = "linear", iters: int = 50) -> Clustered:
    """Cluster one weight tensor into at most ``2**bits`` shared values (plus the zero slot).

    ``keep_zeros`` (default: whether the tensor holds any exact zero) reserves slot 0 for 0.0 and
    clusters only the nonzeros. A tensor that already has few enough distinct values keeps them
    exactly, so clustering a clustered weight changes nothing.
    """
    k = 2 ** _check_bits(bits)
    w = weight.detach().cpu()  # results live on the CPU; callers move them to the layer's device
    if keep_zeros is None:
        keep_zeros = bool((w == 0).any())
    flat = w.reshape(-1)
    live = flat != 0 if keep_zeros else torch.ones_like(flat, dtype=torch.bool)
    values = flat[live]
    distinct, inverse = torch.unique(values, return_inverse=True)
    if len(distinct) <= k:
        centroids, assign = distinct.to(w.dtype), inverse
    else:
        centroids, assign = kmeans_1d(values, k, init=init, iters=iters)
        centroids = centroids.to(w.dtype)
    index = torch.zeros(flat.shape, dtype=torch.long)
    if keep_zeros:
        index[live] = assign + 1
        centroids = torch.cat([torch.zeros(1, dtype=w.dtype), centroids])
    else:
        index[:] = assign
    return Clustered(centroids, index.view(w.shape), bool(keep_zeros))


class SharedWeights(nn.Module):
    """Trainable shared values behind one layer's weight: ``forward()`` returns the dense weight.

    ``centroids`` (a Parameter) holds only the trainable values; with a zero slot, index 0 means a
    constant 0.0 that receives no update. ``index`` is a buffer, so it moves with the model.
    """

    def __init__(self, clustered: Clustered):
        super().__init__()
        values = clustered.centroids[1:] if clustered.zero_slot else clustered.centroids
        self.centroids = nn.Parameter(values.detach().clone())
        self.register_buffer("index", clustered.index.clone())
        self.zero_slot = clustered.zero_slot

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bits: int, **kwargs) -> "SharedWeights":
        return cls(cluster_weight(weight, bits, **kwargs))

    def table(self) -> torch.Tensor:
        if not self.zero_slot:
            return self.centroids
        return torch.cat([self.centroids.new_zeros(1), self.centroids])

    def forward(self) -> torch.Tensor:
        return self.table()[self.index]

    def materialize(self) -> torch.Tensor:
        """The dense weight ``centroids[index]``, detached."""
        with torch.no_grad():
            return self.forward().detach().clone()

    def extra_repr(self) -> str:
        return f"clusters={len(self.centroids)}, zero_slot={self.zero_slot}, shape={tuple(self.index.shape)}"


_ATTR = "weight_shared"


def _set_shared_weight(module: nn.Module, args) -> None:
    # Module-level (not a closure) so a deep-copied model uses its own copy of the centroids.
    module.weight = getattr(module, _ATTR)()


def share_weights(model: nn.Module, bits: int = 4, layers: Iterable[str] = ("re:.*",), **kwargs
                  ) -> Dict[str, SharedWeights]:
    """Replace each selected layer's ``weight`` Parameter by a :class:`SharedWeights`, in place.

    The layer keeps its name; ``layer.weight_shared`` holds centroids and index, and a forward
    pre-hook rebuilds ``layer.weight`` from them. Build the optimizer afterwards (the weight is no
    longer a Parameter, the centroids are), train as usual, then call :func:`materialize`.
    """
    shared = {}
    for name, module in select_layers(model, layers).items():
        if hasattr(module, _ATTR):
            raise ConfigError("layer already shares its weights", key=name,
                              fix="call materialize(model) before clustering again")
        weight = module.weight
        sw = SharedWeights.from_weight(weight, bits, **kwargs).to(weight.device)
        del module._parameters["weight"]
        setattr(module, _ATTR, sw)
        module.weight = sw.materialize()  # readable before the first forward
        module.register_forward_pre_hook(_set_shared_weight)
        shared[name] = sw
    return shared


def materialize(model: nn.Module) -> Dict[str, SharedWeights]:
    """Write ``w = centroids[index]`` back as plain Parameters and remove the sharing, in place."""
    done = {}
    for name, module in list(model.named_modules()):
        sw = module._modules.get(_ATTR)
        if sw is None:
            continue
        weight = sw.materialize()
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is _set_shared_weight:  # looked up, not a stored handle: survives deepcopy
                del module._forward_pre_hooks[key]
        del module._modules[_ATTR]
        if "weight" in module.__dict__:
            del module.__dict__["weight"]
        others = dict(module._parameters)
        module._parameters.clear()  # weight first again, as in the layer's own state_dict order
        module._parameters["weight"] = nn.Parameter(weight, requires_grad=True)
        module._parameters.update(others)
        done[name] = sw
    return done


@dataclass(frozen=True)
class ClusterReport:
    layer: str
    clusters: int  # distinct shared values of the nonzeros
    zero_slot: bool
    mse: float  # mean squared change of the weights


def cluster_model(model: nn.Module, bits: int = 4, layers: Iterable[str] = ("re:.*",), **kwargs
                  ) -> Tuple[nn.Module, List[ClusterReport]]:
    """A deep copy of ``model`` whose selected weights are replaced by their clustered values."""
    clustered = copy.deepcopy(model)
    report = []
    for name, module in select_layers(clustered, layers).items():
        if hasattr(module, _ATTR):
            raise ConfigError("layer shares its weights", key=name, fix="call materialize(model) first")
        result = cluster_weight(module.weight, bits, **kwargs)
        new = result.weight().to(module.weight.device)
        with torch.no_grad():
            mse = float(((new - module.weight) ** 2).mean())
            module.weight.copy_(new)
        clusters = len(result.centroids) - int(result.zero_slot)
        report.append(ClusterReport(name, clusters, result.zero_slot, mse))
    return clustered, report
