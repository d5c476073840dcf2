"""The package's layers: no import cycle between automl's subpackages and modules, counting the imports
made inside functions (a cycle hidden in a function is still a cycle)."""
import ast
import collections
from pathlib import Path

import automl

PACKAGE = Path(automl.__file__).parent


def _unit(module: str) -> str:
    """automl.compress.pruning.structured -> automl.compress (a subpackage or a top-level module)."""
    return ".".join(module.split(".")[:2])


def import_graph():
    edges, where = collections.defaultdict(set), {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("automl"):
                names = [f"automl.{a.name}" for a in node.names] if node.module == "automl" else [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("automl")]
            else:
                continue
            for name in names:
                a, b = _unit(module), _unit(name)
                if a != b:
                    edges[a].add(b)
                    where.setdefault((a, b), f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return edges, where


def _reaches(edges, start, goal):
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(edges[node])
    return False


def test_no_import_cycle_between_subpackages():
    edges, where = import_graph()
    cycles = [f"{a} -> {b} ({where[(a, b)]}) and back" for a in list(edges) for b in edges[a] if _reaches(edges, b, a)]
    assert not cycles, "\n".join(cycles)



def test_a_cycle_made_inside_a_function_is_found():
    """compress importing recipe inside a function (as the teacher loader once did) closes a cycle."""
    edges, _ = import_graph()
    edges["automl.compress"].add("automl.recipe")
    assert _reaches(edges, "automl.recipe", "automl.compress")
