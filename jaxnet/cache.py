"""Where jaxnet keeps what it builds once (decoded datasets, compiled oneDNN handlers, XLA executables), the
check that a directory it is to write into can be one, and the lock a run holds on its workdir."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from jaxnet.errors import ConfigError


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/jaxnet, else ~/.cache/jaxnet."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxnet"


def check_directory(path: str | os.PathLike, what: str) -> None:
    """ConfigError (one line) unless `path` is a directory this process can write into, or can be made one:
    checked before a run starts, so that it never fails (or loses its work) when it first writes there. A
    directory still to be made is made and removed again, as a place that looks writable can refuse one (/proc)."""
    path = Path(path)
    missing = [p for p in (path, *path.absolute().parents) if not os.path.exists(p)]  # False where stat is refused
    existing = path.absolute().parents[len(missing) - 1] if missing else path
    if not existing.is_dir():
        raise ConfigError(f"{what} {path} exists and is not a directory" if existing == path else
                          f"{what} {path} cannot be made: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {existing} is not writable")
    made = []
    try:
        for p in reversed(missing):
            try:
                p.mkdir()
            except FileExistsError:  # made meanwhile, by another process of the run
                continue
            made.append(p)
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be made: {e.strerror or e}") from None
    finally:
        for p in reversed(made):
            with contextlib.suppress(OSError):  # another process may be writing into it by now
                p.rmdir()


@contextlib.contextmanager
def hold_directory(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """Make `path` (a directory) and hold an exclusive lock on it until the block ends: a second holder, in this
    process or another on this host, gets a one-line ConfigError instead of writing into the same files. The
    lock (flock on the directory itself: no file to leave behind) goes with the process, however it ends. On a
    file system without flock (some network mounts) nothing is held."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(f"{what} {path} is in use by another run: wait for it to end, or choose another "
                                  f"{what}") from None
        yield path
    finally:
        os.close(fd)
