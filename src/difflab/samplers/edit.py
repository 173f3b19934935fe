"""The edits generate() accepts, checked once and turned into what the sampler call needs.

    Inpaint  known pixels imposed after every step (RePaint, the score-SDE inpainter / colorizer, ILVR): the
             sampler gets `inpaint=` (samplers that declare `supports_inpainting`: ddpm, ddim, pc)
    SDEdit   the source noised to t0 and denoised: the sampler runs on the family truncated at t0 from that
             start (samplers that declare `supports_sdedit`: all but ald)

A latent diffusion model edits in latent space (Rombach et al. 2022, Sec. 4.3 / App. for inpainting): the
source is encoded (z = s E(y), one posterior draw per sample from its own generator) and a pixel mask
becomes a latent mask that is known only where the whole f x f pixel block is known. After decoding, the
known region is therefore only approximately the source (the autoencoder's reconstruction error), and pixels
of a partly known block are regenerated. Colour-basis (colorize) and low-pass (ILVR) constraints live in
pixel space and are refused for latent models.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.diffusion.schedules import NoiseSchedule
from difflab.diffusion.sde import NoiseFamily
from difflab.samplers.base import Sampler
from difflab.samplers.inpaint import Inpaint, KnownPixels, LowPass
from difflab.samplers.sdedit import SDEdit, scaled_sampler, start_point, truncate

Edit = Inpaint | SDEdit
Encoder = Callable[[Tensor, torch.Generator], Tensor]  # (1, C, H, W) pixels, generator -> (1, c, h, w) latents


def check_edit_sampler(edit: Edit, sampler: Sampler) -> None:
    """Refuse a sampler that cannot run this edit, naming the samplers that can."""
    if isinstance(edit, Inpaint) and not getattr(sampler, "supports_inpainting", False):
        raise ValueError(f"sampler {sampler.name!r} cannot impose known pixels (inpaint, colorize, superres); use "
                         "sampler=ddpm|ddim on DDPM models (RePaint) or sampler=pc on score SDEs (the PC inpainter)")
    if isinstance(edit, SDEdit) and not getattr(sampler, "supports_sdedit", True):
        raise ValueError(f"sampler {sampler.name!r} cannot start part-way (SDEdit); use ddpm, ddim, heun, dpmpp, ode "
                         "or pc")


def check_edit_shape(edit: Edit, shape: Sequence[int]) -> None:
    """The edit's images must be shaped like the samples (B, C, H, W) the model draws."""
    got = tuple((edit.source if isinstance(edit, SDEdit) else edit.known.values).shape)
    if got != tuple(shape):
        raise ValueError(f"the edit's images have shape {got} (B, C, H, W) but the model samples {tuple(shape)}; "
                         "give one source per seed, of the model's channels and size")


def _encode_each(encode: Encoder, images: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """z_i = encode(y_i) with sample i's own generator (latents do not depend on the batch)."""
    return torch.cat([encode(images[i : i + 1], g) for i, g in enumerate(generators)])


def latent_mask(mask: Tensor, latent_hw: tuple[int, int], channels: int) -> Tensor:
    """A pixel mask (B, C, H, W) -> latent mask (B, c, h, w): known where the whole f x f block is known in
    every channel."""
    (H, W), (h, w) = mask.shape[-2:], latent_hw
    if H % h or W % w or H // h != W // w:
        raise ValueError(f"a {H}x{W} mask does not map onto {h}x{w} latents (need one integer factor)")
    f = H // h
    known = -F.max_pool2d(-mask.all(dim=1, keepdim=True).float(), f)  # block minimum, (B, 1, h, w)
    return known.bool().expand(-1, channels, -1, -1).clone()


def latent_edit(edit: Edit, encode: Encoder, generators: Sequence[torch.Generator]) -> Edit:
    """The pixel-space edit for a latent model: sources encoded, masks pooled to latent blocks (module docstring)."""
    if isinstance(edit, SDEdit):
        return edit.map(lambda y: _encode_each(encode, y, generators))
    known = edit.known
    if isinstance(known, LowPass) or known.basis is not None:
        raise ValueError("colorize and superres method=ilvr constrain pixels (a colour basis, a low-pass image) and "
                         "are refused for a latent diffusion model; use task=inpaint or task=sdedit")
    z = _encode_each(encode, known.values, generators)
    mask = latent_mask(known.mask, tuple(z.shape[-2:]), z.shape[1])
    if known.mask.any() and not mask.any():
        warnings.warn("no latent position is entirely known under this mask (each covers a block of pixels): the "
                      "latent model samples without constraint", stacklevel=2)
    return Inpaint(KnownPixels(values=z, mask=mask), jump_length=edit.jump_length, resamplings=edit.resamplings)


def edited_call(edit: Edit | None, family: NoiseSchedule | NoiseFamily, sampler: Sampler,
                x_T: Tensor) -> tuple[NoiseSchedule | NoiseFamily, Sampler, Tensor, dict[str, Any]]:
    """(family, sampler, x_T, extra keywords) of the sampler call that runs `edit` (unchanged when edit is None)."""
    if edit is None:
        return family, sampler, x_T, {}
    if isinstance(edit, Inpaint):
        return family, sampler, x_T, {"inpaint": edit}
    cut = truncate(family, edit.strength)
    levels = cut.T if isinstance(cut, NoiseSchedule) else None
    return cut, scaled_sampler(sampler, edit.strength, levels), start_point(cut, edit.source, x_T), {}
