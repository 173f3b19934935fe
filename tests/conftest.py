import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)  # the tests use small tensors; more threads only add contention


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)
