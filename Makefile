# The two commands a newcomer needs: `make demo` and `make test`. Both create (or reuse) .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-slow lint venv clean bench-quick mutations

venv: $(STAMP)

# torch is pinned so that CPU machines take the CPU wheel instead of a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The main job on the built-in tiny model: train (DAG-DB, compressibility), then compare base vs trained.
# One torch thread: the run's float rounding, hence its numbers, depends on the thread count; with it fixed,
# `make demo` prints the README's table (benchmarks/demo_figures.py runs the same commands the same way).
demo: export OMP_NUM_THREADS := 1
demo: export MKL_NUM_THREADS := 1
demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/dag train --config examples/demo-compressibility.toml --output runs/demo
	$(BIN)/dag eval --prompts examples/prompts/demo.txt --ckpt runs/demo --reward compressibility,clip \
		--num-per-prompt 8 --steps 10 --guidance 3 --output runs/demo/eval
	@echo "report: runs/demo/eval/report.html · samples during training: runs/demo/samples/"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples tools

# One pytest worker per core (pytest-xdist); each test process runs torch on one thread (tests/conftest.py).
test: lint
	$(BIN)/python -m pytest -q -n auto --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Break the training arithmetic on purpose, one change at a time, and check that the tests catch each (minutes).
mutations: $(STAMP)
	$(BIN)/python tests/helpers/mutations.py

clean:
	rm -rf $(VENV) runs .pytest_cache
