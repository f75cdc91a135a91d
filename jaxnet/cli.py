"""What jaxnet's command lines (`jaxnet.cifar10`, `jaxnet.profiling`) share: a parser whose errors are one line,
and a type for arguments that must be positive. Standard library only: a command line parses its arguments
before JAX is imported."""

from __future__ import annotations

import argparse
from collections.abc import Callable


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (no usage block): `error: argument --seed: invalid int value: 'x'`."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse `type`: the argument read as `kind` (int, float), refused unless > 0 and finite."""

    def parse(text: str) -> float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        if value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid <type> value"
    return parse
