"""`python -m experiments.cifar10 ...` from a clone of the repository: the command line of `jaxnet.cifar10`
(installed as `jaxnet-cifar10`, or `python -m jaxnet.cifar10`). Kept because the docs and users' scripts use it;
the `experiments` directory is not installed, so it never shadows a package of that name."""

import sys

from jaxnet.cifar10 import main

if __name__ == "__main__":
    sys.exit(main())
