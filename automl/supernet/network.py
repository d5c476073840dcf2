"""The supernet: a family, its architecture space, and the shared tensors every sub-network slices.

``forward(config, x)`` runs one sub-network on the shared weights (training); ``extract(config)``
returns an ordinary model of the family with its inherited weights copied in (evaluation, export).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call

from automl.arch import ARCHS
from automl.spaces.domains import IntRange
from automl.supernet.elastic import (canonical_keys, check_fits, extreme_configs, init_shared, shared_shapes,
                                     take)

BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
CACHED_MODULES = 512  # sub-network skeletons kept for training (meta tensors: no memory for weights)
MAX_INT_VALUES = 64   # an integer range up to this long sizes the tensors value by value


def sizing_values(domain) -> List:
    """The values that size the shared tensors: every value of a choice or a short integer range (each
    depth has its own head), the ends of anything longer."""
    if isinstance(domain, IntRange) and (domain.high - domain.low) // domain.step < MAX_INT_VALUES and not domain.log:
        return list(range(domain.low, domain.high + 1, domain.step))
    return list(domain.examples())


def _numeric(values: List) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


@dataclass
class Supernet:
    family: str
    domains: Dict[str, List[Any]]         # arch parameter -> the values it may take (extremes of ranges)
    params: Tuple[Any, ...]               # the space's arch Params (domains and conditions), to sample
    input_shape: Tuple[int, ...]
    num_classes: int
    tensors: Dict[str, torch.Tensor]
    kinds: Dict[str, str]
    _skeletons: Dict[Tuple, Tuple[nn.Module, List]] = field(default_factory=dict, repr=False)

    @classmethod
    def create(cls, family: str, params, input_shape, num_classes: int, seed: int = 0) -> "Supernet":
        """Shared tensors sized for every sub-network of the arch ``params`` (a space's ``arch.*`` Params)."""
        arch = ARCHS.get(family, key="arch.family")
        params = tuple(params)
        domains = {p.name.split(".", 1)[1]: sizing_values(p.domain) for p in params}
        build = lambda config: arch.build(config, tuple(input_shape), num_classes)  # noqa: E731
        shapes, kinds = shared_shapes(family, build, extreme_configs(domains))
        tensors = init_shared(shapes, kinds, seed)
        for key, tensor in tensors.items():
            tensor.requires_grad_(key.rpartition(".")[2] not in BUFFERS)
        return cls(family, domains, params, tuple(input_shape), num_classes, tensors, kinds)

    def build(self, config: Mapping) -> nn.Module:
        return ARCHS.get(self.family).build(dict(config), self.input_shape, self.num_classes)

    # -- sub-networks ---------------------------------------------------------------------------
    def largest(self, rng) -> Dict:
        return self._extreme(rng, max)

    def smallest(self, rng) -> Dict:
        return self._extreme(rng, min)

    def _extreme(self, rng, pick) -> Dict:
        """Every numeric parameter at its end; a categorical one (pooling, se ...) drawn at random."""
        out = {}
        for name, values in self.domains.items():
            out[name] = pick(values) if _numeric(values) else values[int(rng.integers(len(values)))]
        return out

    def sample(self, rng) -> Dict:
        values: Dict = {}
        for p in self.params:  # in order: a condition names parameters drawn before it
            if all(c.holds(values) for c in p.conditions):
                values[p.name] = p.domain.sample(rng)
        return {name.split(".", 1)[1]: value for name, value in values.items()}

    def forward(self, config: Mapping, x: torch.Tensor) -> torch.Tensor:
        """The sub-network ``config`` on the shared tensors (slices: its gradients train them)."""
        module, plan = self._skeleton(config)
        state = {name: take(self.tensors[key], shape, kind) for name, key, shape, kind in plan}
        return functional_call(module, state, (x,))

    def _skeleton(self, config: Mapping):
        key = tuple(sorted(config.items()))
        if key not in self._skeletons:
            if len(self._skeletons) >= CACHED_MODULES:
                self._skeletons.clear()
            with torch.device("meta"):
                module = self.build(config)
            names = canonical_keys(self.family, module)
            plan = []
            for name, tensor in module.state_dict().items():
                have = self.tensors.get(names[name])
                check_fits(name, names[name], tensor.shape, None if have is None else have.shape, dict(config))
                plan.append((name, names[name], tuple(tensor.shape), self.kinds.get(names[name], "other")))
            self._skeletons[key] = (module, plan)
        module, plan = self._skeletons[key]
        module.train(torch.is_grad_enabled())
        return module, plan

    def extract(self, config: Mapping) -> nn.Module:
        """An ordinary model of the family with the inherited weights (copies) loaded."""
        _, plan = self._skeleton(config)
        state = {name: take(self.tensors[key], shape, kind).detach().clone() for name, key, shape, kind in plan}
        with torch.device("meta"):  # no random initialisation to overwrite
            model = self.build(config)
        model.load_state_dict(state, assign=True)
        if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
            model = self.build(config)  # a tensor the state_dict does not hold (a non-persistent buffer)
            model.load_state_dict(state)
        return model

    def parameters(self) -> List[torch.Tensor]:
        return [t for t in self.tensors.values() if t.is_floating_point() and t.requires_grad]


def recalibrate_bn(model: nn.Module, batches, max_samples: int) -> nn.Module:
    """Batch-norm statistics of ``model`` re-estimated on up to ``max_samples`` inputs (a cumulative
    average, not a running one): inherited weights come with statistics of other sub-networks."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or max_samples <= 0:
        return model.eval()
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    with torch.no_grad():
        for x, _ in batches:
            x = x[: max_samples - seen]
            model(x)
            seen += len(x)
            if seen >= max_samples:
                break
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    return model.eval()


def sample_configs(net: Supernet, count: int, seed: int) -> List[Dict]:
    rng = np.random.default_rng(seed)
    return [net.sample(rng) for _ in range(count)]


__all__ = ["Supernet", "recalibrate_bn", "sample_configs"]
