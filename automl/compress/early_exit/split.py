"""Cut a model we did not write into ordered blocks for early exit, with torch.fx.

``torch.fx.symbolic_trace`` records the forward as a graph. The output of a named module is a *cut*
when it is the only value that later code still needs (parameters and constants aside): everything
before it and everything after it are then two graphs joined by one tensor, which is what an exit
between them requires. A residual connection or a dense concatenation that spans the point keeps
a second value alive, so no cut is offered inside such a block, only after it.

Blocks are cut at the outputs of the model's container modules (a ResNet's units, a stage, ...); a
flat model of leaf layers is cut at its layers. Each block is an ``fx.GraphModule`` that shares the
model's modules (and so its trained weights).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from automl.errors import ConfigError

KEY = "early_exit.positions"


@dataclass(frozen=True)
class Cut:
    index: int               # position of the cut node in the traced graph
    names: Tuple[str, ...]   # the modules whose output it is, outermost first


def trace(model: nn.Module) -> fx.GraphModule:
    try:
        traced = fx.symbolic_trace(model)
    except Exception as exc:  # data-dependent control flow, unsupported Python: fx's own message
        raise ConfigError(f"early exit cannot split {type(model).__name__}: torch.fx could not trace its forward "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})", key="early_exit",
                          value=type(model).__name__,
                          fix="make the forward traceable (no Python branches on tensor values), or build "
                              "EarlyExitModel(blocks, head, exits=..., example=...) from your own ordered blocks, or "
                              "drop the exits stage") from None
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ConfigError("early exit splits a model with one input", key="early_exit",
                          value=f"{type(model).__name__} takes {len(placeholders)} inputs",
                          fix="wrap the model so forward takes one tensor, or drop the exits stage")
    return traced


def _free_nodes(nodes: Sequence[fx.Node]) -> set:
    """Nodes that do not depend on the input (parameters, constants): any block can recompute them."""
    bound = set()
    for node in nodes:
        if node.op == "placeholder" or any(a in bound for a in node.all_input_nodes):
            bound.add(node)
    return {n for n in nodes if n not in bound}


def _single_value_points(nodes: Sequence[fx.Node], free: set) -> List[int]:
    """Indices i where node i is the only input-dependent value used after it."""
    position = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((position[u] for u in n.users), default=position[n]) for n in nodes}
    live: Dict[fx.Node, int] = {}
    points = []
    for i, node in enumerate(nodes):
        if node not in free:
            live[node] = last_use[node]
        for done in [n for n, last in live.items() if last <= i and n is not node]:
            del live[done]
        if list(live) == [node] and last_use[node] > i and node.op != "output":
            points.append(i)
    return points


def _module_outputs(nodes: Sequence[fx.Node]) -> Dict[str, int]:
    """Module name -> index of the last node it produced."""
    ends: Dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in (node.meta.get("nn_module_stack") or {}):
            if isinstance(name, str) and name:
                ends[name] = i
    return ends


def find_cuts(model: nn.Module, traced: fx.GraphModule, example: torch.Tensor) -> List[Cut]:
    """The cuts of ``traced``: outputs of container modules (leaf layers for a flat model) that carry
    the only live value, a feature map (N, C, H, W) or vector (N, C)."""
    nodes = list(traced.graph.nodes)
    ShapeProp(traced).propagate(example)
    points = set(_single_value_points(nodes, _free_nodes(nodes)))
    containers = {name for name, m in model.named_modules() if name and any(True for _ in m.children())}
    by_index: Dict[int, List[str]] = {}
    for name, i in _module_outputs(nodes).items():
        meta = nodes[i].meta.get("tensor_meta")
        if i in points and hasattr(meta, "shape") and len(meta.shape) in (2, 4):
            by_index.setdefault(i, []).append(name)
    usable = {i: names for i, names in by_index.items() if containers.intersection(names)} or by_index
    return [Cut(i, tuple(sorted(names, key=lambda n: (n.count("."), n)))) for i, names in sorted(usable.items())]


def _piece(traced: fx.GraphModule, nodes: Sequence[fx.Node], start: int, stop: int,
           source: Optional[fx.Node], free: set) -> fx.GraphModule:
    """Graph of nodes[start..stop] fed by ``source`` (None: the model's input), returning node ``stop``
    (the model's output when ``stop`` is the output node)."""
    graph = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    if source is not None:
        env[source] = graph.placeholder("h")

    def get(node):
        if node not in env:  # a parameter or constant from an earlier block
            assert node in free, f"value {node} crosses a cut"
            env[node] = graph.node_copy(node, get)
        return env[node]

    for node in nodes[start:stop + 1]:
        if node.op == "output":
            graph.node_copy(node, get)
            break
        env[node] = graph.node_copy(node, get)
    else:
        graph.output(env[nodes[stop]])
    piece = fx.GraphModule(traced, graph)
    piece.graph.eliminate_dead_code()
    piece.recompile()
    return piece


def split_model(model: nn.Module, example: torch.Tensor) -> Tuple[List[nn.Module], nn.Module, List[Cut]]:
    """(blocks, head, cuts): block i ends at cut i, the last block ends at the model's output and the
    head is the identity, so an exit may follow any cut."""
    was_training = model.training
    model.eval()
    try:
        traced = trace(model)
        cuts = find_cuts(model, traced, example)
    finally:
        model.train(was_training)
    if not cuts:
        raise ConfigError(f"early exit found no point in {type(model).__name__} where one tensor carries all the "
                          "work so far (every module output is bypassed by a skip or concat connection)",
                          key="early_exit", value=type(model).__name__,
                          fix="drop the exits stage, or build EarlyExitModel(blocks, head, ...) yourself")
    nodes = list(traced.graph.nodes)
    free = _free_nodes(nodes)
    bounds = [c.index for c in cuts] + [len(nodes) - 1]
    blocks, start, source = [], 0, None
    for stop in bounds:
        blocks.append(_piece(traced, nodes, start, stop, source, free))
        start, source = stop + 1, nodes[stop]
    for block in blocks:
        block.train(was_training)
    return blocks, nn.Identity(), cuts


def positions_by_name(positions: Sequence, cuts: Sequence[Cut]) -> List[int]:
    """Exit positions given as module names (or block indices) -> block indices."""
    index = {name: i for i, cut in enumerate(cuts) for name in cut.names}
    out = []
    for p in positions:
        text = str(p)
        if text in index:
            out.append(index[text])
        elif text.lstrip("-").isdigit():
            out.append(int(text))
        else:
            shown = ", ".join(c.names[0] for c in cuts[:12]) + (" ..." if len(cuts) > 12 else "")
            raise ConfigError("no early exit can follow this module (it is not a module of the model, or a skip "
                              "or concat connection bypasses its output)", key=KEY, value=text,
                              fix=f"name one of: {shown}")
    return out


__all__ = ["Cut", "find_cuts", "positions_by_name", "split_model", "trace"]
