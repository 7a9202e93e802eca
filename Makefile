# The two entry points of the README. Each creates or updates the venv when pyproject.toml changed.
# CUDA selects the ONNX Runtime build: 12 (default: onnxruntime-gpu 1.24, CUDA 12, venv .venv) or
# 13 (onnxruntime-gpu 1.31, CUDA 13, venv .venv-cu13), e.g. `make env CUDA=13`, `make test CUDA=13`.
PYTHON ?= python3
CUDA   ?= 12
ifeq ($(CUDA),12)
VENV   ?= .venv
else ifeq ($(CUDA),13)
VENV   ?= .venv-cu13
else
$(error CUDA must be 12 or 13, got '$(CUDA)')
endif
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test env

demo: $(STAMP)
	$(PY) scripts/cv-models/run_yolov10m_lowbit_workflow.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

env: $(STAMP)

# pip resolves torch/torchvision as the pinned pair; onnxruntime-gpu carries the CPU EP, so plain
# onnxruntime is never installed (both ship the `onnxruntime` module and the later install wins).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev,cu$(CUDA)]'
	@if $(PY) -m pip show onnxruntime >/dev/null 2>&1; then \
		echo "error: plain onnxruntime is installed beside onnxruntime-gpu; run: $(PY) -m pip uninstall -y onnxruntime onnxruntime-gpu && make env CUDA=$(CUDA)" >&2; exit 1; fi
	touch $(STAMP)
