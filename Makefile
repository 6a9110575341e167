# The README's two commands: `make demo` and `make test`. Each creates .venv and installs
# what it needs, Debian/Ubuntu packages included (mosquitto; dcmtk, gdcm tools, Orthanc and
# dicom3tools for tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The export extra needs PyTorch; ask for the CPU build explicitly (a plain `torch` pulls a
# multi-GB CUDA build). Override TORCH_SPEC/TORCH_INDEX for another platform.
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint bench demo-bundle system-deps system-deps-test clean

demo: system-deps $(VENV)/.stamp-run
	$(VENV)/bin/edge-agent demo

test: system-deps-test $(VENV)/.stamp-dev lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.stamp-dev
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff check edge_agent export tests benchmarks
	$(VENV)/bin/ruff format --check edge_agent export tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/vermin -q -t=3.10- --violations --no-tips --eval-annotations edge_agent export benchmarks tests

bench: $(VENV)/.stamp-dev
	$(PY) benchmarks/preprocess.py
	$(PY) benchmarks/intake.py
	$(PY) benchmarks/delivery.py
	$(PY) benchmarks/board.py
	$(PY) benchmarks/encoder.py

demo-bundle: $(VENV)/.stamp-dev
	$(PY) -m export demo --out edge_agent/data/demo-bundle --overwrite

# --- environment ---------------------------------------------------------------------------
system-deps:
	@need=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need="$$need mosquitto"; \
	$(PYTHON) -c 'import ensurepip' >/dev/null 2>&1 || need="$$need python3-venv"; \
	if [ -n "$$need" ]; then \
	  echo "installing Debian packages:$$need"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need; \
	fi

system-deps-test: system-deps
	@need=""; \
	command -v storescu >/dev/null 2>&1 || need="$$need dcmtk"; \
	command -v gdcmconv >/dev/null 2>&1 || need="$$need libgdcm-tools"; \
	command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || need="$$need orthanc"; \
	command -v dciodvfy >/dev/null 2>&1 || need="$$need dicom3tools"; \
	command -v systemd-analyze >/dev/null 2>&1 || need="$$need systemd"; \
	[ -x /usr/bin/chromium ] || need="$$need chromium"; \
	if [ -n "$$need" ]; then \
	  echo "installing Debian packages:$$need"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need; \
	fi

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.stamp-run: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[cpu,board]'
	touch $@

$(VENV)/.stamp-dev: pyproject.toml | $(VENV)/bin/python
	$(PY) -c 'import torch' 2>/dev/null || \
	  $(PIP) install -q --retries 1 --extra-index-url $(TORCH_INDEX) '$(TORCH_SPEC)'
	$(PIP) install -q -e '.[cpu,board,export,dev]'
	touch $@ $(VENV)/.stamp-run

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build dist *.egg-info
