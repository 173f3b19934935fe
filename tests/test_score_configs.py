"""Every sde option and score experiment composes, instantiates and computes a loss (Hydra compose API)."""

from __future__ import annotations

import pytest
import torch

from difflab.lit.from_config import build_module
from difflab.lit import ScoreModule
from test_configs import compose_train, options


@pytest.mark.parametrize("option", options("sde"))
def test_every_sde_option_trains_a_score_module(tmp_path, option):
    cfg = compose_train(tmp_path, ["experiment=digits_vpsde", f"sde={option}", "model.ch=8", "model.attn_resolutions=[]"])
    module = build_module(cfg)
    assert isinstance(module, ScoreModule) and module.family == ("ncsn" if option == "ncsn" else option)
    assert "schedule" not in cfg and "objective" not in cfg  # nothing of the DDPM setup is left dangling
    assert module.loss(torch.randn(3, 1, 8, 8)).shape == (3,)


def test_likelihood_weighting_composes(tmp_path):
    cfg = compose_train(tmp_path, ["experiment=digits_vpsde", "module.weighting=likelihood", "model.ch=8"])
    assert build_module(cfg).loss(torch.randn(2, 1, 8, 8)).shape == (2,)
