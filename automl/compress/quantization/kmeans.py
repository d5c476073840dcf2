"""Weight sharing by k-means with centroid fine-tuning (``kmeans``), shipped as a Deep Compression file.

At the start epoch every selected layer's weight becomes ``centroids[index]`` (1-D k-means per
layer, ``2**bits`` shared values; a layer that holds zeros, e.g. after pruning, keeps them in a
fixed zero slot). Fine-tuning then trains the centroids: a centroid's gradient is the sum of its
weights' gradients. The centroids are reserved at ``prepare`` so the optimizer trains them (see
``automl.compress.late_params``). At finalize the shared values are written back as plain weights;
zeros a pruning stage set after clustering are kept (pruning wins). Deploy writes the Deep
Compression file (sparse positions + Huffman-coded indices, ``deepcomp_format``) beside the ONNX
model: the ONNX model is what runs and is timed, the file is what ships and what size is measured
on; it decodes to exactly the deployed weights.

With a pruning stage first this is Han et al.'s Deep Compression (prune -> share -> Huffman code).
The shared weights are written back after the last optimizer step, so a pruning stage that thins
layers at its finalize slices plain Parameters (the kept weights keep their shared values).
Pruning masks in ``dual`` mode cannot be combined (the weight is a parametrization).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from automl.compress.base import KEEPS_PRECISION, KEEPS_SHAPE, Method, register_method
from automl.compress.quantization.clustering import INITS, materialize, share_weights
from automl.compress.coding.deepcomp_format import CENTROID_DTYPES, save_compressed
from automl.compress.late_params import LateParameters
from automl.compress.layers import PRUNABLE, select_layers
from automl.configs import option
from automl.errors import ConfigError, LifecycleError


@dataclass(frozen=True)
class KMeansConfig:
    bits: int = option(5, low=1, high=8, doc="index bits of Linear layers: 2**bits shared values (+ zero)")
    conv_bits: int = option(8, low=1, high=8, doc="index bits of convolutions (Han et al.: 8 conv, 5 fc)")
    init: str = option("linear", choices=INITS, doc="k-means start: linear over [min, max] or density")
    layers: Tuple[str, ...] = option(("re:.*",), doc="layer names or 're:' patterns (Conv/Linear)")
    finetune_epochs: int = option(2, low=0, high=10_000, doc="epochs of centroid fine-tuning")
    sparse: bool = option(True, doc="store nonzero positions as coded gaps when that is smaller")
    centroid_dtype: str = option("float32", choices=tuple(CENTROID_DTYPES),
                                 doc="stored shared values; float16 rounds the model's centroids to match")


@register_method("kmeans", "quantization", KMeansConfig)
class KMeans(Method):
    """Han et al.'s trained quantization: k-means weight sharing with centroid fine-tuning."""

    profile_precision = KEEPS_PRECISION
    deployed_shape = KEEPS_SHAPE

    def _prepare(self, model, ctx):
        select_layers(model, self.config.layers)  # a bad pattern fails now
        layers = sum(isinstance(m, PRUNABLE) for m in model.modules())
        self.slots = LateParameters(3 * layers, "kmeans")  # one centroid table per layer (x3: low-rank splits)
        self.shared, self.done, self.ctx = {}, False, ctx
        self.epoch, self.step = -1, 0
        return model

    def trainable_parameters(self):
        return self.slots.parameters()

    def _on_epoch_start(self, model, epoch, ctx):
        self.epoch, self.step = epoch, 0
        if not self.shared and epoch >= (self.start_epoch or 0):
            self._share(model)

    def _after_step(self, model):
        # After the last optimizer step the centroids are final: write plain weights back now, so
        # stages that finalize before this one (pruning that thins layers) see ordinary Parameters.
        self.step += 1
        if (self.shared and not self.done and self.epoch == self.ctx.epochs - 1
                and self.step >= getattr(self.ctx, "steps_per_epoch", 0) > 0):
            self._materialize(model)

    def _share(self, model):
        for name, module in select_layers(model, self.config.layers).items():
            if parametrize.is_parametrized(module, "weight"):
                raise ConfigError("kmeans cannot share a weight that a pruning stage masks in dual mode",
                                  key=name, value="dual", fix="use pruning mode: hard (or soft) with kmeans")
            bits = self.config.conv_bits if isinstance(module, nn.Conv2d) or module.weight.dim() > 2 \
                else self.config.bits
            sw = share_weights(model, bits, [name], init=self.config.init)[name]
            sw.centroids = self.slots.adopt(sw.centroids)
            self.shared[name] = (module, sw)

    def _finalize(self, model, ctx):
        if not self.shared:
            self._share(model)
        if not self.done:
            self._materialize(model)
        # a pruning stage that finalized after the weights were written back may have zeroed more
        weights = [m.weight.detach() for m in select_layers(model, list(self.shared)).values()]
        self.stats = {"kmeans_layers": len(self.shared),
                      "kmeans_max_clusters": max(len(torch.unique(w[w != 0])) for w in weights),
                      "kmeans_zeroed_after_sharing": self.repruned}
        self.model = model
        return model

    def _materialize(self, model):
        pruned = {}
        for name, (module, sw) in self.shared.items():
            if "weight" in module._parameters:
                raise LifecycleError(f"kmeans: layer '{name}' got a new weight Parameter while its weights were "
                                     "shared; another stage replaced it. Fix: start kmeans after that stage's changes")
            # zeros set by a pruning stage after clustering (its masks act on the shared weight)
            pruned[name] = module.weight.detach() == 0
            if self.config.centroid_dtype == "float16":
                with torch.no_grad():
                    sw.centroids.copy_(sw.centroids.half().float())
        materialize(model)
        self.repruned = 0
        for name, (module, sw) in self.shared.items():
            with torch.no_grad():
                self.repruned += int(((module.weight != 0) & pruned[name]).sum())
                module.weight.masked_fill_(pruned[name], 0.0)
        self.done = True

    def _deploy(self, artifact, ctx):
        cfg = self.config
        path = artifact.path.with_name(artifact.path.stem + ".deepc")
        report = save_compressed(self.model, path, bits=max(cfg.bits, cfg.conv_bits), sparse=cfg.sparse,
                                 layers=list(self.shared), centroid_dtype=cfg.centroid_dtype)
        change = max((layer.max_abs_change for layer in report.layers), default=0.0)
        if change > 0:  # never expected: the file must decode to the weights that were measured
            raise LifecycleError(f"kmeans: the compressed file changes weights by up to {change:g}")
        self.stats.update({"deepc_kb": report.file_bytes / 1024.0, "deepc_ratio": report.ratio})
        artifact.shipped = path
        artifact.precision = f"fp32 (shared weights, {cfg.bits}-bit fc / {cfg.conv_bits}-bit conv indices)"
        artifact.notes.update({"shipped": "Deep Compression file (deepcomp_format.load_compressed)",
                               "runs": "float ONNX with the shared weights"})
        return artifact
