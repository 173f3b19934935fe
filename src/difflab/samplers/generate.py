"""THE one sampling path: (net, family, sampler, seeds, cond, guidance, precision) -> images.

Both LightningModules' `sample`, the callbacks and every CLI come through `generate`; it checks
everything once (sampler against the model, labels, guidance scales, precision) before the first
network call, draws x_T from one generator per sample (sample i uses seeds[i] for all of its
noise, so images do not depend on batch size or rank), prepares the net once per call
(nets/inference.py) and wraps it into the model_fn the sampler sees: conditioning passed through,
classifier-free guidance, the mean channels of a learned-variance net for samplers without Sigma.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from difflab.diffusion.schedules import NoiseSchedule
from difflab.diffusion.sde import NoiseFamily, as_family
from difflab.nets.conditioning import Conditioning
from difflab.nets.inference import active_autocast_dtype, autocast_dtype, precision_autocast, sampling_net
from difflab.samplers.base import Callback, ModelFn, Sampler
from difflab.samplers.edit import Edit, Encoder, check_edit_sampler, check_edit_shape, edited_call, latent_edit
from difflab.samplers.families import check_sampler_fits
from difflab.samplers.guidance import classifier_free_guidance, classifier_grad, clip_grad, summed

Labels = Sequence[int] | Tensor | None
Prompts = Sequence[str] | str | None


@dataclass(frozen=True)
class Guidance:
    """Classifier-free scale w (0 unconditional, 1 conditional, > 1 guided), classifier guidance (classifier, s) and
    CLIP guidance (a noise-aware CLIP, nets/clip.py, and its scale s; the prompt is generate()'s)."""

    scale: float = 1.0
    classifier: nn.Module | None = None
    classifier_scale: float = 0.0
    clip: nn.Module | None = None
    clip_scale: float = 0.0

    def __post_init__(self) -> None:
        if not self.scale >= 0 or not self.classifier_scale >= 0:
            raise ValueError(f"guidance_scale={self.scale!r} and classifier_scale={self.classifier_scale!r} must be >= 0 "
                             "(guidance_scale: 0 unconditional, 1 conditional, > 1 guided; classifier_scale: 0 = off)")
        if not self.clip_scale >= 0:
            raise ValueError(f"clip_guidance_scale={self.clip_scale!r} must be >= 0 (0 = off, bit for bit)")

    @property
    def uses_classifier(self) -> bool:
        return self.classifier is not None and self.classifier_scale > 0

    @property
    def uses_clip(self) -> bool:
        return self.clip is not None and self.clip_scale > 0


def initial_noise(shape: tuple[int, ...], seeds: Sequence[int], device: torch.device) -> tuple[Tensor, list[torch.Generator]]:
    """x_T ~ N(0, I) (len(seeds), *shape) and one generator per sample, sample i seeded by seeds[i]."""
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in generators]), generators


def labels_tensor(labels: Labels, n: int, num_classes: int | None, device: torch.device, *, for_classifier: bool) -> Tensor | None:
    """Labels as a (n,) long tensor, checked against the net's classes (or, for classifier guidance, >= 0)."""
    if labels is None:
        if for_classifier:
            raise ValueError("classifier guidance needs labels (one class per sample), e.g. label=7")
        return None
    y = torch.as_tensor(labels, dtype=torch.long, device=device).flatten()
    if y.numel() == 1 and n > 1:
        y = y.expand(n).clone()
    if y.shape != (n,):
        raise ValueError(f"got {y.numel()} labels for {n} samples; give one label, or one per sample")
    if num_classes is None and not for_classifier:
        raise ValueError("labels were given but this model is unconditional (model.num_classes=null); "
                         "train with model.num_classes=auto, or use a noise-aware classifier for guidance")
    bad = y[(y < 0) | (y >= num_classes)] if num_classes is not None else y[y < 0]
    if bad.numel():
        raise ValueError(f"label {bad[0].item()} is outside 0..{(num_classes or 1) - 1} (num_classes={num_classes})")
    return y


def prompt_list(prompts: Prompts, n: int, *, is_text: bool, has_labels: bool) -> list[str] | None:
    """The prompts as one per sample (one prompt for all, or n), checked against the net: a text net takes prompts, never labels."""
    if prompts is None:
        if is_text and has_labels:
            raise ValueError("labels were given but this is a text-to-image model: condition it with prompt=\"...\" "
                             "(or prompts_file=), not label=")
        return None
    if not is_text:
        raise ValueError(f"a prompt was given ({_first(prompts)!r}) but this model does not read text (it is "
                         "class-conditional or unconditional); use label= on a class-conditional model, or train a text "
                         "model (experiment=digits_t2i|fashion_t2i)")
    out = [prompts] * n if isinstance(prompts, str) else [str(p) for p in prompts]
    if len(out) == 1 and n > 1:
        out = out * n
    if len(out) != n:
        raise ValueError(f"got {len(out)} prompts for {n} samples; give one prompt, or one per sample")
    for i, p in enumerate(out):
        if not p.strip():
            raise ValueError(f"prompt {i} is empty ({p!r}); give a description such as \"a pair of trousers\" "
                             "(guidance_scale=0 samples the unconditional model)")
    return out


def _first(prompts: Sequence[str] | str) -> str:
    return prompts if isinstance(prompts, str) else (list(prompts) or [""])[0]


def check_request(family: NoiseFamily, sampler: Sampler, *, model_variance: str, guidance: Guidance,
                  has_labels: bool) -> None:
    """Everything generate() refuses, checked before any network call."""
    check_sampler_fits(sampler, family, model_variance)
    if guidance.uses_classifier and not sampler.supports_classifier_guidance:
        raise ValueError(f"classifier guidance (classifier_scale={guidance.classifier_scale}) needs a sampler that "
                         f"supports it (ddpm, ddim), not {sampler.name!r}; use classifier-free guidance "
                         "(guidance_scale) with this sampler, or sampler=ddpm|ddim")
    if guidance.uses_clip and not sampler.supports_classifier_guidance:
        raise ValueError(f"CLIP guidance (clip_guidance_scale={guidance.clip_scale}) adds a gradient term to each step, "
                         f"which sampler {sampler.name!r} cannot take; use sampler=ddpm or ddim")
    if guidance.clip is not None and family.name != "ddpm":
        raise ValueError(f"guidance=clip needs a DDPM model (mini_clip reads timestep indices t); this is a "
                         f"{family.name!r} score model")
    if has_labels and family.name != "ddpm":
        raise ValueError(f"labels / guidance were given but this {family.name!r} score model is unconditional; "
                         "class conditioning and guidance exist for DDPM models (experiment=digits_cfg)")


def check_clip_fits(clip: nn.Module, net: nn.Module, *, latent: bool) -> None:
    """A noise-aware CLIP guides a model whose x_t it can read: pixel space, the same image size and channels."""
    source = getattr(clip, "stored_config", {}).get("path", "the CLIP")
    if latent:
        raise ValueError(f"guidance=clip on a latent diffusion model: clip_ckpt_path={source!r} is a pixel-space CLIP, "
                         "whose image tower cannot read the first stage's latents; use CLIP guidance on a pixel-space "
                         "model, or classifier-free guidance (a text model, experiment=fashion_t2i) on this one")
    mine = (clip.in_channels, clip.image_size)
    theirs = (net.in_channels, net.image_size)
    if mine != theirs:
        raise ValueError(f"clip_ckpt_path={source!r} was trained on {mine[0]}-channel {mine[1]}x{mine[1]} images, the "
                         f"model draws {theirs[0]}-channel {theirs[1]}x{theirs[1]} ones; train a mini_clip on the model's "
                         f"data (data.image_size={theirs[1]} data.channels={theirs[0]})")


def guided_model_fn(net: nn.Module, cond: Conditioning | None, guidance: Guidance, mean_channels: int,
                    null: Conditioning | None = None) -> ModelFn:
    """model_fn(x_t, t) over net(x_t, t, cond): the conditioning passed through, with classifier-free guidance.

    The null condition is the null label of a class-conditional net, or `null` (the empty or negative prompt)
    of a text net.
    """
    if cond is None:  # unconditional (a conditional net: its null label or empty prompt)
        return net
    if cond.labels is not None:
        num_classes = getattr(net, "num_classes", None)
        if num_classes is None:
            return net
        null = Conditioning(labels=torch.full_like(cond.labels, num_classes))
    if null is None:
        raise ValueError("classifier-free guidance on a prompt needs its null condition (the empty or negative prompt)")
    return classifier_free_guidance(net, cond, null, guidance_scale=guidance.scale, mean_channels=mean_channels)


def text_conditions(net: nn.Module, prompts: list[str], negative_prompt: str | None,
                    device: torch.device) -> tuple[Conditioning, Conditioning]:
    """(prompt, null) conditionings encoded once by the net's text encoder; null is the negative prompt or the empty one."""
    cond = net.encode_condition(net.prompt_condition(prompts, device))
    negative = [negative_prompt] * len(prompts) if negative_prompt else [""] * len(prompts)
    null = net.encode_condition(net.prompt_condition(negative, device))
    return cond, null


@torch.inference_mode()
def generate(
    net: nn.Module,
    family: NoiseSchedule | NoiseFamily,
    sampler: Sampler,
    seeds: Sequence[int],
    *,
    parameterization: str,
    model_variance: str = "fixed",
    labels: Labels = None,
    prompts: Prompts = None,
    negative_prompt: str | None = None,
    guidance: Guidance = Guidance(),
    precision: str | int | None = None,
    callback: Callback = None,
    decoder: Callable[[Tensor], Tensor] | None = None,
    edit: Edit | None = None,
    encoder: Encoder | None = None,
) -> Tensor:
    """Images in [-1, 1], (len(seeds), C, H, W), from `net` (in eval mode) under `family`, sampled with `sampler`.

    A latent diffusion model samples latents and passes them through `decoder` (its first stage's
    decode, run under the same precision), so the result is in pixel space either way.

    labels (one per seed, or one for all) condition a class-conditional net (guidance.scale is the
    classifier-free w) or steer a noise-aware guidance.classifier; prompts (one per seed, or one for all)
    condition a text net the same way, against the empty prompt or `negative_prompt`, and are what guidance.clip (a
    noise-aware CLIP on pixels of the net's size) steers towards on any DDPM net, with scale guidance.clip_scale
    (GLIDE Sec. 3.2; 0 changes nothing, bit for bit); precision bf16-mixed / 16-mixed
    runs the net under autocast with weights cast once; None or 32 keeps the caller's context.

    edit (samplers/edit.py): Inpaint imposes known pixels after every step (RePaint, the PC inpainter),
    SDEdit starts part-way from a noised source; its images are in pixel space, one per seed, and a latent
    model's `encoder` (its first stage's encode) maps them to latents first.
    """
    device = next(net.parameters()).device
    dtype = active_autocast_dtype(device.type) if precision is None else autocast_dtype(precision)
    fam = as_family(family)
    check_request(fam, sampler, model_variance=model_variance, guidance=guidance, has_labels=labels is not None)
    if edit is not None:
        check_edit_sampler(edit, sampler)
    is_text = getattr(net, "text_encoder", None) is not None
    if guidance.clip is not None:  # CLIP guidance: the prompt is CLIP's (and the net's, on a text model)
        check_clip_fits(guidance.clip, net, latent=decoder is not None)
        if prompts is None:
            raise ValueError("guidance=clip needs a prompt (prompt=\"a handwritten seven\"): CLIP guidance steers towards it")
    texts = prompt_list(prompts, len(seeds), is_text=is_text or guidance.clip is not None,
                        has_labels=labels is not None and is_text)
    if negative_prompt is not None and (texts is None or not is_text):
        raise ValueError(f"negative_prompt={negative_prompt!r} needs a prompt on a text-to-image model")
    y = None if is_text and not guidance.uses_classifier else labels_tensor(
        labels, len(seeds), getattr(net, "num_classes", None), device, for_classifier=guidance.uses_classifier)
    cond = None if y is None or is_text else Conditioning(labels=y)
    x_T, generators = initial_noise((net.in_channels, net.image_size, net.image_size), seeds, device)
    if edit is not None:
        edit = edit.map(lambda v: v.to(device))
        edit = edit if encoder is None else latent_edit(edit, encoder, generators)
        check_edit_shape(edit, x_T.shape)
        if getattr(edit, "strength", None) == 0:  # SDEdit at strength 0: the source itself
            return edit.source.float() if decoder is None else decoder(edit.source).float()
    family, sampler, x_T, edit_kwargs = edited_call(edit, family, sampler, x_T)
    with precision_autocast(dtype if precision is not None else None, device.type):
        run_net = sampling_net(net, dtype)
        null = None
        if texts is not None and is_text:  # the text encoder runs once per call, not once per step
            cond, null = text_conditions(run_net, texts, negative_prompt, device)
        model_fn = guided_model_fn(run_net, cond, guidance, net.in_channels, null)
        extra: dict = {}
        if model_variance != "fixed" and sampler.supports_learned_variance:
            extra["model_variance"] = model_variance
        elif model_variance != "fixed":  # samplers without Sigma_theta need only the mean (eps/x0/v) channels
            model_fn = _mean_channels(model_fn, net.in_channels)
        cond_fns = []  # gradient guidance: classifier and CLIP (GLIDE Sec. 3.2), summed; none at scale 0
        if guidance.uses_classifier:
            cond_fns.append(classifier_grad(guidance.classifier, y, scale=guidance.classifier_scale))
        if guidance.uses_clip:
            text = guidance.clip.encode_prompts(texts).float()  # (B, D) unit vectors, once per call
            cond_fns.append(clip_grad(guidance.clip.encode_image, text, scale=guidance.clip_scale))
        if cond_fns:
            extra["cond_fn"] = summed(cond_fns)
        out = sampler(model_fn, x_T, family, parameterization=parameterization, generator=generators,
                      callback=callback, **extra, **edit_kwargs)
        return out if decoder is None else decoder(out).float()


def _mean_channels(model_fn: ModelFn, channels: int) -> ModelFn:
    """The eps/x0/v half of a learned-variance net's (B, 2C, H, W) output, for samplers without Sigma_theta."""
    return lambda x_t, t: model_fn(x_t, t)[:, :channels]
