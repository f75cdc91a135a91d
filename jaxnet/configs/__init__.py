"""Recipes of the CIFAR-10 experiment (`jaxnet-cifar10 --config NAME`): each module has get_config() -> ml_collections.ConfigDict."""

import ast
import importlib

from jaxnet.errors import ConfigError

# name → what it is and what a run costs (measured; benchmarks/RESULTS.md), for --help.
SUMMARIES = {
    "default": "FastNet, airbench94's recipe: 90.6 % with TTA on a JPEG copy; ~70 min on a 2-core AMD EPYC",
    "muon": "FastNet, the record's airbench94_muon recipe (Muon, batch 2000, 8 epochs of 50 000 images)",
    "muon10": "the muon recipe for 10 epochs: with conv_impl=onednn dtype=bfloat16, ~8 min on a 2-core Xeon (AMX)",
    "quick": ("the muon recipe on a half-width FastNet, 4.67 epochs of 1536, half at 24 px: make run's default, "
              "87 % in 4-8 min (fewer epochs where 9.5 min would not hold them)"),
    "resnet18": "ResNet-18, SGD one-cycle, 30 epochs: a GPU recipe (~12 h on a 2-core CPU)",
    "resnet20": "CIFAR ResNet-20, SGD cosine, 40 epochs: a GPU recipe (hours on a CPU)",
    "plain": "the reference PyTorch script's PlainCNN and Adam, 10 epochs: ~67 % after one; ~25 min on 2 cores",
    "smoke": "a few hundred images, a tiny net: the whole pipeline in ~30 s",
}
NAMES = tuple(SUMMARIES)


def get_config(name: str):
    """The config of recipe `name`; ConfigError naming the valid ones for an unknown name."""
    if name not in NAMES:
        raise ConfigError(f"unknown config {name!r}; valid: {', '.join(NAMES)}")
    return importlib.import_module(f"jaxnet.configs.{name}").get_config()


def override(config, items: list[str]):
    """`key=value` pairs onto `config`. Each value is read as a Python literal (else, for a float field, as
    float() reads it: inf, nan; else as a string) and set through ml_collections' type-safe assignment: an int
    goes into a float field, a list into a tuple field, anything else of another type is a ConfigError (one
    line, naming the field and its type). Whether a value is in range is `experiment.validate_config`'s to say."""
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in config:
            raise ConfigError(f"override {item!r} is not key=value with a known key; keys: {', '.join(config)}")
        old = config[key]
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = _float(text) if isinstance(old, float) else text
        kind = type(old).__name__
        expected = f"override {key}={text}: expected {'an' if kind[0] in 'aeiou' else 'a'} {kind}"
        if isinstance(value, bool) != isinstance(old, bool):  # bool is an int to Python and ml_collections
            raise ConfigError(expected)
        try:
            config[key] = value
        except TypeError:
            raise ConfigError(expected) from None
    return config


def _float(text: str) -> float | str:
    """`text` as float() reads it (inf, nan: not Python literals), else the text itself."""
    try:
        return float(text)
    except ValueError:
        return text
