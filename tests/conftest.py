"""Test-wide JAX setup, applied before JAX initialises its backends: 8 fake CPU devices (so sharding code
runs on one machine), strict rank promotion (implicit broadcasting of mismatched ranks is a bug here), and
one persistent compilation cache for the session, so the many runs of the same tiny programs (resume,
device counts, export round trips) compile once. The runs the tests start as processes share one $XDG_CACHE_HOME
(`shared_cache_home`): their decoded data, compiled programs and oneDNN build are made once per session, not once
per test; tests of those caches set their own."""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must follow the environment set above)

from jaxnet import compiler  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
_CACHE = tempfile.mkdtemp(prefix="jaxnet-tests-xla-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
compiler.enable_compilation_cache(_CACHE)


@pytest.fixture(scope="session", autouse=True)
def shared_cache_home(tmp_path_factory):
    """$XDG_CACHE_HOME of this session, shared by pytest-xdist's workers (never the user's ~/.cache)."""
    base = tmp_path_factory.getbasetemp()
    home = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "xdg-cache"
    home.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(home))
        yield home
