"""`when:` conditions: a parameter is sampled only when all its conditions hold."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Tuple

from automl.registry import did_you_mean
from automl.validate import Where, expect_mapping

OPS = ("eq", "ne", "in", "not_in", "gt", "ge", "lt", "le")


@dataclass(frozen=True)
class Condition:
    param: str
    op: str
    operand: Any

    def holds(self, values: dict) -> bool:
        """False when the referenced parameter is inactive (was not sampled)."""
        if self.param not in values:
            return False
        v = values[self.param]
        if self.op == "eq":
            return v == self.operand
        if self.op == "ne":
            return v != self.operand
        if self.op == "in":
            return v in self.operand
        if self.op == "not_in":
            return v not in self.operand
        try:
            return {"gt": v > self.operand, "ge": v >= self.operand,
                    "lt": v < self.operand, "le": v <= self.operand}[self.op]
        except TypeError:
            return False


def _check_reachable(op, operand, domain, at: Where):
    """An equality-style operand the referenced choice can never take would silently disable the param."""
    values = getattr(domain, "values", None)
    if values is None and hasattr(domain, "value"):
        values = (domain.value,)
    if values is None or op not in ("eq", "ne", "in", "not_in"):
        return
    for item in operand if op in ("in", "not_in") else (operand,):
        if item not in values:
            raise at.error("condition compares with a value the parameter never takes", item,
                           f"{did_you_mean(str(item), map(str, values))}its values: {', '.join(map(str, values))}")


def parse_when(raw, where: Where, earlier: Mapping) -> Tuple[Condition, ...]:
    """Parse ``{param: value | {op: operand}}``; params must be defined before this one.

    ``earlier`` maps the names defined so far to their domains (an iterable of names also works,
    without the operand check).
    """
    if raw is None:
        return ()
    raw = expect_mapping(raw, where)
    domains = dict(earlier) if isinstance(earlier, Mapping) else dict.fromkeys(earlier)
    earlier = list(domains)
    out = []
    for param, pred in raw.items():
        at = where / param
        if param not in earlier:
            raise at.error("condition names a parameter that is not defined before this one", param,
                           f"{did_you_mean(str(param), earlier)}conditions may use: {', '.join(earlier) or '(none)'}")
        if isinstance(pred, list):
            raise at.error("a bare list in a condition is ambiguous", pred,
                           f"write {{in: {pred}}} to match any of the items")
        if not isinstance(pred, dict):
            _check_reachable("eq", pred, domains[param], at)
            out.append(Condition(param, "eq", pred))
            continue
        if len(pred) != 1:
            raise at.error("write one operator per parameter", pred, f"operators: {', '.join(OPS)}")
        (op, operand), = pred.items()
        if op not in OPS:
            raise (at / op).error("unknown condition operator", op,
                                  f"{did_you_mean(str(op), OPS)}operators: {', '.join(OPS)}")
        if op in ("in", "not_in") and not isinstance(operand, list):
            raise (at / op).error(f"'{op}' needs a list", operand, f"write {{{op}: [a, b]}}")
        if op in ("gt", "ge", "lt", "le") and (isinstance(operand, bool) or not isinstance(operand, (int, float))):
            raise (at / op).error(f"'{op}' needs a number", operand, f"write {{{op}: <number>}}")
        if op in ("eq", "ne") and isinstance(operand, (list, dict)):
            raise (at / op).error(f"'{op}' compares with one scalar value", operand,
                                  "use 'in' / 'not_in' to compare with several values")
        _check_reachable(op, operand, domains[param], at / op)
        out.append(Condition(param, op, tuple(operand) if isinstance(operand, list) else operand))
    return tuple(out)
