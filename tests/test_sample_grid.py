"""Sample grids: small images are enlarged (nearest neighbour, integer factor) to at least 256 px wide."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.utils import make_grid

from difflab.callbacks.sample_grid import grid_image


@pytest.mark.parametrize(
    "shape, nrow, size",
    [
        ((64, 1, 8, 8), None, 292),    # 8 columns of 8 px + borders = 73 px, x4
        ((4, 3, 64, 64), None, 262),   # 2 columns: 131 px, x2
        ((1, 3, 64, 64), None, 256),   # one image (make_grid adds no border): 64 px, x4
        ((4, 3, 128, 128), None, 259),  # already wide enough: unchanged
        ((10, 1, 8, 8), 10, 273),      # one row of 10: 91 x 10 px, x3
    ],
)
def test_grid_is_enlarged_by_an_integer_factor(shape, nrow, size):
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    grid = grid_image(images, nrow)
    native = make_grid(images, nrow=nrow or int(np.ceil(np.sqrt(shape[0]))), padding=1).permute(1, 2, 0).numpy()
    k = size // native.shape[1]
    assert grid.dtype == np.uint8 and grid.shape == (native.shape[0] * k, size, 3)
    assert np.array_equal(grid, native.repeat(k, axis=0).repeat(k, axis=1))  # every pixel a k x k block


def test_min_width_can_be_lowered():
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    assert grid_image(images, min_width=0).shape == (19, 19, 3)
