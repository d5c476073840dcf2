"""Scores of the structured pruner: one keep-score per channel of each structure group (thinned path)
or per structure of each layer (masks-only path), for every criterion in criteria.py. Weight criteria
read the dense weights; taylor and obd first leave a tensor per parameter in ``.grad`` (the loss
gradient summed over the calibration batches, or the diagonal Fisher); activation criteria hook the
rectified BatchNorm output over the calibration batches."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from automl.compress.pruning.channels import _norm_after, _param, _slices
from automl.compress.pruning.criteria import CRITERIA, ActivationStats
from automl.compress.pruning.fisher import diagonal_fisher
from automl.compress.pruning.granularity import group_view
from automl.compress.pruning.similarity import incoming, outgoing
from automl.compress.pruning.thinning import NORMS, PRUNABLE

GRADIENT_CRITERIA = ("taylor", "obd")  # ranked with a tensor per parameter left in .grad


class StructuredScoring:
    """Mixin of StructuredPruning (uses its config, ctx, units, side, cut, block and _example)."""

    # scoring -----------------------------------------------------------------------------------------
    def _calibration(self):
        if self.batches is None:
            loader = self.ctx.task.train_loader(batch_size=128, seed=self.ctx.seed)
            self.batches = [b for _, b in zip(range(self.config.calib_batches), loader)]
        return self.batches

    def _run(self, model, grads: bool):
        """Forward (and backward when ``grads``) over the calibration batches in eval mode."""
        self._example()
        was_training = model.training
        model.eval()
        loss_fn = getattr(self.ctx.task, "loss", F.cross_entropy)
        try:
            with torch.set_grad_enabled(grads):
                for x, y in self._calibration():
                    out = model(x)
                    if grads:
                        loss_fn(out, y).backward()
        finally:
            model.train(was_training)

    def _gradients(self, model):
        """Leave in each parameter's ``.grad`` what the criterion ranks with: taylor the loss gradient
        summed over the calibration batches, obd the diagonal Fisher over as many samples in batches of 16."""
        if self.config.criterion == "taylor":
            self._run(model, grads=True)
            return
        self._example()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fisher = diagonal_fisher(model, self.ctx.task, params, batches=self.config.calib_batches * 8,
                                 batch_size=16, seed=self.ctx.seed)
        for n, p in params.items():
            p.grad = fisher[n].to(p.dtype)

    def _activation_scores(self, model, units: Dict[str, list]) -> Dict[str, torch.Tensor]:
        """units: {unit: [(layer name, module, idxs, root idxs, channels)]} -> pooled keep-scores."""
        stats = {(u, n): ActivationStats() for u, members in units.items() for n, *_ in members}
        handles = [stats[(u, n)].attach(_norm_after(model, n) or m, relu=True)
                   for u, members in units.items() for n, m, *_ in members]
        try:
            self._run(model, grads=False)
        finally:
            for h in handles:
                h.remove()
        out = {}
        for u, members in units.items():
            zeros, total, count = (torch.zeros(members[0][4], dtype=torch.float64) for _ in range(3))
            for n, _, idxs, root, _ in members:
                s, src, dst = stats[(u, n)], torch.tensor(idxs), torch.tensor(root)
                zeros.index_add_(0, dst, s.zeros[src])
                total.index_add_(0, dst, s.total[src])
                count.index_add_(0, dst, s.count[src])
            count = count.clamp(min=1)
            out[u] = (1 - zeros / count if self.config.criterion == "apoz" else total / count).float()
        return out

    def _group_scores(self, model) -> Dict[str, torch.Tensor]:
        crit, scores = self.config.criterion, {}
        if crit in ("apoz", "mean_activation"):
            units = {}
            for u, unit in self.units.items():
                convs = [(n, m, i, r, unit["group"].channels) for n, m, i, r in unit["producers"]
                         if isinstance(m, PRUNABLE)]
                normed = [c for c in convs if _norm_after(model, c[0]) is not None]
                units[u] = normed or convs
            return self._activation_scores(model, units)
        if crit in GRADIENT_CRITERIA:
            self._gradients(model)
        for i, (u, unit) in enumerate(self.units.items()):
            g = unit["group"]
            side = [(m, s, idx, r) for m, s, idx, r in g.members if s == self.side and isinstance(m, PRUNABLE)]
            if crit == "bn_scale":
                scores[u] = torch.zeros(g.channels)
                for _, m, idx, r in unit["producers"]:
                    if isinstance(m, NORMS):
                        scores[u].index_add_(0, torch.tensor(r), _param(m, "weight").detach()[list(idx)].abs())
            elif crit == "random":
                scores[u] = CRITERIA.get("random")(g.channels, seed=self.ctx.seed * 7919 + i)
            elif crit == "similarity":
                scores[u] = CRITERIA.get(crit)(incoming(g.members, g.channels), outgoing(g.members, g.channels))
            elif crit in GRADIENT_CRITERIA:  # over what the side's masks zero: producers' weights, biases, BN
                members = side if self.side == "in" else [(m, "out", idx, r) for _, m, idx, r in unit["producers"]]
                scores[u] = CRITERIA.get(crit)(*self._channel_matrix(g.channels, members, ("weight", "bias"), True))
            else:  # l1 / l2 / fpgm on the concatenated slices of the dense weights
                scores[u] = CRITERIA.get(crit)(self._channel_matrix(g.channels, side, ("weight",), False)[0])
        if crit in GRADIENT_CRITERIA:
            model.zero_grad(set_to_none=True)
        return scores

    @staticmethod
    def _channel_matrix(channels, members, attrs, grad: bool):
        """(channels, features) matrices of the members' slices (weights, and gradients if ``grad``)."""
        ws, gs = [], []

        def add(acc, m, side, idxs, root, t):
            rows = _slices(m, side, idxs, t)
            acc.append(torch.zeros(channels, rows.shape[1], dtype=rows.dtype).index_copy(0, torch.tensor(root), rows))

        for m, side, idxs, root in members:
            for attr in attrs:
                p = _param(m, attr)
                if not isinstance(p, torch.Tensor) or (attr == "bias" and side != "out"):
                    continue
                add(ws, m, side, idxs, root, p.detach())
                if grad:
                    add(gs, m, side, idxs, root, p.grad if p.grad is not None else torch.zeros_like(p))
        return torch.cat(ws, 1), (torch.cat(gs, 1) if grad else None)

    def _layer_scores(self, model, weights) -> Dict[str, torch.Tensor]:
        crit, scores = self.config.criterion, {}
        if crit in ("apoz", "mean_activation"):
            units = {n: [(n, m, list(range(weights[n].shape[0])), list(range(weights[n].shape[0])),
                          weights[n].shape[0])] for n, m in self.units.items()}
            return self._activation_scores(model, units)
        if crit in GRADIENT_CRITERIA:
            self._gradients(model)
        for i, (n, m) in enumerate(self.units.items()):
            view = group_view(weights[n], self.cut, self.block)
            if crit in GRADIENT_CRITERIA:
                grad = _param(m, "weight").grad
                scores[n] = CRITERIA.get(crit)(view, group_view(
                    grad if grad is not None else torch.zeros_like(weights[n]), self.cut, self.block))
            elif crit == "bn_scale":
                scores[n] = CRITERIA.get(crit)(_param(_norm_after(model, n), "weight"))
            elif crit == "random":
                scores[n] = CRITERIA.get(crit)(view.shape[0], seed=self.ctx.seed * 7919 + i)
            else:
                scores[n] = CRITERIA.get(crit)(view)
        if crit in GRADIENT_CRITERIA:
            model.zero_grad(set_to_none=True)
        return scores

