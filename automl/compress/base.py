"""Compression methods: a frozen config dataclass plus a handler with a checked lifecycle.

Lifecycle: prepare -> (on_epoch_start / adjust_loss / after_step)* -> finalize -> deploy. Search only produces
configs; ``recipe.apply`` is the one place that runs handlers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional

from automl.errors import ConfigError, LifecycleError
from automl.registry import Registry, unknown_name

# Categories in the order their stages run; a space names each category at most once.
CATEGORIES = ("regularization", "distillation", "factorization", "pruning", "early_exit", "quantization")


@dataclass(frozen=True)
class MethodInfo:
    name: str
    category: str
    config_cls: type
    handler_cls: type


METHODS: Registry[MethodInfo] = Registry("compression method")


def register_method(name: str, category: str, config_cls: type):
    """Class decorator registering a handler for ``config_cls`` under ``name``; the handler must declare
    how it deploys (``Method.DEPLOY_HOOKS``)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category}")

    def decorator(handler_cls):
        missing = [hook for hook in Method.DEPLOY_HOOKS if not callable(getattr(handler_cls, hook, None))]
        if missing:
            raise TypeError(f"compression method '{name}' ({handler_cls.__name__}) does not say how it deploys: "
                            f"define {' and '.join(missing)} (KEEPS_PRECISION / KEEPS_SHAPE when it changes "
                            "neither precision nor shape)")
        handler_cls.method_name = name
        METHODS.register(name)(MethodInfo(name, category, config_cls, handler_cls))
        return handler_cls

    return decorator


def methods_in(category: str) -> Dict[str, MethodInfo]:
    return {name: info for name, info in METHODS.items() if info.category == category}


def get_method(name: str, *, category: str | None = None, file=None, key=None) -> MethodInfo:
    options = methods_in(category) if category else dict(METHODS.items())
    if name not in options:
        kind = f"{category} method" if category else "compression method"
        raise unknown_name(kind, name, list(options) + (["none"] if category else []), file=file, key=key)
    return options[name]


def _keeps_precision(cls, config) -> Optional[str]:
    return None


def _keeps_shape(cls, model, example, config, notes: Dict[str, Any]):
    return model


# A stage that leaves the deployed precision (masks, regularizers, distillation) or the deployed structure
# (masks, value changes) as it is declares it with these.
KEEPS_PRECISION = classmethod(_keeps_precision)
KEEPS_SHAPE = classmethod(_keeps_shape)


def changes_shape(handler_cls) -> bool:
    """Whether a method's stage changes the deployed structure (its options then matter to a profile)."""
    return getattr(handler_cls.deployed_shape, "__func__", None) is not _keeps_shape


def incompatibility(a: str, b: str) -> Optional[str]:
    """Why the methods named ``a`` and ``b`` cannot share a recipe (each method says which categories it
    cannot share one with, ``Method.CANNOT_SHARE``), or None."""
    ia, ib = METHODS.get(a), METHODS.get(b)
    return ia.handler_cls.CANNOT_SHARE.get(ib.category) or ib.handler_cls.CANNOT_SHARE.get(ia.category)


def check_stage_combination(methods, *, file=None, key: str = "stages"):
    """Refuse a set of stages (method names) that cannot be deployed together."""
    names = list(methods)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            why = incompatibility(a, b)
            if why:
                ca, cb = METHODS.get(a).category, METHODS.get(b).category
                raise ConfigError(f"a {a} stage and a {b} stage cannot be combined: {why}", file=file, key=key,
                                  value=[a, b], fix=f"drop one of them (in a search space, add "
                                                    f"'when: {{{ca}.method: none}}' to {cb}.method)")


@dataclass
class ApplyContext:
    """What a handler may use: the task (data, calibration), the work dir, the run's settings."""

    task: Any
    work_dir: Any
    epochs: int
    seed: int = 0
    threads: int = 1
    steps_per_epoch: int = 0  # optimizer steps per epoch, set by the training loop
    recipe: Any = None  # the recipe being applied (a distillation teacher is built from it)
    cache_dir: Any = None  # where trained teachers are kept between trials (default: work_dir/cache)
    model: Any = None  # the trained model that was exported, set before the deploy calls
    # (spec, ctx, teacher_epochs) -> trained teacher; the recipe layer sets it (automl.recipe.teacher)
    load_teacher: Any = None
    # (model, example, profile spec, 'latency' | 'energy') -> {layer name: cost}, for stages that weigh
    # layers by their device cost; handed down by the callers of apply_recipe (automl.hardware.layer_costs)
    price_layers: Any = None


class Method:
    """Base handler. Subclasses override the ``_`` hooks; the public calls enforce the order."""

    method_name: ClassVar[str] = "?"

    # How the stage deploys, declared by every method (register_method refuses one that does not, so a
    # method cannot be priced by a profile as something it is not): ``profile_precision(config)`` is the
    # hardware-profile precision it deploys the model at (one of automl.hardware.layers.PRECISIONS), None
    # when it leaves the precision as it is (simulated low-bit models compute in float), or a ProfileError
    # when no profile can price it; ``deployed_shape(model, example, config, notes)`` is the model with the
    # stage's structural effect and random weights, as a profile prices it (see automl.hardware.candidates),
    # recording what it did in ``notes``; a config the architecture cannot take raises ConfigError.
    # Methods that change neither say so with KEEPS_PRECISION / KEEPS_SHAPE.
    DEPLOY_HOOKS: ClassVar[tuple] = ("profile_precision", "deployed_shape")
    # Categories whose stages this method cannot share a recipe with, and why (asked in both directions).
    CANNOT_SHARE: ClassVar[Dict[str, str]] = {}

    def __init__(self, config, *, start_epoch: Optional[int] = None):
        self.config = config
        self.start_epoch = start_epoch
        self.state = "new"
        self.stats: Dict[str, Any] = {}

    def _require(self, call: str, allowed: tuple):
        if self.state not in allowed:
            raise LifecycleError(
                f"{self.method_name}: {call}() called in state '{self.state}'; the order is "
                "prepare -> on_epoch_start/after_step -> finalize -> deploy"
            )

    def prepare(self, model, ctx: ApplyContext):
        self._require("prepare", ("new",))
        model = self._prepare(model, ctx) or model
        self.state = "prepared"
        return model

    def on_epoch_start(self, model, epoch: int, ctx: ApplyContext):
        self._require("on_epoch_start", ("prepared",))
        self._on_epoch_start(model, epoch, ctx)

    def after_step(self, model):
        self._require("after_step", ("prepared",))
        self._after_step(model)

    def adjust_loss(self, model, x, y, output, loss):
        """The training loss with this method's terms (regularization, distillation) added."""
        self._require("adjust_loss", ("prepared",))
        return self._adjust_loss(model, x, y, output, loss)

    def trainable_parameters(self) -> list:
        """Parameters the method adds outside the model (e.g. distillation adapters); the training
        loop gives them to the optimizer."""
        return []

    @property
    def adjusts_loss(self) -> bool:
        return type(self)._adjust_loss is not Method._adjust_loss

    def finalize(self, model, ctx: ApplyContext):
        self._require("finalize", ("prepared",))
        model = self._finalize(model, ctx) or model
        self.state = "finalized"
        return model

    def deploy(self, artifact, ctx: ApplyContext):
        self._require("deploy", ("finalized",))
        artifact = self._deploy(artifact, ctx) or artifact
        self.state = "deployed"
        return artifact

    # hooks -------------------------------------------------------------------------------
    def _prepare(self, model, ctx):
        return model

    def _on_epoch_start(self, model, epoch, ctx):
        pass

    def _after_step(self, model):
        pass

    def _adjust_loss(self, model, x, y, output, loss):
        return loss

    def _finalize(self, model, ctx):
        return model

    def _deploy(self, artifact, ctx):
        return artifact
