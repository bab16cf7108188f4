# The two commands: `make demo` (train -> quantize -> label on Fashion-MNIST) and `make test`.
# Both set everything up from nothing on a fresh Debian machine, and skip what is already there.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST_DEBIAN := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
FMNIST_KERAS := $(HOME)/.keras/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: setup data demo test bench lint clean

setup: $(STAMP) data

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstalled only when pyproject.toml changes. "compat" editable mode puts the repository on sys.path
# with a .pth file instead of an import hook, which would cost `pipeline label` ~15 ms at every start.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[train,test]' --config-settings editable_mode=compat
	touch $@

# Fashion-MNIST from Debian's package, unless Keras's cache already has it.
data:
	@if [ ! -f $(FMNIST_DEBIAN) ] && [ ! -f $(FMNIST_KERAS) ]; then \
	  if command -v apt-get >/dev/null; then \
	    $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST not found: put its four idx .gz files in $(dir $(FMNIST_KERAS))" >&2; exit 1; \
	  fi; \
	fi

demo: setup
	$(BIN)/pipeline train --config fashion_mnist --name demo --exist-ok
	$(BIN)/pipeline quantize runs/demo --mode int8
	$(BIN)/pipeline samples --count 3 --out runs/demo/samples
	@for image in runs/demo/samples/*.png; do \
	  echo "\$$ pipeline label $$image -k 3"; $(BIN)/pipeline label $$image -k 3; done

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest

bench: setup
	$(BIN)/python benchmarks/bench.py

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
