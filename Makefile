# The two entry points of the README. Each creates or updates the venv when pyproject.toml or the lock
# changed, installing exactly the pinned, hash-checked packages of requirements/cu$(CUDA).lock.txt.
# CUDA selects the ONNX Runtime build: 12 (default: onnxruntime-gpu 1.24, CUDA 12, venv .venv) or
# 13 (onnxruntime-gpu 1.31, CUDA 13, venv .venv-cu13), e.g. `make env CUDA=13`, `make test CUDA=13`.
# `make lock` regenerates both locks from pyproject.toml with uv (version UV_VERSION, installed into
# tmp/uv-tool; needs PyPI), keeping the current pins where they still fit; `make lock UV_ARGS=--upgrade`
# moves every pin to the newest allowed version.
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
LOCK   := requirements/cu$(CUDA).lock.txt

# The locks target CPython 3.11 on Linux x86-64 (manylinux_2_28 wheels), from PyPI only.
UV_VERSION  := 0.13.9
UV_TOOL     := tmp/uv-tool
UV          ?= $(UV_TOOL)/bin/uv
UV_ARGS     ?=
LOCK_PYTHON := 3.11
lock_args = pip compile pyproject.toml --extra dev --extra cu$(1) --python-version $(LOCK_PYTHON) \
	--python-platform x86_64-manylinux_2_28 --generate-hashes --no-config --index-url https://pypi.org/simple \
	--output-file requirements/cu$(1).lock.txt $(UV_ARGS)

.PHONY: demo test env lock

demo: $(STAMP)
	$(PY) scripts/cv-models/run_yolov10m_lowbit_workflow.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

env: $(STAMP)

# --no-deps: the lock is the whole environment (torch/torchvision as the pinned pair, onnxruntime-gpu,
# which carries the CPU EP). Plain onnxruntime is never installed (both ship the `onnxruntime` module and
# the later install wins); a venv that has it from elsewhere is refused.
# lowbit itself is built with the lock's setuptools (--no-build-isolation), so nothing unhashed is fetched.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) requirements/inputs_digest.py check $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; sys.exit("%d.%d" % sys.version_info[:2] != "$(LOCK_PYTHON)")' || { \
		echo "error: $(LOCK) is for CPython $(LOCK_PYTHON); $(VENV) has $$($(PY) -V); recreate it: rm -rf $(VENV) && make env PYTHON=python$(LOCK_PYTHON)" >&2; exit 1; }
	$(PY) -m pip install --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	@if $(PY) -m pip show onnxruntime >/dev/null 2>&1; then \
		echo "error: plain onnxruntime is installed beside onnxruntime-gpu; run: $(PY) -m pip uninstall -y onnxruntime onnxruntime-gpu && make env CUDA=$(CUDA)" >&2; exit 1; fi
	$(PY) -m pip check
	touch $(STAMP)

lock:
	command -v $(UV) >/dev/null || { $(PYTHON) -m venv $(UV_TOOL) && $(UV_TOOL)/bin/pip install uv==$(UV_VERSION); }
	$(UV) $(call lock_args,12) --custom-compile-command "uv $(strip $(call lock_args,12))"
	$(UV) $(call lock_args,13) --custom-compile-command "uv $(strip $(call lock_args,13))"
	$(PYTHON) requirements/inputs_digest.py write requirements/cu12.lock.txt requirements/cu13.lock.txt
