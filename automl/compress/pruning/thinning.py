"""Physical removal of pruned output channels, with every coupled channel, via Torch-Pruning's DepGraph.

A *structure group* is the set of layers whose output channels must be removed together: a conv and
its BN, every conv feeding one residual add, the SE excitation conv gating that tensor, a depthwise
conv and its producer, and (on the input side) every consumer, including concat and grouped convs.

Why we do not call ``group.prune()`` once per layer: pruning groups one after another invalidates
the concat offsets and the per-group layout of grouped convs computed for the next group. Instead
all groups are planned on the unpruned graph (original indices), merged per (layer, side), and each
layer is cut exactly once. Torch-Pruning slices a grouped conv's input channels wrongly unless every
group loses the same local indices, so grouped convs are cut here (see ``_cut_grouped_inputs``).
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch_pruning as tp

from automl.compress.pruning.groups import (conv_blocks, group_problem, install_guards,
                                            merge_channels, opaque_ops)
from automl.errors import ConfigError, UnknownNameError

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
Keep = Union[Sequence[int], Sequence[bool], torch.Tensor]


@dataclass(frozen=True, eq=False)
class CoupledGroup:
    """Output channels of ``outputs`` are removed together; ``inputs`` lose the matching inputs."""

    root: str
    channels: int
    outputs: Tuple[str, ...]
    inputs: Tuple[str, ...]
    couplings: Tuple[str, ...]  # residual, concat, gating (SE), depthwise, grouped, batchnorm
    members: tuple = field(repr=False, default=())  # (module, side, idxs, root_idxs) for scoring
    blocked: str = ""  # why the group cannot be thinned ('' = it can); see groups.py
    blocks: tuple = ()  # grouped convs: channel blocks that must each lose the same number of channels


def _graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph, with ``dg.opaque_ops`` {op node: why} for the ops whose
    channel mapping it gets wrong (see groups.py); groups crossing one are never thinned."""
    was_training = model.training  # tracing puts the model in eval mode and leaves it there
    # A model with side outputs (early-exit heads) is traced through all of them, so the layers
    # that read a pruned feature map are cut with it.
    # Always a forward_fn: without one Torch-Pruning first tries ``model(*example)``, which unpacks
    # the batch and traces an MLP (or a conv net without BatchNorm) on one unbatched sample.
    all_outputs = getattr(model, "all_exits", None)
    forward = (lambda m, x: all_outputs(x)) if all_outputs is not None else (lambda m, x: m(x))
    install_guards()
    dg = tp.DependencyGraph()
    dg.reshape_problems = {}
    try:
        with torch.enable_grad():
            dg.build_dependency(model, example_inputs=example, forward_fn=forward, verbose=False)
    finally:
        model.train(was_training)
    dg.opaque_ops = opaque_ops(dg, dg.reshape_problems)
    return dg


def _is_depthwise(m) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.out_channels > 1


def _is_grouped(m) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not _is_depthwise(m)


def _members(dg, group, names) -> List[tuple]:
    """(module, 'out'|'in', idxs, root_idxs) for the real layers of a Torch-Pruning group."""
    out = []
    for item in group:
        dep, module = item.dep, item.dep.target.module
        if dep.target.type == tp.ops.OPTYPE.PARAMETER:
            raise ConfigError("thinning does not support bare nn.Parameter tensors in the channel path",
                              value=dg._param_to_name.get(module, "?"), fix="wrap the parameter in a module")
        if module not in names:
            continue  # Torch-Pruning's own op nodes (add, cat, relu ...) hold no weights
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            raise ConfigError("thinning does not support transposed convolutions", value=names[module],
                              fix="leave this layer and its coupled layers out of `keep`")
        if _is_depthwise(module) and module.in_channels != module.out_channels:
            raise ConfigError("a conv with groups == out_channels but in_channels != out_channels cannot be "
                              "thinned", value=names[module], fix="leave its coupled layers out of `keep`")
        # BN and depthwise convs use one function for both sides: they shrink their outputs.
        side = "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in"
        out.append((module, side, tuple(item.idxs), tuple(item.root_idxs), dep))
    return out


def _output_layers(dg, names) -> set:
    """Layers whose output reaches the model output through weight-free ops only (the classifier)."""
    found = set()
    for module, node in dg.module2node.items():
        if module not in names:
            continue
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if not n.outputs or n.type == tp.ops.OPTYPE.OUTPUT:
                found.add(module)
                break
            for o in n.outputs:
                if o not in seen and o.module not in names:
                    seen.add(o)
                    stack.append(o)
    return found


def _resolve(model: nn.Module, name: str) -> Tuple[str, nn.Module]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE)}
    key = name[len("module."):] if isinstance(name, str) and name.startswith("module.") else name
    if key not in layers:
        near = difflib.get_close_matches(str(key), list(layers), n=5, cutoff=0.0)
        raise UnknownNameError("not a Conv/Linear layer of the model", key="keep", value=name,
                               fix=f"nearest layer names: {', '.join(near) or '(none)'}")
    return key, layers[key]


def _keep_indices(spec: Keep, n: int, name: str) -> List[int]:
    """Normalise an index list or a boolean mask over ``n`` output channels to sorted indices."""
    values = spec.tolist() if isinstance(spec, torch.Tensor) else list(spec)
    if values and all(isinstance(v, bool) for v in values):
        if len(values) != n:
            raise ConfigError(f"keep mask for '{name}' has {len(values)} entries but the layer has {n} "
                              "output channels", key="keep", value=len(values), fix=f"give {n} booleans")
        values = [i for i, v in enumerate(values) if v]
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n]
    if bad or len(set(values)) != len(values):
        raise ConfigError(f"keep indices for '{name}' must be distinct integers in [0, {n})", key="keep",
                          value=bad[:5] or values, fix="give each kept output channel index once")
    if not values:
        raise ConfigError(f"'{name}' would keep no output channel", key="keep", value=[],
                          fix="keep at least one channel (to drop a layer, change the architecture)")
    return sorted(values)


def _plan(model: nn.Module, example, keep: Mapping[str, Keep], require_coupled: bool = False):
    """Merged removal per (module, side) in original indices, after validating ``keep``."""
    names = {m: n for n, m in model.named_modules()}
    dg = _graph(model, example)
    heads = _output_layers(dg, names)
    plan: Dict[tuple, list] = {}  # (module, side) -> [dep, removed idxs, requesting names]
    wanted = {}
    for raw, spec in keep.items():
        name, layer = _resolve(model, raw)
        n = layer.out_channels if isinstance(layer, nn.modules.conv._ConvNd) else layer.out_features
        pruned = sorted(set(range(n)) - set(_keep_indices(spec, n, name)))
        wanted[name] = (layer, set(pruned))
        if not pruned:
            continue
        pruner = dg.get_pruner_of_module(layer)
        group = dg.get_pruning_group(layer, pruner.prune_out_channels, pruned)
        why = group_problem(group, dg.opaque_ops)
        if why:
            raise ConfigError(f"the channels of '{name}' cannot be thinned: they pass through {why}", key="keep",
                              value=raw, fix=f"leave '{name}' and its coupled layers out (structured pruning: "
                              "exclude them with `layers:`)")
        for module, side, idxs, _, dep in _members(dg, group, names):
            if side == "out" and module in heads:
                raise ConfigError(f"removing channels of '{name}' would change the model's outputs (it is or "
                                  f"is coupled with the output layer '{names[module]}')", key="keep", value=raw,
                                  fix="never thin the classifier or layers added to its output")
            entry = plan.setdefault((module, side), [dep, set(), set()])
            entry[1].update(idxs)
            entry[2].add(name)
    for name, (layer, pruned) in wanted.items():
        removed = plan.get((layer, "out"), [None, set(), set()])
        if removed[1] != pruned:
            extra = sorted(removed[1] - pruned)
            raise ConfigError(f"'{name}' is coupled with {sorted(removed[2] - {name})}, whose keep also removes "
                              f"its channels {extra[:10]}", key="keep", value=name,
                              fix="give coupled layers the same keep (see coupled_groups), or name only one")
    if require_coupled:
        missing = sorted(names[m] for (m, side) in plan if side == "out" and isinstance(m, PRUNABLE)
                         and names[m] not in wanted)
        if missing:
            raise ConfigError("masks remove channels whose coupled layers have no mask, so the masked model "
                              "is not equivalent to a thinned one", key="masks", value=missing,
                              fix="mask coupled layers with the same indices (coupled_masks) or use thin()")
    return plan, names


def _cut_grouped(module: nn.Conv2d, side: str, idxs: List[int], dep, name: str):
    """Grouped (non-depthwise) conv: every group must lose the same number of channels on ``side``."""
    groups = module.groups
    total = module.out_channels if side == "out" else module.in_channels
    per = total // groups
    local = [[i - g * per for i in idxs if g * per <= i < (g + 1) * per] for g in range(groups)]
    counts = {len(lst) for lst in local}
    if len(counts) != 1 or counts == {per}:
        raise ConfigError(f"grouped conv '{name}' ({groups} groups of {per} {side}put channels) must lose the "
                          "same number of channels in every group, and keep some", value=[len(x) for x in local],
                          fix="remove the same number of channels from each group's producers")
    if side == "out":
        dep(idxs)  # filters are contiguous per group: Torch-Pruning's slicing is correct here
        return
    # Each output filter reads only its own group's inputs: select them per filter's group.
    out_per = module.out_channels // groups
    rows = []
    for g, drop in enumerate(local):
        cols = torch.tensor([j for j in range(per) if j not in set(drop)], dtype=torch.long)
        rows.append(module.weight.data[g * out_per:(g + 1) * out_per].index_select(1, cols))
    module.weight = nn.Parameter(torch.cat(rows, 0))
    module.in_channels -= len(idxs)


def _reroot(dg, group, members, names):
    """The group traced again from its producer with the fewest channels in it, when that is fewer
    than the root's: from a layer reading a ghost module's cat(x1, dw(x1)), channels j and j + C1 are
    two root channels that Torch-Pruning's merge never links; from x1's conv they are one."""
    channels = len(group[0].idxs)
    sizes = [(len(idxs), i) for i, (m, side, idxs, *_) in enumerate(members)
             if side == "out" and isinstance(m, PRUNABLE)
             and len(idxs) == (m.out_features if isinstance(m, nn.Linear) else m.out_channels)]
    if not sizes or min(sizes)[0] >= channels:
        return group, members
    module = members[min(sizes)[1]][0]
    again = dg.get_pruning_group(module, dg.get_pruner_of_module(module).prune_out_channels,
                                 list(range(min(sizes)[0])))
    return again, _members(dg, again, names)


def coupled_groups(model: nn.Module, example: torch.Tensor, *, include_blocked: bool = False
                   ) -> List[CoupledGroup]:
    """Every structure group of Conv/Linear output channels, except the classifier's outputs.

    Channels tied inside a group (a ghost module's two halves) are merged into one channel. Groups
    that cannot be thinned (they cross an op Torch-Pruning maps wrongly) are left out unless
    ``include_blocked``. ``blocked`` says why a group is not pruned automatically: those, and groups
    whose grouped convs need a balance with other groups (thin() accepts a balanced keep for them)."""
    names = {m: n for n, m in model.named_modules()}
    dg = _graph(model, example)
    heads = _output_layers(dg, names)
    groups = []
    for group in dg.get_all_groups(root_module_types=PRUNABLE):
        try:
            members = _members(dg, group, names)
        except ConfigError as exc:  # a bare parameter, a transposed conv ... in the channel path
            root = group[0].dep.target.module
            if include_blocked and root not in heads:
                groups.append(CoupledGroup(root=names[root], channels=len(group[0].idxs), outputs=(names[root],),
                                           inputs=(), couplings=(), blocked=f"{exc.message} ({exc.value})"))
            continue
        if any(side == "out" and m in heads for m, side, *_ in members):
            continue
        group, members = _reroot(dg, group, members, names)
        why = group_problem(group, dg.opaque_ops)
        channels, merged = merge_channels([m[:4] for m in members])
        blocks, problem = conv_blocks(merged, channels)
        if why and not include_blocked:
            continue  # thin() refuses it too
        why = why and f"it passes through {why}" or problem
        ops = [repr(item.dep.target.module) for item in group]
        layers = [m[0] for m in members]
        tags = {"residual": any("AddBackward" in o for o in ops), "concat": any("_ConcatOp" in o for o in ops),
                "gating": any("MulBackward" in o for o in ops), "depthwise": any(map(_is_depthwise, layers)),
                "grouped": any(map(_is_grouped, layers)), "batchnorm": any(isinstance(m, NORMS) for m in layers)}
        unique = lambda side: tuple(dict.fromkeys(names[m] for m, s, *_ in members if s == side))  # noqa: E731
        groups.append(CoupledGroup(root=names[members[0][0]], channels=channels, outputs=unique("out"),
                                   inputs=unique("in"), couplings=tuple(t for t, on in tags.items() if on),
                                   members=tuple(merged), blocked=why, blocks=blocks))
    return groups


def group_channel_scores(group: CoupledGroup, criterion: str = "l1") -> torch.Tensor:
    """Per-channel importance of a group: the sum over members of the norm of each channel's slice
    (output filter, input column, BN gamma), so coupled layers are ranked together."""
    if criterion not in ("l1", "l2"):
        raise ConfigError("unknown channel criterion", key="criterion", value=criterion, fix="use 'l1' or 'l2'")
    p = 1 if criterion == "l1" else 2
    scores = torch.zeros(group.channels)
    for module, side, idxs, root_idxs in group.members:
        if getattr(module, "weight", None) is None:
            continue
        w = module.weight.detach()
        if side == "out":
            slices = [w[i] for i in idxs]
        elif _is_grouped(module):
            per, out_per = module.in_channels // module.groups, module.out_channels // module.groups
            slices = [w[(i // per) * out_per:(i // per + 1) * out_per, i % per] for i in idxs]
        else:
            slices = [w[:, i] for i in idxs]
        norms = torch.stack([s.flatten().norm(p) for s in slices])
        scores.index_add_(0, torch.tensor(root_idxs, dtype=torch.long), norms)
    return scores


def coupled_masks(model: nn.Module, example: torch.Tensor, keep: Mapping[str, Keep]) -> Dict[str, torch.Tensor]:
    """Boolean keep-masks over the output channels of every Conv/Linear that ``keep`` touches."""
    plan, names = _plan(model, example, keep)
    masks = {}
    for (module, side), (_, removed, _) in plan.items():
        if side == "out" and isinstance(module, PRUNABLE):
            n = module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else module.out_features
            mask = torch.ones(n, dtype=torch.bool)
            mask[sorted(removed)] = False
            masks[names[module]] = mask
    return masks


def mask_channels(model: nn.Module, example: torch.Tensor, keep: Mapping[str, Keep]) -> nn.Module:
    """A deep copy in which every removed channel is zero at the output of each coupled layer
    (conv/linear filter and bias, BN/GN gamma and beta): numerically what ``thin`` keeps."""
    masked = copy.deepcopy(model)
    plan, names = _plan(masked, example, keep)
    with torch.no_grad():
        for (module, side), (_, removed, _) in plan.items():
            if side != "out":
                continue
            if isinstance(module, NORMS) and not module.affine:
                raise ConfigError("cannot zero channels of a norm layer without affine parameters",
                                  value=names[module], fix="use affine=True or leave its group out of `keep`")
            idx = torch.tensor(sorted(removed), dtype=torch.long)
            module.weight[idx] = 0
            if getattr(module, "bias", None) is not None:
                module.bias[idx] = 0
    return masked


def thin(model: nn.Module, example: torch.Tensor, keep: Mapping[str, Keep]) -> nn.Module:
    """A thinned deep copy (``model`` is untouched): each named layer keeps exactly its ``keep``
    output channels (index list or boolean mask); coupled layers lose the same channels."""
    return _thin(model, example, keep, require_coupled=False)


def thin_from_masks(model: nn.Module, example: torch.Tensor, masks: Mapping[str, Keep]) -> nn.Module:
    """Remove exactly the masked (False) output channels; every coupled layer must carry a mask.

    Exact with respect to a masked model that zeroes the whole group, as ``mask_channels`` does."""
    return _thin(model, example, masks, require_coupled=True)


def _thin(model, example, keep, require_coupled: bool) -> nn.Module:
    thinned = copy.deepcopy(model)
    plan, names = _plan(thinned, example, keep, require_coupled)
    for (module, side), (dep, removed, _) in plan.items():
        idxs = sorted(removed)
        if _is_grouped(module):
            _cut_grouped(module, side, idxs, dep, names[module])
        else:
            dep(idxs)
    return thinned
