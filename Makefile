# The two commands: `make demo` (train -> quantize -> label on Fashion-MNIST) and `make test`.
# Both set everything up from nothing on a fresh Debian machine, and skip what is already there.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOROVOD := $(VENV)/.horovod
FMNIST_DEBIAN := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
FMNIST_KERAS := $(HOME)/.keras/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: setup data jdk web clients demo test bench lint clean

setup: $(STAMP) $(HOROVOD) data jdk web

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstalled only when pyproject.toml changes. "compat" editable mode puts the repository on sys.path
# with a .pth file instead of an import hook, which would cost `pipeline label` ~15 ms at every start.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[train,test]' --config-settings editable_mode=compat
	touch $@

# Horovod (pyproject's `distributed` extra) compiled against the pinned TensorFlow (2-3 minutes), only when it
# does not import yet.
# Gloo always; MPI too where Debian's openmpi is installed (libopenmpi-dev). Needs cmake < 4 and a C++ compiler.
# Without build isolation the venv's own setuptools builds this project too: >= 77 reads its SPDX licence string.
# NCCL for the GPU collectives only where `nvidia-smi -L` lists a GPU: nvcc alone (CUDA without a GPU) builds the
# CPU/Gloo Horovod.
$(HOROVOD): $(STAMP)
	@if ! $(BIN)/python -c "import horovod.tensorflow" 2>/dev/null; then \
	  command -v cmake >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq cmake g++; }; \
	  MPI=$$(command -v mpicxx >/dev/null && echo HOROVOD_WITH_MPI=1 || echo HOROVOD_WITHOUT_MPI=1); \
	  GPU=$$(nvidia-smi -L 2>/dev/null | grep -q '^GPU ' && echo HOROVOD_GPU_OPERATIONS=NCCL); \
	  $(BIN)/pip install -q 'setuptools>=77' || exit 1; \
	  env MAKEFLAGS=-j$$(nproc) HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
	    HOROVOD_WITH_GLOO=1 $$MPI $$GPU $(BIN)/pip install --no-build-isolation --no-cache-dir -e '.[distributed]' \
	    --config-settings editable_mode=compat || exit 1; \
	fi
	$(BIN)/horovodrun --check-build
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

# The Android demo's tests compile and run its Java core (tests/test_android.py): a JDK when javac is missing.
# (android_demo/build_offline.sh installs aapt, apksigner, zipalign and dexdump itself.)
jdk:
	@command -v javac >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq default-jdk-headless; }

# LiteRT.js for the phone-browser demo (pipeline serve-web), pinned in serve/web/package-lock.json.
# (tests/test_web.py installs Debian's chromium itself to drive the page.)
web:
	@command -v npm >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq nodejs npm; }
	@[ -f serve/web/node_modules/@litertjs/core/package.json ] || npm ci --prefix serve/web --no-audit --no-fund

demo: setup
	$(BIN)/pipeline train --config fashion_mnist --name demo --exist-ok
	$(BIN)/pipeline quantize runs/demo --mode int8
	$(BIN)/pipeline samples --count 3 --out runs/demo/samples
	@for image in runs/demo/samples/*.png; do \
	  echo "\$$ pipeline label $$image -k 3"; $(BIN)/pipeline label $$image -k 3; done

# The standard clients tests/test_standard_clients.py runs the bundles in, each in a venv of its own (MediaPipe
# pins its own numpy; tflite-support pins protobuf 3.20 and needs the system's libusb-1.0). The Task Library has
# no wheel for some Pythons (3.12): then its stamp holds the reason and its tests skip, saying it.
CLIENTS := .venv-clients
clients: $(CLIENTS)/mediapipe/.installed $(CLIENTS)/tflite-support.done

$(CLIENTS)/mediapipe/.installed:
	$(PYTHON) -m venv $(CLIENTS)/mediapipe
	$(CLIENTS)/mediapipe/bin/pip install -q mediapipe==1.2.3
	touch $@

$(CLIENTS)/tflite-support.done:
	@ldconfig -p | grep -q libusb-1.0 || ! command -v apt-get >/dev/null || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq libusb-1.0-0; }
	$(PYTHON) -m venv $(CLIENTS)/tflite-support
	@log=$(CLIENTS)/tflite-support.log; again="(delete $@ to try again)"; \
	if ! $(CLIENTS)/tflite-support/bin/pip install -q tflite-support==0.4.4 > $$log 2>&1; then \
	  echo "tflite-support 0.4.4 does not install for $$($(PYTHON) -V): $$(grep -m1 ERROR $$log) $$again" > $@; \
	elif ! $(CLIENTS)/tflite-support/bin/python -c "from tflite_support.task import vision" 2>> $$log; then \
	  echo "tflite-support 0.4.4 installs but does not import: $$(tail -1 $$log) $$again" > $@; \
	else echo installed > $@; fi
	@cat $@

test: setup clients
	$(BIN)/ruff check .
	$(BIN)/pytest

bench: setup
	$(BIN)/python benchmarks/bench.py
	$(BIN)/python benchmarks/label_bench.py
	$(BIN)/python benchmarks/evaluate_bench.py
	$(BIN)/python benchmarks/train_bench.py
	$(BIN)/python benchmarks/quantize_bench.py
	$(BIN)/python benchmarks/horovod_bench.py
	$(BIN)/python benchmarks/data_bench.py
	$(BIN)/python benchmarks/scaling_bench.py
	$(BIN)/pipeline pretrained efficientnet-lite0
	$(BIN)/python benchmarks/pretrained_bench.py --plain-int8
	$(BIN)/python benchmarks/int8_io_bench.py
	$(BIN)/python benchmarks/preemption_bench.py

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(CLIENTS) runs .pytest_cache .ruff_cache *.egg-info serve/web/node_modules
