# diffmine: `make demo` runs the whole pipeline on the built-in dataset, `make test` runs the tests.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO    ?= runs/demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test test-all browser bench clean

setup: $(STAMP)

# Rebuilt when the pins or the package metadata change. torch is pinned in the same pip
# command (via the constraints file) so pip takes the CPU build instead of a CUDA one.
$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/diffmine demo --run $(DEMO)

# The report test drives a real headless Chromium; install Debian's when it is missing.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "warning: could not install chromium"

# The default suite (CI's): every feature, minus the quality checks marked `slow` (models trained
# for minutes: trends' prevalence, contrast's localization); `make test-all` runs them too.
test: setup browser
	$(BIN)/python -m pytest -q -m "not slow" tests

test-all: setup browser
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
