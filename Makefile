# difflab: `make train` and `make test` work on a fresh machine (they create .venv when missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.difflab-installed
# the digits classifier whose features give make train's offline FID/IS (trained once, ~1 min)
CLASSIFIER := $(or $(DIFFLAB_CACHE_DIR),.cache/difflab)/classifiers/digits_8px.ckpt

.PHONY: train test sample bench clean-venv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

## train the embedded default (scikit-learn digits, no download); extra Hydra overrides via ARGS="..."
train: $(STAMP)
	@test -f $(CLASSIFIER) || $(BIN)/difflab-train-classifier
	$(BIN)/difflab-train $(ARGS)

## run the whole test suite on CPU
test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

## sample from a checkpoint: make sample CKPT=outputs/.../checkpoints/last.ckpt
sample: $(STAMP)
	$(BIN)/difflab-sample ckpt_path=$(CKPT) $(ARGS)

clean-venv:
	rm -rf $(VENV)
