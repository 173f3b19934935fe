"""A LightningModule from a resolved run config: what difflab-train builds and what a checkpoint is rebuilt into.

The one file outside `cli` that calls Hydra's `instantiate`: a checkpoint stores its run's config,
and the checkpoint reader (lit/checkpoint_io.py) must rebuild the module from it without importing
an entry point. Only `difflab.*` and `torch.*` targets are built from a stored config.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Mapping

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from difflab.lit.autoencoder import AutoencoderModule
from difflab.lit.clip import MiniCLIPModule
from difflab.lit.diffusion_module import DiffusionModule
from difflab.lit.first_stage import build_first_stage, is_difflab_autoencoder
from difflab.lit.score_module import ScoreModule
from difflab.nets.first_stage import FirstStage

ALLOWED_TARGETS = ("difflab.", "torch.")  # what a stored config may name as _target_
# targets that moved since a checkpoint may have been written: old name -> new name
MOVED_TARGETS = {
    "difflab.diffusion.objectives.UniformTimesteps": "difflab.diffusion.timesteps.UniformTimesteps",
    "difflab.diffusion.hybrid.HybridLoss": "difflab.diffusion.vlb_objectives.HybridLoss",
    "difflab.diffusion.hybrid.VLBLoss": "difflab.diffusion.vlb_objectives.VLBLoss",
    "difflab.samplers.sde.PC": "difflab.samplers.PC",
    "difflab.samplers.ode.PFODE": "difflab.samplers.PFODE",
}


def data_num_classes(cfg: DictConfig) -> int:
    """num_classes of the configured data module's class (no data is loaded); refuses unlabelled data."""
    k = getattr(get_class(cfg.data._target_), "num_classes", None)
    if k is None:
        raise ValueError(
            f"model.num_classes=auto but data {cfg.data._target_} has no class labels; use an unconditional "
            "model (model.num_classes=null) or labelled data (digits, mnist, fashion_mnist, cifar10)"
        )
    return int(k)


ClipTextLoader = Callable[[str], nn.Module]  # a mini_clip checkpoint path -> its text tower, frozen (FrozenTextEncoder)


def net_overrides(cfg: DictConfig, objective: object, load_clip_text: ClipTextLoader | None = None) -> dict[str, Any]:
    """model.num_classes=auto -> the data's class count; out_channels=null -> 2C for learned-variance objectives."""
    out: dict[str, Any] = {}
    if cfg.model.get("num_classes") == "auto":
        out["num_classes"] = data_num_classes(cfg)
    if cfg.model.get("out_channels", "absent") is None and getattr(objective, "variance", "fixed") != "fixed":
        out["out_channels"] = 2 * int(cfg.model.in_channels)
    if cfg.get("text_encoder"):  # text-to-image: the net owns its text encoder (trained with it, or frozen)
        if cfg.model.get("num_classes") is not None:
            raise ValueError(f"text_encoder is set and model.num_classes={cfg.model.num_classes!r}: a model conditions on "
                             "prompts or on class labels, not both; set model.num_classes=null for a text model")
        if not (cfg.get("data") or {}).get("captions"):
            raise ValueError("text_encoder is set but data.captions=false: a text-to-image model trains on captions; "
                             "set data.captions=true (experiment=digits_t2i and fashion_t2i do)")
        out["text_encoder"] = text_encoder_from_config(cfg, load_clip_text)
    return out


AutoencoderLoader = Callable[[str], nn.Module]  # a difflab autoencoder checkpoint path -> its frozen AutoencoderKL


def first_stage_from_config(cfg: DictConfig, load_autoencoder: AutoencoderLoader | None = None) -> FirstStage | None:
    """The frozen first stage `cfg.first_stage` names (None: pixel space); kind `ckpt` reads its checkpoint
    with `load_autoencoder` (lit.checkpoint_io.load_first_stage), `embedded` rebuilds a stored one."""
    config = cfg.get("first_stage")
    if not config:
        return None
    config = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
    if str(cfg.module.get("_target_", "")).endswith("AutoencoderModule"):
        raise ValueError("module=autoencoder trains a first stage; it cannot have one itself: set first_stage=null")
    if cfg.get("first_stage_model") is not None:
        raise ValueError("first_stage_model is set but this run trains a diffusion model on a first stage "
                         f"(first_stage.kind={config.get('kind')!r}); set first_stage_model=null (the first stage "
                         "is the autoencoder of first_stage.ckpt_path)")
    autoencoder = None
    if config.get("kind") == "ckpt":
        path = config.get("ckpt_path")
        if not path or path == "???":
            raise ValueError("first_stage=ckpt needs first_stage.ckpt_path=<an autoencoder run's checkpoints/last.ckpt> "
                             "(difflab-train experiment=digits_autoencoder or fashion_autoencoder writes one)")
        if load_autoencoder is None:
            raise ValueError("first_stage.kind=ckpt needs a checkpoint reader (lit.checkpoint_io.load_first_stage)")
        autoencoder = load_autoencoder(str(path))
    elif is_difflab_autoencoder(config):
        autoencoder = autoencoder_from_config(config.get("config") or {}, source="the checkpoint's first stage")
    data = cfg.get("data") or {}
    return build_first_stage(config, image_size=int(data.get("image_size")), in_channels=int(data.get("channels", 3)),
                             autoencoder=autoencoder)


def with_latent_model(cfg: DictConfig, first_stage: FirstStage | None) -> DictConfig:
    """A copy of cfg whose model takes the first stage's latents: model.in_channels and model.image_size from
    its latent shape (C, h, w), so no hand-matching; refuses a model given other values by hand."""
    if first_stage is None or cfg.get("model") is None:
        return cfg
    c, h, w = first_stage.latent_shape
    if h != w:
        raise ValueError(f"the first stage's latents are {h}x{w}; the U-Net needs square latents")
    raw = OmegaConf.to_container(cfg.model, resolve=False)
    for key, value in (("in_channels", c), ("image_size", h)):
        given = raw.get(key)
        if given is not None and not (isinstance(given, str) and given.startswith("${")) and int(given) != value:
            raise ValueError(f"model.{key}={given} does not fit the first stage, whose latents are {c}x{h}x{w} "
                             f"(C x h x w); leave model.{key} to the first stage (difflab-train derives it) or "
                             f"set model.{key}={value}")
    levels = len(raw.get("ch_mult") or ()) if isinstance(raw.get("ch_mult"), (list, tuple)) else 0
    if levels and h % 2 ** (levels - 1):
        raise ValueError(f"the first stage's latents are {h}x{w}, but model.ch_mult={list(raw['ch_mult'])} downsamples "
                         f"by {2 ** (levels - 1)}; use a ch_mult with at most {int(math.log2(h & -h)) + 1} levels "
                         "(or a first stage with a smaller downsampling factor)")
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.model.in_channels = c
        out.model.image_size = h
    return out


def build_module(cfg: DictConfig | Mapping[str, Any], *, first_stage: FirstStage | None = None,
                 load_autoencoder: AutoencoderLoader | None = None, load_clip_text: ClipTextLoader | None = None,
                 ) -> DiffusionModule | ScoreModule | AutoencoderModule | MiniCLIPModule:
    """Network, schedule (or SDE), objective, optimizer and first stage (latent diffusion) from config; fails fast
    on bad shapes or values. `first_stage` is built from cfg.first_stage unless given; `load_clip_text` reads the
    text tower of text_encoder=mini_clip (lit.checkpoint_io.load_clip_text_encoder)."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    if str(cfg.module.get("_target_", "")).endswith("MiniCLIPModule"):
        return build_clip_module(cfg)
    if str(cfg.module.get("_target_", "")).endswith("AutoencoderModule"):
        if cfg.get("first_stage"):
            raise ValueError("module=autoencoder trains a first stage; it cannot have one itself: set first_stage=null")
        return build_autoencoder_module(cfg)
    if first_stage is None:
        first_stage = first_stage_from_config(cfg, load_autoencoder)
    cfg = with_latent_model(cfg, first_stage)
    latent = {} if first_stage is None else {"first_stage": first_stage}
    score = str(cfg.module.get("_target_", "")).endswith("ScoreModule")
    if (cfg.get("sde") is not None) != score:
        raise ValueError(
            f"sde={'set' if cfg.get('sde') is not None else 'null'} does not fit module={cfg.module.get('_target_')}: "
            "a score model needs both module=score and sde=vp|subvp|ve|ncsn (e.g. experiment=digits_vpsde); "
            "a DDPM needs module=diffusion and sde=null"
        )
    if score:  # score-based model: NCSN or a continuous-time SDE
        return instantiate(cfg.module, net=instantiate(cfg.model), sde=instantiate(cfg.sde),
                           optimizer=instantiate(cfg.optimizer), _convert_="all", **latent)
    objective = instantiate(cfg.objective)
    extra = {"timestep_sampler": instantiate(cfg.timestep_sampler)} if cfg.get("timestep_sampler") else {}
    return instantiate(
        cfg.module,
        net=instantiate(cfg.model, **net_overrides(cfg, objective, load_clip_text)),
        betas=instantiate(cfg.schedule),
        objective=objective,
        optimizer=instantiate(cfg.optimizer),
        _convert_="all",
        **extra,
        **latent,
    )


def build_autoencoder_module(cfg: DictConfig) -> AutoencoderModule:
    """module=autoencoder: the first stage of latent diffusion (first_stage_model), trained with manual optimisation;
    refuses the diffusion-only settings a run of it cannot use, before any work."""
    if cfg.get("first_stage_model") is None:
        raise ValueError("module=autoencoder needs first_stage_model=<preset> (small, tiny, kl_f4, kl_f8; "
                         "e.g. experiment=digits_autoencoder)")
    callbacks = cfg.get("callbacks") or {}
    on = [f"callbacks.{name}" for name in ("sample_grid", "evaluation") if callbacks.get(name)]
    on += ["sampler"] if cfg.get("sampler") is not None else []
    if on:
        raise ValueError(f"module=autoencoder trains a first stage, which draws no samples, but {', '.join(on)} "
                         f"{'is' if len(on) == 1 else 'are'} set; set {' '.join(k + '=null' for k in on)} "
                         "(experiment=digits_autoencoder and fashion_autoencoder do)")
    trainer = cfg.get("trainer") or {}
    if trainer.get("gradient_clip_val") or trainer.get("accumulate_grad_batches", 1) != 1:
        raise ValueError("module=autoencoder steps its optimizers itself (Lightning's manual optimisation), which "
                         "Lightning's trainer.gradient_clip_val and trainer.accumulate_grad_batches do not support; "
                         "set trainer.gradient_clip_val=null trainer.accumulate_grad_batches=1")
    return instantiate(cfg.module, net=instantiate(cfg.first_stage_model), optimizer=instantiate(cfg.optimizer),
                       _convert_="all")


def build_clip_module(cfg: DictConfig) -> MiniCLIPModule:
    """module=mini_clip: a CLIP with a noise-aware image tower (clip_model) trained contrastively on captioned data under
    cfg.schedule; refuses the diffusion-only settings a run of it cannot use, before any work."""
    if cfg.get("clip_model") is None:
        raise ValueError("module=mini_clip needs clip_model=<preset> (small; e.g. experiment=digits_clip)")
    callbacks = cfg.get("callbacks") or {}
    on = [f"callbacks.{name}" for name in ("sample_grid", "evaluation") if callbacks.get(name)]
    on += [name for name in ("sampler", "first_stage", "text_encoder") if cfg.get(name)]
    if on:
        raise ValueError(f"module=mini_clip trains a CLIP, which draws no samples and has its own text tower, but "
                         f"{', '.join(on)} {'is' if len(on) == 1 else 'are'} set; set {' '.join(k + '=null' for k in on)} "
                         "(experiment=digits_clip and fashion_clip do)")
    if not (cfg.get("data") or {}).get("captions"):
        raise ValueError("module=mini_clip trains on image-caption pairs but data.captions=false; set data.captions=true")
    if cfg.get("schedule") is None:
        raise ValueError("module=mini_clip needs schedule=<the guided model's schedule>: its image tower reads x_t at "
                         "that schedule's noise levels")
    return instantiate(cfg.module, net=instantiate(cfg.clip_model), betas=instantiate(cfg.schedule),
                       optimizer=instantiate(cfg.optimizer), _convert_="all")


def autoencoder_from_config(config: Mapping[str, Any], *, source: str) -> Any:
    """The untrained AutoencoderKL of a stored first_stage_model config node (a difflab.nets.* class only)."""
    target = str((config or {}).get("_target_", ""))
    if not target.startswith("difflab.nets."):  # the stored config picks what gets called: nets only
        raise ValueError(f"{source}: first_stage_model._target_={target!r} is not allowed; it must name a class in "
                         "difflab.nets.*")
    return instantiate(OmegaConf.create(dict(config)), _convert_="all")


BUILT_GROUPS = ("module", "model", "first_stage_model", "clip_model", "sde", "schedule", "objective", "timestep_sampler", "optimizer",
                "sampler", "data", "text_encoder")


def checked_stored_config(config: Mapping[str, Any], groups: tuple[str, ...] = BUILT_GROUPS, *,
                          source: str) -> dict[str, Any]:
    """A copy of a stored config with moved targets renamed; refuses a built group whose _target_ lies
    outside difflab.* / torch.* (a checkpoint must not pick what code runs)."""

    def walk(node: Any, where: str) -> Any:
        if isinstance(node, Mapping):
            out = {key: walk(value, f"{where}.{key}") for key, value in node.items()}
            target = out.get("_target_")
            if target is not None:
                out["_target_"] = target = MOVED_TARGETS.get(str(target), target)
                if not str(target).startswith(ALLOWED_TARGETS):
                    raise ValueError(f"{source}: {where}._target_={target!r} is not allowed in a stored config; it "
                                     f"must name a class or function in {' or '.join(p + '*' for p in ALLOWED_TARGETS)}")
            return out
        if isinstance(node, (list, tuple)):
            return [walk(value, f"{where}[{i}]") for i, value in enumerate(node)]
        return node

    return {key: walk(value, key) if key in groups else value for key, value in config.items()}


def classifier_net_from_config(config: Mapping[str, Any], *, source: str) -> Any:
    """The untrained net of a stored classifier config (classifier.net, a difflab.nets.* class only)."""
    net_cfg = (config.get("classifier") or {}).get("net") or {}
    target = str(net_cfg.get("_target_", ""))
    if not target.startswith("difflab.nets."):  # the stored config picks what gets called: nets only
        raise ValueError(f"{source}: classifier.net._target_={target!r} is not allowed; it must name a class in difflab.nets.*")
    return instantiate(net_cfg, _convert_="all")


def clip_net_from_config(config: Mapping[str, Any], *, source: str) -> Any:
    """The untrained MiniCLIP of a stored mini_clip run config (clip_model; difflab.nets.* classes only)."""
    net_cfg = dict(config.get("clip_model") or {})

    def targets(node: Any) -> list[str]:
        if isinstance(node, Mapping):
            return [str(node.get("_target_"))] * ("_target_" in node) + [t for v in node.values() for t in targets(v)]
        return []

    bad = [t for t in targets(net_cfg) if not t.startswith("difflab.nets.")] or ([] if net_cfg else ["(none)"])
    if bad:  # the stored config picks what gets called: nets only
        raise ValueError(f"{source}: clip_model._target_={bad[0]!r} is not allowed; it must name a class in difflab.nets.*")
    return instantiate(OmegaConf.create(net_cfg), _convert_="all")


def sampler_from_config(config: Mapping[str, Any], *, source: str) -> Any:
    """A sampler object from a sampler config node (a difflab.samplers.* target only)."""
    config = checked_stored_config({"sampler": config}, ("sampler",), source=source)["sampler"]
    target = str(config.get("_target_", ""))
    if not target.startswith("difflab.samplers."):
        raise ValueError(f"{source}: sampler._target_={target!r} is not allowed; it must name a class in difflab.samplers.*")
    return instantiate(OmegaConf.create(dict(config)), _convert_="all")


def text_encoder_from_config(cfg: DictConfig | Mapping[str, Any], load_clip_text: ClipTextLoader | None = None
                             ) -> nn.Module | None:
    """The text encoder `cfg.text_encoder` names (None: no text conditioning); a difflab.nets.text.* class only,
    and text_encoder=clip refused without a text_encoder.path before anything loads. text_encoder=mini_clip reads
    its tower from text_encoder.ckpt_path with `load_clip_text`, unless the config already describes the tower
    (a stored run config: the weights come with the checkpoint's state_dict)."""
    config = cfg.get("text_encoder")
    if not config:
        return None
    config = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
    target = str(config.get("_target_", ""))
    if not target.startswith("difflab.nets.text."):  # a stored config picks what gets called: text encoders only
        raise ValueError(f"text_encoder._target_={target!r} is not allowed; it must name a class in difflab.nets.text.* "
                         "(text_encoder=scratch or clip)")
    if "path" in config and (not config["path"] or config["path"] == "???"):
        raise ValueError("text_encoder=clip needs text_encoder.path=<a local folder with a CLIP text model: config.json, "
                         "weights, and vocab.json + merges.txt or tokenizer.json>")
    if "ckpt_path" in config and not config.get("tower"):  # text_encoder=mini_clip: the tower of a trained CLIP
        path = config["ckpt_path"]
        if not path or path == "???":
            raise ValueError("text_encoder=mini_clip needs text_encoder.ckpt_path=<a mini_clip run's checkpoints/last.ckpt> "
                             "(difflab-train experiment=digits_clip or fashion_clip writes one)")
        if load_clip_text is None:
            raise ValueError("text_encoder=mini_clip needs a checkpoint reader (lit.checkpoint_io.load_clip_text_encoder)")
        return load_clip_text(str(path))
    return instantiate(OmegaConf.create(config), _convert_="all")
