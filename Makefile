# The two commands of the README. Each creates .venv if it is missing, installs the project, then runs.
PYTHON ?= python3
# One virtual environment per interpreter: .venv for python3, .venv-python3.12 for `make test PYTHON=python3.12`.
VENV   ?= $(if $(filter python3,$(PYTHON)),.venv,.venv-$(notdir $(PYTHON)))
BIN    := $(VENV)/bin
# make run's recipe: `quick` is a real one (86-87 % with TTA in 4-8 min on 2 cores; its time_budget of 9.5 min cuts the epochs on slower ones); CONFIG=smoke checks the pipeline in ~30 s.
CONFIG ?= quick
ARGS   ?=
# Extras installed for the tests: add bench (PyTorch, CPU build) to run the benchmarks' PyTorch peers too.
EXTRAS ?= test
# pytest workers (pytest-xdist): XLA compiles each program on one thread, so two workers overlap compilation.
JOBS   ?= 2
# The shared CIFAR-10 copy beside the checkout, if present (else $$JAXNET_CIFAR10, then tensorflow-datasets).
DATA   ?= $(wildcard ../shared/data/cifar10/cifar10-jpeg.tar.gz)
# A new workdir per run, so that a second `make run` never meets the first one's checkpoints.
WORKDIR ?= runs/$(CONFIG)-$(shell date +%Y%m%d-%H%M%S)

.PHONY: run test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

run: $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m experiments.cifar10 --config $(CONFIG) --workdir $(WORKDIR) $(if $(DATA),--data-dir $(DATA)) $(ARGS)

test: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	$(BIN)/python -m pytest -q -n $(JOBS) $(ARGS)

clean:
	rm -rf .venv .venv-* build *.egg-info
