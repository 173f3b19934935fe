"""A LightningModule from a resolved run config: what difflab-train builds and what a checkpoint is rebuilt into.

The one file outside `cli` that calls Hydra's `instantiate`: a checkpoint stores its run's config,
and the checkpoint reader (lit/checkpoint_io.py) must rebuild the module from it without importing
an entry point. Only `difflab.*` and `torch.*` targets are built from a stored config.
"""

from __future__ import annotations

from typing import Any, Mapping

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from difflab.lit.autoencoder import AutoencoderModule
from difflab.lit.diffusion_module import DiffusionModule
from difflab.lit.score_module import ScoreModule

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


def net_overrides(cfg: DictConfig, objective: object) -> dict[str, Any]:
    """model.num_classes=auto -> the data's class count; out_channels=null -> 2C for learned-variance objectives."""
    out: dict[str, Any] = {}
    if cfg.model.get("num_classes") == "auto":
        out["num_classes"] = data_num_classes(cfg)
    if cfg.model.get("out_channels", "absent") is None and getattr(objective, "variance", "fixed") != "fixed":
        out["out_channels"] = 2 * int(cfg.model.in_channels)
    return out


def build_module(cfg: DictConfig | Mapping[str, Any]) -> DiffusionModule | ScoreModule | AutoencoderModule:
    """Network, schedule (or SDE), objective and optimizer from config; fails fast on bad shapes or values."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    if str(cfg.module.get("_target_", "")).endswith("AutoencoderModule"):
        return build_autoencoder_module(cfg)
    score = str(cfg.module.get("_target_", "")).endswith("ScoreModule")
    if (cfg.get("sde") is not None) != score:
        raise ValueError(
            f"sde={'set' if cfg.get('sde') is not None else 'null'} does not fit module={cfg.module.get('_target_')}: "
            "a score model needs both module=score and sde=vp|subvp|ve|ncsn (e.g. experiment=digits_vpsde); "
            "a DDPM needs module=diffusion and sde=null"
        )
    if score:  # score-based model: NCSN or a continuous-time SDE
        return instantiate(cfg.module, net=instantiate(cfg.model), sde=instantiate(cfg.sde),
                           optimizer=instantiate(cfg.optimizer), _convert_="all")
    objective = instantiate(cfg.objective)
    extra = {"timestep_sampler": instantiate(cfg.timestep_sampler)} if cfg.get("timestep_sampler") else {}
    return instantiate(
        cfg.module,
        net=instantiate(cfg.model, **net_overrides(cfg, objective)),
        betas=instantiate(cfg.schedule),
        objective=objective,
        optimizer=instantiate(cfg.optimizer),
        _convert_="all",
        **extra,
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


def autoencoder_from_config(config: Mapping[str, Any], *, source: str) -> Any:
    """The untrained AutoencoderKL of a stored first_stage_model config node (a difflab.nets.* class only)."""
    target = str((config or {}).get("_target_", ""))
    if not target.startswith("difflab.nets."):  # the stored config picks what gets called: nets only
        raise ValueError(f"{source}: first_stage_model._target_={target!r} is not allowed; it must name a class in "
                         "difflab.nets.*")
    return instantiate(OmegaConf.create(dict(config)), _convert_="all")


BUILT_GROUPS = ("module", "model", "first_stage_model", "sde", "schedule", "objective", "timestep_sampler", "optimizer",
                "sampler", "data")


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


def sampler_from_config(config: Mapping[str, Any], *, source: str) -> Any:
    """A sampler object from a sampler config node (a difflab.samplers.* target only)."""
    config = checked_stored_config({"sampler": config}, ("sampler",), source=source)["sampler"]
    target = str(config.get("_target_", ""))
    if not target.startswith("difflab.samplers."):
        raise ValueError(f"{source}: sampler._target_={target!r} is not allowed; it must name a class in difflab.samplers.*")
    return instantiate(OmegaConf.create(dict(config)), _convert_="all")
