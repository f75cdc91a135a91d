"""jaxnet: compiler-first convolutional networks on JAX/Flax. Public API only; see the README."""

from jaxnet.layers import BatchNorm, Conv
from jaxnet.models import (FastNet, FastNetTiny, PlainCNN, PlainCNNTiny, ResNet, ResNet18, ResNet20, ResNet34,
                           ResNet50, ResNet56, ResNetTiny)
from jaxnet.ops import IMPLS, conv2d, conv2d_reference
from jaxnet.parallel import jit_eval_step, jit_train_step
from jaxnet.train import (Lookahead, TrainState, adamw, constant, create_train_state, cross_entropy, eval_step, merge_metrics,
                          piecewise_linear, sgd, train_step, validate_batch, warmup_cosine)

__version__ = "0.1.0"

__all__ = ["IMPLS", "BatchNorm", "Conv", "FastNet", "FastNetTiny", "PlainCNN", "PlainCNNTiny", "ResNet", "ResNet18", "ResNet20",
           "ResNet34", "ResNet50", "ResNet56", "ResNetTiny", "Lookahead", "TrainState", "adamw", "constant", "conv2d",
           "conv2d_reference", "create_train_state", "cross_entropy", "eval_step", "jit_eval_step",
           "jit_train_step", "merge_metrics", "piecewise_linear", "sgd", "train_step", "validate_batch",
           "warmup_cosine"]
