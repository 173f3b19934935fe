"""Consistency distillation (Song et al. 2023, Alg. 2) from a DDPM teacher, and the consistency model it trains.

The student's net is `ConsistencyNet`: a U-Net (initialised from the teacher's EMA weights) whose output, read
in the objective's parameterization (v or x0), gives a denoiser D; the consistency function is
f(x, sigma) = c_skip x + c_out F with F the EDM output D implies (difflab.diffusion.distillation), so f(x, sigma_min) = x.
It returns f as its x0 prediction, so the module's parameterization is 'x0' and samplers see an ordinary net;
`sampler=consistency` (samplers/consistency.py) is the one it accepts, with steps in `sample_steps`.

Each step: n ~ U{0..N(k)-2} on a Karras grid of N(k) levels, x_{n+1} = x + sigma_{n+1} z, one teacher ODE step
(Heun or DDIM) to sigma_n, loss d(f_theta(x_{n+1}, sigma_{n+1}), f_theta-(x_n, sigma_n)), then the target network
theta- <- mu(k) theta- + (1 - mu(k)) theta. The sampling EMA (module.ema_decay) is kept besides, as in training.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.distillation import (Distance, Solver, check_sigma_range, consistency_distance,
                                            consistency_function, mu_schedule, n_schedule, target_ema_update,
                                            teacher_ode_step)
from difflab.diffusion.objectives import SimpleLoss
from difflab.diffusion.process import randn_like
from difflab.diffusion.schedules import NoiseSchedule
from difflab.diffusion.sde import DiscreteVP, _bcast, karras_sigmas, x0_from_output
from difflab.diffusion.timesteps import UniformTimesteps
from difflab.lit.base import OptimizerFactory
from difflab.lit.diffusion_module import DiffusionModule
from difflab.lit.distillation import DistillationModule, as_int_list, frozen_copy
from difflab.nets.conditioning import Conditioning
from difflab.samplers.base import Sampler
from difflab.samplers.consistency import Consistency


class ConsistencyNet(nn.Module):
    """f(x_t, t, cond) -> x0: the consistency function of a net predicting `prediction` under a DDPM table."""

    def __init__(self, inner: nn.Module, family: DiscreteVP, *, prediction: str, sigma_min: float, sigma_data: float) -> None:
        super().__init__()
        self.inner, self.family, self.prediction = inner, family, prediction
        self.sigma_min, self.sigma_data = float(sigma_min), float(sigma_data)

    def __getattr__(self, name: str) -> Any:
        if name in ("in_channels", "out_channels", "image_size", "num_classes"):  # the inner net's contract
            return getattr(self._modules["inner"], name)
        return super().__getattr__(name)

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        # x_t: (B, C, H, W) = alpha x_hat; t: (B,) fractional timesteps of the table
        t64 = torch.as_tensor(t, dtype=torch.float64, device=x_t.device).expand(x_t.shape[0])
        alpha, sigma_hat = self.family.alpha(t64), self.family.sigma_hat(t64)
        out = self.inner(x_t, t) if cond is None else self.inner(x_t, t, cond)
        a = _bcast(alpha, x_t)
        denoised = x0_from_output(out.to(x_t.dtype), x_t, a, _bcast(sigma_hat, x_t) * a, self.prediction)
        return consistency_function(x_t / a, denoised, sigma_hat, self.sigma_min, self.sigma_data)


class ConsistencyDistillation(DistillationModule):
    """Consistency distillation: student (ConsistencyNet), frozen teacher, target network theta-, sampling EMA."""

    method = "consistency"

    def __init__(
        self,
        *,
        net: nn.Module,
        betas: Tensor,
        optimizer: OptimizerFactory,
        objective: SimpleLoss | None = None,
        timestep_sampler: UniformTimesteps | None = None,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        sigma_data: float = 0.5,
        rho: float = 7.0,
        n_start: int = 18,
        n_end: int = 17,
        mu0: float = 0.95,
        solver: Solver = "heun",
        distance: Distance = "pseudo_huber",
        sample_steps: Sequence[int] = (1, 2, 4),
        lr_warmup_steps: int = 0,
        ema_decay: float = 0.995,
        ema_warmup: bool = True,
        label_dropout: float = 0.1,
    ) -> None:
        family = DiscreteVP(NoiseSchedule.from_betas(betas))
        lo, hi = family.sigma_hat_min, family.sigma_hat_max
        self_sigma_min, self_sigma_max = float(lo if sigma_min is None else sigma_min), float(hi if sigma_max is None else sigma_max)
        check_sigma_range(self_sigma_min, self_sigma_max, lowest=lo, highest=hi)
        if not sigma_data > 0 or not rho > 0 or not 0 <= mu0 < 1:
            raise ValueError(f"sigma_data={sigma_data}, rho={rho}, mu0={mu0}: need sigma_data > 0, rho > 0, 0 <= mu0 < 1")
        if isinstance(n_start, bool) or not isinstance(n_start, int) or not isinstance(n_end, int) or not 2 <= n_start <= n_end + 1:
            raise ValueError(f"n_start={n_start!r}, n_end={n_end!r}: the N(k) schedule needs integers 2 <= n_start <= n_end + 1")
        for name, value, allowed in (("solver", solver, Solver), ("distance", distance, Distance)):
            if value not in allowed.__args__:
                raise ValueError(f"{name}={value!r} is not supported; choose one of {allowed.__args__}")
        wrapped = ConsistencyNet(net, family, prediction=(objective or SimpleLoss(parameterization="v")).parameterization,
                                 sigma_min=self_sigma_min, sigma_data=sigma_data)
        super().__init__(net=wrapped, betas=betas, optimizer=optimizer, objective=objective,
                         timestep_sampler=timestep_sampler, lr_warmup_steps=lr_warmup_steps, ema_decay=ema_decay,
                         ema_warmup=ema_warmup, label_dropout=label_dropout)
        self.family, self.sigma_min, self.sigma_max = family, self_sigma_min, self_sigma_max
        self.sigma_data, self.rho, self.n_start, self.n_end, self.mu0 = float(sigma_data), float(rho), n_start, n_end, mu0
        self.solver, self.distance = solver, distance
        self.sample_steps = as_int_list(sample_steps, "sample_steps")
        self.teacher = frozen_copy(net)
        self.target = frozen_copy(wrapped)

    @property
    def parameterization(self) -> str:
        """What the sampling net outputs: f, an x0 estimate."""
        return "x0"

    @property
    def student_net(self) -> nn.Module:
        return self.net.inner

    def copy_teacher(self, teacher: DiffusionModule) -> None:
        self.teacher.load_state_dict(teacher.ema.module.state_dict())
        self.target.load_state_dict(self.net.state_dict())

    # -- schedules ------------------------------------------------------------------------------------------------

    def n_and_mu(self) -> tuple[int, float]:
        """(N(k), mu(k)) at this global step k of K = trainer.max_steps (Song et al. 2023, App. C)."""
        K = max(1, int(self.trainer.max_steps)) if self._trainer is not None else 1
        N = n_schedule(self.global_step, K, self.n_start, self.n_end)
        return N, mu_schedule(N, self.n_start, self.mu0)

    def on_fit_start(self) -> None:
        if self.teacher_parameterization is None:
            raise ValueError("no teacher: difflab-train sets it from teacher.ckpt_path (lit.distillation.attach_teacher)")
        if self.trainer.max_steps < 1:
            raise ValueError(f"trainer.max_steps={self.trainer.max_steps}: consistency distillation needs a step count "
                             "(K of its N(k) schedule), e.g. trainer.max_steps=1200")

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)  # the sampling EMA too
        _, mu = self.n_and_mu()
        target_ema_update(list(self.target.parameters()), list(self.net.parameters()), mu)

    # -- the objective ---------------------------------------------------------------------------------------------

    def f(self, net: nn.Module, x_hat: Tensor, sigma: Tensor, cond: Conditioning | None) -> Tensor:
        """f(x_hat, sigma) through a ConsistencyNet (the student or the target network); sigma (B,)."""
        t = self.family.t_of_sigma_hat(sigma)
        x_t = _bcast(self.family.alpha(t), x_hat) * x_hat
        return net(x_t, t.to(x_hat.dtype), cond)

    def teacher_denoiser(self, cond: Conditioning | None) -> Denoiser:
        """The teacher's D(x_hat; sigma), x0 clipped to [-1, 1] as the Heun sampler does."""
        fn = self.teacher if cond is None else (lambda x, t: self.teacher(x, t, cond))
        return Denoiser(fn, self.family, self.teacher_parameterization, clip_x0=True)

    def distillation_loss(self, x0: Tensor, labels: Tensor | None, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample d(f_theta(x + sigma_{n+1} z, sigma_{n+1}), f_theta-(x_hat_n, sigma_n)) (Song et al. 2023, Alg. 2)."""
        N, _ = self.n_and_mu()
        sigmas = karras_sigmas(N, self.sigma_min, self.sigma_max, self.rho)[:-1].flip(0).to(x0.device)  # ascending (N,)
        n = torch.randint(0, N - 1, (x0.shape[0],), device=x0.device, generator=generator)
        s_n, s_next = sigmas[n], sigmas[n + 1]
        x_next = x0 + _bcast(s_next, x0) * randn_like(x0, generator)
        cond = None if labels is None else Conditioning(labels=labels)
        with torch.no_grad():
            self.teacher.eval()
            x_n = teacher_ode_step(self.teacher_denoiser(cond), x_next, s_next, s_n, self.solver)
            target = self.f(self.target, x_n, s_n, cond)
        return consistency_distance(self.f(self.net, x_next, s_next, cond), target, self.distance)

    def progress(self) -> dict[str, float]:
        N, mu = self.n_and_mu()
        return {"distill/N": float(N), "distill/mu": mu}

    # -- sampling ------------------------------------------------------------------------------------------------

    def native_samplers(self) -> list[Sampler]:
        return [Consistency(steps=s, rho=self.rho) for s in self.sample_steps]

    def native_sampler_config(self) -> dict[str, Any]:
        return {"_target_": "difflab.samplers.Consistency", "steps": self.sample_steps[0], "rho": self.rho,
                "sigma_min": None, "sigma_max": None, "clip_x0": True, "dynamic_percentile": None}

    def sample(self, sampler: Sampler, seeds: Sequence[int], **kwargs: Any) -> Tensor:
        """TrainingModule.sample with the student's sigma_min / sigma_max given to the consistency sampler."""
        if isinstance(sampler, Consistency):
            sampler = dataclasses.replace(sampler, sigma_min=self.sigma_min, sigma_max=self.sigma_max)
        return super().sample(sampler, seeds, **kwargs)

    def distillation_info(self) -> dict[str, Any]:
        return {**super().distillation_info(), "steps": list(self.sample_steps), "sigma_min": self.sigma_min,
                "sigma_max": self.sigma_max, "solver": self.solver, "distance": self.distance}
