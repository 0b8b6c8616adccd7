# Two commands matter: `make train` and `make test`. Both run `make setup` first.
# setup is idempotent: it reinstalls only when pyproject.toml/setup.cfg change.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
MODEL_DIR ?= runs/vae
# pytest-xdist workers: one per core (the suite is bound by one Python thread per worker).
TEST_WORKERS ?= auto
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup data train test bench bench-bnn bench-bnn-quality bench-scaling clean-venv

setup: $(STAMP) data

$(STAMP): pyproject.toml setup.cfg
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found. Install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'." >&2; exit 1; }
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

# Fashion-MNIST comes from the Debian package; no download at run time.
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] || [ -n "$$ELBO_DATA_DIR" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)..."; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null && command -v apt-get >/dev/null; then \
	  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
	  echo "Fashion-MNIST is missing from $(FMNIST_DIR) and this user cannot install packages." >&2; \
	  echo "Fix: run 'sudo apt-get install dataset-fashion-mnist', or put the four IDX files" >&2; \
	  echo "(train-images-idx3-ubyte.gz, ...) in a directory and 'export ELBO_DATA_DIR=that/dir'." >&2; \
	  exit 1; \
	fi

train: setup
	$(PY) -m bin.train --model_dir=$(MODEL_DIR) $(ARGS)

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15 tests

bench: setup
	$(PY) benchmarks/throughput.py

# BNN layer throughput vs the deterministic network (a few minutes).
bench-bnn: setup
	$(PY) benchmarks/bnn_throughput.py $(ARGS)

# BNN quality at a wall-clock budget per config (default 60 min x 7 configs).
bench-bnn-quality: setup
	$(PY) benchmarks/bnn_quality.py $(ARGS)

# Replicas x precision, VAE and BNN (about 10 minutes).
bench-scaling: setup
	$(PY) benchmarks/scaling.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
