"""The Lightning module: loss, EMA, sampling API, checkpoint contents and safe loading."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from difflab.lit.checkpoint_io import read_checkpoint
from difflab.diffusion import SimpleLoss, linear_betas
from difflab.lit import DiffusionModule
from difflab.lit.diffusion_module import EMADecay
from difflab.nets import UNet
from difflab.samplers import DDIM


def tiny_module(**kwargs) -> DiffusionModule:
    net = UNet(image_size=8, in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
    return DiffusionModule(net=net, betas=linear_betas(50), optimizer=lambda params: torch.optim.SGD(params, lr=0.1), **kwargs)


def test_loss_is_per_sample_and_finite():
    m = tiny_module(objective=SimpleLoss(parameterization="v"))
    loss = m.loss(torch.rand(5, 1, 8, 8) * 2 - 1)
    assert loss.shape == (5,) and torch.isfinite(loss).all()


def test_ema_warmup_decay_matches_closed_form():
    ema, cur = [torch.zeros(3)], [torch.ones(3)]
    fn = EMADecay(0.99)
    fn(ema, cur, torch.tensor(1))  # decay = min(0.99, 2/11)
    assert torch.allclose(ema[0], torch.full((3,), 1 - 2 / 11))
    ema = [torch.zeros(3)]
    fn(ema, cur, torch.tensor(10_000))  # warm-up over: decay = 0.99
    assert torch.allclose(ema[0], torch.full((3,), 0.01))
    ema = [torch.zeros(3)]
    EMADecay(0.99, warmup=False)(ema, cur, torch.tensor(1))
    assert torch.allclose(ema[0], torch.full((3,), 0.01))


def test_bad_ema_decay_is_refused():
    with pytest.raises(ValueError, match="ema_decay=1.5"):
        tiny_module(ema_decay=1.5)


def test_ema_tracks_net_after_updates():
    m = tiny_module(ema_decay=0.5, ema_warmup=False)
    m.ema.update_parameters(m.net)  # first update copies
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(1.0)
    m.ema.update_parameters(m.net)
    for p_ema, p in zip(m.ema.module.parameters(), m.net.parameters()):
        assert torch.allclose(p_ema, p - 0.5)


def test_sample_uses_one_seed_per_image_and_restores_mode():
    m = tiny_module()
    for p in m.ema.module.parameters():  # a non-trivial EMA net (the fresh U-Net outputs zeros)
        nn.init.normal_(p, std=0.05)
    m.ema.module.train()
    a = m.sample(DDIM(steps=3, eta=1.0), seeds=[3, 4, 5])
    b = m.sample(DDIM(steps=3, eta=1.0), seeds=[4])
    assert a.shape == (3, 1, 8, 8) and torch.allclose(a[1:2], b, atol=1e-6)
    assert m.ema.module.training  # mode restored


def test_checkpoint_holds_config_and_loads_safely(tmp_path):
    m = tiny_module()
    m.run_config = {"model": {"ch": 16}}
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "ok.ckpt")
    loaded = read_checkpoint(tmp_path / "ok.ckpt")
    assert loaded.config == {"model": {"ch": 16}} and loaded.contents["difflab"]["parameterization"] == "eps"
    assert loaded.kind == "diffusion" and loaded.family == "ddpm"


class _Exploit:
    def __reduce__(self):
        return (open, ("/tmp/difflab-pwned", "w"))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"difflab": {"config": {}}, "payload": _Exploit()}, f)
    with pytest.raises(ValueError, match="evil.ckpt"):
        read_checkpoint(path)


def test_checkpoint_without_difflab_config_is_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="holds no difflab run config"):
        read_checkpoint(tmp_path / "plain.ckpt")


def test_atomic_checkpoint_io_keeps_the_old_file_when_a_save_dies(tmp_path, monkeypatch):
    from difflab.lit.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}

    import lightning_fabric.plugins.io.torch_io as torch_io

    def dying_save(checkpoint, filepath):  # killed half-way through writing the bytes to filepath
        with open(filepath, "wb") as f:
            f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch_io, "_atomic_save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
