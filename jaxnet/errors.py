"""jaxnet's error types: what a caller can get wrong (data, config, checkpoint, devices) and a run that
diverged. Each message is one line naming what was expected and what was found. Entry points turn exactly
these into one line and an exit code; any other exception is a bug and keeps its traceback. `check_values`
is the one test of a numeric argument's range that the public functions share."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax


class JaxnetError(Exception):
    """Base of every error jaxnet raises on purpose."""


class DataError(JaxnetError, ValueError):
    """A data source or batch that cannot be read as what was asked for."""


class ConfigError(JaxnetError, ValueError):
    """A config value, argument or option that cannot work (unknown name, wrong type, out of range)."""


class CheckpointError(JaxnetError, ValueError):
    """A checkpoint that cannot be restored into this run; the message names its directory."""


class ParallelError(JaxnetError, ValueError):
    """A device, process or batch layout that cannot work."""


class TrainingDiverged(JaxnetError, RuntimeError):
    """The training loss became NaN or infinite."""


def finite(value: Any) -> bool:
    """Whether every number in `value` (a number, or a sequence of them, nested or not) is finite: False for an
    infinite or NaN one (an overflowing literal such as 1e400 reads as infinite). Non-numbers pass."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return all(finite(v) for v in value)
    value = _number(value)
    return not isinstance(value, numbers.Real) or isinstance(value, numbers.Integral) or math.isfinite(value)


# What a number must be, by kind (`is_kind`, `check_values`): (its test, as a message says it).
KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "finite": (finite, "a finite number"),
    "positive": (lambda v: v > 0, "> 0"),
    "non-negative": (lambda v: v >= 0, ">= 0"),
    "in [0, 1)": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "in (0, 1]": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "positive integer": (lambda v: isinstance(v, numbers.Integral) and v > 0, "a positive integer"),
    "non-negative integer": (lambda v: isinstance(v, numbers.Integral) and v >= 0, "an integer >= 0"),
}


def is_kind(kind: str, value: Any) -> bool:
    """Whether `value` (a Python, NumPy or JAX number; booleans are not numbers here) is of `kind`, a key of
    `KINDS`; an infinite or NaN value is of none. A concrete value only: a traced one cannot be read."""
    value = _number(value)
    return (not isinstance(value, bool) and isinstance(value, numbers.Real) and finite(value)
            and KINDS[kind][0](value))


def check_values(where: str, **values: tuple[str, Any]) -> None:
    """ConfigError (one line, naming `where` and the argument) for the first of `values`, given as name=(kind,
    value), that is not a number of its kind (`is_kind`), where "<kind> or None" lets None pass and "<kind> or
    schedule" a function of the step. A traced value is not read (no host sync; it is checked where it was made)."""
    for name, (kind, value) in values.items():
        base, _, alternative = kind.partition(" or ")
        if ((alternative == "None" and value is None) or (alternative == "schedule" and callable(value))
                or isinstance(value, jax.core.Tracer) or is_kind(base, value)):
            continue
        want = KINDS[base][1] + {"": "", "None": " or None", "schedule": " or a schedule (step → rate)"}[alternative]
        if not finite(value):
            want = KINDS["finite"][1]
        raise ConfigError(f"{where} {name} must be {want}, got {_number(value)!r}")


def check_sizes(where: str, **sizes: Any) -> None:
    """ConfigError (one line) unless each of `sizes` (a model's classes, widths, blocks) is a positive integer,
    or, where a sequence is given, a non-empty sequence of them."""
    for name, value in sizes.items():
        many = isinstance(value, Sequence) and not isinstance(value, str)
        items = list(value) if many else [value]
        if not (items and all(is_kind("positive integer", v) for v in items)):
            want = "a non-empty sequence of positive integers" if many else "a positive integer"
            raise ConfigError(f"{where} {name} must be {want}, got {value!r}")


def _number(value: Any) -> Any:
    """A NumPy or JAX scalar as its Python number; anything else as it is."""
    return value.item() if getattr(value, "ndim", None) == 0 else value
