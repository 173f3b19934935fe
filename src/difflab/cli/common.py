"""What every entry point shares: the config directory, resolvers, and building objects from config."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def config_dir() -> str:
    """Absolute path of the Hydra config tree: $DIFFLAB_CONFIG_DIR, else the repository's conf/."""
    env = os.environ.get("DIFFLAB_CONFIG_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[3] / "conf")  # src/difflab/cli -> repo root
    for path in candidates:
        if (path / "train.yaml").is_file():
            return str(path)
    raise FileNotFoundError(
        f"no difflab config tree (train.yaml) found in {[str(p) for p in candidates]}; "
        "install difflab with `pip install -e .` from its repository or set DIFFLAB_CONFIG_DIR"
    )


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


def register_resolvers() -> None:
    """Resolvers the configs use; registering twice is harmless."""
    if not OmegaConf.has_resolver("difflab_wandb_offline"):
        OmegaConf.register_new_resolver("difflab_wandb_offline", wandb_offline)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The fully resolved config as plain Python containers (what loggers and checkpoints store)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]


register_resolvers()
