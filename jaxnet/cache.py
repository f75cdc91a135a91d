"""Where jaxnet keeps what it builds once: decoded datasets, compiled oneDNN handlers, XLA executables."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/jaxnet, else ~/.cache/jaxnet."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxnet"
