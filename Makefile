# difflab: `make train` and `make test` work on a fresh machine (they create .venv when missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.difflab-installed

.PHONY: train test data sample edit bench bench-quality bench-deps gpu-wheels gpu-check clean-venv

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

## the Fashion-MNIST demo's data and one-time assets, idempotent: Debian's dataset-fashion-mnist (apt-get, as root or
## with sudo; else a message saying how), then its feature classifier for FID / rFID, trained once into the cache
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
data: $(STAMP)
	@if [ -f "$(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz" ]; then \
		echo "data: Fashion-MNIST is installed ($(FASHION_MNIST_DIR))"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "data: no apt-get on this system: place Fashion-MNIST's train-*-ubyte.gz files in data/FashionMNIST/raw" \
			"(or let torchvision download them where the network allows)"; \
	else \
		if [ "$$(id -u)" = 0 ]; then SUDO=; \
		elif command -v sudo >/dev/null 2>&1 && { [ -t 0 ] || sudo -n true 2>/dev/null; }; then SUDO=sudo; \
		else SUDO=none; fi; \
		if [ "$$SUDO" = none ]; then \
			echo "data: installing Fashion-MNIST needs root: run 'apt-get install dataset-fashion-mnist' as root" \
				"(or sudo), then make data again"; \
		else \
			$$SUDO apt-get install -y -q dataset-fashion-mnist || \
				{ $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; } || \
				echo "data: apt-get could not install dataset-fashion-mnist (see above)"; \
		fi; \
	fi
	$(BIN)/python -m difflab.cli.assets fashion_mnist

## sample from a checkpoint: make sample CKPT=outputs/.../checkpoints/last.ckpt
sample: $(STAMP)
	$(BIN)/difflab-sample ckpt_path=$(CKPT) $(ARGS)

## inpaint the right halves of 200 digits with RePaint (docs/editing.md): make edit CKPT=outputs/.../last.ckpt
edit: $(STAMP)
	$(BIN)/difflab-edit ckpt_path=$(CKPT) source=digits:0-199 mask=right_half $(ARGS)

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

## wheels of what the GPU check needs and the GPU machine lacks (hydra-core, omegaconf, antlr4, torch-fidelity,
## EfficientNet-Lite0, diffusers; Python 3.12 manylinux x86-64) into .whl/, checked; run here, with network
gpu-wheels: $(STAMP)
	$(BIN)/python benchmarks/gpu_wheels.py download --dest .whl

## the one-shot GPU check (docs/performance.md, "GPU check"): with a CUDA GPU, that machine's python3 installs
## .whl/ into a target folder and runs pytest -m gpu, a ~2 min ddpm_cifar10 run and the CUDA bench (< 8 min);
## without one, .venv runs the CPU-side plumbing. Results: GPU_CHECK_OUT (outputs/gpu-check/), ARGS="--stages env"
GPU_CHECK_OUT ?= outputs/gpu-check
gpu-check:
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" >/dev/null 2>&1; then \
		PYTHON=$(PYTHON) sh benchmarks/gpu_check.sh --out "$(GPU_CHECK_OUT)" $(ARGS); \
	else \
		echo "gpu-check: $(PYTHON) sees no CUDA GPU: the CPU-side plumbing with $(BIN)/python (GPU stages skipped)"; \
		$(MAKE) --no-print-directory $(STAMP) && $(BIN)/python benchmarks/gpu_check.py --out "$(GPU_CHECK_OUT)" $(ARGS); \
	fi

clean-venv:
	rm -rf $(VENV)
