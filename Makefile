# The two commands: `make run` and `make test`. Both create .venv when missing and install the project.
# TORCH is the pip spec for PyTorch: the default is the CPU build these machines have on disk;
# on a CUDA machine use e.g. `make test TORCH=torch` (or a pinned CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.manualbp-installed

.PHONY: install run test test-all lint bench clean

# Reinstall when pyproject.toml changes or when TORCH names another spec than the last install.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q -e ".[dev,interop]" || echo "manualbp: the optional interop packages (skorch, lightning, opacus, onnx) did not install; their tests skip"
	$(PY) -m manualbp.native
	@echo "$(TORCH)" > $(STAMP)

install:
	@if [ ! -f $(STAMP) ] || [ "$$(cat $(STAMP))" != "$(TORCH)" ]; then rm -f $(STAMP); fi
	@$(MAKE) --no-print-directory $(STAMP) TORCH="$(TORCH)"

run: install
	$(PY) experiments/train.py

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m "slow or not slow"

lint: install
	$(PY) -m ruff check .

# BENCH_ARGS: e.g. --quick, --compile, --threads 1, --no-anchors, --device cuda, --out docs/bench
# The JAX anchors need the optional extra: `$(PY) -m pip install -e .[bench]` (jax[cpu]); without it their rows
# read "n/a: jax not installed" and everything else runs (`make test` never needs jax).
bench: install
	$(PY) scripts/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) outputs multirun wandb .pytest_cache .hypothesis
