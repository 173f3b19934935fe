"""DiffusionModule and ScoreModule share one base (EMA, optimizer, exact resume); the features of
the improved-DDPM, guidance and score/solver work compose: fast solvers on learned-variance models,
guidance limits, and the module/sde pairing of the configs."""

from __future__ import annotations

import pytest
import torch

from difflab.lit.from_config import build_module
from difflab.diffusion.vlb_objectives import HybridLoss
from difflab.diffusion.schedules import cosine_betas
from difflab.diffusion.sde import VPSDE
from difflab.lit import DiffusionModule, ScoreModule
from difflab.lit.base import TrainingModule
from difflab.nets.unet import UNet
from difflab.samplers import DDIM, DPMSolverPP, Heun
from difflab.samplers.generate import initial_noise
from test_configs import compose_train


def _net(out_channels=None, num_classes=None):
    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, out_channels=out_channels, ch=8, ch_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(), dropout=0.0, num_classes=num_classes)
    with torch.no_grad():  # as if trained: zero-initialised output layers become non-zero
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return net


@pytest.mark.parametrize("sampler", [DPMSolverPP(steps=5), Heun(steps=4)], ids=lambda s: s.name)
def test_fast_solvers_use_the_mean_channels_of_a_learned_variance_model(sampler):
    learned = DiffusionModule(net=_net(out_channels=2), betas=cosine_betas(50), optimizer=torch.optim.Adam,
                              objective=HybridLoss())
    x = learned.sample(sampler, [0, 1])
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    # the same solver called directly on the eps half of the net's output gives the same images
    x_T, gens = initial_noise((1, 8, 8), [0, 1], torch.device("cpu"))
    with torch.no_grad():
        direct = sampler(lambda x_t, t: learned.ema.module(x_t, t)[:, :1], x_T, learned.schedule, generator=gens)
    torch.testing.assert_close(x, direct)


def test_classifier_guidance_with_a_fast_solver_is_refused():
    m = DiffusionModule(net=_net(num_classes=3), betas=cosine_betas(20), optimizer=torch.optim.Adam)
    classifier = lambda x_t, t: torch.zeros(x_t.shape[0], 3, requires_grad=True)  # noqa: E731
    m.ema.module.train()
    with pytest.raises(ValueError, match=r"classifier guidance .* \(ddpm, ddim\), not 'dpmpp-5'"):
        m.sample(DPMSolverPP(steps=5), [0], labels=[1], classifier=classifier, classifier_scale=1.0)
    with pytest.raises(ValueError, match="classifier guidance needs labels"):
        m.sample(DDIM(steps=5), [0], classifier=classifier, classifier_scale=1.0)
    assert m.ema.module.training  # refused calls leave the net's mode as it was
    # classifier-free guidance works with the fast solver
    assert m.sample(DPMSolverPP(steps=5), [0, 1], labels=[1, 2], guidance_scale=3.0).shape == (2, 1, 8, 8)


def test_score_module_refuses_labels_and_shares_the_resume_base():
    m = ScoreModule(net=_net(), sde=VPSDE(), optimizer=torch.optim.Adam)
    assert isinstance(m, TrainingModule) and m.num_classes is None
    with pytest.raises(ValueError, match="'vp' score model is unconditional"):
        m.sample(DPMSolverPP(steps=3), [0], labels=[1])
    ckpt: dict = {}
    m.on_save_checkpoint(ckpt)
    stored = ckpt["difflab"]
    assert stored["family"] == "vp" and len(stored["rng"]) == 1 and "torch" in stored["rng"][0]
    # a checkpoint of another architecture is refused by name, before any weights are copied
    other = ScoreModule(net=UNet(image_size=8, in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                                 attn_resolutions=(), dropout=0.0), sde=VPSDE(), optimizer=torch.optim.Adam)
    with pytest.raises(ValueError, match="net"):
        other.on_load_checkpoint({"difflab": stored, "state_dict": m.state_dict()})


def test_ddpm_samplers_are_refused_on_score_models():
    m = ScoreModule(net=_net(), sde=VPSDE(), optimizer=torch.optim.Adam)
    with pytest.raises(ValueError, match="needs a discrete-time DDPM model"):
        m.sample(DDIM(steps=5), [0])


@pytest.mark.parametrize("overrides,match", [
    (["sde=vp"], "sde=set does not fit module=difflab.lit.DiffusionModule"),
    (["module=score"], "sde=null does not fit module=difflab.lit.ScoreModule"),
])
def test_module_and_sde_must_agree(tmp_path, overrides, match):
    cfg = compose_train(tmp_path, overrides + ["model.ch=8"])
    with pytest.raises(ValueError, match=match):
        build_module(cfg)
