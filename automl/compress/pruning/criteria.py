"""Pruning criteria: pure functions giving ONE SCORE PER STRUCTURE (higher = more important = kept).

Weight-based criteria take ``groups`` of shape (n_structures, group_size), i.e. a weight already
grouped by ``granularity.group_view``; activation-based ones take activations or running
statistics (``ActivationStats``). ``CRITERIA`` maps names to the functions; each function carries
a ``needs`` attribute saying what it must be given, so a handler can dispatch on it:

  ``groups``          f(groups)                     l1, l2, fpgm
  ``groups+grads``    f(groups, grad_groups)        taylor, obd (given the diagonal Fisher)
  ``incoming+outgoing`` f(incoming, outgoing)       similarity (per channel: weights in and out)
  ``activations``     f(activations (N, C, ...))    apoz, mean_activation
  ``bn_weight``       f(bn_weight (C,))             bn_scale
  ``count``           f(n, seed)                    random

``rank_to_keep`` turns any score vector into a keep-mask.
"""
from __future__ import annotations

from typing import Callable

import torch

from automl.errors import ConfigError
from automl.registry import Registry

CRITERIA: Registry[Callable[..., torch.Tensor]] = Registry("pruning criterion")


def _criterion(name: str, needs: str):
    def decorator(fn):
        fn.needs = needs
        return CRITERIA.register(name)(fn)

    return decorator


def _check_groups(groups: torch.Tensor, what: str = "groups") -> torch.Tensor:
    if not isinstance(groups, torch.Tensor) or groups.dim() != 2:
        shape = tuple(groups.shape) if isinstance(groups, torch.Tensor) else type(groups).__name__
        raise ConfigError(f"{what} must be a 2-D tensor (n_structures, group_size)", value=shape,
                          fix="group the weight first with granularity.group_view(weight, granularity)")
    return groups.detach()


# weight-based -------------------------------------------------------------------------------------
def lp_norm(groups: torch.Tensor, p: float = 1) -> torch.Tensor:
    """L_p norm of each structure (row): small-norm filters/blocks contribute little (Li et al. 2017)."""
    if not p > 0:
        raise ConfigError("lp_norm needs p > 0", key="p", value=p, fix="use p=1 (L1) or p=2 (L2)")
    return torch.linalg.vector_norm(_check_groups(groups).float(), ord=p, dim=1)


@_criterion("l1", "groups")
def l1_norm(groups: torch.Tensor) -> torch.Tensor:
    return lp_norm(groups, p=1)


@_criterion("l2", "groups")
def l2_norm(groups: torch.Tensor) -> torch.Tensor:
    return lp_norm(groups, p=2)


@_criterion("taylor", "groups+grads")
def taylor(groups: torch.Tensor, grad_groups: torch.Tensor) -> torch.Tensor:
    """|sum(w * dL/dw)| per structure: first-order estimate of the loss change when the structure is
    zeroed (Molchanov et al. 2017, weight variant). Accumulate gradients over a few batches first."""
    groups, grad_groups = _check_groups(groups), _check_groups(grad_groups, "grad_groups")
    if groups.shape != grad_groups.shape:
        raise ConfigError("taylor needs weights and gradients grouped the same way",
                          value=(tuple(groups.shape), tuple(grad_groups.shape)),
                          fix="call group_view with the same granularity on weight and weight.grad")
    return (groups.float() * grad_groups.float()).sum(dim=1).abs()


@_criterion("obd", "groups+grads")
def obd(groups: torch.Tensor, fisher_groups: torch.Tensor) -> torch.Tensor:
    """sum(0.5 * F * w^2) per structure: Optimal Brain Damage's second-order estimate of the loss
    change when the structure is zeroed, with the diagonal empirical Fisher ``F`` (``fisher.py``) as the
    Hessian's diagonal. Given the Fisher where taylor is given gradients."""
    groups, fisher_groups = _check_groups(groups), _check_groups(fisher_groups, "fisher_groups")
    if groups.shape != fisher_groups.shape:
        raise ConfigError("obd needs weights and Fisher values grouped the same way",
                          value=(tuple(groups.shape), tuple(fisher_groups.shape)),
                          fix="call group_view with the same granularity on the weight and its Fisher values")
    return (0.5 * fisher_groups.float() * groups.float() ** 2).sum(dim=1)


@_criterion("fpgm", "groups")
def fpgm(groups: torch.Tensor) -> torch.Tensor:
    """Sum of Euclidean distances from each structure to all others (He et al. 2019).

    Filters near the geometric median are replaceable by the rest, so they get the lowest score.
    Uses pairwise distances (n x n memory), exact rather than the matmul shortcut.
    """
    g = _check_groups(groups).float()
    dist = torch.cdist(g, g, compute_mode="donot_use_mm_for_euclid_dist")
    return dist.sum(dim=1)


def pair_saliency(dist: torch.Tensor, power: torch.Tensor) -> torch.Tensor:
    """[i, j] = power[j] * dist[i, j]: the cost of removing j into i; inf on the diagonal (never oneself)."""
    return (dist * power[None, :]).fill_diagonal_(float("inf"))


def squared_distances(w: torch.Tensor) -> torch.Tensor:
    return torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist") ** 2


@_criterion("similarity", "incoming+outgoing")
def similarity(incoming: torch.Tensor, outgoing: torch.Tensor) -> torch.Tensor:
    """min over i of <a_j^2> * ||w_j - w_i||^2 per channel j: the saliency of removing j and adding its
    outgoing weights ``a_j`` to its nearest twin i (Srinivas & Babu 2015, data-free); ``incoming``
    (C, F) and ``outgoing`` (C, G) rows per channel. Pruning by it folds each removed channel
    (similarity.py)."""
    w, a = _check_groups(incoming, "incoming").double(), _check_groups(outgoing, "outgoing").double()
    if w.shape[0] != a.shape[0]:
        raise ConfigError("similarity needs one incoming and one outgoing row per channel",
                          value=(tuple(w.shape), tuple(a.shape)), fix="build both over the same channels")
    if w.shape[0] < 2:
        return torch.full((w.shape[0],), float("inf"))
    return pair_saliency(squared_distances(w), a.pow(2).mean(1)).min(0).values.float()


@_criterion("bn_scale", "bn_weight")
def bn_scale(bn_weight: torch.Tensor) -> torch.Tensor:
    """|gamma| per channel of the BatchNorm following a conv (network slimming, Liu et al. 2017)."""
    if not isinstance(bn_weight, torch.Tensor) or bn_weight.dim() != 1:
        raise ConfigError("bn_scale needs the 1-D BatchNorm weight (gamma)",
                          value=tuple(getattr(bn_weight, "shape", ())) or type(bn_weight).__name__,
                          fix="pass bn.weight of the BatchNorm after the pruned layer")
    return bn_weight.detach().float().abs()


@_criterion("random", "count")
def random_scores(n: int, seed: int = 0) -> torch.Tensor:
    """Uniform random scores from a private generator: reproducible and global-RNG neutral (baseline)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError("random_scores needs a positive structure count", key="n", value=n,
                          fix="pass structure_count(weight.shape, granularity)")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.rand(n, generator=gen)


# activation-based ---------------------------------------------------------------------------------
def _per_channel(activations: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) -> (C, N*...) so every statistic is a row reduction."""
    if not isinstance(activations, torch.Tensor) or activations.dim() < 2:
        raise ConfigError("activations must be (N, C, ...) with a channel dimension",
                          value=tuple(getattr(activations, "shape", ())) or type(activations).__name__,
                          fix="record the output of the layer (after its ReLU) for a batch")
    a = activations.detach()
    return a.transpose(0, 1).reshape(a.shape[1], -1)


@_criterion("apoz", "activations")
def apoz(activations: torch.Tensor) -> torch.Tensor:
    """1 - APoZ per channel (Hu et al. 2016): channels that are mostly zero after ReLU are dropped."""
    return 1.0 - (_per_channel(activations) == 0).float().mean(dim=1)


@_criterion("mean_activation", "activations")
def mean_activation(activations: torch.Tensor) -> torch.Tensor:
    """Mean activation per channel (Molchanov et al. 2017 baseline): small mean = little signal."""
    return _per_channel(activations).float().mean(dim=1)


class ActivationStats:
    """Running per-channel statistics of a module's output, fed by a forward hook.

    Keeps counts, not batches, so memory is O(C) however much data passes. Attach it to the module
    whose output is post-ReLU (the ReLU itself), or pass ``relu=True`` to rectify the output first
    (for models that call F.relu functionally).
    """

    def __init__(self):
        self.zeros = None   # (C,) number of exact zeros seen per channel
        self.total = None   # (C,) sum of activations per channel
        self.count = None   # (C,) elements seen per channel

    def attach(self, module: torch.nn.Module, *, relu: bool = False):
        """Register the hook; returns the handle (call ``.remove()`` on it when done)."""
        def hook(_module, _inputs, output):
            self.update(torch.relu(output) if relu else output)

        return module.register_forward_hook(hook)

    @torch.no_grad()
    def update(self, activations: torch.Tensor) -> None:
        rows = _per_channel(activations).float()
        if self.count is None:
            shape = (rows.shape[0],)
            self.zeros, self.total, self.count = (torch.zeros(shape, dtype=torch.float64) for _ in range(3))
        elif rows.shape[0] != self.count.numel():
            raise ConfigError("channel count changed between batches", value=rows.shape[0],
                              fix=f"use one ActivationStats per module (this one has "
                                  f"{self.count.numel()} channels)")
        self.zeros += (rows == 0).sum(dim=1).to(torch.float64).cpu()
        self.total += rows.sum(dim=1).to(torch.float64).cpu()
        self.count += rows.shape[1]

    def _require(self):
        if self.count is None:
            raise ConfigError("no activations recorded yet",
                              fix="attach() to a module and run forward passes before reading statistics")

    def apoz(self) -> torch.Tensor:
        """The raw APoZ per channel (share of zeros, in [0, 1]); the keep-score is ``1 - apoz()``."""
        self._require()
        return (self.zeros / self.count).float()

    def mean_activation(self) -> torch.Tensor:
        self._require()
        return (self.total / self.count).float()

    def scores(self, criterion: str) -> torch.Tensor:
        """Keep-scores (higher = keep) for ``apoz`` or ``mean_activation``."""
        if criterion == "apoz":
            return 1.0 - self.apoz()
        if criterion == "mean_activation":
            return self.mean_activation()
        raise ConfigError("ActivationStats scores only activation criteria", key="criterion",
                          value=criterion, fix="use 'apoz' or 'mean_activation'")


# ranking ----------------------------------------------------------------------------------------------
def rank_to_keep(scores: torch.Tensor, prune_ratio: float) -> torch.Tensor:
    """Bool keep-mask dropping exactly round(prune_ratio * n) lowest-score structures.

    Ties go by index (the earlier structure is dropped first), matching ``magnitude_masks``. At least
    one structure is always kept, so a layer never disappears. ``round`` is Python's (half to even).
    """
    is_number = isinstance(prune_ratio, (int, float)) and not isinstance(prune_ratio, bool)
    if not is_number or not 0.0 <= prune_ratio < 1.0:
        raise ConfigError("prune ratio must be in [0, 1)", key="prune_ratio", value=prune_ratio,
                          fix="use a share such as 0.5 (1.0 would remove every structure)")
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or scores.numel() == 0:
        raise ConfigError("scores must be a non-empty 1-D tensor (one per structure)",
                          value=tuple(getattr(scores, "shape", ())) or type(scores).__name__,
                          fix="pass the output of a criterion for one layer (or concatenated layers)")
    scores = scores.detach()
    if torch.isnan(scores).any():
        raise ConfigError("scores contain NaN", value=int(torch.isnan(scores).sum()),
                          fix="check the model for NaN weights, gradients or activations")
    n = scores.numel()
    n_drop = min(int(round(prune_ratio * n)), n - 1)
    keep = torch.ones(n, dtype=torch.bool, device=scores.device)
    if n_drop:
        keep[torch.argsort(scores, stable=True)[:n_drop]] = False
    return keep
