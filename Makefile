# The two entry points of the README. Each creates or updates .venv when pyproject.toml changed.
PYTHON ?= python3
VENV   ?= .venv
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
	$(PY) -m pip install -e '.[dev]'
	@if $(PY) -m pip show onnxruntime >/dev/null 2>&1; then \
		echo "error: plain onnxruntime is installed beside onnxruntime-gpu; run: $(PY) -m pip uninstall -y onnxruntime onnxruntime-gpu && make env" >&2; exit 1; fi
	touch $(STAMP)
