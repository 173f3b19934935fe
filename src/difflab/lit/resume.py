"""What exact resume and safe loading need beyond Lightning's own checkpoint: per-rank RNG streams,
the timestep-sampler protocol, and a readable architecture check before weights are loaded."""

from __future__ import annotations

import os
import random
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor


@runtime_checkable
class StatefulTimesteps(Protocol):
    """A timestep sampler whose state (e.g. importance-sampling loss history) is checkpointed."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def seed_rank(seed: int, rank: int, world_size: int) -> None:
    """Distinct global RNG streams per rank, seed * world_size + rank (as EDM's training_loop.py).

    Lightning's seed_everything gives every rank the same seed, so without this all ranks would
    draw the same timesteps and noise for their different images.
    """
    s = (seed * world_size + rank) % (2**32)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch CPU and CUDA RNG states, as plain types and tensors
    (loadable with torch.load(weights_only=True))."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what rng_state() captured; CUDA states only when CUDA is present here."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng_streams(states: list[dict[str, Any]] | None, *, rank: int, world_size: int, step: int) -> None:
    """At the first batch of a resumed run: this rank's stored RNG state; when the checkpoint was written by another
    process count, fresh streams seed_rank(PL_GLOBAL_SEED + step) and a warning (the resume is not bitwise exact)."""
    if states and len(states) == world_size:
        set_rng_state(states[rank])
    elif states:
        rank_zero_warn(f"resuming on {world_size} processes a checkpoint written by {len(states)}: RNG streams are "
                       "re-seeded, so the resume is not bitwise exact")
        seed_rank(int(os.environ.get("PL_GLOBAL_SEED", 0)) + step, rank, world_size)


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's rng_state() in rank order (a collective under torch.distributed)."""
    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def all_ranks_true(flag: bool) -> bool:
    """True only if flag is true on every rank (a collective under torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor(int(flag), device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _shape(t: Any) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, Tensor) else None


def check_state_dict_fits(
    expected: Mapping[str, Any],
    found: Mapping[str, Any],
    *,
    source: str,
    produced_by: Mapping[str, Any] | None = None,
    expected_config: Mapping[str, Any] | None = None,
    limit: int = 8,
) -> None:
    """Raise ValueError naming missing/unexpected keys and shape mismatches (checkpoint vs model)
    and the model config that wrote the checkpoint, instead of torch's long strict-load error."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k}: checkpoint {_shape(found[k])} vs model {_shape(v)}"
              for k, v in expected.items() if k in found and _shape(found[k]) != _shape(v)]
    if not (missing or unexpected or shapes):
        return
    parts = [f"{source} does not fit this model (a different architecture):"]
    for title, items in (("shape mismatches", shapes), ("missing in checkpoint", missing),
                         ("not in model", unexpected)):
        if items:
            more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"  {len(items)} {title}: " + "; ".join(items[:limit]) + more)
    if produced_by is not None:
        parts.append(f"  the checkpoint was produced by model config {dict(produced_by)}")
    if expected_config is not None:
        parts.append(f"  this run's model config is {dict(expected_config)}")
    raise ValueError("\n".join(parts))
