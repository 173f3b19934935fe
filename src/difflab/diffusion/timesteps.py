"""Timestep samplers: uniform (Ho et al. 2020) and importance sampling from the loss history (Nichol & Dhariwal 2021, Sec. 3.3, Eq. 18).

    p_t ∝ sqrt(E[L_t^2]),   L_vlb = E_{t ~ p_t}[L_t / p_t]

E[L_t^2] is the mean over the last `history_per_term` losses seen at t (10 in the paper). Until
every t has that many, t is uniform (the warm-up); afterwards a `uniform_prob` share of uniform
probability is mixed in (improved-diffusion's LossSecondMomentResampler) so no t starves.
Weights 1 / (T p_t) make the weighted loss an unbiased estimate of the uniform-t mean.

Kept apart from the loss: the training loop calls `sample` for (t, weights) and `update` with the
per-sample unweighted losses; `state_dict` / `load_state_dict` carry the history across resumes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class UniformTimesteps:
    """t ~ Uniform{1..T} (stored as indices 0..T-1), every sample weighted 1 (Ho et al. 2020, Alg. 1)."""

    def sample(
        self, batch_size: int, *, T: int, device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Timestep indices (B,) and importance weights (B,)."""
        t = torch.randint(0, T, (batch_size,), device=device, generator=generator)
        return t, torch.ones(batch_size, device=device)

    def state_dict(self) -> dict[str, Any]:
        """Checkpointed state (protocol of every timestep sampler): uniform sampling has none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict(); refuses keys this sampler does not know."""
        if state:
            raise ValueError(f"UniformTimesteps has no state, but the checkpoint holds {sorted(state)}; "
                             "was it written with another timestep sampler?")


class ImportanceTimesteps:
    """t ~ p_t ∝ sqrt(E[L_t^2]) over the last `history_per_term` losses per t, with uniform mixing (Nichol & Dhariwal 2021, Eq. 18)."""

    def __init__(self, *, history_per_term: int = 10, uniform_prob: float = 0.001) -> None:
        if isinstance(history_per_term, bool) or not isinstance(history_per_term, int) or history_per_term < 1:
            raise ValueError(f"history_per_term={history_per_term!r} must be an int >= 1 (10 in the paper)")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob={uniform_prob!r} must be in [0, 1]")
        self.history_per_term, self.uniform_prob = history_per_term, float(uniform_prob)
        self.history: Tensor | None = None  # (T, history_per_term) losses, float64
        self.counts: Tensor | None = None  # (T,) int64: losses seen per t, capped at history_per_term

    def _ensure(self, T: int) -> None:
        if self.history is None:
            self.history = torch.zeros(T, self.history_per_term, dtype=torch.float64)
            self.counts = torch.zeros(T, dtype=torch.long)
        elif self.history.shape[0] != T:
            raise ValueError(f"this sampler's history is for T={self.history.shape[0]}, not T={T}")

    @property
    def warmed_up(self) -> bool:
        return self.counts is not None and bool((self.counts == self.history_per_term).all())

    def probabilities(self, T: int) -> Tensor:
        """p_t (T,) in float64: uniform during the warm-up, then sqrt(E[L_t^2]) normalised and mixed with uniform."""
        self._ensure(T)
        if not self.warmed_up:
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        w = self.history.pow(2).mean(dim=1).sqrt()
        w = w / w.sum()
        return w * (1.0 - self.uniform_prob) + self.uniform_prob / T

    def sample(
        self, batch_size: int, *, T: int, device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Timestep indices (B,) drawn from p_t and importance weights 1 / (T p_t) (B,)."""
        p = self.probabilities(T).to(device)
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        return t, (1.0 / (T * p[t])).float()

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Append each sample's unweighted loss to the history of its t (oldest dropped when full)."""
        if self.history is None:
            raise RuntimeError("update() before sample(): the sampler does not know T yet")
        for ti, loss in zip(t.detach().cpu().tolist(), losses.detach().double().cpu().tolist()):
            n = int(self.counts[ti])
            if n == self.history_per_term:
                self.history[ti, :-1] = self.history[ti, 1:].clone()
                self.history[ti, -1] = loss
            else:
                self.history[ti, n] = loss
                self.counts[ti] = n + 1

    def state_dict(self) -> dict:
        """The loss history and counts (checkpointed, so a resumed run keeps its distribution)."""
        return {"history": self.history, "counts": self.counts}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""
        history, counts = state.get("history"), state.get("counts")
        if history is not None and history.shape[1] != self.history_per_term:
            raise ValueError(
                f"checkpointed history keeps {history.shape[1]} losses per t but history_per_term={self.history_per_term}"
            )
        self.history = None if history is None else history.detach().cpu().to(torch.float64).clone()
        self.counts = None if counts is None else counts.detach().cpu().to(torch.long).clone()
