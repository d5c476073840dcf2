"""The ``schedule:`` section of a search space: the recipe's Distiller-style policies on epoch windows
(regularization, lr), any option or window bound of which may be a search domain, so the search
produces schedules as it produces stages.

Entry ``i`` gives the parameters ``schedule.<i>.policy`` (fixed) and ``schedule.<i>.<key>`` per key
(``start_epoch``, ``end_epoch``, ``frequency`` and the policy's options); ``schedule_from_config`` puts a
trial's values back into the recipe's list. Every value a domain can produce is checked when the space
is read, and so is every window: it must start before training ends and before its own end.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

from automl.compress.schedule import (POLICIES, TIMING, PolicySpec, check_schedule_epochs, parse_policy,
                                      parse_schedule, without_unused)
from automl.configs import field_names
from automl.spaces.conditions import parse_when
from automl.spaces.domains import Domain, Fixed, parse_domain
from automl.validate import Where, expect_choice, expect_keys, expect_mapping, expect_type

PREFIX = "schedule"


def schedule_params(raw, where: Where, earlier: dict, epochs: int) -> List[Tuple[str, Domain, tuple]]:
    """(name, domain, conditions) of every parameter of the section at ``where``."""
    if raw is None:
        return []
    out = []
    for i, entry in enumerate(expect_type(raw, where, list, "write a list of policies, one '- {policy: ...}' each")):
        out += _entry_params(expect_mapping(entry, where / i), where / i, i, earlier, epochs)
    first = {}  # one schedule made of each parameter's first value: the list-level checks (lr overlaps)
    for name, domain, _ in out:
        _, i, key = name.split(".", 2)
        first.setdefault(int(i), {})[key] = domain.examples()[0]
    parse_schedule([without_unused(e) for _, e in sorted(first.items())], where)
    return out


def _entry_params(entry: dict, at: Where, i: int, earlier: dict, epochs: int) -> list:
    if "policy" not in entry:
        raise (at / "policy").error("missing required key", no_value=True,
                                    fix=f"add 'policy:' with one of: {', '.join(POLICIES.names())}")
    policy = expect_choice(expect_type(entry["policy"], at / "policy", str), at / "policy", POLICIES.names())
    expect_keys(entry, at, ("policy",) + TIMING + tuple(field_names(POLICIES.get(policy).config_cls)))
    out = [(f"{PREFIX}.{i}.policy", Fixed(policy), ())]
    values: Dict[str, list] = {}
    for key, raw in entry.items():
        if key == "policy":
            continue
        domain, when = parse_domain(raw, at / key)
        for value in domain.examples():  # each value alone, as the recipe's parser reads it
            parse_policy({"policy": policy, key: value}, at)
        values[key] = domain.examples()
        name = f"{PREFIX}.{i}.{key}"
        out.append((name, domain, parse_when(when, at / key / "when", earlier)))
        earlier[name] = domain
    _check_window(values, at, epochs)
    return out


def _check_window(values: Dict[str, list], at: Where, epochs: int) -> None:
    latest_start = max(values.get("start_epoch", [0]))
    if latest_start >= epochs:
        raise (at / "start_epoch").error(f"can start after training ends ({epochs} epochs)", latest_start,
                                         f"keep start_epoch below {epochs} (train.epochs)")
    if "end_epoch" in values:
        ends = [e for e in values["end_epoch"] if e is not None]
        if ends and max(ends) > epochs:
            raise (at / "end_epoch").error(f"can end after training ends ({epochs} epochs)", max(ends),
                                           f"keep end_epoch at most {epochs}, or leave it out")
        if ends and latest_start >= min(ends):
            raise (at / "end_epoch").error(
                f"can end (epoch {min(ends)}) before the latest start ({latest_start}); the end is exclusive",
                min(ends), "give every start_epoch a value below every end_epoch")


def schedule_from_config(config: Mapping, where: Where, epochs: int) -> List[PolicySpec]:
    """The recipe's schedule from a trial's flat ``schedule.<i>.<key>`` values (options its sampled kind
    does not use are left out)."""
    entries: Dict[int, dict] = {}
    for name, value in config.items():
        if name.startswith(PREFIX + "."):
            _, i, key = name.split(".", 2)
            entries.setdefault(int(i), {})[key] = value
    specs = parse_schedule([without_unused(e) for _, e in sorted(entries.items())], where / PREFIX)
    check_schedule_epochs(specs, epochs, where / PREFIX)
    return specs
