"""Low-level ops with named implementations, each checked against a `*_reference`."""

from jaxnet.ops.channel import batch_norm, batch_norm_reference, bias_add, channel_sum
from jaxnet.ops.conv import DEFAULT_IMPL, IMPLS, conv2d, conv2d_reference

__all__ = ["DEFAULT_IMPL", "IMPLS", "batch_norm", "batch_norm_reference", "bias_add", "channel_sum", "conv2d",
           "conv2d_reference"]
