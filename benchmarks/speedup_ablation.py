"""Which performance means help: difflab's own network with a mean on and off, interleaved in one run.

    python benchmarks/speedup_ablation.py --net cifar --batch 8 --repeats 5
    python benchmarks/speedup_ablation.py --net digits --batch 64 --repeats 7
    python benchmarks/speedup_ablation.py --net cifar --precision bf16     # under CPU bf16 autocast
    python benchmarks/speedup_ablation.py --net cifar --compile            # also under torch.compile: with the
                                                                           # C GroupNorm kernel, and with inductor's

Variants: channels_last (NHWC weights and activations), the fused Adam(W) kernel, the
residual blocks' dropout mask (difflab's integer-draw mask against torch's ``nn.Dropout``) and
difflab's NHWC GroupNorm+SiLU(+dropout) kernel (against torch's GroupNorm, SiLU and Dropout ops),
each against the plain baseline (NCHW, per-tensor AdamW, ``nn.Dropout``). Reported: median over repetitions of (baseline seconds / variant
seconds) for a training step (forward + loss + backward + optimizer step) and a no-grad forward.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peer_systems import autocast  # benchmarks/peer_systems.py: bf16 autocast as Lightning's bf16-mixed

from difflab.nets import UNet
from difflab.nets.dropout import Dropout
from difflab.nets.group_norm import GroupNorm, torch_group_norm_act

NETS = {
    "cifar": dict(image_size=32, in_channels=3),  # ddpm_cifar10: the constructor's defaults
    "digits": dict(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2, 2), attn_resolutions=(4,), dropout=0.0),
}
VARIANTS = {  # (channels_last, fused, difflab dropout, difflab NHWC GroupNorm kernel)
    "baseline": (False, False, False, False),
    "fused": (False, True, False, False),
    "channels_last+fused": (True, True, False, False),
    "cl+fused+dropout": (True, True, True, False),
    "cl+fused+dropout+gn": (True, True, True, True),
}


class TorchGroupNorm(GroupNorm):
    """difflab's GroupNorm through torch's ops only (GroupNorm, SiLU, then the dropout module)."""

    def forward(self, x, dropout=None):
        return torch_group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, self.act, dropout=dropout)


def _swap(model: torch.nn.Module, cls: type, make) -> None:
    """Replace every submodule of type cls by make(old)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, cls):
                setattr(module, name, make(child))


def build(net: str, channels_last: bool, fused: bool, own_dropout: bool, gn_kernel: bool):
    torch.manual_seed(0)
    model = UNet(**NETS[net], channels_last=channels_last)
    if not own_dropout:  # torch's bernoulli_ mask, same p
        _swap(model, Dropout, lambda m: torch.nn.Dropout(m.p))
    if not gn_kernel:
        for m in model.modules():
            if isinstance(m, GroupNorm):
                m.__class__ = TorchGroupNorm
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)


def train_s(model, opt, x, t, precision: str) -> float:
    start = time.perf_counter()
    model.train()
    with autocast(precision):
        loss = model(x, t).float().square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def forward_s(model, x, t, precision: str) -> float:
    model.eval()
    with torch.inference_mode(), autocast(precision):
        start = time.perf_counter()
        model(x, t)
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--net", choices=sorted(NETS), default="cifar")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="add the full set under torch.compile (~1.5 min to compile)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: CPU autocast")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    size, channels = NETS[args.net]["image_size"], NETS[args.net]["in_channels"]
    x, t = torch.randn(args.batch, channels, size, size), torch.randint(0, 1000, (args.batch,))
    systems = {name: build(args.net, *flags) for name, flags in VARIANTS.items()}
    if args.compile:  # module.compile=true: the training network compiled in place (CPU inductor here)
        systems["all+torch.compile"] = build(args.net, *VARIANTS["cl+fused+dropout+gn"])
        systems["all+torch.compile"][0].compile()
        # inductor's own fused GroupNorm + SiLU (+ dropout) code in place of the hand-written C kernel
        systems["cl+fused+dropout+compile"] = build(args.net, *VARIANTS["cl+fused+dropout"])
        systems["cl+fused+dropout+compile"][0].compile()
    for model, opt in systems.values():  # warm-up (allocations, optimizer state)
        train_s(model, opt, x, t, args.precision), forward_s(model, x, t, args.precision)
    times = {name: {"train": [], "forward": []} for name in systems}
    for r in range(args.repeats):
        order = list(systems) if r % 2 == 0 else list(reversed(systems))
        for name in order:
            model, opt = systems[name]
            times[name]["train"].append(train_s(model, opt, x, t, args.precision))
            times[name]["forward"].append(forward_s(model, x, t, args.precision))
    base = times["baseline"]
    print(f"net={args.net} precision={args.precision} batch={args.batch} repeats={args.repeats} threads={args.threads}")
    for name, got in times.items():
        speed = {k: statistics.median(b / v for b, v in zip(base[k], got[k])) for k in got}
        print(f"  {name:<20} train step {statistics.median(got['train']):.3f} s (x{speed['train']:.2f})   "
              f"forward {statistics.median(got['forward']):.3f} s (x{speed['forward']:.2f})")


if __name__ == "__main__":
    main()
