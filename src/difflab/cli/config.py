"""The Hydra side every entry point shares: where the config tree is, the resolvers it uses, plain containers."""

from __future__ import annotations

import netrc
import os
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


PACKAGE_CONFIG = "pkg://difflab.conf"  # the config tree ships inside the package (src/difflab/conf -> conf/)


def config_dir() -> str:
    """Absolute path of the Hydra config tree: $DIFFLAB_CONFIG_DIR, else the installed difflab/conf.

    In the repository (editable install) difflab/conf links to the top-level conf/; a wheel holds a copy.
    """
    env = os.environ.get("DIFFLAB_CONFIG_DIR")
    candidates = [Path(env).expanduser().resolve()] if env else []
    candidates.append((Path(__file__).resolve().parents[1] / "conf").resolve())  # difflab/cli -> difflab/conf
    for path in candidates:
        if (path / "train.yaml").is_file():
            return str(path)
    raise FileNotFoundError(
        f"no difflab config tree (train.yaml) found in {[str(p) for p in candidates]}; "
        "reinstall difflab (`pip install .`) or set DIFFLAB_CONFIG_DIR to a folder holding train.yaml"
    )


def config_path() -> str:
    """What the entry points give `@hydra.main(config_path=...)`: pkg://difflab.conf, or $DIFFLAB_CONFIG_DIR.

    Your own configs compose with ours through Hydra's search path: `--config-dir DIR` or
    `hydra.searchpath=[file:///abs/DIR]` (docs/architecture.md#your-own-configs).
    """
    return config_dir() if os.environ.get("DIFFLAB_CONFIG_DIR") else PACKAGE_CONFIG


def cache_dir() -> str:
    """Feature classifiers and reference statistics: $DIFFLAB_CACHE_DIR, else $XDG_CACHE_HOME/difflab, else ~/.cache/difflab."""
    env = os.environ.get("DIFFLAB_CACHE_DIR")
    if env:
        return str(Path(env).expanduser())
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"  # XDG: relative values are ignored
    return str(base / "difflab")


def downsampled(image_size: int, factors: Any) -> list[int]:
    """${difflab_downsampled:${data.image_size},[2]} -> [image_size // 2]: resolutions given relative to the image."""
    return [int(image_size) // int(f) for f in factors]


def pixel_budget(count: int, at_size: int, image_size: int, minimum: int = 1) -> int:
    """${difflab_pixel_budget:64,8,${data.image_size}}: count scaled by the pixels of at_size^2 / image_size^2
    (sampling then costs about the same at any image size), at least `minimum`, never more than `count`."""
    scaled = round(int(count) * int(at_size) ** 2 / int(image_size) ** 2)
    return min(int(count), max(int(minimum), scaled))


def distill_steps(start_steps: int, end_steps: int, steps_per_round: int) -> int:
    """${difflab_distill_steps:start,end,per_round}: a progressive distillation's optimizer steps, rounds x per_round."""
    from difflab.diffusion.distillation import check_progressive_steps

    return check_progressive_steps(int(start_steps), int(end_steps), 1 << 30) * int(steps_per_round)


def wandb_offline() -> bool:
    """True unless W&B credentials exist (WANDB_API_KEY or a ~/.netrc entry) or WANDB_MODE says online."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        return netrc.netrc().authenticators(host) is None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return True


def run_name() -> str | None:
    """The run's command-line overrides (without hydra.* and paths.*), e.g. 'schedule=cosine,seed=1'."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    task = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith(("hydra.", "paths."))]
    return ",".join(task) or None


def sweep_group() -> str | None:
    """For a Hydra multirun, the sweep directory's name (groups its runs in W&B); else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).as_posix().replace("/", "_")


def register_resolvers() -> None:
    """Resolvers the configs use; registering twice is harmless."""
    from difflab.cli.cluster import run_id

    for name, fn in (("difflab_wandb_offline", wandb_offline), ("difflab_run_name", run_name),
                     ("difflab_sweep_group", sweep_group), ("difflab_cache_dir", cache_dir),
                     ("difflab_downsampled", downsampled), ("difflab_pixel_budget", pixel_budget),
                     ("difflab_distill_steps", distill_steps)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    # cached like ${now:}: Hydra copies the cache into every job of a sweep (and submitit pickles it),
    # so all jobs of a sweep agree on its directory
    if not OmegaConf.has_resolver("difflab_run_id"):
        OmegaConf.register_new_resolver("difflab_run_id", run_id, use_cache=True)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The fully resolved config as plain Python containers (what loggers and checkpoints store)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]


register_resolvers()
# conf/hydra/launcher/submitit_{slurm,local}.yaml deliberately share the plugin's names, so Hydra
# validates them against the plugin's schema (and says this is deprecated); the files are complete
# (_target_ included) and keep working if Hydra drops the validation.
warnings.filterwarnings("ignore", message=r"(?s).*hydra/launcher/submitit_.* is validated against ConfigStore schema")
