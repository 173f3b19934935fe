"""The systems `bench.py` compares: difflab and its peers, each driven the way its users drive it.

Each system offers train_step() (forward + loss + backward + optimizer step), ema_update() (the
EMA update each tool's own training loop makes after it: difflab's AveragedModel, diffusers'
EMAModel as its train_unconditional example with --use_ema, lucidrains' Trainer's ema_pytorch EMA;
every system holds its EMA copy from the start, as in training), sampler_forward() (one network
call as the tool's sampler makes it: difflab's through `sampling_net`), forward() (no-grad
network evaluation in eval mode) and ddim() (a full DDIM-50 sample of a batch through the tool's
own sampler). Peers are optional benchmark dependencies (`pip install -e ".[bench]"`).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

DDPM_CIFAR10_PARAMS = 35_746_307


def autocast(precision: str):
    """bf16 autocast as Lightning's `bf16-mixed` does it on CPU; a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compose_train(overrides: list[str]):
    """difflab's resolved train config (conf/train.yaml) with overrides, as difflab-train builds it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from difflab.cli.config import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


class Difflab:
    """difflab's DiffusionModule built from its config; the step is what `training_step` runs."""

    def __init__(self, *, overrides: list[str], batch: int, ddim_steps: int) -> None:
        from difflab.lit.from_config import build_module

        cfg = compose_train(overrides)
        self.module = build_module(cfg)
        self.optimizer = self.module.configure_optimizers()["optimizer"]
        self.shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        self.net = self.module.net
        self.ddim_steps = ddim_steps
        g = torch.Generator().manual_seed(0)
        self.x0 = torch.rand(batch, *self.shape, generator=g) * 2 - 1
        self._sampling_nets: dict[str, torch.nn.Module] = {}  # precision -> the prepared EMA net

    def train_step(self, precision: str) -> None:
        self.module.train()
        with autocast(precision):
            loss = self.module.loss(self.x0).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def ema_update(self) -> None:
        self.module.ema.update_parameters(self.net)  # what DiffusionModule.optimizer_step adds

    def forward(self, batch: int, precision: str) -> None:
        x, t = torch.randn(batch, *self.shape), torch.randint(0, 1000, (batch,))
        self.net.eval()
        with torch.inference_mode(), autocast(precision):
            self.net(x, t)

    def sampler_forward(self, batch: int, precision: str) -> None:
        """One network call as a sampling step makes it: the EMA net through `sampling_net`, prepared once."""
        from difflab.nets.inference import sampling_net

        x, t = torch.randn(batch, *self.shape), torch.randint(0, 1000, (batch,))
        net = self.module.ema.module.eval()
        with torch.inference_mode(), autocast(precision):
            if precision not in self._sampling_nets:  # once per sampling call in DiffusionModule.sample
                self._sampling_nets[precision] = sampling_net(net)
            self._sampling_nets[precision](x, t)

    def ddim(self, batch: int, precision: str) -> None:
        from difflab.samplers import DDIM

        with autocast(precision):
            self.module.sample(DDIM(steps=self.ddim_steps), seeds=range(batch))


def diffusers_unet(ch: int = 128, dropout: float = 0.1):
    """diffusers' UNet2DModel as google/ddpm-cifar10-32 (Ho et al. 2020's CIFAR-10 net) at base width ch."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(ch, 2 * ch, 2 * ch, 2 * ch),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
        dropout=dropout, attention_head_dim=None,
    )


class Diffusers:
    """diffusers' UNet2DModel trained as in its train_unconditional example (DDPMScheduler, AdamW)."""

    def __init__(self, *, ch: int, batch: int, ddim_steps: int) -> None:
        from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler
        from diffusers.training_utils import EMAModel

        self.net = diffusers_unet(ch)
        # train_unconditional.py --use_ema with its defaults (ema_max_decay 0.9999, inv_gamma 1, power 3/4)
        self.ema = EMAModel(self.net.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
        kw = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
        self.scheduler = DDPMScheduler(**kw)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=2e-4)
        self.pipe = DDIMPipeline(unet=self.net, scheduler=DDIMScheduler(**kw))
        self.pipe.set_progress_bar_config(disable=True)
        self.ddim_steps = ddim_steps
        g = torch.Generator().manual_seed(0)
        self.x0 = torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1

    def train_step(self, precision: str) -> None:
        self.net.train()
        noise = torch.randn_like(self.x0)
        t = torch.randint(0, 1000, (self.x0.shape[0],))
        with autocast(precision):
            pred = self.net(self.scheduler.add_noise(self.x0, noise, t), t).sample
            loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def ema_update(self) -> None:
        self.ema.step(self.net.parameters())

    def forward(self, batch: int, precision: str) -> None:
        x, t = torch.randn(batch, 3, 32, 32), torch.randint(0, 1000, (batch,))
        self.net.eval()
        with torch.inference_mode(), autocast(precision):
            self.net(x, t)

    sampler_forward = forward  # DDIMPipeline calls the UNet as it is

    def ddim(self, batch: int, precision: str) -> None:
        self.net.eval()  # DDIMPipeline leaves the mode alone; sampling with dropout on would be wrong and slower
        with autocast(precision):
            self.pipe(batch_size=batch, num_inference_steps=self.ddim_steps,
                      generator=torch.Generator().manual_seed(0), output_type="np")


def lucidrains_unet(dim: int = 32):
    """lucidrains' Unet at the size of difflab's default digits net (1.41M vs 1.62M parameters)."""
    from denoising_diffusion_pytorch import Unet

    return Unet(dim=dim, dim_mults=(1, 2, 2), channels=1)


class Lucidrains:
    """denoising-diffusion-pytorch's GaussianDiffusion with its Trainer's optimizer (Adam, betas 0.9/0.99)."""

    def __init__(self, *, batch: int, ddim_steps: int, image_size: int = 8) -> None:
        os.environ.setdefault("TQDM_DISABLE", "1")
        from denoising_diffusion_pytorch import GaussianDiffusion
        from ema_pytorch import EMA

        self.net = lucidrains_unet()
        self.diffusion = GaussianDiffusion(
            self.net, image_size=image_size, timesteps=1000, sampling_timesteps=ddim_steps,
            objective="pred_noise", beta_schedule="linear",
        )
        self.optimizer = torch.optim.Adam(self.diffusion.parameters(), lr=1e-4, betas=(0.9, 0.99))
        self.ema = EMA(self.diffusion, beta=0.995, update_every=10)  # its Trainer's defaults
        self.image_size = image_size
        g = torch.Generator().manual_seed(0)
        self.x01 = torch.rand(batch, 1, image_size, image_size, generator=g)  # it normalises [0, 1] itself

    def train_step(self, precision: str) -> None:
        self.diffusion.train()
        with autocast(precision):
            loss = self.diffusion(self.x01)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def ema_update(self) -> None:
        self.ema.update()

    def forward(self, batch: int, precision: str) -> None:
        s = self.image_size
        x, t = torch.randn(batch, 1, s, s), torch.randint(0, 1000, (batch,))
        self.net.eval()
        with torch.inference_mode(), autocast(precision):
            self.net(x, t)

    sampler_forward = forward  # its sampler calls the Unet as it is

    def ddim(self, batch: int, precision: str) -> None:
        self.diffusion.eval()
        with torch.inference_mode(), autocast(precision):
            self.diffusion.sample(batch_size=batch)


def build(kind: str, *, ch: int, batch: int, ddim_steps: int):
    """One system by name: difflab-cifar, diffusers, difflab-digits or lucidrains."""
    if kind == "difflab-cifar":
        return Difflab(overrides=["experiment=ddpm_cifar10", f"model.ch={ch}"], batch=batch, ddim_steps=ddim_steps)
    if kind == "diffusers":
        return Diffusers(ch=ch, batch=batch, ddim_steps=ddim_steps)
    if kind == "difflab-digits":
        return Difflab(overrides=[], batch=batch, ddim_steps=ddim_steps)
    if kind == "lucidrains":
        return Lucidrains(batch=batch, ddim_steps=ddim_steps)
    raise ValueError(f"system {kind!r} is unknown; choose difflab-cifar, diffusers, difflab-digits or lucidrains")
