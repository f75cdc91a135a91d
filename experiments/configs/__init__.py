"""Recipes for experiments/cifar10.py: each module has get_config() -> ml_collections.ConfigDict."""

import importlib

NAMES = ("default", "resnet18", "resnet20", "plain", "smoke")


def get_config(name: str):
    """The config of recipe `name`; ValueError naming the valid ones for an unknown name."""
    if name not in NAMES:
        raise ValueError(f"unknown config {name!r}; valid: {', '.join(NAMES)}")
    return importlib.import_module(f"experiments.configs.{name}").get_config()
