"""The model zoo: ResNets, the airbench-class FastNet, and the reference script's PlainCNN."""

from jaxnet.models.fast import FastNet, FastNetTiny, whitening_kernel
from jaxnet.models.plain import PlainCNN, PlainCNNTiny
from jaxnet.models.resnet import (BasicBlock, Bottleneck, ResNet, ResNet18, ResNet20, ResNet34, ResNet50, ResNet56,
                                  ResNetTiny)

__all__ = ["BasicBlock", "Bottleneck", "FastNet", "FastNetTiny", "PlainCNN", "PlainCNNTiny", "ResNet", "ResNet18",
           "ResNet20", "ResNet34", "ResNet50", "ResNet56", "ResNetTiny", "whitening_kernel"]
