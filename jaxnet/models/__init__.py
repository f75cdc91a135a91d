"""The model zoo: ResNets, the airbench-class FastNet, and the reference script's PlainCNN, and the one
name → constructor registry (`get`) that the experiment and every benchmark use."""

from collections.abc import Callable

import flax.linen as nn

from jaxnet.errors import ConfigError
from jaxnet.models.fast import (ACTIVATIONS, FastNet, FastNetMuon, FastNetTiny, patch_covariance, whitening_kernel,
                               with_whitening_stem)
from jaxnet.models.plain import PlainCNN, PlainCNNTiny
from jaxnet.models.resnet import (BasicBlock, Bottleneck, ResNet, ResNet18, ResNet20, ResNet34, ResNet50, ResNet56,
                                  ResNetTiny)

REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "fastnet": FastNet, "fastnet_tiny": FastNetTiny, "fastnet_muon": FastNetMuon, "resnet18": ResNet18,
    "resnet34": ResNet34, "resnet50": ResNet50, "resnet20": ResNet20, "resnet56": ResNet56, "resnet_tiny": ResNetTiny,
    "plain": PlainCNN, "plain_tiny": PlainCNNTiny}
NAMES = tuple(REGISTRY)


def get(name: str, **kwargs) -> nn.Module:
    """The model registered as `name`, built with `kwargs` (e.g. num_classes, conv, norm, dtype).
    Raises ConfigError naming the valid names for an unknown one."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown model {name!r}; valid: {', '.join(NAMES)}")
    return REGISTRY[name](**kwargs)


__all__ = ["ACTIVATIONS", "NAMES", "REGISTRY", "BasicBlock", "Bottleneck", "FastNet", "FastNetMuon", "FastNetTiny", "PlainCNN",
           "PlainCNNTiny", "ResNet", "ResNet18", "ResNet20", "ResNet34", "ResNet50", "ResNet56", "ResNetTiny", "get",
           "patch_covariance", "whitening_kernel", "with_whitening_stem"]
