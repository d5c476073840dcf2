"""The ``kd`` distillation method: soft targets and hint losses from a frozen, trained teacher.

The stage adds its terms to the training loss from its start epoch (epoch 0 unless the recipe gives
one) to the end of training, so it runs through every other stage's training: pruning fine-tune and
its schedule, regularization windows and quantization-aware fine-tuning, as one schedule. The hard
task loss the training loop computed is kept and weighted by (1 - alpha).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from automl.compress.base import KEEPS_PRECISION, KEEPS_SHAPE, Method, register_method
from automl.compress.distill.loss import DistillationConfig, distiller_from_config
from automl.configs import option
from automl.errors import ConfigError, LifecycleError


def check_outputs_match(teacher: nn.Module, student: nn.Module, example: torch.Tensor, spec: str):
    """The teacher must produce logits of the student's shape."""
    was_training = student.training
    with torch.no_grad():
        t_out, s_out = teacher(example), student.eval()(example)
    student.train(was_training)
    t_shape = tuple(t_out.shape) if isinstance(t_out, torch.Tensor) else type(t_out).__name__
    s_shape = tuple(s_out.shape) if isinstance(s_out, torch.Tensor) else type(s_out).__name__
    if t_shape != s_shape:
        raise ConfigError(f"the teacher outputs {t_shape}, the student {s_shape}", key="distillation.teacher",
                          value=spec, fix="use a teacher classifier trained on the same task")


@dataclass(frozen=True)
class KDConfig(DistillationConfig):
    teacher: str = option("self", doc="'self' (this architecture, uncompressed, trained first), a recipe YAML "
                                      "path, or an `automl apply` output directory")
    teacher_epochs: int = option(0, low=0, high=10_000, doc="epochs of a 'self' teacher (0: the recipe's)")


@register_method("kd", "distillation", KDConfig)
class KD(Method):
    """Knowledge distillation (Hinton et al.) with optional FitNets hints."""

    profile_precision = KEEPS_PRECISION
    deployed_shape = KEEPS_SHAPE

    def _prepare(self, model, ctx):
        cfg = self.config
        if ctx.load_teacher is None:  # the recipe layer provides it (recipe.teacher), compress does not replay recipes
            raise LifecycleError("kd needs ctx.load_teacher; run distillation through automl.recipe "
                                 "(apply_recipe or train_with_stages), which sets it")
        teacher = ctx.load_teacher(cfg.teacher, ctx, cfg.teacher_epochs)
        example = ctx.task.example_input(2)
        check_outputs_match(teacher, model, example, cfg.teacher)
        self.distiller = distiller_from_config(cfg, model, teacher, example=example)
        self.active = False
        return model

    def trainable_parameters(self):
        return self.distiller.parameters()

    def _on_epoch_start(self, model, epoch, ctx):
        self.active = epoch >= (self.start_epoch or 0)

    def _adjust_loss(self, model, x, y, output, loss):
        if not self.active:
            return loss
        return self.distiller.combine(x, output, loss)

    def _finalize(self, model, ctx):
        self.distiller.close()  # remove hooks; drop the teacher so the model pickles alone
        self.stats = {"kd_teacher": self.config.teacher, "kd_hints": len(self.distiller.pairs)}
        self.distiller = None
        return model
