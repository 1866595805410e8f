# Set-up and checks on a fresh clone: `make test` (whole suite) and `make demo` (the CPU demo).
# Both create .venv when missing and install the pinned CPU set once; a stamp named after the
# hash of the requirement files makes re-runs skip the install until those files change.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# on a machine whose default index would hand out the CUDA build.
TORCH_PIP_ARGS ?=
REQUIREMENTS := requirements-cpu.txt requirements-unsloth.txt pyproject.toml
STAMP := $(VENV)/.installed-$(shell cat $(REQUIREMENTS) | sha256sum | cut -c1-12)

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test demo gpu-check

setup: $(STAMP)

$(STAMP): $(REQUIREMENTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and alone, so nothing after it can pick another build.
	$(PIP) install $(TORCH_PIP_ARGS) torch==$(TORCH_VERSION)
	echo "torch==$(TORCH_VERSION)" > $(VENV)/torch-constraint.txt
	$(PIP) install -r requirements-cpu.txt -c $(VENV)/torch-constraint.txt
	$(PIP) install --no-deps -r requirements-unsloth.txt
	$(PIP) install --no-deps -e .
	$(PY) -c "import torch, trl, transformers; assert torch.__version__.split('+')[0] == '$(TORCH_VERSION)', torch.__version__; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
	rm -f $(VENV)/.installed-*
	touch $@

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/brandcopy demo

# Every stage once on the GPU (small step counts) -> outputs/gpu-check/report.json. Uses the Python
# that has the GPU set (environment.yml / requirements-gpu.txt), not the CPU .venv; prints one line
# and does nothing on a machine without CUDA. GPU_CHECK_ARGS="--shape 7b" checks the 7B shape.
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
gpu-check:
	HF_HUB_OFFLINE=1 PYTHONPATH=$(CURDIR):$$PYTHONPATH $(GPU_PYTHON) -m brandcopy.cli gpu-check $(GPU_CHECK_ARGS)
