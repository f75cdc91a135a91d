"""Recipes for experiments/cifar10.py: each module has get_config() -> ml_collections.ConfigDict."""

import ast
import importlib

from jaxnet.errors import ConfigError

NAMES = ("default", "muon", "resnet18", "resnet20", "plain", "smoke")


def get_config(name: str):
    """The config of recipe `name`; ConfigError naming the valid ones for an unknown name."""
    if name not in NAMES:
        raise ConfigError(f"unknown config {name!r}; valid: {', '.join(NAMES)}")
    return importlib.import_module(f"experiments.configs.{name}").get_config()


def override(config, items: list[str]):
    """`key=value` pairs onto `config`. Each value is read as a Python literal (else as a string) and set
    through ml_collections' type-safe assignment: an int goes into a float field, a list into a tuple
    field, anything else of another type is a ConfigError (one line, naming the field and its type)."""
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in config:
            raise ConfigError(f"override {item!r} is not key=value with a known key; keys: {', '.join(config)}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        old = config[key]
        if isinstance(value, bool) != isinstance(old, bool):  # bool is an int to Python and ml_collections
            raise ConfigError(f"override {key}={text}: expected a {type(old).__name__}")
        try:
            config[key] = value
        except TypeError:
            raise ConfigError(f"override {key}={text}: expected a {type(old).__name__}") from None
    return config
