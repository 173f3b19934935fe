"""Power-function EMA profiles tracked during training (Karras et al. 2024, EDM2, Sec. 3): `module.ema=power`.

Each profile is a torch AveragedModel of the training net whose multi-tensor update uses the power-function
decay beta_t = (1 - 1/t)^(gamma + 1) (difflab.diffusion.ema_profiles); AveragedModel copies the net at its
first update (t = 1, beta = 0), so after t updates a profile holds exactly sum_i w_i theta_i with EDM2's
closed-form weights, whatever t is. Snapshots of the profiles (callbacks.EMASnapshots) let
difflab.lit.posthoc_ema reconstruct the EMA of any sigma_rel after training.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from difflab.diffusion.ema_profiles import SIGMA_REL_MAX, gamma_of_sigma_rel, power_beta

EMAKind = Literal["constant", "power"]
EMA_KINDS: tuple[str, ...] = ("constant", "power")
SNAPSHOT_FORMAT = "difflab-ema-snapshot"  # what a snapshot file says it is (difflab.lit.posthoc_ema reads it)
SNAPSHOT_VERSION = 1


def check_ema_kind(ema: str) -> str:
    """Refuse an unknown module.ema, naming the allowed ones."""
    if ema not in EMA_KINDS:
        raise ValueError(f"module.ema={ema!r} is not supported; choose one of {EMA_KINDS} (constant: one EMA of "
                         "decay ema_decay, as before; power: also EDM2's power-function profiles for post-hoc EMA)")
    return ema


def check_sigma_rels(sigma_rels: Sequence[float]) -> tuple[float, ...]:
    """Distinct tracked sigma_rel values, each in (0, SIGMA_REL_MAX]; refused by name otherwise."""
    values = tuple(float(s) for s in sigma_rels)
    if not values or len(set(values)) != len(values) or not all(0.0 < s <= SIGMA_REL_MAX for s in values):
        raise ValueError(f"module.ema_sigma_rels={list(sigma_rels)!r} is not allowed; give one or more distinct "
                         f"values in (0, {SIGMA_REL_MAX:.4f}] (EDM2 tracks [0.05, 0.10])")
    return values


class PowerEMADecay:
    """Multi-tensor power-function EMA update for AveragedModel: beta = (1 - 1/t)^(gamma + 1) at step t = n + 1
    after n earlier updates (EDM2, Eq. 4). A class (not a closure) so modules pickle for ddp_spawn."""

    def __init__(self, gamma: float) -> None:
        self.gamma = float(gamma)

    @torch.no_grad()
    def __call__(self, ema: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        beta = power_beta(self.gamma, int(num_averaged) + 1)
        if torch.is_floating_point(ema[0]):
            torch._foreach_lerp_(ema, current, 1.0 - beta)
        else:  # integer buffers (e.g. counters) are copied, not averaged
            torch._foreach_copy_(ema, current)


class PowerEMA(nn.Module):
    """The power-function EMA profiles of `net`, one per sigma_rel; their state travels in the module's state_dict."""

    def __init__(self, net: nn.Module, sigma_rels: Sequence[float] = (0.05, 0.10)) -> None:
        super().__init__()
        self.sigma_rels = check_sigma_rels(sigma_rels)
        self.gammas = tuple(gamma_of_sigma_rel(s) for s in self.sigma_rels)
        self.profiles = nn.ModuleList(
            AveragedModel(net, multi_avg_fn=PowerEMADecay(g), use_buffers=True) for g in self.gammas
        )
        self.profiles.requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        """One training step: every profile moves towards the net's current weights."""
        for profile in self.profiles:
            profile.update_parameters(net)

    @property
    def num_updates(self) -> int:
        """t: how many training steps the profiles average (0 before the first update)."""
        return int(self.profiles[0].n_averaged)

    def snapshot(self, *, step: int, model_config: Any = None) -> dict[str, Any]:
        """The profiles now, float32 on the CPU, with what reconstruction needs: a plain dict (weights_only loadable)."""
        return {
            "format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "step": int(step), "t": self.num_updates,
            "sigma_rels": list(self.sigma_rels), "gammas": list(self.gammas),
            "profiles": [{k: _stored(v) for k, v in p.module.state_dict().items()} for p in self.profiles],
            "model": model_config,
        }


def _stored(tensor: Tensor) -> Tensor:
    """A CPU copy, floating point as float32 (integer buffers kept as they are)."""
    tensor = tensor.detach().to("cpu", copy=True)
    return tensor.float() if torch.is_floating_point(tensor) else tensor


def check_resume_kind(ema: str, state_dict: dict[str, Any], *, source: str) -> None:
    """A run resumes with the EMA kind it was trained with: power-function profiles average from step 1 on, so they
    can neither start nor be dropped part-way through a run."""
    stored = "power" if any(k.startswith("power_ema.") for k in state_dict) else "constant"
    if stored != ema:
        raise ValueError(f"{source} was trained with module.ema={stored}, this run has module.ema={ema}: the "
                         "power-function EMA profiles average every step from the first, so resume with "
                         f"module.ema={stored} (or start a new run)")
