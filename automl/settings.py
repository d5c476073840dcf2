"""Settings shared by search spaces and recipes: training, deployment, search budget, metrics."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from automl.configs import option

# Metric name -> the direction that is better. Objectives and constraints use these names.
METRICS = {
    "accuracy": "max",        # validation accuracy of the deployed model
    "latency_ms": "min",      # median batch latency of the deployed model: measured, or predicted from
                              # the hardware profile when the search runs with one (--profile)
    "energy_mj": "min",       # energy per batch predicted from the profile (its entries say measured/modelled)
    "measured_latency_ms": "min",  # with a profile and --measure-trials: latency measured inside the trial
    "size_kb": "min",         # deflate-compressed size of the deployed file (what ships)
    "file_kb": "min",         # raw size of the deployed file
    "params": "min",
    "nonzero_params": "min",
    "macs": "min",
    # searches over a user's model only: against the uncompressed model, measured once per search
    "accuracy_drop": "min",   # baseline validation accuracy - this trial's (0.01 = one point)
    "speedup": "max",         # baseline latency_ms / latency_ms
    "size_reduction": "max",  # baseline size_kb / size_kb
}
BASELINE_METRICS = ("accuracy_drop", "speedup", "size_reduction")


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = option(10, low=0, high=10_000, doc="total training epochs, fine-tuning included (0: none, "
                                                      "e.g. post-training quantization of a trained model)")
    lr: float = option(3e-3, low=0.0, high=10.0, doc="initial learning rate (cosine decay)")
    batch_size: int = option(32, low=1, high=65_536)
    weight_decay: float = option(0.0, low=0.0, high=1.0)
    optimizer: str = option("adam", choices=("adam", "sgd"))
    momentum: float = option(0.9, low=0.0, high=1.0, high_open=True, doc="sgd only")
    seed: int = option(0, low=0, high=2**31 - 1)
    augment: str = option("none", choices=("none", "shift"),
                          doc="shift: each training image moved by a random -1..+1 pixels (zero fill)")
    threads: int = option(0, low=0, high=1024, doc="torch threads while training (0: deploy.threads; a search "
                                                   "sets it to the CPUs of budget.resources)")


@dataclass(frozen=True)
class DeploySettings:
    runtime: str = option("onnxruntime", choices=("onnxruntime",), doc="where latency is measured")
    threads: int = option(1, low=1, high=1024, doc="intra-op threads of the deployed model (and torch threads "
                                                   "while training unless train.threads says otherwise)")
    batch: int = option(1, low=1, high=65_536, doc="batch size of the latency measurement")


@dataclass(frozen=True)
class Budget:
    trials: int = option(30, low=1, high=1_000_000)
    concurrency: int = option(2, low=1, high=4096, doc="trials run at once")
    resources: Dict[str, float] = option({"cpu": 1.0}, low=1.0, high=4096.0, choices=("cpu",),
                                         doc="what each trial holds: {cpu: N}, N CPUs and N training threads")
    scheduler: str = option("pareto", choices=("pareto", "asha"),
                            doc="early stopping: pareto (on accuracy and the cost predicted before training; "
                                "bench/search.py) or asha (on accuracy)")
    grace_epochs: int = option(3, low=1, high=10_000, doc="ASHA: epochs before a trial may be stopped")
    reduction_factor: int = option(3, low=2, high=100, doc="ASHA reduction factor")
    seed: int = option(0, low=0, high=2**31 - 1, doc="seed of the searcher")
    sampler: str = option("tpe", choices=("tpe", "nsga2", "random"),
                          doc="Optuna sampler: tpe (multi-objective TPE), nsga2 (genetic), random")
    time_limit_s: float = option(0.0, low=0.0, doc="stop launching trials after this long (0 = no limit)")
    strategy: str = option("joint", choices=("joint", "sequential", "random"),
                           doc="joint (everything sampled together), sequential (architectures first over half the "
                               "trials, then compression of the best), random (uniform sampling); search/strategy.py")

    @property
    def trial_cpus(self) -> int:
        return int(self.resources.get("cpu", 1))
