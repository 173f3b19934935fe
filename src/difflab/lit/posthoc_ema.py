"""Post-hoc EMA (Karras et al. 2024, EDM2, Sec. 3.2 and App. C.3): the EMA of any sigma_rel at any step up to the
last snapshot, reconstructed by least squares from a run's snapshots of its power-function EMA profiles.

A run trained with `module.ema=power` leaves <run dir>/ema_snapshots/step-<step>.pt (callbacks.EMASnapshots).
`find_run` turns a checkpoint or run directory into (checkpoint, snapshot directory); `read_snapshots` lists
the snapshots (read safely, weights_only); `reconstruct` solves for the coefficients with only the snapshots
taken at or before the target step (difflab.diffusion.ema_profiles) and sums the weights in float64;
`apply_to` loads a reconstruction into a module's EMA copy; `export_contents` is a normal difflab checkpoint
whose EMA is the reconstruction (difflab-export).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from difflab.diffusion.ema_profiles import (SIGMA_REL_MAX, gamma_of_sigma_rel, posthoc_coefficients,
                                            weighting_tv_distance)
from difflab.lit.checkpoint_io import Checkpoint, newest_checkpoint, safe_load
from difflab.lit.power_ema import SNAPSHOT_FORMAT
from difflab.lit.resume import check_state_dict_fits

SNAPSHOT_DIR = "ema_snapshots"  # under the run directory (conf/callbacks/default.yaml, ema_snapshots.dirpath)
MAX_ERROR = 0.15  # default tolerance on the total-variation distance of the step weighting (ema_profiles)
SCAN = torch.logspace(math.log10(0.005), math.log10(SIGMA_REL_MAX), 97, dtype=torch.float64)  # range reports


@dataclass(frozen=True)
class Snapshot:
    """One snapshot file: its step, the profiles' t (EMA updates so far), their sigma_rel and gamma."""

    path: Path
    step: int
    t: int
    sigma_rels: tuple[float, ...]
    gammas: tuple[float, ...]
    model: Any = None  # the model config of the run that wrote it


@dataclass(frozen=True)
class Reconstruction:
    """The EMA weights of one sigma_rel at one step, and how close its step weighting is to the requested one."""

    sigma_rel: float
    step: int
    state_dict: dict[str, Tensor] = field(repr=False)
    error: float  # total-variation distance of the weighting of training steps (0: exact)
    l2_error: float  # EDM2's least-squares residual, relative to the target profile's norm
    snapshots: int  # how many snapshot files it combines

    def info(self) -> dict[str, Any]:
        """What reports and exported checkpoints record about it (plain types)."""
        return {"sigma_rel": self.sigma_rel, "step": self.step, "error_tv": self.error, "error_l2": self.l2_error,
                "snapshots": self.snapshots}


def find_run(path: str | os.PathLike, snapshot_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(checkpoint, snapshot directory) of a checkpoint file or a run directory (its newest checkpoint)."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = newest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"ckpt_path={str(path)!r} is a directory holding no checkpoint (checkpoints/*.ckpt); "
                                    "give a difflab-train run directory or one of its checkpoints")
        ckpt, run_dir = found[0], path
    elif path.is_file():
        ckpt, run_dir = path, path.parent.parent if path.parent.name == "checkpoints" else path.parent
    else:
        raise FileNotFoundError(f"ckpt_path={str(path)!r} does not exist; give a checkpoint or a run directory")
    return ckpt, Path(snapshot_dir).expanduser() if snapshot_dir else run_dir / SNAPSHOT_DIR


def read_snapshots(directory: str | os.PathLike) -> list[Snapshot]:
    """Every snapshot in directory by step (metadata only, memory-mapped); refuses a directory without any."""
    directory = Path(directory)
    files = sorted(directory.glob("step-*.pt")) if directory.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"no EMA snapshots in {str(directory)!r}: post-hoc EMA needs a run trained with module.ema=power (whose "
            "callbacks.ema_snapshots writes <run dir>/ema_snapshots/step-<step>.pt); set ema.snapshot_dir if they "
            "were moved")
    out = []
    for path in files:
        data = safe_load_mmap(path)
        if not isinstance(data, dict) or data.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{str(path)!r} is not a difflab EMA snapshot (format {SNAPSHOT_FORMAT!r})")
        out.append(Snapshot(path=path, step=int(data["step"]), t=int(data["t"]),
                            sigma_rels=tuple(float(s) for s in data["sigma_rels"]),
                            gammas=tuple(float(g) for g in data["gammas"]), model=data.get("model")))
    return sorted(out, key=lambda s: s.step)


def safe_load_mmap(path: Path) -> Any:
    """torch.load(weights_only=True, mmap=True) via the one safe reader; tensors are read only when touched."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - truncated, foreign or unsafe: the safe reader refuses it by name
        return safe_load(path)


def check_targets(sigma_rels: Sequence[float], step: int | None, snapshots: Sequence[Snapshot]) -> tuple[list[float], int]:
    """(sigma_rels as floats, target step): each in (0, SIGMA_REL_MAX], the step in 1..last snapshot (default the last)."""
    values = [float(s) for s in sigma_rels]
    bad = [s for s in values if not 0.0 < s <= SIGMA_REL_MAX]
    if not values or bad:
        raise ValueError(f"ema.sigma_rel={list(sigma_rels)!r}: {bad or 'nothing'} cannot be reconstructed; a power-"
                         f"function EMA has sigma_rel in (0, {SIGMA_REL_MAX:.4f}]")
    last = snapshots[-1].step
    if step is None:
        return values, last
    if isinstance(step, bool) or not isinstance(step, int) or not 0 < step <= last:
        raise ValueError(f"ema.step={step!r} is not allowed: reconstruction uses snapshots taken at or before the "
                         f"target step, and this run's snapshots span steps {snapshots[0].step}..{last}; give a step "
                         f"in 1..{last} (null: {last})")
    return values, step


def representable_range(t_in: Tensor, gamma_in: Tensor, t_out: int, max_error: float) -> tuple[float, float] | None:
    """The smallest and largest sigma_rel of a grid over (0.005, SIGMA_REL_MAX) reconstructible within max_error."""
    gammas = torch.tensor([gamma_of_sigma_rel(float(s)) for s in SCAN], dtype=torch.float64)
    x, _ = posthoc_coefficients(t_in, gamma_in, torch.full_like(gammas, t_out), gammas)
    ok = SCAN[weighting_tv_distance(t_in, gamma_in, x, torch.full_like(gammas, t_out), gammas) <= max_error]
    return None if ok.numel() == 0 else (float(ok.min()), float(ok.max()))


def solve(snapshots: Sequence[Snapshot], sigma_rels: list[float], step: int, max_error: float,
          profiles: Sequence[float] | None) -> tuple[list[tuple[int, int]], Tensor, Tensor, Tensor]:
    """(rows (snapshot index, profile index), coefficients (rows, outputs), TV errors, L2 errors); refuses
    targets whose error exceeds max_error, naming the sigma_rel range that is reconstructible."""
    rows = [(i, k) for i, s in enumerate(snapshots) if 0 < s.step <= step and s.t > 0
            for k, sr in enumerate(s.sigma_rels) if profiles is None or any(math.isclose(sr, p) for p in profiles)]
    if not rows:
        raise ValueError(f"ema.step={step}: no EMA snapshot at or before it to reconstruct from (the first is at step "
                         f"{snapshots[0].step}{'' if profiles is None else f', of the profiles {list(profiles)}'})")
    t_in = torch.tensor([snapshots[i].t for i, _ in rows], dtype=torch.float64)
    gamma_in = torch.tensor([snapshots[i].gammas[k] for i, k in rows], dtype=torch.float64)
    used = [s for s in snapshots if s.step <= step]
    t_out = used[-1].t + (step - used[-1].step)  # the profiles' t counts EMA updates, one per optimizer step
    gammas = [gamma_of_sigma_rel(s) for s in sigma_rels]
    x, l2 = posthoc_coefficients(t_in, gamma_in, [t_out] * len(gammas), gammas)
    tv = weighting_tv_distance(t_in, gamma_in, x, [t_out] * len(gammas), gammas)
    bad = [f"{s:g} (error {float(e):.3f})" for s, e in zip(sigma_rels, tv) if float(e) > max_error]
    if bad:
        span = representable_range(t_in, gamma_in, t_out, max_error)
        where = (f"at step {step} these snapshots represent sigma_rel in about [{span[0]:.3f}, {span[1]:.3f}]"
                 if span else f"at step {step} no sigma_rel is reconstructible from these snapshots")
        raise ValueError(
            f"ema.sigma_rel {', '.join(bad)} lies outside the range the snapshots can represent: {where} within "
            f"ema.max_error={max_error:g} (total-variation distance of the weighting of training steps; snapshot "
            f"steps at or before {step}: {used[0].step}..{used[-1].step}, every ~{max(1, used[-1].step // len(used))}, "
            f"profiles sigma_rel {list(used[-1].sigma_rels)}). Choose a sigma_rel in that range, a snapshot step "
            "(ema.step), or raise ema.max_error")
    return rows, x, tv, l2


def reconstruct(snapshots: Sequence[Snapshot], sigma_rels: Sequence[float], *, step: int | None = None,
                max_error: float = MAX_ERROR, profiles: Sequence[float] | None = None) -> list[Reconstruction]:
    """The EMA weights for each sigma_rel at `step` (default: the last snapshot): sum_i x_i theta_hat_i over the
    snapshot profiles taken at or before it (EDM2, App. C.3, Algorithm 3), in float64, returned as float32."""
    if not snapshots:
        raise ValueError("no EMA snapshots to reconstruct from")
    if not max_error > 0:
        raise ValueError(f"ema.max_error={max_error!r} must be > 0 (a total-variation distance, at most 1)")
    sigma_rels, step = check_targets(sigma_rels, step, snapshots)
    rows, x, tv, l2 = solve(snapshots, sigma_rels, step, max_error, profiles)
    sums: list[dict[str, Tensor]] = [{} for _ in sigma_rels]
    reference: tuple[Path, dict[str, Tensor]] | None = None
    for i in sorted({i for i, _ in rows}):
        data = safe_load(snapshots[i].path)
        for k, profile in enumerate(data["profiles"]):
            if (i, k) not in rows:
                continue
            reference = reference or (snapshots[i].path, profile)
            check_state_dict_fits(reference[1], profile, source=f"EMA snapshot {str(snapshots[i].path)!r}",
                                  produced_by=data.get("model"), expected_config=snapshots[0].model)
            weights = x[rows.index((i, k))]  # (outputs,)
            for out, w in zip(sums, weights.tolist()):
                for name, tensor in profile.items():
                    if torch.is_floating_point(tensor):
                        out[name] = out.get(name, 0.0) + w * tensor.double()
                    else:  # integer buffers: the latest snapshot's
                        out[name] = tensor.clone()
    return [Reconstruction(sigma_rel=s, step=step, state_dict={k: v.float() if v.is_floating_point() else v
                                                               for k, v in out.items()},
                           error=float(e), l2_error=float(l), snapshots=len({i for i, _ in rows}))
            for s, out, e, l in zip(sigma_rels, sums, tv, l2)]


def apply_to(module: torch.nn.Module, reconstruction: Reconstruction, *, source: str) -> None:
    """Load a reconstruction into module.ema.module (what sampling with use_ema=true uses); refuses another architecture."""
    ema_net = module.ema.module
    check_state_dict_fits(ema_net.state_dict(), reconstruction.state_dict, source=source,
                          expected_config=(getattr(module, "run_config", None) or {}).get("model"))
    ema_net.load_state_dict(reconstruction.state_dict)


def export_contents(ckpt: Checkpoint, config: Mapping[str, Any], reconstruction: Reconstruction) -> dict[str, Any]:
    """A normal difflab checkpoint: the run's net weights, the reconstruction as its EMA (module.ema=constant), its
    config and a `difflab.posthoc_ema` record; no optimizer, loop or RNG state (not a resume point)."""
    state = {k: v for k, v in ckpt.state_dict.items() if not k.startswith("power_ema.")}
    missing = [k for k in reconstruction.state_dict if f"ema.module.{k}" not in state]
    if missing:
        raise ValueError(f"{str(ckpt.path)!r} has no EMA entries for {missing[:4]}: the snapshots are of another "
                         "architecture than this checkpoint")
    state.update({f"ema.module.{k}": v for k, v in reconstruction.state_dict.items()})
    config = {**config, "module": {**config["module"], "ema": "constant"}}
    stored = {k: v for k, v in ckpt.contents["difflab"].items() if k != "rng"}
    stored |= {"config": config, "posthoc_ema": {**reconstruction.info(), "source": str(ckpt.path)}}
    return {"state_dict": state, "global_step": ckpt.global_step, "epoch": ckpt.contents.get("epoch", 0),
            "pytorch-lightning_version": ckpt.contents.get("pytorch-lightning_version"), "difflab": stored}
