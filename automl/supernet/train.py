"""Train a supernet once with the sandwich rule and in-place distillation (Yu et al., BigNAS / slimmable
networks): every batch trains the largest sub-network on the labels, and the smallest plus a few
random ones on the largest's predictions. Checkpointed every epoch; a stopped run resumes there."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from automl.errors import ConfigError, MeasurementError
from automl.io import write_yaml
from automl.spaces import load_space
from automl.runtime.threads import torch_threads
from automl.supernet.network import Supernet, recalibrate_bn, sample_configs
from automl.supernet.store import (SPACE, STATE, WEIGHTS, arch_params, atomic_torch_save, read_manifest,
                                   save_weights, write_manifest)


@dataclass(frozen=True)
class SupernetTraining:
    epochs: int = 30
    lr: float = 3e-3
    batch_size: int = 32
    random_subnets: int = 2       # sub-networks drawn at random per batch, besides the largest and smallest
    bn_samples: int = 256         # training samples that recalibrate an extracted sub-network's batch norm
    eval_subnets: int = 8         # random sub-networks scored in the manifest
    seed: int = 0
    threads: int = 0              # torch threads (0: all the machine's)


def evaluate_subnet(net: Supernet, config: Dict, task, bn_samples: int, seed: int = 0) -> float:
    model = recalibrate_bn(net.extract(config), task.train_loader(batch_size=64, seed=seed), bn_samples)
    return task.evaluate(model, task.val_loader())


def _step(net: Supernet, optimizer, x, y, configs: List[Dict]) -> float:
    optimizer.zero_grad(set_to_none=True)
    logits = net.forward(configs[0], x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    soft = logits.detach().softmax(dim=1)
    total = loss.item()
    for config in configs[1:]:  # in-place distillation from the largest sub-network
        student = F.log_softmax(net.forward(config, x), dim=1)
        kd = F.kl_div(student, soft, reduction="batchmean")
        kd.backward()
        total += kd.item()
    optimizer.step()
    return total / len(configs)


def _epoch(net, optimizer, scheduler, task, settings: SupernetTraining, epoch: int) -> float:
    rng = np.random.default_rng([settings.seed, epoch])
    losses = []
    for x, y in task.train_loader(batch_size=settings.batch_size, seed=settings.seed * 1000 + epoch):
        configs = [net.largest(rng), net.smallest(rng)] + [net.sample(rng) for _ in range(settings.random_subnets)]
        loss = _step(net, optimizer, x, y, configs)
        if not math.isfinite(loss):
            raise MeasurementError(f"the supernet's training loss became {loss} in epoch {epoch}; lower --lr")
        losses.append(loss)
        scheduler.step()
    return float(np.mean(losses))


def scores(net: Supernet, task, settings: SupernetTraining) -> Dict:
    """Validation accuracy of the largest, the smallest and a seeded sample of sub-networks."""
    rng = np.random.default_rng(settings.seed)
    largest, smallest = net.largest(rng), net.smallest(rng)
    sample = sample_configs(net, settings.eval_subnets, seed=settings.seed + 1)
    acc = lambda c: round(evaluate_subnet(net, c, task, settings.bn_samples), 4)  # noqa: E731
    return {"largest": {"arch": largest, "accuracy": acc(largest)},
            "smallest": {"arch": smallest, "accuracy": acc(smallest)},
            "random": [{"arch": c, "accuracy": acc(c)} for c in sample]}


def train_supernet(space, out, settings: SupernetTraining = SupernetTraining(), *, force: bool = False,
                   log: Callable[[str], None] = print) -> Dict:
    """Train the supernet of ``space``'s architecture parameters into ``out``; returns the manifest."""
    if space.model is not None or not space.family:
        raise ConfigError("a supernet shares weights across a built-in family's architectures; this space "
                          "compresses one model of yours", file=space.source, key="model",
                          fix="give a space with an 'arch:' section (cnn, resnet, mobilenetv2 ...)")
    out = Path(out)
    resume = _prepare(out, space, force)
    with torch_threads(settings.threads):  # the caller's setting comes back after
        return _train(space, out, settings, resume, log)


def _train(space, out: Path, settings: SupernetTraining, resume: bool, log) -> Dict:
    task = space.build_task()
    torch.manual_seed(settings.seed)
    net = Supernet.create(space.family, arch_params(space), task.input_shape, task.num_classes, seed=settings.seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=settings.lr)
    steps = settings.epochs * len(task.train_loader(batch_size=settings.batch_size, seed=0))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    start, spent = _restore(out, net, optimizer, scheduler) if resume else (0, 0.0)
    if start:
        log(f"automl supernet: resuming after epoch {start} of {settings.epochs}")
    for epoch in range(start, settings.epochs):
        began = time.perf_counter()
        loss = _epoch(net, optimizer, scheduler, task, settings, epoch)
        spent += time.perf_counter() - began
        save_weights(out, net)
        atomic_torch_save({"epoch": epoch + 1, "seconds": spent, "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict()}, out / STATE)
        log(f"epoch {epoch + 1}/{settings.epochs}: loss {loss:.4f}, {spent:.0f} s")
    manifest = _finish(out, net, space, task, settings, spent)
    log(f"automl supernet: largest {manifest['accuracy']['largest']['accuracy']:.4f}, smallest "
        f"{manifest['accuracy']['smallest']['accuracy']:.4f} validation accuracy -> {out}")
    return manifest


def _prepare(out: Path, space, force: bool) -> bool:
    """True when ``out`` holds an unfinished training of the same space (resume it)."""
    if out.exists() and any(out.iterdir()) and not force:
        same = (out / SPACE).is_file() and load_space(out / SPACE).hash == space.hash
        if same and (out / STATE).is_file():
            return True
        what = "a trained supernet of this space" if same and (out / "manifest.yaml").is_file() else "other work"
        raise ConfigError(f"the supernet directory exists and holds {what}", key="--out", value=str(out),
                          fix="choose another --out, or pass --force to replace it")
    if force and out.exists():
        for name in (WEIGHTS, STATE, SPACE, "manifest.yaml"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(out / SPACE, space.raw)
    return False


def _restore(out: Path, net: Supernet, optimizer, scheduler):
    state = torch.load(out / STATE, map_location="cpu", weights_only=True)
    weights = torch.load(out / WEIGHTS, map_location="cpu", weights_only=True)
    with torch.no_grad():
        for key, tensor in net.tensors.items():
            tensor.copy_(weights[key])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]), float(state["seconds"])


def _finish(out: Path, net: Supernet, space, task, settings: SupernetTraining, spent: float) -> Dict:
    sha = save_weights(out, net)
    manifest = {
        "family": space.family, "space_hash": space.hash, "task": space.task,
        "input_shape": list(task.input_shape), "num_classes": int(task.num_classes),
        "training": {"epochs": settings.epochs, "lr": settings.lr, "batch_size": settings.batch_size,
                     "random_subnets": settings.random_subnets, "seed": settings.seed, "seconds": round(spent, 1)},
        "bn_samples": settings.bn_samples, "accuracy": scores(net, task, settings), "sha256": sha,
    }
    write_manifest(out, manifest)
    (out / STATE).unlink(missing_ok=True)
    return read_manifest(out)


__all__ = ["SupernetTraining", "evaluate_subnet", "train_supernet"]
