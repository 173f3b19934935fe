"""The Lightning callback behind `make gpu-check`'s real-run stage: images/s, peak GPU memory, MFU.

Added to a difflab-train run on the command line (benchmarks/ on PYTHONPATH):
    +callbacks.gpu_check._target_=gpu_check_throughput.Throughput +callbacks.gpu_check.path=<file.json>

- FLOPs per image: torch.utils.flop_counter.FlopCounterMode over one forward of (a CPU copy of) the training
  net on one image (matmuls, convolutions, attention), times 3 for forward + backward (backward ~ 2x forward):
  36.3 GFLOP for ddpm_cifar10 at 32x32.
- images/s: global batch x optimizer steps / seconds, between the end of step `warmup_steps` (cuDNN
  autotuning, allocator growth and any compilation are behind it) and the end of training, with a
  device synchronisation at both ends, so epoch ends, checkpoint saves and logging are included, as a
  user's run has them; `median_step_images_per_s` is from the median host interval between steps.
- MFU: images/s x training FLOPs per image / peak, the peak given (989e12: the H100/H200 SXM dense
  bf16 datasheet figure) and named in the output.
The JSON is rewritten at the warm-up step and at the end, so a run cut short still reports.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

H200_BF16_DENSE_PEAK = 989e12  # FLOP/s, NVIDIA's datasheet (H100/H200 SXM, dense, no sparsity)


def forward_flops_per_image(net: torch.nn.Module) -> float:
    """FLOPs of one forward pass of `net` on one image (FlopCounterMode: 2 per multiply-add), counted on a CPU
    copy so the count does not depend on which attention kernel the device picks."""
    from torch.utils.flop_counter import FlopCounterMode

    net = copy.deepcopy(net).cpu().eval()
    x = torch.zeros(1, net.in_channels, net.image_size, net.image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, torch.zeros(1, dtype=torch.long))
    return float(counter.get_total_flops())


class Throughput(pl.Callback):
    """Writes {steps, images_per_s, peak memory, FLOPs per image, MFU, first/last loss} to `path` (JSON)."""

    def __init__(self, path: str, warmup_steps: int = 30, peak_flops: float = H200_BF16_DENSE_PEAK,
                 peak_name: str = "H200 SXM dense bf16 (datasheet)") -> None:
        self.path = Path(path)
        self.warmup_steps, self.peak_flops, self.peak_name = int(warmup_steps), float(peak_flops), peak_name
        self.result: dict = {}
        self._t0: float | None = None
        self._step0 = self._idx0 = 0
        self._times: list[float] = []
        self._losses: list[float] = []

    def _sync(self, module: pl.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.result, indent=2))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = pl_module.net
        dm = trainer.datamodule
        batch = int(getattr(dm, "batch_size", 0)) or None
        fwd = forward_flops_per_image(net)
        cuda = pl_module.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self.result = {
            "device": torch.cuda.get_device_name(pl_module.device) if cuda else "cpu",
            "precision": str(trainer.precision_plugin.__class__.__name__) + f" ({trainer.precision})",
            "global_batch": batch, "parameters": sum(p.numel() for p in net.parameters()),
            "forward_flops_per_image": fwd, "train_flops_per_image": 3 * fwd,
            "peak_flops": self.peak_flops, "peak_name": self.peak_name, "warmup_steps": self.warmup_steps,
            "channels_last": bool(getattr(net, "channels_last", False)),
            "compiled": getattr(net, "_compiled_call_impl", None) is not None,
        }
        self._write()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        step = trainer.global_step
        self._times.append(now)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if step % 25 == 1 and isinstance(loss, torch.Tensor):
            self._losses.append(float(loss.detach()))  # a host sync only every 25 steps
        if step >= self.warmup_steps and self._t0 is None:
            self._sync(pl_module)
            self._t0, self._step0, self._idx0 = time.perf_counter(), step, len(self._times)
            self.result["loss_first"] = self._losses[0] if self._losses else None
            self._write()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)
        end = time.perf_counter()
        steps = trainer.global_step
        batch = self.result.get("global_batch") or 0
        r = self.result
        r["steps"] = steps
        r["losses_every_25_steps"] = [round(v, 5) for v in self._losses]
        r["loss_last"] = self._losses[-1] if self._losses else None
        if self._t0 is not None and steps > self._step0:
            seconds = end - self._t0
            r["timed_steps"], r["timed_seconds"] = steps - self._step0, round(seconds, 3)
            r["images_per_s"] = batch * (steps - self._step0) / seconds
            timed = self._times[self._idx0 - 1:]
            intervals = [b - a for a, b in zip(timed, timed[1:])]
            if intervals:
                r["median_step_images_per_s"] = batch / statistics.median(intervals)
            r["achieved_flops"] = r["images_per_s"] * r["train_flops_per_image"]
            r["mfu"] = r["achieved_flops"] / self.peak_flops
        else:
            r["note"] = f"training ended at step {steps}, before the {self.warmup_steps} warm-up steps: no timing"
        if pl_module.device.type == "cuda":
            r["peak_memory_allocated_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            r["peak_memory_reserved_gib"] = torch.cuda.max_memory_reserved(pl_module.device) / 2**30
        self._write()
