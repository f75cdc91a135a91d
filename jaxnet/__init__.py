"""jaxnet: compiler-first convolutional networks on JAX/Flax. Public API only; see the README."""

from jaxnet import models, optim
from jaxnet.errors import CheckpointError, ConfigError, DataError, JaxnetError, ParallelError, TrainingDiverged
from jaxnet.layers import BatchNorm, Conv
from jaxnet.models import (FastNet, FastNetTiny, PlainCNN, PlainCNNTiny, ResNet, ResNet18, ResNet20, ResNet34,
                           ResNet50, ResNet56, ResNetTiny)
from jaxnet.ops import IMPLS, conv2d, conv2d_reference
from jaxnet.optim import adamw, airbench_sgd, sgd
from jaxnet.parallel import jit_eval_step, jit_train_step
from jaxnet.train import (TrainState, create_train_state, cross_entropy, eval_step, lookahead_ema, merge_metrics,
                          select_hardest, train_step, validate_batch)

__version__ = "0.1.0"

__all__ = ["IMPLS", "BatchNorm", "CheckpointError", "ConfigError", "Conv", "DataError", "FastNet", "FastNetTiny",
           "JaxnetError", "ParallelError", "PlainCNN", "PlainCNNTiny", "ResNet", "ResNet18", "ResNet20", "ResNet34",
           "ResNet50", "ResNet56", "ResNetTiny", "TrainState", "TrainingDiverged", "adamw", "airbench_sgd",
           "conv2d", "conv2d_reference", "create_train_state", "cross_entropy", "eval_step", "jit_eval_step",
           "jit_train_step", "lookahead_ema", "merge_metrics", "models", "optim", "select_hardest", "sgd", "train_step",
           "validate_batch"]
