"""Experiments built on jaxnet: thin command-line entry points over the library."""
