"""What difflab-edit reads and asks for: source images, masks, and the edit request each task builds from them.

Sources (`source=`):
    path.npz            uint8 `images` (N, H, W, C) or (N, H, W) as difflab-sample writes them, optional `labels`
    a folder            image files below it, sorted (data/image_files.py), decoded to the model's mode (L / RGB);
                        labels when every image sits in a class subfolder
    <data set>:<i>      a conf/data option and indices in its stored order, e.g. digits:0-199, digits:0-9,100,
                        mnist:5 (ranges inclusive); the images are prepared as for training, at the model's size
Images must have the model's size and channels; exceptions: a 1-channel source for task=colorize (the grey
image to colour) and a source of size H/f for task=superres (the low-resolution image itself).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from difflab.cli.sampler_specs import compose_config
from difflab.data.image_files import check_images_open, load_image, scan_image_folder
from difflab.data.masks import MASK_NAMES, load_mask_file, named_masks
from difflab.data.transforms import to_model_range, to_uint8
from difflab.samplers.edit import Edit
from difflab.samplers.inpaint import Inpaint, KnownPixels, LowPass, decorrelated_basis
from difflab.samplers.sdedit import SDEdit

TASKS = ("inpaint", "sdedit", "colorize", "superres")
METHODS = {"inpaint": ("repaint", "pc"), "colorize": ("repaint", "pc"), "superres": ("repaint", "pc", "ilvr"),
           "sdedit": ()}
FACTORS = (2, 4)
_DATASET = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*):(?P<indices>[0-9,\- ]+)$")


@dataclass(frozen=True)
class Sources:
    """uint8 images (N, C, H, W) as given, their labels (N,) or None, and a short name for file stems."""

    images: Tensor
    labels: Tensor | None
    name: str


def parse_indices(text: str, n: int, name: str) -> list[int]:
    """'0-99,120' -> [0, ..., 99, 120], each checked against the n images of data set `name`."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"source index {part!r} of {name!r} is not an index or an increasing range a-b "
                             f"(e.g. {name}:0-99,120)")
        out += list(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    bad = [i for i in out if i >= n]
    if bad:
        raise ValueError(f"source index {bad[0]} is outside {name}'s images 0..{n - 1}")
    return out


def _from_dataset(name: str, indices: str, *, channels: int, size: int) -> Sources:
    try:
        node = compose_config("train_classifier", [f"data={name}", f"data.image_size={size}",
                                                   f"data.channels={channels}"]).data
    except Exception as err:  # noqa: BLE001 - Hydra's message names the missing option; ours names the fix
        raise ValueError(f"source={name}:{indices}: {name!r} is not a data config (conf/data/): {err}") from err
    dataset = hydra.utils.instantiate(node).full_dataset()
    idx = parse_indices(indices, len(dataset), name)
    images, labels = dataset.__getitems__(idx) if hasattr(dataset, "__getitems__") else \
        (torch.stack([dataset[i][0] for i in idx]), torch.tensor([int(dataset[i][1]) for i in idx]))
    return Sources(images=images, labels=labels.to(torch.int64), name=f"{name}{idx[0]}-{idx[-1]}")


def _from_npz(path: Path) -> Sources:
    with np.load(path) as data:
        if "images" not in data:
            raise ValueError(f"source={str(path)!r} holds {list(data.keys())}; it needs uint8 `images` (N, H, W, C)")
        images, labels = data["images"], data["labels"] if "labels" in data else None
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"source={str(path)!r}: `images` must be uint8 (N, H, W, C) or (N, H, W); got "
                         f"{images.dtype} {images.shape}")
    images = torch.from_numpy(images if images.ndim == 4 else images[..., None]).permute(0, 3, 1, 2).contiguous()
    labels = None if labels is None else torch.as_tensor(labels, dtype=torch.int64).flatten()
    return Sources(images=images, labels=labels, name=path.stem)


def _from_folder(root: Path, channels: int) -> Sources:
    index = scan_image_folder(root)
    check_images_open(index.paths)
    sizes = set()
    for p in index.paths:
        with Image.open(p) as im:
            sizes.add(im.size)
    if len(sizes) != 1:
        raise ValueError(f"source={str(root)!r}: its images have different sizes {sorted(sizes)}; give one size")
    (w, h), = sizes
    if w != h:
        raise ValueError(f"source={str(root)!r}: images are {w}x{h}; difflab models are square")
    images = torch.stack([load_image(p, image_size=h, channels=channels) for p in index.paths])
    labels = torch.tensor(index.labels, dtype=torch.int64) if index.classes is not None else None
    return Sources(images=images, labels=labels, name=root.name)


def load_sources(spec: str, *, channels: int, size: int) -> Sources:
    """The source images that `spec` names (module docstring); data sets come at the model's size and channels."""
    spec = str(spec)
    m = _DATASET.match(spec)
    if m and not Path(spec).exists():
        return _from_dataset(m["name"], m["indices"], channels=channels, size=size)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _from_folder(path, channels)
    if path.is_file() and path.suffix.lower() == ".npz":
        return _from_npz(path)
    raise ValueError(f"source={spec!r} is neither an .npz of uint8 `images`, a folder of images, nor "
                     "<data set>:<indices> such as digits:0-199")


def check_task(task: str, method: str | None, *, family: str, channels: int, latent: bool, factor: int) -> str:
    """The method to run (null -> repaint), every task / method / model combination checked before loading data."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not supported; choose one of {TASKS}")
    if task == "sdedit":
        if method is not None:
            raise ValueError(f"task=sdedit takes no method (got method={method!r}): it runs the sampler named by "
                             "sampler= (default: the run's own); leave method=null")
        return "sdedit"
    method = method or "repaint"
    if method not in METHODS[task]:
        raise ValueError(f"method={method!r} is not a method of task={task}; choose one of {METHODS[task]}")
    if method == "pc" and family == "ddpm":
        raise ValueError("method=pc is the score-SDE predictor-corrector inpainter: it needs a score model "
                         "(vp, subvp, ve, ncsn); this checkpoint is a 'ddpm' model: use method=repaint")
    if task == "colorize" and channels != 3:
        raise ValueError(f"task=colorize needs an RGB (3-channel) model; this model has {channels} channel(s)")
    if task == "superres" and factor not in FACTORS:
        raise ValueError(f"factor={factor!r} is not supported; choose one of {FACTORS}")
    if latent and task in ("colorize", "superres"):
        raise ValueError(f"task={task} constrains pixels (a colour basis, a pixel lattice / low-pass image) and is "
                         "refused for a latent diffusion model; use task=inpaint or task=sdedit")
    return method


def _check_shape(images: Tensor, channels: int, size: int, *, allowed: str = "") -> None:
    c, h, w = images.shape[1:]
    if (c, h, w) != (channels, size, size):
        raise ValueError(f"the source images are {c}x{h}x{w} (C x H x W) but the model draws {channels}x{size}x{size}"
                         f"{allowed}; give images of the model's size and channels")


def masks_for(spec: str, n: int, size: int, seed: int) -> Tensor:
    """bool (n, H, W), True = known, from a named mask or a file; warns on all-known / all-unknown masks."""
    masks = named_masks(spec, n, size, size, seed=seed) if spec in MASK_NAMES else load_mask_file(spec, n, size, size)
    if bool(masks.all()):
        warnings.warn(f"mask={spec!r} keeps every pixel: the results are the sources", stacklevel=2)
    elif not bool(masks.any()):
        warnings.warn(f"mask={spec!r} keeps no pixel: this is unconditional sampling", stacklevel=2)
    return masks


@dataclass(frozen=True)
class Plan:
    """The edit for all images, and what the outputs record: sources and masks (uint8 / bool (N, C, H, W)) and
    the grid's middle column (what the model is given, uint8)."""

    edit: Edit
    sources: Tensor
    masks: Tensor
    given: Tensor


def inpaint_plan(src: Tensor, mask_spec: str, mask_seed: int, jr: tuple[int, int]) -> Plan:
    """Inpainting: the masked pixels regenerated, the others kept."""
    n, c, h, _ = src.shape
    masks = masks_for(mask_spec, n, h, mask_seed)[:, None].expand(-1, c, -1, -1).clone()
    y = to_model_range(src)
    return Plan(Inpaint(KnownPixels(y, masks), *jr), src, masks, torch.where(masks, src, 128).to(torch.uint8))


def colorize_plan(src: Tensor, jr: tuple[int, int]) -> Plan:
    """Colorization: known = the grey level (channel mean), the first coordinate of the decorrelated basis."""
    rgb = src.expand(-1, 3, -1, -1) if src.shape[1] == 1 else src
    grey = to_model_range(rgb).mean(1, keepdim=True).expand(-1, 3, -1, -1).contiguous()
    masks = torch.zeros(rgb.shape, dtype=torch.bool)
    masks[:, 0] = True
    return Plan(Inpaint(KnownPixels(grey, masks, decorrelated_basis(3)), *jr), rgb.contiguous(), masks, to_uint8(grey))


def superres_plan(src: Tensor, size: int, factor: int, method: str, jr: tuple[int, int]) -> Plan:
    """Super-resolution by f: the lattice of every f-th pixel known (repaint, pc), or the f x f block means (ilvr)."""
    low_res = src.shape[-1] == size // factor
    y = to_model_range(src)
    if method == "ilvr":
        low = y if low_res else F.avg_pool2d(y, factor)
        up = F.interpolate(low, scale_factor=factor, mode="nearest")
        sources = to_uint8(up) if low_res else src
        return Plan(Inpaint(LowPass(up, factor), *jr), sources, torch.zeros(up.shape, dtype=torch.bool), to_uint8(up))
    n, c = src.shape[:2]
    values = torch.zeros(n, c, size, size)
    values[..., ::factor, ::factor] = y if low_res else y[..., ::factor, ::factor]
    masks = named_masks(f"superres{factor}", n, size, size)[:, None].expand(-1, c, -1, -1).clone()
    sources = to_uint8(F.interpolate(y, scale_factor=factor, mode="nearest")) if low_res else src
    given = torch.where(masks, to_uint8(values), 128).to(torch.uint8)
    return Plan(Inpaint(KnownPixels(values, masks), *jr), sources, masks, given)


def build_plan(task: str, method: str, src: Tensor, *, channels: int, size: int, mask: str, mask_seed: int,
               strength: float, factor: int, jr: tuple[int, int]) -> Plan:
    """The edit request of `task` over all sources (shapes checked against the model first)."""
    if task == "colorize":
        if src.shape[1] not in (1, 3) or src.shape[-2:] != (size, size):
            _check_shape(src, channels, size, allowed=" (colorize also takes 1-channel grey sources)")
        return colorize_plan(src, jr)
    if task == "superres" and src.shape[1:] == (channels, size // factor, size // factor):
        return superres_plan(src, size, factor, method, jr)
    _check_shape(src, channels, size, allowed=f" (or {size // factor}x{size // factor}: the low-resolution image)"
                 if task == "superres" else "")
    if task == "superres":
        return superres_plan(src, size, factor, method, jr)
    if task == "sdedit":
        plan_edit = SDEdit(to_model_range(src), float(strength))
        return Plan(plan_edit, src, torch.zeros(src.shape, dtype=torch.bool), src)
    return inpaint_plan(src, mask, mask_seed, jr)
