"""What both distillation modules share: the teacher (read, checked, copied into the student), the student's native
samplers (recorded in every checkpoint, the only ones it accepts) and the wall-clock cost of distillation.

A student is a DiffusionModule whose net learns from a frozen teacher instead of from the data's noise alone:
lit/progressive.py (Salimans & Ho 2022) and lit/consistency.py (Song et al. 2023). Formulas live in
difflab.diffusion.distillation. difflab-train calls `attach_teacher` before fitting; a student's checkpoint
rebuilds without its teacher's file (the teacher's weights travel in the checkpoint's state_dict).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from difflab.diffusion.objectives import SimpleLoss
from difflab.diffusion.schedules import NoiseSchedule
from difflab.diffusion.timesteps import UniformTimesteps
from difflab.lit.base import OptimizerFactory
from difflab.lit.checkpoint_io import load_run
from difflab.lit.diffusion_module import DiffusionModule
from difflab.lit.resume import check_state_dict_fits
from difflab.samplers.base import Sampler

STUDENT_PARAMETERIZATIONS = ("v", "x0")


class DistillationModule(DiffusionModule):
    """A student of a frozen DDPM teacher: checks, teacher hand-over, native samplers, distillation seconds."""

    method = "distillation"

    def __init__(
        self,
        *,
        net: nn.Module,
        betas: torch.Tensor,
        optimizer: OptimizerFactory,
        objective: SimpleLoss | None = None,
        timestep_sampler: UniformTimesteps | None = None,
        lr_warmup_steps: int = 0,
        ema_decay: float = 0.995,
        ema_warmup: bool = True,
        label_dropout: float = 0.1,
    ) -> None:
        objective = objective or SimpleLoss(parameterization="v")
        if objective.parameterization not in STUDENT_PARAMETERIZATIONS:
            ab_T = float(NoiseSchedule.from_betas(betas).alpha_bar[-1])
            raise ValueError(
                f"objective.parameterization={objective.parameterization!r}: a distilled student predicts one of "
                f"{STUDENT_PARAMETERIZATIONS} (set objective.parameterization=v); with eps, x0 = (x_t - sqrt(1-ab) eps) / "
                f"sqrt(ab) amplifies the error {1 / ab_T ** 0.5:.0f}x at the last step (1/sqrt(ab_T) of this schedule)")
        if timestep_sampler is not None and not isinstance(timestep_sampler, UniformTimesteps):
            raise ValueError(f"timestep_sampler={type(timestep_sampler).__name__}: a student draws its own levels; "
                             "use timestep_sampler=uniform or null")
        super().__init__(net=net, betas=betas, optimizer=optimizer, objective=objective, lr_warmup_steps=lr_warmup_steps,
                         ema_decay=ema_decay, ema_warmup=ema_warmup, label_dropout=label_dropout)
        self.teacher_parameterization: str | None = None
        self._seconds_before = 0.0  # distillation seconds of earlier runs (restored on resume)
        self._started: float | None = None

    # -- the teacher ------------------------------------------------------------------------------------

    @property
    def student_net(self) -> nn.Module:
        """The network whose weights start as the teacher's (the net itself, or what a wrapper holds)."""
        return self.net

    def start_from_teacher(self, teacher: DiffusionModule, *, source: str) -> None:
        """Copy the teacher's EMA weights into the student, its EMA and the subclass's copies (`copy_teacher`)."""
        weights = teacher.ema.module.state_dict()
        cfg = teacher.run_config or {}
        check_state_dict_fits(self.student_net.state_dict(), weights, source=source, produced_by=cfg.get("model"),
                              expected_config=(self.run_config or {}).get("model"))
        self.student_net.load_state_dict(weights)
        self.ema.module.load_state_dict(self.net.state_dict())
        self.teacher_parameterization = teacher.parameterization
        self.copy_teacher(teacher)

    def copy_teacher(self, teacher: DiffusionModule) -> None:
        """Subclasses keep their frozen copies of the teacher here."""
        raise NotImplementedError

    # -- the loss -----------------------------------------------------------------------------------------

    def distillation_loss(self, x0: Tensor, labels: Tensor | None, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample loss (B,) of the student on clean images x0 (the method's equation; subclasses)."""
        raise NotImplementedError

    def progress(self) -> dict[str, float]:
        """The method's schedule at this step, logged beside train/loss (subclasses)."""
        return {}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        labels = self._train_labels(batch[1] if len(batch) > 1 else None, batch[0].shape[0], None)
        loss = self.distillation_loss(batch[0], labels).mean()
        self.check_finite(loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log_dict(self.progress(), on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """The distillation loss on held-out images with fixed noise and levels (val/loss)."""
        generator = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
        labels = self._train_labels(batch[1] if len(batch) > 1 else None, batch[0].shape[0], generator)
        loss = self.distillation_loss(batch[0], labels, generator).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch[0].shape[0])
        return loss

    # -- native samplers ----------------------------------------------------------------------------------

    def native_samplers(self) -> list[Sampler]:
        """The samplers (and step counts) this student was distilled for; the first is difflab-sample's default."""
        raise NotImplementedError

    def native_sampler_config(self) -> dict[str, Any]:
        """The default native sampler as a conf/sampler node (stored as the run's `sampler` in every checkpoint)."""
        raise NotImplementedError

    def distillation_info(self) -> dict[str, Any]:
        """What a checkpoint records about the distillation (method, steps, cost)."""
        return {"method": self.method, "seconds": round(self.distill_seconds, 2),
                "native_samplers": [s.name for s in self.native_samplers()]}

    def check_sampler(self, sampler: Sampler) -> None:
        """Only the native samplers: anything else is refused, naming the allowed ones."""
        super().check_sampler(sampler)
        if not any(self.same_sampler(sampler, native) for native in self.native_samplers()):
            allowed = ", ".join(describe(s) for s in self.native_samplers())
            raise ValueError(f"this {self.method}-distillation student cannot sample with {describe(sampler)}: it was "
                             f"distilled for {allowed} only (difflab-sample without sampler= uses "
                             f"{self.native_samplers()[0].name})")

    @staticmethod
    def same_sampler(sampler: Sampler, native: Sampler) -> bool:
        """sampler does what native does (its output-only options, clipping and thresholding, may differ)."""
        free = ("clip_x0", "dynamic_percentile", "sigma_min", "sigma_max")
        a, b = vars(sampler), vars(native)
        return type(sampler) is type(native) and all(a.get(k) == b.get(k) for k in b if k not in free)

    # -- wall clock and checkpoints ------------------------------------------------------------------------

    @property
    def distill_seconds(self) -> float:
        """Seconds spent distilling so far, over every run that resumed this one."""
        now = 0.0 if self._started is None else time.perf_counter() - self._started
        return self._seconds_before + now

    def on_train_start(self) -> None:
        super().on_train_start()
        self._started = time.perf_counter()

    def on_train_end(self) -> None:
        self._seconds_before, self._started = self.distill_seconds, None

    def checkpoint_state(self) -> dict[str, Any]:
        return {**super().checkpoint_state(), "teacher_parameterization": self.teacher_parameterization,
                "distillation": self.distillation_info()}

    def load_checkpoint_state(self, stored: dict[str, Any]) -> None:
        super().load_checkpoint_state(stored)
        self.teacher_parameterization = stored.get("teacher_parameterization") or self.teacher_parameterization
        self._seconds_before = float((stored.get("distillation") or {}).get("seconds", 0.0))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:  # difflab-sample's default sampler: this student's native one
            self.run_config["sampler"] = self.native_sampler_config()
        super().on_save_checkpoint(checkpoint)


def describe(sampler: Sampler) -> str:
    """'ddim-4 (sampler=ddim sampler.steps=4 sampler.spacing=trailing)': a sampler's name and defining options."""
    opts = {k: getattr(sampler, k) for k in ("steps", "spacing") if getattr(sampler, k, None) is not None}
    if getattr(sampler, "eta", 0) != 0:
        opts["eta"] = sampler.eta
    return f"{sampler.name} (sampler={type(sampler).__name__.lower()} " + " ".join(f"sampler.{k}={v}" for k, v in opts.items()) + ")"


def attach_teacher(module: Any, teacher_path: str | None, run_config: Mapping[str, Any]) -> None:
    """difflab-train: load teacher.ckpt_path into a distillation module, refusing a bad pairing by name before training."""
    if not isinstance(module, DistillationModule):
        if teacher_path:
            raise ValueError(f"teacher.ckpt_path={teacher_path!r} is set but module={type(module).__name__} does not "
                             "distil; use experiment=digits_distill or experiment=digits_consistency (module=progressive|consistency)")
        return
    if not teacher_path:
        raise ValueError(f"module={module.method} distils a teacher: set teacher.ckpt_path=<a difflab-train checkpoint>, "
                         "e.g. make train's outputs/<date>/<time>/checkpoints/last.ckpt")
    teacher = load_teacher(teacher_path)
    check_teacher_fits(teacher, module, run_config, source=f"teacher.ckpt_path={teacher_path!r}")
    module.start_from_teacher(teacher, source=f"teacher.ckpt_path={teacher_path!r}")


def load_teacher(path: str) -> DiffusionModule:
    """A DDPM teacher's module (weights and EMA) from a difflab-train checkpoint; anything else is refused by name."""
    run = load_run(path, name="teacher.ckpt_path",
                   hint="; a teacher is a diffusion model's difflab-train checkpoint (make train's last.ckpt)")
    module = run.module
    module.run_config = run.config
    where = f"teacher.ckpt_path={path!r}"
    if isinstance(module, DistillationModule):
        raise ValueError(f"{where} is itself a {module.method}-distillation student; distil from the diffusion model it came from")
    if not isinstance(module, DiffusionModule) or run.family != "ddpm":
        raise ValueError(f"{where} is a {run.family!r} score model; distillation takes a discrete DDPM teacher "
                         "(module=diffusion, e.g. make train's checkpoint)")
    if module.first_stage is not None:
        raise ValueError(f"{where} is a latent diffusion model; distillation takes a pixel-space teacher (first_stage=null)")
    if module.model_variance != "fixed":
        raise ValueError(f"{where} learns its variance (objective variance={module.model_variance!r}); distillation takes "
                         "a teacher with a fixed variance (objective=simple)")
    return module


def check_teacher_fits(teacher: DiffusionModule, student: DistillationModule, run_config: Mapping[str, Any], *,
                       source: str) -> None:
    """The teacher's data and noise schedule must be the student's (the architecture is checked on copying)."""
    tc = teacher.run_config or {}
    for key in ("image_size", "channels"):
        mine, theirs = (run_config.get("data") or {}).get(key), (tc.get("data") or {}).get(key)
        if mine != theirs:
            raise ValueError(f"{source} was trained with data.{key}={theirs}, this run has data.{key}={mine}; "
                             f"distil on the teacher's data (data={tc.get('data_name')} data.{key}={theirs})")
    a, b = teacher.schedule.alpha_bar.cpu(), student.schedule.alpha_bar.cpu()
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-6, atol=1e-9):
        raise ValueError(f"{source} was trained with schedule {tc.get('schedule')}, this run's schedule is "
                         f"{run_config.get('schedule')}; a student keeps its teacher's noise schedule: set schedule= to match")


def guidance_ok(teacher_classes: int | None, guidance_scale: float | None) -> None:
    """A guided teacher (Meng et al. 2023) needs a class-conditional teacher and w >= 0."""
    if guidance_scale is None:
        return
    if not guidance_scale >= 0:
        raise ValueError(f"module.guidance_scale={guidance_scale!r} must be >= 0 (or null: no guidance)")
    if teacher_classes is None:
        raise ValueError(f"module.guidance_scale={guidance_scale} distils a classifier-free-guided teacher, but the teacher "
                         "is unconditional (model.num_classes=null); set module.guidance_scale=null")


def frozen_copy(net: nn.Module) -> nn.Module:
    """A deep copy of net in eval mode without gradients (a teacher or a target network)."""
    import copy

    return copy.deepcopy(net).eval().requires_grad_(False)


def as_int_list(values: Sequence[int], name: str) -> tuple[int, ...]:
    """Positive integers, named in the error when not."""
    out = tuple(values)
    if not out or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in out):
        raise ValueError(f"{name}={list(out)!r} must be a non-empty list of integers >= 1")
    return out
