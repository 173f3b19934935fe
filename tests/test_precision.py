"""bf16 mixed precision with difflab's fused AdamW and gradient clipping (Lightning refuses the pair)."""

from __future__ import annotations

import pytest
import torch
from pytorch_lightning.plugins.precision import MixedPrecision

from difflab.cli.trainer_setup import autocast_device, check_precision, check_precision_fits_device
from difflab.lit.mixed_precision import BF16MixedPrecision


def _fused_with_grads(scale: float) -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3, fused=True)
    (scale * layer(torch.randn(5, 4)).square().sum()).backward()
    return layer, opt


def _grad_norm(layer: torch.nn.Module) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in layer.parameters()])).item()


def test_bf16_plugin_clips_fused_optimizer_gradients_to_the_norm():
    layer, opt = _fused_with_grads(100.0)
    assert _grad_norm(layer) > 1.0
    BF16MixedPrecision(device="cpu").clip_gradients(opt, clip_val=1.0)
    assert _grad_norm(layer) == pytest.approx(1.0, rel=1e-4)


def test_lightning_mixed_precision_refuses_what_the_plugin_allows():
    _, opt = _fused_with_grads(100.0)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        MixedPrecision("bf16-mixed", device="cpu").clip_gradients(opt, clip_val=1.0)


def test_bf16_plugin_autocasts_to_bfloat16():
    plugin = BF16MixedPrecision(device="cpu")
    with plugin.forward_context():
        y = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert y.dtype == torch.bfloat16 and plugin.scaler is None


def test_fp16_with_fused_optimizer_and_clipping_fails_clearly():
    with pytest.raises(ValueError, match=r"trainer.precision=16-mixed .* optimizer.fused=false"):
        check_precision("16-mixed", 1.0, {"fused": True})
    check_precision("16-mixed", None, {"fused": True})  # no clipping: fine
    check_precision("16-mixed", 1.0, {"fused": False})
    check_precision("bf16-mixed", 1.0, {"fused": True})


def test_fp16_training_on_a_cpu_is_refused_by_name():
    for accelerator in ("cpu", *(("auto",) if not torch.cuda.is_available() else ())):
        with pytest.raises(ValueError, match=rf"trainer.precision=16-mixed trains on the CPU here \(trainer.accelerator={accelerator}.*bf16-mixed"):
            check_precision_fits_device("16-mixed", accelerator)
    check_precision_fits_device("bf16-mixed", "cpu")
    check_precision_fits_device("16-mixed", "gpu")  # a GPU precision (a missing GPU is check_gpus' message)


def test_autocast_device_follows_the_accelerator():
    assert autocast_device("cpu") == "cpu" and autocast_device("gpu") == "cuda" and autocast_device("cuda") == "cuda"
    assert autocast_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
