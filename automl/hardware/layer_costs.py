"""Per-layer latency or energy from a hardware profile, for compression stages that weigh layers by
what they cost on the device (structured pruning's ``allocation: energy`` with ``cost: latency`` or
``energy``). Neither compress/ nor recipe/ may import hardware/ (which builds and prices their models),
so the layers above (``automl apply``, the API, search trials) hand this function down:
``apply_recipe(..., price_layers=price_layers)`` puts it in ``ApplyContext.price_layers``."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional

import torch.nn as nn

from automl.errors import ConfigError
from automl.hardware.layers import trace_layers
from automl.hardware.predict import price_layer
from automl.hardware.profile import HardwareProfile
from automl.hardware.shipped import shipped_profile_here

COSTS = ("latency", "energy")


@lru_cache(maxsize=8)
def _profile(spec: str) -> HardwareProfile:
    if spec != "auto":
        if not Path(spec).is_file():
            raise ConfigError("hardware profile not found", key="profile", value=spec,
                              fix="give the path of a profile YAML (automl profile measure writes one), or 'auto'")
        return HardwareProfile.load(spec)
    choice = shipped_profile_here()
    if choice.profile is None:
        raise ConfigError("profile 'auto' found no shipped profile measured on this CPU", key="profile", value=spec,
                          fix="measure one (automl profile measure --threads 1 --out my_cpu.yaml) and give its path, "
                              "or use cost: macs")
    return choice.profile


def price_layers(model: nn.Module, example, spec: str, cost: str, *,
                 auto: Optional[HardwareProfile] = None) -> Dict[str, float]:
    """{module name: latency_ms or energy_mj} of every costed layer of ``model`` on ``example``, in fp32,
    from the profile ``spec``: a path, or 'auto' -- ``auto`` when given (a search's own profile), else
    the shipped profile of this CPU. A layer the profile cannot price is a ProfileError naming it and
    the command that profiles the model."""
    if cost not in COSTS:
        raise ConfigError("a profile prices latency or energy", key="cost", value=cost, fix="use latency or energy")
    profile = auto if spec == "auto" and auto is not None else _profile(spec)
    out: Dict[str, float] = {}
    for layer in trace_layers(model, example[:1], "fp32"):
        price = price_layer(profile, layer.key)
        out[layer.name] = out.get(layer.name, 0.0) + (price.latency_ms if cost == "latency" else price.energy_mj)
    return out
