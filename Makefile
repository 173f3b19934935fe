# difflab: `make train` and `make test` work on a fresh machine (they create .venv when missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.difflab-installed

.PHONY: train test sample bench bench-quality bench-deps clean-venv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

## train the embedded default (scikit-learn digits, no download); extra Hydra overrides via ARGS="..."
train: $(STAMP)
	$(BIN)/difflab-train $(ARGS)

## run the whole test suite on CPU, one worker per core (TEST_WORKERS=0 runs it in one process)
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

## sample from a checkpoint: make sample CKPT=outputs/.../checkpoints/last.ckpt
sample: $(STAMP)
	$(BIN)/difflab-sample ckpt_path=$(CKPT) $(ARGS)

## benchmarks against diffusers and denoising-diffusion-pytorch (sizes: BENCH_REPEATS=5, BENCH_THREADS=1, ...)
bench: bench-deps
	$(BIN)/python benchmarks/bench.py $(ARGS)

## FID after the same training budget, difflab vs denoising-diffusion-pytorch (BENCH_BUDGET=seconds)
bench-quality: bench-deps
	$(BIN)/python benchmarks/quality_per_minute.py $(ARGS)

# the optional peers of pyproject's `bench` extra, installed once (torch stays pinned)
bench-deps: $(STAMP)
	@$(BIN)/python -c "import diffusers, denoising_diffusion_pytorch" 2>/dev/null || \
		$(BIN)/python -m pip install --quiet -e ".[bench]" torch==2.14.1 torchvision==0.29.1

clean-venv:
	rm -rf $(VENV)
