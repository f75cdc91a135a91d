"""Recipes of the CIFAR-10 experiment (`jaxnet-cifar10 --config NAME`): each module has get_config() -> ml_collections.ConfigDict."""

import ast
import importlib
from typing import Any

from jaxnet.errors import ConfigError

# name → what it is and what a run costs (measured; benchmarks/RESULTS.md), for --help.
SUMMARIES = {
    "default": "FastNet, airbench94's recipe: 90.6 % with TTA on a JPEG copy; ~70 min on a 2-core AMD EPYC",
    "muon": "FastNet, the record's airbench94_muon recipe (Muon, batch 2000, 8 epochs of 50 000 images)",
    "muon10": "the muon recipe for 10 epochs: with conv_impl=onednn dtype=bfloat16, ~8 min on a 2-core Xeon (AMX)",
    "quick": ("the muon recipe on a half-width FastNet, 4.67 epochs of 1536, half at 24 px: make run's default, "
              "86-87 % in 4-8 min (fewer epochs where 9.5 min would not hold them)"),
    "hour": ("airbench96's net with quick's recipe, as many of 25 epochs as fit in 60 min: 92.5 % with TTA on a JPEG "
             "copy (12 epochs on a 2-core Zen 4 with conv_impl=onednn dtype=bfloat16)"),
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
    """`key=value` pairs onto `config`. Each value is read as a Python literal — in a field that is not a string,
    one where inf and nan (float()'s words, any case) are numbers too, as in `lr=inf` or `widths=(inf, 64, 64)` —
    else as a string, and set through ml_collections' type-safe assignment: an int goes into a float field, a list
    into a tuple field, anything else of another type is a ConfigError (one line, naming the field and its type).
    Whether a value is in range (finite, to begin with) is `experiment.validate_config`'s to say."""
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in config:
            raise ConfigError(f"override {item!r} is not key=value with a known key; keys: {', '.join(config)}")
        old = config[key]
        try:
            value = _literal(text, float_words=not isinstance(old, str))
        except (ValueError, SyntaxError):
            value = text
        kind = type(old).__name__
        expected = f"override {key}={text}: expected {'an' if kind[0] in 'aeiou' else 'a'} {kind}"
        if isinstance(value, bool) != isinstance(old, bool):  # bool is an int to Python and ml_collections
            raise ConfigError(expected)
        try:
            config[key] = value
        except TypeError:
            raise ConfigError(expected) from None
    return config


class _FloatWords(ast.NodeTransformer):
    """inf, infinity and nan (float()'s words, any case) as the floats they name: not Python literals."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.Constant(float(node.id)) if node.id.lower() in ("inf", "infinity", "nan") else node


def _literal(text: str, *, float_words: bool) -> Any:
    """`text` as `ast.literal_eval` reads it, with float()'s words for infinite and NaN numbers as numbers where
    `float_words` (`_FloatWords`); ValueError or SyntaxError where it is no literal."""
    tree = ast.parse(text.lstrip(" \t"), mode="eval")
    return ast.literal_eval(_FloatWords().visit(tree) if float_words else tree)
