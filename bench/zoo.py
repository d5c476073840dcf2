"""Third-party models for the bring-your-own-model benchmark: pytorchcv's (a pip package; random
weights, no download), adapted to 32x32 inputs the way a user would (the ImageNet models' final
AvgPool2d(7) becomes an adaptive pool). Used as `bench/zoo.py:build` with kwargs {name: ...}."""
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


def build(name: str, num_classes: int = 10) -> nn.Module:
    module, function, _ = MODELS[name]
    factory = getattr(importlib.import_module(module), function)
    if "cifar" in function:
        return factory(num_classes=num_classes)
    model = factory(num_classes=num_classes, in_size=(32, 32))
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.AvgPool2d) and child.kernel_size in (7, (7, 7)):
                setattr(parent, child_name, nn.AdaptiveAvgPool2d(1))
    return model
