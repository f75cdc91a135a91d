"""The repository's entry-point shims (not installed): see experiments/cifar10.py."""
