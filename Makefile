# gpt-oss QAT Studio. `make demo` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast browser clean-workspace

setup: $(STAMP)

# torch first, pinned to the CPU build on this machine's disk (a bare `pip install torch` pulls a multi-GB CUDA build).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: setup
	$(PY) launch.py

# The browser tests drive Debian's chromium (installed here when missing; CI installs it in .ci/run).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "chromium missing: sudo apt-get install chromium (browser tests will be skipped)"; fi; }

test: setup browser
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q tests

# Everything except the end-to-end recipe and browser tests (a quick loop while developing).
test-fast: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m "not slow" tests

clean-workspace:
	rm -rf workspace
