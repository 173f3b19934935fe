"""Progressive distillation (Salimans & Ho 2022, Alg. 2): rounds that halve the sampling steps.

Round r distils a teacher sampling with 2N deterministic DDIM steps into a student with N = start_steps / 2^(r+1)
steps, on nested 'trailing' grids (the student's levels are every other teacher level). The student starts as a
copy of the teacher's EMA weights; at the end of a round its EMA becomes the next round's teacher and its
starting point, the learning rate anneals to 0 within each round, and checkpoints/pd-<N>steps.ckpt is written.
A round's index is a buffer, so a run interrupted inside round r resumes inside round r, exactly.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difflab.diffusion.distillation import check_progressive_steps, progressive_target, truncated_snr_weight
from difflab.diffusion.objectives import SimpleLoss, per_sample_mse
from difflab.diffusion.process import q_sample, randn_like, x0_eps_from_output
from difflab.diffusion.schedules import extract
from difflab.diffusion.timesteps import UniformTimesteps
from difflab.lit.base import OptimizerFactory
from difflab.lit.diffusion_module import DiffusionModule
from difflab.lit.distillation import DistillationModule, frozen_copy, guidance_ok
from difflab.nets.conditioning import Conditioning
from difflab.samplers.base import Sampler
from difflab.samplers.ddim import DDIM, ddim_timesteps
from difflab.samplers.guidance import classifier_free_guidance

log = logging.getLogger("difflab")


class ProgressiveDistillation(DistillationModule):
    """Student + frozen teacher of the current round; the objective's parameterization is the student's (v or x0)."""

    method = "progressive"

    def __init__(
        self,
        *,
        net: nn.Module,
        betas: Tensor,
        optimizer: OptimizerFactory,
        objective: SimpleLoss | None = None,
        timestep_sampler: UniformTimesteps | None = None,
        start_steps: int = 64,
        end_steps: int = 4,
        steps_per_round: int = 250,
        guidance_scale: float | None = None,
        clip_teacher_x0: bool = True,
        lr_warmup_steps: int = 0,
        ema_decay: float = 0.995,
        ema_warmup: bool = True,
        label_dropout: float = 0.1,
    ) -> None:
        super().__init__(net=net, betas=betas, optimizer=optimizer, objective=objective, timestep_sampler=timestep_sampler,
                         lr_warmup_steps=lr_warmup_steps, ema_decay=ema_decay, ema_warmup=ema_warmup,
                         label_dropout=label_dropout)
        self.rounds = check_progressive_steps(start_steps, end_steps, self.schedule.T)
        if isinstance(steps_per_round, bool) or not isinstance(steps_per_round, int) or steps_per_round < 1:
            raise ValueError(f"steps_per_round={steps_per_round!r} must be an integer >= 1 (a few hundred on the digits)")
        guidance_ok(getattr(net, "num_classes", None), guidance_scale)
        self.start_steps, self.end_steps, self.steps_per_round = start_steps, end_steps, steps_per_round
        self.guidance_scale, self.clip_teacher_x0 = guidance_scale, clip_teacher_x0
        self.teacher = frozen_copy(net)
        self.register_buffer("round", torch.zeros((), dtype=torch.long))  # in the state_dict: resume restores it

    # -- rounds -----------------------------------------------------------------------------------------------

    @property
    def student_steps(self) -> int:
        """N of the current round: start_steps / 2^(round + 1)."""
        return self.start_steps >> (int(self.round) + 1)

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole distillation: rounds x steps_per_round."""
        return self.rounds * self.steps_per_round

    def levels(self, steps: int) -> Tensor:
        """The ascending 'trailing' DDIM levels of `steps` steps (DDIM's tau; Lin et al. 2024 spacing)."""
        return torch.tensor(sorted(ddim_timesteps(self.schedule.T, steps, "trailing")), device=self.device)

    def copy_teacher(self, teacher: DiffusionModule) -> None:
        self.teacher.load_state_dict(teacher.ema.module.state_dict())

    def next_round(self) -> None:
        """The student's EMA becomes the teacher and the new student's start (Salimans & Ho 2022, Alg. 2: theta <- eta)."""
        weights = self.ema.module.state_dict()
        self.teacher.load_state_dict(weights)
        self.net.load_state_dict(weights)
        self.ema.n_averaged.zero_()  # the EMA restarts (with its warm-up) from the new student
        self.round += 1
        self.teacher_parameterization = self.parameterization
        log.info("progressive distillation: round %d of %d, %d -> %d steps", int(self.round) + 1, self.rounds,
                 2 * self.student_steps, self.student_steps)

    def on_fit_start(self) -> None:
        if self.teacher_parameterization is None:
            raise ValueError("no teacher: difflab-train sets it from teacher.ckpt_path (lit.distillation.attach_teacher)")
        max_steps = self.trainer.max_steps
        if 0 <= max_steps < self.total_steps:
            log.warning("trainer.max_steps=%d ends inside round %d of %d (%d rounds x %d steps = %d); resume with "
                        "ckpt_path=last to finish", max_steps, max_steps // self.steps_per_round + 1, self.rounds,
                        self.rounds, self.steps_per_round, self.total_steps)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self.global_step >= (int(self.round) + 1) * self.steps_per_round and int(self.round) < self.rounds - 1:
            self.next_round()
        self.teacher.eval()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step == (int(self.round) + 1) * self.steps_per_round:  # the round's student is done
            path = Path(self.trainer.default_root_dir) / "checkpoints" / f"pd-{self.student_steps}steps.ckpt"
            self.trainer.save_checkpoint(path)
            log.info("progressive distillation: %d-step student -> %s", self.student_steps, path)
            if int(self.round) == self.rounds - 1:
                self.trainer.should_stop = True

    def configure_optimizers(self):
        """The learning rate warms up once, then anneals linearly to 0 within each round."""
        optimizer = self.optimizer_factory(params=[p for p in self.net.parameters() if p.requires_grad])
        warmup, per_round = self.lr_warmup_steps, self.steps_per_round

        def factor(step: int) -> float:
            ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
            return ramp * (1.0 - (step % per_round) / per_round)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- the objective -----------------------------------------------------------------------------------------

    def teacher_x0(self, labels: Tensor | None) -> Any:
        """x0_fn(z, t) of the teacher (classifier-free guided at guidance_scale when set), clipped to [-1, 1] like DDIM's."""
        net_fn = self.teacher if labels is None else (lambda x, t, c: self.teacher(x, t, c))
        if labels is None:
            model_fn = net_fn
        else:
            cond, null = Conditioning(labels=labels), Conditioning(labels=torch.full_like(labels, self.num_classes))
            model_fn = classifier_free_guidance(net_fn, cond, null, guidance_scale=self.guidance_scale or 1.0,
                                                mean_channels=self.net.in_channels)

        def x0_fn(z: Tensor, t: Tensor) -> Tensor:
            x0 = x0_eps_from_output(model_fn(z, t), z, extract(self.schedule.alpha_bar, t, z), self.teacher_parameterization)[0]
            return x0.clamp(-1, 1) if self.clip_teacher_x0 else x0

        return x0_fn

    def distillation_loss(self, x0: Tensor, labels: Tensor | None, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample max(SNR, 1) ||x~ - x_hat_student(z_t)||^2 at a uniformly drawn student level (Salimans & Ho 2022, Alg. 2)."""
        student, teacher = self.levels(self.student_steps), self.levels(2 * self.student_steps)
        assert torch.equal(teacher[1::2], student), "the trailing grids must be nested"
        k = torch.randint(0, len(student), (x0.shape[0],), device=x0.device, generator=generator)
        t, t_mid = student[k], teacher[2 * k]
        t_next = torch.where(k > 0, student[(k - 1).clamp(min=0)], torch.full_like(k, -1))  # -1: the data
        z_t = q_sample(x0, t, randn_like(x0, generator), self.schedule)
        with torch.no_grad():
            target = progressive_target(self.teacher_x0(labels), z_t, t, t_mid, t_next, self.schedule.alpha_bar)
        ab_t = extract(self.schedule.alpha_bar, t, z_t)
        out = self.net(z_t, t) if labels is None else self.net(z_t, t, Conditioning(labels=labels))
        x_hat = x0_eps_from_output(out, z_t, ab_t, self.parameterization)[0]
        return truncated_snr_weight(ab_t.flatten()).float() * per_sample_mse(x_hat, target)

    def progress(self) -> dict[str, float]:
        return {"distill/student_steps": float(self.student_steps)}

    # -- what the student samples with -------------------------------------------------------------------------

    def native_samplers(self) -> list[Sampler]:
        return [DDIM(steps=self.student_steps, eta=0.0, spacing="trailing")]

    def native_sampler_config(self) -> dict[str, Any]:
        return {"_target_": "difflab.samplers.DDIM", "steps": self.student_steps, "eta": 0.0, "spacing": "trailing",
                "clip_x0": True, "dynamic_percentile": None}

    def distillation_info(self) -> dict[str, Any]:
        done = self.global_step >= (int(self.round) + 1) * self.steps_per_round
        return {**super().distillation_info(), "steps": self.student_steps, "round": int(self.round) + 1,
                "rounds": self.rounds, "round_complete": bool(done), "teacher_steps": self.start_steps}


def rounds_steps(start_steps: int, end_steps: int, steps_per_round: int) -> int:
    """trainer.max_steps of a whole distillation (the ${difflab_distill_steps:...} resolver)."""
    return int(math.log2(start_steps // end_steps)) * steps_per_round
