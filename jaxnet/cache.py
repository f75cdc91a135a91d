"""Where jaxnet keeps what it builds once (decoded datasets, compiled oneDNN handlers, XLA executables), and the
check that a directory it is to write into can be one."""

from __future__ import annotations

import os
from pathlib import Path

from jaxnet.errors import ConfigError


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/jaxnet, else ~/.cache/jaxnet."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxnet"


def check_directory(path: str | os.PathLike, what: str) -> None:
    """ConfigError (one line) unless `path` is a directory this process can write into, or can be made one:
    checked before a run starts, so that it never fails (or loses its work) when it first writes there."""
    path = Path(path)
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{what} {path} exists and is not a directory" if existing == path else
                          f"{what} {path} cannot be made: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {existing} is not writable")
