"""Third-party models for the bring-your-own-model benchmarks: pytorchcv's (a pip package; random
weights, no download), adapted to 32x32 inputs the way a user would (an ImageNet model's final
AvgPool2d(7) or larger becomes an adaptive pool). Used as `bench/zoo.py:build` with kwargs {name: ...}.
MODELS are the ones bench/byom.py trains; SWEEP adds graphs bench/zoo_sweep.py only compresses."""
import importlib

import torch.nn as nn

MODELS = {  # name -> (module, function, graph kind)
    "resnet20": ("pytorchcv.models.resnet_cifar", "resnet20_cifar10", "residual"),
    "seresnet20": ("pytorchcv.models.seresnet_cifar", "seresnet20_cifar10", "squeeze-excitation"),
    "densenet40": ("pytorchcv.models.densenet_cifar", "densenet40_k12_cifar10", "dense (concat)"),
    "mobilenetv2": ("pytorchcv.models.mobilenetv2", "mobilenetv2_wd2", "depthwise, inverted residual"),
    "shufflenetv2": ("pytorchcv.models.shufflenetv2", "shufflenetv2_wd2", "channel shuffle"),
    "ghostnet": ("pytorchcv.models.ghostnet", "ghostnet", "ghost modules, SE"),
    "regnetx002": ("pytorchcv.models.regnet", "regnetx002", "grouped convolutions"),
    "mobilenetv3": ("pytorchcv.models.mobilenetv3", "mobilenetv3_small_w7d20", "hard-swish, SE"),
}
SWEEP = {
    **MODELS,
    "mixnet_s": ("pytorchcv.models.mixnet", "mixnet_s", "mixed depthwise kernels (split by stored sizes)"),
    "squeezenet": ("pytorchcv.models.squeezenet", "squeezenet_v1_1", "fire modules (concat)"),
    "squeezenext": ("pytorchcv.models.squeezenext", "sqnxt23_w1", "1x3 / 3x1 separable, residual"),
    "mnasnet": ("pytorchcv.models.mnasnet", "mnasnet_b1", "inverted residual (NAS)"),
    "proxylessnas": ("pytorchcv.models.proxylessnas", "proxylessnas_mobile", "inverted residual, mixed kernels"),
    "igcv3": ("pytorchcv.models.igcv3", "igcv3_wd4", "grouped 1x1 + channel shuffle"),
    "fbnet": ("pytorchcv.models.fbnet", "fbnet_cb", "inverted residual (NAS)"),
    "hardnet": ("pytorchcv.models.hardnet", "hardnet39ds", "harmonic dense (concat)"),
    "peleenet": ("pytorchcv.models.peleenet", "peleenet", "two-way dense (concat)"),
    "resnext": ("pytorchcv.models.resnext", "resnext14_16x4d", "grouped (cardinality)"),
    "shufflenet_v1": ("pytorchcv.models.shufflenet", "shufflenet_g3_wd4", "grouped 1x1 + channel shuffle"),
    "menet": ("pytorchcv.models.menet", "menet108_8x1_g3", "merge-and-evolve (shuffle)"),
    "darknet": ("pytorchcv.models.darknet", "darknet_tiny", "plain, leaky ReLU"),
    "spnasnet": ("pytorchcv.models.spnasnet", "spnasnet", "inverted residual (NAS)"),
    "diracnet": ("pytorchcv.models.diracnetv2", "diracnet18v2", "plain (Dirac-initialised)"),
    "fdmobilenet": ("pytorchcv.models.fdmobilenet", "fdmobilenet_wd4", "depthwise, fast downsampling"),
    "mobilenet_v1": ("pytorchcv.models.mobilenet", "mobilenet_wd4", "depthwise separable"),
    "preresnet": ("pytorchcv.models.preresnet", "preresnet10", "pre-activation residual"),
    "sepreresnet": ("pytorchcv.models.sepreresnet", "sepreresnet10", "pre-activation residual, SE"),
    "regnety": ("pytorchcv.models.regnet", "regnety002", "grouped, SE"),
    "vovnet": ("pytorchcv.models.vovnet", "vovnet27s", "one-shot aggregation (concat)"),
    "dla": ("pytorchcv.models.dla", "dla46c", "deep layer aggregation"),
    "channelnet": ("pytorchcv.models.channelnet", "channelnet", "channel-wise convs (Conv3d)"),
    "bamresnet": ("pytorchcv.models.bamresnet", "bam_resnet18", "BAM attention (dilated convs)"),
    "cbamresnet": ("pytorchcv.models.cbamresnet", "cbam_resnet18", "CBAM attention (max pools)"),
    "resnesta": ("pytorchcv.models.resnesta", "resnestabc14", "split attention"),
    "octresnet": ("pytorchcv.models.octresnet", "octresnet10_ad2", "octave convs (two maps)"),
    "dpn": ("pytorchcv.models.dpn", "dpn68", "dual path (add + concat)"),
}


def build(name: str, num_classes: int = 10) -> nn.Module:
    module, function, _ = SWEEP[name]
    factory = getattr(importlib.import_module(module), function)
    if "cifar" in function:
        return factory(num_classes=num_classes)
    try:
        model = factory(num_classes=num_classes, in_size=(32, 32))
    except TypeError:  # a factory without in_size
        model = factory(num_classes=num_classes)
    for parent in model.modules():
        for child_name, child in parent.named_children():
            kernel = child.kernel_size if isinstance(child, nn.AvgPool2d) else 0
            if max(kernel if isinstance(kernel, tuple) else (kernel,)) >= 7:
                setattr(parent, child_name, nn.AdaptiveAvgPool2d(1))
    return model
