# Two commands on a fresh Debian machine (Python 3.11+, no GPU needed):
#   make demo   install into .venv and run the main job on its built-in default
#   make test   install into .venv and run the test suite, then the replay suite against a real
#               Reverb server in .venv-reverb (make test-reverb)
# Installing is idempotent: it reruns only when pyproject.toml or this Makefile change.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# DeepMind Reverb has wheels only up to Python 3.11 and pins numpy<2, protobuf<5 and TensorFlow 2.15,
# so the Reverb backend is tested in a venv of its own (the `reverb` extra), never in .venv.
PYTHON_REVERB ?= $(shell command -v python3.11 2>/dev/null || echo $(PYTHON))
VENV_REVERB ?= .venv-reverb
PY_REVERB := $(VENV_REVERB)/bin/python
STAMP_REVERB := $(VENV_REVERB)/.installed
PYTEST_REVERB_ARGS ?=
TORCH_VERSION := 2.13.0
# Debian packages the stack needs (checked with dpkg, installed only when missing): Mesa's EGL
# (llvmpipe) for MuJoCo's offscreen rendering, libGL and GLib for OpenCV under robosuite.
SYSTEM_PACKAGES := libegl1 libgl1 libgl1-mesa-dri libglib2.0-0
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test test-reverb install install-reverb system-packages clean

# The main job on its built-in default (the quickstart): a local Ray cluster on 127.0.0.1, the small
# model, the built-in Lift task; W&B offline unless WANDB_API_KEY is set. Prints where the plot is.
demo: $(STAMP)
	MUJOCO_GL=egl RAY_USAGE_STATS_ENABLED=0 $(PY) launch/online.py $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory test-reverb

# The replay suite's Reverb cases against a real server, and a scaled-down main job with
# replay.backend=reverb. REQUIRE_REVERB=1 turns their skip into a failure should Reverb not import,
# and pytest's exit code 5 (no test ran) fails the target too.
test-reverb: $(STAMP_REVERB)
	REQUIRE_REVERB=1 TF_CPP_MIN_LOG_LEVEL=2 MUJOCO_GL=egl $(PY_REVERB) -m pytest tests/test_replay.py tests/test_online.py -k reverb $(PYTEST_REVERB_ARGS)

install: $(STAMP)

install-reverb: $(STAMP_REVERB)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed, found " + sys.version.split()[0])'
	@$(MAKE) --no-print-directory system-packages
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first: the CPU build where there is no NVIDIA GPU, else pip would pull the multi-GB CUDA build.
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PIP) install -q "torch==$(TORCH_VERSION)"; \
	else \
		$(PIP) install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null || \
		$(PIP) install -q "torch==$(TORCH_VERSION)+cpu" --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple; \
	fi
	$(PIP) install -q -e '.[all,libero,dev]'
	@touch $@

$(STAMP_REVERB): pyproject.toml Makefile
	@$(PYTHON_REVERB) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "dm-reverb 0.14 needs Python 3.11 here (wheels stop at 3.11, the project starts at 3.11), found " + sys.version.split()[0] + "; set PYTHON_REVERB")'
	@$(MAKE) --no-print-directory system-packages
	@test -x $(PY_REVERB) || $(PYTHON_REVERB) -m venv $(VENV_REVERB)
	@# torch first, as for .venv: the CPU build where there is no NVIDIA GPU.
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY_REVERB) -m pip install -q "torch==$(TORCH_VERSION)"; \
	else \
		$(PY_REVERB) -m pip install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null || \
		$(PY_REVERB) -m pip install -q "torch==$(TORCH_VERSION)+cpu" --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple; \
	fi
	$(PY_REVERB) -m pip install -q -e '.[all,reverb,dev]'
	$(PY_REVERB) -m pip check
	@touch $@

# Installs only what is missing; uses sudo when not root and sudo exists.
system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	$(PYTHON) -c 'import ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		if ! command -v apt-get >/dev/null 2>&1; then echo "missing system packages:$$missing (no apt-get here; install them by hand)"; exit 1; fi; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
		echo "installing system packages:$$missing"; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

clean:
	rm -rf $(VENV) $(VENV_REVERB) .pytest_cache build *.egg-info
