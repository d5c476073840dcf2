"""What Torch-Pruning's dependency graph gets wrong on third-party graphs, and how a structure group
is shaped, for ``thinning.coupled_groups``.

Opaque ops. Torch-Pruning maps channel indices through add/mul/cat/split/slice and a flatten before a
Linear; every op it does not know is taken as element-wise, i.e. channel ``i`` in is channel ``i``
out. That is false for a channel shuffle (view to (N, g, C/g, H, W) + transpose + view back, where
its reshape mapping even divides by zero), a slice that really cuts channels (a ghost module's
``cat(x1, x2)[:, :out]``: the thinned model would still slice at the old ``out``), a reduction or a
broadcast over channels (spatial attention), a padded channel dimension, ... Such ops are *opaque*:
every structure group that crosses one is left unpruned (``CoupledGroup.blocked`` says why), so the
masked model and the thinned one stay equal. Deliberately a whitelist: an op not known to keep
channel ``i`` at channel ``i`` is opaque; a wrong "opaque" only costs some reduction.

Tied channels. A ghost module concatenates a conv's output x1 with a depthwise conv of x1, so its
channel j and channel j + C1 are one decision; Torch-Pruning reports both as separate root channels
of a group rooted at a layer that reads the concatenation. ``merge_channels`` makes one channel
(class) of every set of root channels tied through a shared layer channel.

Grouped convolutions. A grouped (not depthwise) conv must lose the same number of channels in each
of its groups, on each side. ``conv_blocks`` gives the partition of a structure group's channels into
those groups, which the allocation keeps balanced (``allocation.grid_keep``).
"""
from __future__ import annotations

import re
from math import gcd
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn
import torch_pruning as tp
import torch_pruning.dependency.index_mapping as tp_index_mapping

# ops that keep channel i at channel i (pooling, padding of spatial dims, activations, arithmetic)
KEEPS_CHANNELS = {
    "Add", "Sub", "Mul", "Div", "Neg", "Relu", "Relu6", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Silu",
    "Mish", "Sigmoid", "Tanh", "Hardtanh", "Hardswish", "Hardsigmoid", "Clamp", "ClampMin", "ClampMax",
    "Threshold", "Softplus", "Exp", "Log", "Abs", "Pow", "Sqrt", "Rsqrt", "Reciprocal", "Clone", "ToCopy",
    "Alias", "NativeDropout", "Dropout", "MaxPool1DWithIndices", "MaxPool2DWithIndices",
    "MaxPool3DWithIndices", "MaxPool2D", "AvgPool1D", "AvgPool2D", "AvgPool3D", "AdaptiveAvgPool1D",
    "AdaptiveAvgPool2D", "AdaptiveAvgPool3D", "AdaptiveMaxPool1D", "AdaptiveMaxPool2D", "AdaptiveMaxPool3D",
    "UpsampleNearest2D", "UpsampleBilinear2D", "UpsampleNearest1D", "UpsampleNearest3D", "ReflectionPad1D",
    "ReflectionPad2D", "ReplicationPad1D", "ReplicationPad2D", "ReplicationPad3D", "T", "Expand",
    "Round", "Floor", "Ceil", "Sign", "Trunc", "Frac", "Maximum", "Minimum", "Square",  # fake quantizers
}
REDUCTIONS = {"Mean", "Sum", "Amax", "Amin", "Std", "Var", "Max", "Min"}  # fine unless over channels


def _op_name(grad_fn) -> str:
    return re.sub(r"Backward\d*$", "", grad_fn.name()) if hasattr(grad_fn, "name") else "?"


def _out_shape(grad_fn) -> Optional[Tuple[int, ...]]:
    meta = getattr(grad_fn, "_input_metadata", None)
    return tuple(meta[0].shape) if meta else None


def _in_shapes(grad_fn) -> List[Tuple[int, ...]]:
    """Shapes of the op's tensor inputs (as their producers output them); leaves (parameters) skipped."""
    shapes = []
    for f, nr in getattr(grad_fn, "next_functions", ()):
        meta = getattr(f, "_input_metadata", None) if f is not None else None
        if meta and "AccumulateGrad" not in f.name() and nr < len(meta):
            shapes.append(tuple(meta[nr].shape))
    return shapes


def _dims(value, rank: int) -> set:
    values = value if isinstance(value, (tuple, list)) else [value]
    return {int(d) % rank for d in values} if rank else set()


def _inside_linear(node) -> bool:
    """A Linear on tokens (N, L, C) runs as view (N * L, C) -> addmm -> view back; Torch-Pruning records
    the first two as ops of their own. Both keep feature i at feature i of the Linear's input."""
    return bool(node.outputs) and all(isinstance(o.module, nn.Linear) or _op_name(o.grad_fn) in ("Addmm", "Mm")
                                      and _inside_linear(o) for o in node.outputs)


CHANNELS_LAST = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.MultiheadAttention)  # features on the last dim


def _real_module(node) -> bool:
    return isinstance(node.module, nn.Module) and not type(node.module).__module__.startswith("torch_pruning")


def _channels_last_input(node, depth: int = 8) -> bool:
    """The nearest modules upstream of ``node`` (through ops) all keep their features on the last dim,
    so a view that keeps the last dim keeps the features (not a conv's spatial width)."""
    if depth == 0 or not node.inputs:
        return False
    return all(isinstance(i.module, CHANNELS_LAST) if _real_module(i) else _channels_last_input(i, depth - 1)
               for i in node.inputs)


def _reshape_problem(node) -> str:
    """'' for a view Torch-Pruning maps right: a flatten to (N, features), one that keeps dim 1, or the
    token view a Linear makes of its input."""
    grad_fn = node.grad_fn
    before, after = getattr(grad_fn, "_saved_self_sym_sizes", None), _out_shape(grad_fn)
    if before is None or after is None:
        return "a reshape of unknown shape"
    before = tuple(int(s) for s in before)
    if len(before) >= 2 and len(after) >= 2 and before[:2] == after[:2]:
        return ""
    if len(after) == 2 and before[:1] == after[:1]:
        return ""
    if len(after) == 2 and before[-1] == after[-1] and _inside_linear(node) and _channels_last_input(node):
        return ""
    return f"a reshape {list(before)} -> {list(after)} moves channels (e.g. a channel shuffle)"


def _op_problem(node) -> str:
    """Why Torch-Pruning's channel mapping through this op node is wrong, or ''."""
    op, gf = node.type, node.grad_fn
    name = _op_name(gf)
    out = _out_shape(gf) if gf is not None else None
    rank = len(out) if out else 0
    if op in (tp.ops.OPTYPE.CONCAT, tp.ops.OPTYPE.SPLIT):
        dim = getattr(gf, "_saved_dim", 1)
        channel = rank < 2 or int(dim) % max(rank, 1) == 1 or dim == 1
        if channel and getattr(node.module, "offsets", None) is None:
            return f"a {name.lower()} whose channel offsets could not be traced"
        return ""
    if op == tp.ops.OPTYPE.SLICE:
        ins = _in_shapes(gf) or [tuple(getattr(gf, "_saved_self_sym_sizes", ()) or ())]
        size = ins[0][1] if ins and len(ins[0]) >= 2 else None
        dim = int(getattr(gf, "_saved_dim", 1)) % max(rank, 1)
        start, end, step = (getattr(gf, f"_saved_{k}", None) for k in ("start", "end", "step"))
        if dim == 1 and not (start in (0, None) and step in (1, None) and size is not None and end is not None
                             and end >= size):
            return f"a channel slice [{start}:{end}:{step}] of {size} channels (it would not shrink with them)"
        return ""
    if op == tp.ops.OPTYPE.RESHAPE:
        return ""  # judged while Torch-Pruning maps it (see guarded_reshape)
    if op == tp.ops.OPTYPE.UNBIND:
        return "an unbind"
    if op == tp.ops.OPTYPE.EXPAND:
        ins = _in_shapes(gf)
        return "" if not ins or len(ins[0]) < 2 or rank < 2 or ins[0][1] == out[1] else \
            "an expand over the channel dimension"
    if op != tp.ops.OPTYPE.ELEMENTWISE:
        return ""
    if name in REDUCTIONS:
        dims = getattr(gf, "_saved_dim", None)
        if dims is None or (rank_in := len(getattr(gf, "_saved_self_sym_sizes", ()) or ())) < 2 \
                or 1 in _dims(dims, rank_in):
            return f"a {name.lower()} over the channels"
        return ""
    if name in ("Transpose", "Permute", "Squeeze", "Unsqueeze"):
        rank_in = len(_in_shapes(gf)[0]) if _in_shapes(gf) else rank
        if name == "Transpose":
            moved = _dims((gf._saved_dim0, gf._saved_dim1), rank_in) if rank_in else {0, 1}
            ok = not moved & {0, 1} or len(set(moved)) == 1
        elif name == "Permute":
            perm = getattr(gf, "_saved_dims", None)
            ok = perm is not None and [int(d) % rank_in for d in perm][:2] == [0, 1]
        else:
            dims = getattr(gf, "_saved_dim", None)
            ok = dims is not None and min(_dims(dims, max(rank_in, rank))) >= 2
        return "" if ok else f"a {name.lower()} that moves the channel dimension"
    if name == "ConstantPadNd":
        pad = getattr(gf, "_saved_pad", ())
        return "" if len(pad) <= 2 * max(rank - 2, 0) else "a padding of the channel dimension"
    if name in ("Addmm", "Mm") and _inside_linear(node):
        return ""
    if name not in KEEPS_CHANNELS:
        return f"the op {name} (not known to keep channel i at channel i)"
    if rank >= 2:  # a broadcast over channels couples tensors of different widths
        for shape in _in_shapes(gf):
            if len(shape) >= 2 and shape[1] != out[1] and name not in ("T",):
                return f"a {name.lower()} broadcasting {shape[1]} channels to {out[1]}"
    return ""


def _split_problem(node) -> str:
    """'' when Torch-Pruning's offsets of a channel split (chunk) cover the input in as many pieces as
    the split has outputs (else its mapping indexes past the offsets and raises)."""
    gf, offsets = node.grad_fn, getattr(node.module, "offsets", None)
    dim = getattr(gf, "_saved_dim", 1)
    ins = _in_shapes(gf)
    rank = len(ins[0]) if ins else 0
    if rank >= 2 and int(dim) % rank != 1:
        return ""
    if offsets is None or len(offsets) != len(node.outputs) + 1 or (ins and offsets[-1] != ins[0][1]):
        return "a channel split (chunk) whose pieces could not be traced"
    return ""


def install_guards():
    """Make Torch-Pruning's reshape and split mappings safe for graphs that carry ``reshape_problems``
    (a dict): an op it cannot map (a channel shuffle's reshape divides by zero there; a chunk whose
    pieces it miscounts indexes past its offsets) is recorded there {node: why} and left unmapped.
    Torch-Pruning re-runs the mappings at every get_pruning_group, hence lasting wrappers; graphs
    without the attribute behave as before."""
    for fn_name, check in (("update_reshape_index_mapping", _reshape_problem),
                           ("update_split_index_mapping", _split_problem)):
        original = getattr(tp_index_mapping, fn_name)
        if getattr(original, "automl_guard", False):
            continue

        def guarded(graph, node, _original=original, _check=check):
            problems = getattr(graph, "reshape_problems", None)
            if problems is None:
                return _original(graph, node)
            why = problems.get(node) or _check(node)
            if not why:
                try:
                    return _original(graph, node)
                except (ZeroDivisionError, IndexError, ValueError, TypeError) as exc:
                    why = f"an op Torch-Pruning cannot map ({type(exc).__name__} in {fn_name})"
            problems[node] = why

        guarded.automl_guard = True
        setattr(tp_index_mapping, fn_name, guarded)


def opaque_ops(dg, reshape_problems: Dict) -> Dict:
    """{node: why} for every op node whose channel mapping Torch-Pruning gets wrong."""
    found = dict(reshape_problems)
    for node in dg.module2node.values():
        if node in found or _real_module(node):
            continue
        why = _op_problem(node)
        if why:
            found[node] = why
    return found


def group_problem(group, opaque: Dict) -> str:
    """Why a Torch-Pruning group cannot be thinned as traced (it crosses an opaque op), or ''. The
    root cause first: a concat whose offsets fail to trace is mostly a consequence of a reshape."""
    found = [opaque[node] for item in group for node in (item.dep.source, item.dep.target) if node in opaque]
    return min(found, key=lambda why: ("offsets" in why or "pieces" in why, found.index(why))) if found else ""


def merge_channels(members: Sequence[tuple]) -> Tuple[int, List[tuple]]:
    """(channels, members) with tied root channels merged into one class (see the module docstring);
    members are (module, side, idxs, classes), one entry per (module, side), each channel once."""
    parent: Dict[int, int] = {}

    def find(r):
        parent.setdefault(r, r)
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    first: Dict[tuple, int] = {}
    for module, side, idxs, roots in members:
        for i, r in zip(idxs, roots):
            find(r)
            key = (id(module), side, i)
            if key in first:
                parent[find(r)] = find(first[key])
            else:
                first[key] = r
    classes = {r: c for c, r in enumerate(sorted({find(r) for r in parent}))}
    merged: Dict[tuple, dict] = {}
    for module, side, idxs, roots in members:
        entry = merged.setdefault((id(module), side), {"module": module, "side": side, "map": {}})
        for i, r in zip(idxs, roots):
            entry["map"][i] = classes[find(r)]
    out = []
    for entry in merged.values():
        idxs = tuple(sorted(entry["map"]))
        out.append((entry["module"], entry["side"], idxs, tuple(entry["map"][i] for i in idxs)))
    return len(classes), out


def _is_grouped(m) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not m.groups == m.out_channels > 1


def conv_blocks(members: Sequence[tuple], channels: int) -> Tuple[tuple, str]:
    """(blocks, problem): the partition of the group's channels into the groups of its grouped
    convs (each block must lose as many channels as every other), () when there is none."""
    partition = None
    for module, side, idxs, classes in members:
        if not _is_grouped(module):
            continue
        total = module.out_channels if side == "out" else module.in_channels
        per = total // module.groups
        name = type(module).__name__
        if len(idxs) != total or len(set(classes)) != total or len(classes) != channels:
            return (), (f"a grouped {name} ({module.groups} groups) reads these channels together with "
                        "channels of other layers (e.g. through a concat)")
        if per < 2:
            return (), f"a grouped {name} with one {side}put channel per group"
        blocks = [[] for _ in range(module.groups)]
        for i, c in zip(idxs, classes):
            blocks[i // per].append(c)
        mine = frozenset(frozenset(b) for b in blocks)
        if partition is not None and mine != partition:
            return (), "grouped convs with different groupings share these channels"
        partition = mine
    if partition is None:
        return (), ""
    return tuple(tuple(sorted(b)) for b in sorted(partition, key=min)), ""


def grid_step(block: int, round_to: int) -> int:
    """The step of the kept-channel grid for a block (a group, or one group of a grouped conv) of
    ``block`` channels: ``round_to`` when it divides the block, else gcd(block, round_to).

    Why: round_to exists because CPU kernels process channels in blocks of 8/16, so a count that is
    not a multiple runs a partial block. A layer that is itself not on the grid (12 channels of a
    DenseNet growth rate, 24 or 40 in MobileNet/GhostNet widths) already has that alignment; keeping
    a multiple of gcd(channels, round_to) (4 for 12, 8 for 24 or 40) never makes it worse, while the
    plain rule (multiples of 16 or all) would leave every such layer unpruned (a DenseNet-40 could not
    lose a single channel). A grouped conv runs one small kernel per group, so the grid is per group.
    """
    return max(1, gcd(block, round_to)) if round_to > 1 else 1
