"""Masks for editing: named generators and mask files. A mask is bool (N, H, W) with True = known (kept).

A named mask names the region to *generate*: `right_half` keeps the left half and regenerates the right.

    left_half | right_half     generate that half (columns W/2.. or ..W/2)
    center_box                 generate the central box of half the height and width
    random_box                 generate one box per image, sides in [H/4, H/2] (at least 1 pixel), seeded
    lines                      generate whole rows and columns, each with probability 1/4 (at least one), seeded
    strokes                    generate free-form brush strokes (random walks with momentum, width ~H/16), seeded
    superres2 | superres4      keep one pixel per f x f block (its top-left corner): super-resolution by f

Random masks draw image i's mask from its own generator seeded `seed + i`, so a mask does not depend on
the batch it is drawn in. Files: `.npz` (key `masks`, else its only array) of shape (N, H, W[, C]) or
(H, W[, C]), bool or 0/1 (a difflab-edit output's `masks` works as is: True = known, channels must agree
and are reduced with `all`), or a PNG (white / >= 128 = known), shared by every image.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MASK_NAMES = ("left_half", "right_half", "center_box", "random_box", "lines", "strokes", "superres2", "superres4")


def named_masks(name: str, n: int, height: int, width: int, *, seed: int = 0) -> torch.Tensor:
    """n masks bool (n, H, W), True = known, from a named generator (module docstring); random ones use seed + i."""
    if name not in MASK_NAMES:
        raise ValueError(f"mask={name!r} is not a named mask; choose one of {MASK_NAMES}, or give a .npz / .png file")
    if n < 1 or height < 2 or width < 2:
        raise ValueError(f"masks need n >= 1 and an image of at least 2x2 pixels; got n={n}, {height}x{width}")
    generate = torch.zeros(n, height, width, dtype=torch.bool)  # True = to generate
    if name == "left_half":
        generate[:, :, : width // 2] = True
    elif name == "right_half":
        generate[:, :, width // 2 :] = True
    elif name == "center_box":
        generate[:, height // 4 : height - height // 4, width // 4 : width - width // 4] = True
    elif name.startswith("superres"):
        f = int(name.removeprefix("superres"))
        generate[:] = True
        generate[:, ::f, ::f] = False
    else:
        draw = {"random_box": _random_box, "lines": _lines, "strokes": _strokes}[name]
        for i in range(n):
            generate[i] = draw(height, width, torch.Generator().manual_seed(seed + i))
    return ~generate


def _randint(low: int, high: int, g: torch.Generator) -> int:
    """An integer in [low, high] inclusive."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def _random_box(h: int, w: int, g: torch.Generator) -> torch.Tensor:
    bh, bw = _randint(max(1, h // 4), max(1, h // 2), g), _randint(max(1, w // 4), max(1, w // 2), g)
    top, left = _randint(0, h - bh, g), _randint(0, w - bw, g)
    out = torch.zeros(h, w, dtype=torch.bool)
    out[top : top + bh, left : left + bw] = True
    return out


def _lines(h: int, w: int, g: torch.Generator) -> torch.Tensor:
    rows, cols = torch.rand(h, generator=g) < 0.25, torch.rand(w, generator=g) < 0.25
    if not rows.any() and not cols.any():
        rows[_randint(0, h - 1, g)] = True
    return rows[:, None] | cols[None, :]


def _strokes(h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """1-3 strokes, each a random walk of ~max(h, w) steps with momentum, painted with a square brush."""
    out = torch.zeros(h, w, dtype=torch.bool)
    radius = max(h, w) // 32  # brush half-width: 1 pixel at 8x8 .. 32x32, 2 at 64
    for _ in range(_randint(1, 3, g)):
        y, x = float(_randint(0, h - 1, g)), float(_randint(0, w - 1, g))
        angle = float(torch.rand(1, generator=g)) * 2 * math.pi
        for _ in range(max(h, w)):
            yi, xi = int(round(y)), int(round(x))
            out[max(0, yi - radius) : yi + radius + 1, max(0, xi - radius) : xi + radius + 1] = True
            angle += float(torch.randn(1, generator=g)) * 0.6
            y, x = min(max(y + math.sin(angle), 0.0), h - 1.0), min(max(x + math.cos(angle), 0.0), w - 1.0)
    return out


def load_mask_file(path: str | Path, n: int, height: int, width: int) -> torch.Tensor:
    """Masks bool (n, H, W), True = known, from a .npz or .png file (module docstring); shapes are checked."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"mask={str(path)!r} is neither a named mask {MASK_NAMES} nor an existing file")
    if path.suffix.lower() == ".npz":
        with np.load(path) as data:
            keys = list(data.keys())
            if "masks" not in keys and len(keys) != 1:
                raise ValueError(f"mask file {path} holds {keys}; it needs a `masks` array (or exactly one array)")
            array = data["masks" if "masks" in keys else keys[0]]
        masks = _as_bool(array, path)
    elif path.suffix.lower() == ".png":
        with Image.open(path) as image:
            masks = torch.from_numpy(np.array(image.convert("L")) >= 128)
    else:
        raise ValueError(f"mask file {path} must be .npz or .png (or name a mask: {MASK_NAMES})")
    return _fit(masks, n, height, width, path)


def _as_bool(array: np.ndarray, path: Path) -> torch.Tensor:
    if array.dtype != np.bool_ and not np.isin(array, (0, 1)).all():
        raise ValueError(f"mask file {path}: values must be bool or 0/1 (1 = known); found {np.unique(array)[:5]}...")
    return torch.from_numpy(array.astype(bool))


def _fit(masks: torch.Tensor, n: int, height: int, width: int, path: Path) -> torch.Tensor:
    """(H, W[, C]) broadcast to n images, (N, H, W[, C]) checked against n; channels reduced with all."""
    if masks.ndim == 4 or (masks.ndim == 3 and masks.shape[:2] == (height, width) and masks.shape[-1] in (1, 3)):
        masks = masks.all(dim=-1)
    if masks.ndim == 2:
        masks = masks.expand(n, -1, -1)
    if masks.ndim != 3 or masks.shape != (n, height, width):
        raise ValueError(f"mask file {path} gives masks of shape {tuple(masks.shape)}; the {n} images need "
                         f"({n}, {height}, {width}) or ({height}, {width}), optionally with a channel axis last")
    return masks.clone()
