# Both targets create or reuse .venv (pip, not uv) and reinstall only when pyproject.toml changed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.torchfast-installed

.PHONY: demo test install bench clean test-xla

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m torchfast.demo

test: $(STAMP)
	$(PY) -m pytest

# torch_xla 2.9.0 needs torch 2.9.1, older than the main environment's torch: its own venv (~7 GB).
# The XLA tests run on the CPU PJRT device, where torch_xla really compiles and executes.
# If pip refuses torch 2.9.1 because of a machine-wide constraints file, see /etc/xdg/pip.
XLA_VENV  ?= .venv-xla
XLA_PY    := $(XLA_VENV)/bin/python
XLA_STAMP := $(XLA_VENV)/.torchfast-xla-installed

$(XLA_STAMP):
	@test -x $(XLA_PY) || $(PYTHON) -m venv $(XLA_VENV)
	$(XLA_PY) -m pip install --disable-pip-version-check -q torch==2.9.1 torch_xla==2.9.0 numpy pytest pytest-timeout
	@touch $(XLA_STAMP)

test-xla: $(XLA_STAMP)
	PJRT_DEVICE=CPU PYTHONPATH=$(CURDIR) $(XLA_PY) -m pytest -p no:cacheprovider tests/backends/test_backend_xla*.py

clean:
	rm -rf $(VENV) $(XLA_VENV) .pytest_cache build *.egg-info
