"""Test-wide JAX setup, applied before JAX initialises its backends: 8 fake CPU devices (so sharding code
runs on one machine), strict rank promotion (implicit broadcasting of mismatched ranks is a bug here)."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must follow the environment set above)

jax.config.update("jax_numpy_rank_promotion", "raise")
