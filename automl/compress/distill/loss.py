"""Knowledge distillation: soft-target KD (Hinton et al.) and hint (feature) distillation (FitNets).

``Distiller`` pairs a student with a frozen teacher. A training loop either calls
``distiller.loss(x, y, student_logits)`` or swaps its loss for ``distiller.wrap_loss(task_loss)``,
which takes ``(logits, target)`` and reads the batch from a pre-hook on the student. Hint
adapters are trainable: give ``distiller.parameters()`` to the optimizer with the student's.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from automl.configs import option
from automl.errors import ConfigError, UnknownNameError


@dataclass(frozen=True)
class DistillationConfig:
    temperature: float = option(4.0, low=0.0, low_open=True, high=100.0, doc="softmax temperature T")
    alpha: float = option(0.5, low=0.0, high=1.0, doc="weight of the KD term; (1 - alpha) weights the hard CE")
    hints: Tuple[str, ...] = option((), doc="'student_layer=teacher_layer' pairs for hint losses")
    hint_weight: float = option(1.0, low=0.0, high=1e6, doc="weight of the summed hint MSE terms")


# -- pure losses ------------------------------------------------------------------------------------
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch.

    The T^2 factor keeps the gradient scale of the soft term independent of T (Hinton et al. 2015).
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature ** 2


def distillation_loss(student_logits, teacher_logits, target, *, temperature: float, alpha: float,
                      hard_loss: Optional[Callable] = None) -> torch.Tensor:
    """(1 - alpha) * hard loss (cross-entropy by default) + alpha * KD."""
    hard = (hard_loss or F.cross_entropy)(student_logits, target)
    if alpha == 0.0:
        return hard
    return (1.0 - alpha) * hard + alpha * kd_loss(student_logits, teacher_logits, temperature)


# -- layer addressing -------------------------------------------------------------------------------
def resolve_module(model: nn.Module, name: str, *, key: str = "hints") -> Tuple[str, nn.Module]:
    """One module by exact name or ``re:`` pattern (which must match exactly one module)."""
    modules = {n.removeprefix("module."): m for n, m in model.named_modules() if n}
    if not isinstance(name, str) or not name:
        raise ConfigError("expected a layer name", key=key, value=name,
                          fix="write an exact module name or 're:<regex>'")
    if name.startswith("re:"):
        try:
            rx = re.compile(name[3:])
        except re.error as exc:
            raise UnknownNameError(f"invalid regular expression: {exc}", key=key, value=name,
                                   fix="fix the regex after 're:'") from None
        hits = [n for n in modules if rx.fullmatch(n)]
    else:
        hits = [n for n in modules if n == name.removeprefix("module.")]
    if len(hits) > 1:
        raise ConfigError(f"pattern matches {len(hits)} modules, a hint needs exactly one", key=key,
                          value=name, fix=f"narrow it; matches: {', '.join(hits[:8])}")
    if not hits:
        near = difflib.get_close_matches(name.removeprefix("re:"), list(modules), n=5, cutoff=0.0)
        raise UnknownNameError("layer name matches no module", key=key, value=name,
                               fix=f"nearest module names: {', '.join(near) or '(none)'}; "
                                   "use an exact name or 're:<regex>'")
    return hits[0], modules[hits[0]]


def parse_hint(spec) -> Tuple[str, str]:
    """'student=teacher' or a (student, teacher) pair."""
    if isinstance(spec, str) and spec.count("=") == 1:
        s, t = (p.strip() for p in spec.split("="))
        if s and t:
            return s, t
    elif isinstance(spec, (tuple, list)) and len(spec) == 2 and all(isinstance(p, str) for p in spec):
        return spec[0], spec[1]
    raise ConfigError("a hint pairs one student layer with one teacher layer", key="hints", value=spec,
                      fix="write 'student_layer=teacher_layer', e.g. 'features.4=features.4'")


# -- hint adapters ----------------------------------------------------------------------------------
def _match_spatial(s: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger map down to the smaller one's size; flatten a map compared to a vector."""
    if s.dim() == 4 and t.dim() == 2:
        return s.mean(dim=(2, 3)), t
    if s.dim() == 2 and t.dim() == 4:
        return s, t.mean(dim=(2, 3))
    if s.dim() == 4 and s.shape[2:] != t.shape[2:]:
        size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
        s = F.adaptive_avg_pool2d(s, size) if s.shape[2:] != size else s
        t = F.adaptive_avg_pool2d(t, size) if t.shape[2:] != size else t
    return s, t


class HintAdapter(nn.Module):
    """Maps a student feature to the teacher's width (1x1 conv for maps, Linear for vectors)."""

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size):
        super().__init__()
        s = torch.zeros((1,) + tuple(student_shape[1:]))
        t = torch.zeros((1,) + tuple(teacher_shape[1:]))
        s, t = _match_spatial(s, t)
        if s.dim() not in (2, 4):
            raise ConfigError("hint layers must output (N, C) vectors or (N, C, H, W) maps", key="hints",
                              value=tuple(student_shape), fix="choose a conv/linear block output")
        s_ch, t_ch = s.shape[1], t.shape[1]
        if s_ch == t_ch:
            self.proj = nn.Identity()
        elif s.dim() == 4:
            self.proj = nn.Conv2d(s_ch, t_ch, 1, bias=False)
        else:
            self.proj = nn.Linear(s_ch, t_ch, bias=False)

    def forward(self, student_feature, teacher_feature) -> torch.Tensor:
        """MSE between the adapted student feature and the (detached) teacher feature."""
        s, t = _match_spatial(student_feature, teacher_feature.detach())
        return F.mse_loss(self.proj(s), t)


def _capture(module: nn.Module, store: Dict[str, torch.Tensor], name: str):
    def hook(_module, _inputs, output):
        store[name] = output[0] if isinstance(output, (tuple, list)) else output
    return module.register_forward_hook(hook)


# -- distiller --------------------------------------------------------------------------------------
class Distiller:
    """Student + frozen teacher: total loss = (1-alpha) task + alpha KD + hint_weight * sum(hint MSE)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, *, temperature: float = 4.0,
                 alpha: float = 0.5, hints: Iterable = (), hint_weight: float = 1.0,
                 example: Optional[torch.Tensor] = None):
        if not isinstance(teacher, nn.Module):
            raise ConfigError("the teacher must be a torch module", key="distillation.teacher",
                              value=type(teacher).__name__, fix="pass a trained nn.Module")
        if not temperature > 0:
            raise ConfigError("temperature must be > 0", key="distillation.temperature", value=temperature,
                              fix="use a value such as 2 or 4")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError("alpha must lie in [0, 1]", key="distillation.alpha", value=alpha,
                              fix="use e.g. 0.5")
        if not hint_weight >= 0:
            raise ConfigError("hint_weight must be >= 0", key="distillation.hint_weight", value=hint_weight,
                              fix="use e.g. 1.0, or 0 to switch hint losses off")
        self.student, self.teacher = student, teacher
        self.temperature, self.alpha, self.hint_weight = float(temperature), float(alpha), float(hint_weight)
        # Frozen for good: no gradients, eval mode (BN statistics fixed), re-asserted at every call.
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()
        self.pairs: List[Tuple[str, str]] = []
        self._student_feats: Dict[str, torch.Tensor] = {}
        self._teacher_feats: Dict[str, torch.Tensor] = {}
        self._hooks = []
        for i, spec in enumerate(hints):
            s_name, t_name = parse_hint(spec)
            s_name, s_mod = resolve_module(student, s_name, key=f"hints.{i}.student")
            t_name, t_mod = resolve_module(teacher, t_name, key=f"hints.{i}.teacher")
            self.pairs.append((s_name, t_name))
            self._hooks.append(_capture(s_mod, self._student_feats, s_name))
            self._hooks.append(_capture(t_mod, self._teacher_feats, t_name))
        self.adapters = nn.ModuleDict()
        if self.pairs:
            if example is None:
                self.close()
                raise ConfigError("hint distillation needs an example input to size its adapters",
                                  key="distillation.example", value=None, fix="pass example=task.example_input()")
            self._build_adapters(example)
        self._last_input: Optional[torch.Tensor] = None
        self._hooks.append(student.register_forward_pre_hook(self._remember_input))

    def _remember_input(self, _module, inputs):
        self._last_input = inputs[0]

    def _build_adapters(self, example: torch.Tensor):
        was_training = self.student.training
        self.student.eval()
        with torch.no_grad():
            self.student(example)
            self.teacher(example)
        self.student.train(was_training)
        for i, (s_name, t_name) in enumerate(self.pairs):
            s, t = self._student_feats[s_name], self._teacher_feats[t_name]
            self.adapters[str(i)] = HintAdapter(s.shape, t.shape)
        self._student_feats.clear()
        self._teacher_feats.clear()

    def parameters(self) -> List[nn.Parameter]:
        """Trainable adapter parameters: add them to the optimizer beside the student's."""
        return list(self.adapters.parameters())

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        self.teacher.eval()
        with torch.no_grad():
            return self.teacher(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor, student_logits: torch.Tensor,
             task_loss: Optional[Callable] = None) -> torch.Tensor:
        """Total loss for one batch; ``student_logits`` must come from ``student(x)`` just before."""
        hard = (task_loss or F.cross_entropy)(student_logits, y)
        return self.combine(x, student_logits, hard)

    def combine(self, x: torch.Tensor, student_logits: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
        """(1 - alpha) * ``hard`` (the task loss already computed for this batch) + alpha * KD + hints."""
        total = hard
        if self.alpha:
            soft = kd_loss(student_logits, self.teacher_logits(x), self.temperature)
            total = (1.0 - self.alpha) * hard + self.alpha * soft
        elif self.pairs and self.hint_weight:
            self.teacher_logits(x)  # hints still need the teacher's features
        if self.pairs and self.hint_weight:
            missing = [s for s, _ in self.pairs if s not in self._student_feats]
            if missing:
                raise ConfigError("no student features captured for the hint layers", key="distillation.hints",
                                  value=missing, fix="call loss() right after logits = student(x)")
            self.adapters.train(self.student.training)
            hint = sum(self.adapters[str(i)](self._student_feats[s], self._teacher_feats[t])
                       for i, (s, t) in enumerate(self.pairs))
            total = total + self.hint_weight * hint
        self._student_feats.clear()
        self._teacher_feats.clear()
        return total

    def wrap_loss(self, task_loss: Optional[Callable] = None) -> Callable:
        """A ``(logits, target) -> loss`` drop-in for a task loss, e.g. ``task.loss = d.wrap_loss(task.loss)``."""
        def wrapped(logits, target):
            if self._last_input is None:
                raise ConfigError("the distillation loss was called before any student forward pass",
                                  key="distillation", value=None, fix="compute logits = student(x) first")
            return self.loss(self._last_input, target, logits, task_loss)
        return wrapped

    def close(self):
        """Remove the hooks this distiller put on the student and the teacher."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._last_input = None


def distiller_from_config(config: DistillationConfig, student: nn.Module, teacher: nn.Module,
                          example: Optional[torch.Tensor] = None) -> Distiller:
    return Distiller(student, teacher, temperature=config.temperature, alpha=config.alpha,
                     hints=config.hints, hint_weight=config.hint_weight, example=example)


__all__ = ["DistillationConfig", "Distiller", "HintAdapter", "distillation_loss", "distiller_from_config",
           "kd_loss", "parse_hint", "resolve_module"]
