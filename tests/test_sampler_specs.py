"""One sampler language: difflab-eval's `samplers=[...]` entries are built from the sampler= config group.

Compose and instantiate only (no sampling): every option of every conf/sampler/*.yaml is accepted by
name, compact specs equal their long form, unknown names and options are refused naming what exists.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from difflab.cli.config import config_dir
from difflab.cli.sampler_specs import build_sampler, build_samplers, sampler_config, sampler_config_names
from difflab.samplers import ALD, DDIM, DDPM, PC, PFODE, DPMSolverPP, Heun
from difflab.samplers.specs import parse_spec

CONF = Path(config_dir())
SAMPLER_FILES = sorted((CONF / "sampler").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _clear_hydra():
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None
    yield
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None  # no app's search path leaks into later tests


def yaml_options(path: Path) -> dict:
    return {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "_target_"}


def test_the_group_names_every_sampler_file():
    assert sampler_config_names() == [p.stem for p in SAMPLER_FILES] == ["ald", "consistency", "ddim", "ddpm", "dpmpp", "heun", "ode", "pc"]


@pytest.mark.parametrize("path", SAMPLER_FILES, ids=lambda p: p.stem)
def test_every_option_of_every_sampler_config_is_accepted_by_name(path):
    default = instantiate(yaml.safe_load(path.read_text()), _convert_="all")
    assert build_sampler(path.stem) == default  # a bare name: the config as it is
    options = yaml_options(path)
    assert build_sampler({"name": path.stem, **options}) == default  # every option named at once
    for key, value in options.items():
        label, config = sampler_config({"name": path.stem, key: value})
        assert config[key] == value and set(config) == {"_target_", *options}, (label, key)


@pytest.mark.parametrize("entry, expected", [
    ({"name": "ddim", "steps": 20, "spacing": "trailing", "eta": 0.3, "clip_x0": False, "dynamic_percentile": 0.995},
     DDIM(steps=20, spacing="trailing", eta=0.3, clip_x0=False, dynamic_percentile=0.995)),
    ({"name": "ddpm", "variance": "fixed_large", "steps": 50, "spacing": "trailing"},
     DDPM(variance="fixed_large", steps=50, spacing="trailing")),
    ({"name": "heun", "steps": 10, "s_churn": 5.0, "s_noise": 1.003, "spacing": "logsnr"},
     Heun(steps=10, s_churn=5.0, s_noise=1.003, spacing="logsnr")),
    ({"name": "dpmpp", "steps": 12, "spacing": "time"}, DPMSolverPP(steps=12, spacing="time")),
    ({"name": "ode", "method": "RK23", "rtol": 1e-3}, PFODE(method="RK23", rtol=1e-3)),
    ({"name": "pc", "steps": 100, "corrector": "none", "snr_norm": "batch"}, PC(steps=100, corrector="none", snr_norm="batch")),
    ({"name": "ald", "levels": 5, "n_steps_each": 3, "step_lr": 1e-4}, ALD(levels=5, n_steps_each=3, step_lr=1e-4)),
    ({"name": "ddim-50", "eta": 1.0}, DDIM(steps=50, eta=1.0)),  # a compact spec as the base of a mapping
])
def test_mappings_set_any_option(entry, expected):
    assert build_sampler(entry) == expected


@pytest.mark.parametrize("spec, long_form, direct", [
    ("ddim-50", {"name": "ddim", "steps": 50}, DDIM(steps=50)),
    ("ddim-50-eta0.5", {"name": "ddim", "steps": 50, "eta": 0.5}, DDIM(steps=50, eta=0.5)),
    ("ddpm", {"name": "ddpm"}, DDPM()),
    ("ddpm-large", {"name": "ddpm", "variance": "fixed_large"}, DDPM(variance="fixed_large")),
    ("ddpm-100", {"name": "ddpm", "steps": 100}, DDPM(steps=100)),
    ("ddpm-100-large", {"name": "ddpm", "steps": 100, "variance": "fixed_large"}, DDPM(steps=100, variance="fixed_large")),
    ("heun-18", {"name": "heun", "steps": 18}, Heun(steps=18)),
    ("heun-18-churn40", {"name": "heun", "steps": 18, "s_churn": 40}, Heun(steps=18, s_churn=40.0)),
    ("dpmpp-20", {"name": "dpmpp", "steps": 20}, DPMSolverPP(steps=20)),
    ("ode", {"name": "ode"}, PFODE()),
    ("ode-tol1e-4", {"name": "ode", "rtol": 1e-4, "atol": 1e-4}, PFODE(rtol=1e-4, atol=1e-4)),
    ("pc-1000-em", {"name": "pc", "steps": 1000, "predictor": "euler_maruyama"}, PC(steps=1000, predictor="euler_maruyama")),
    ("pc-500", {"name": "pc", "steps": 500}, PC(steps=500)),
    ("ald-100", {"name": "ald", "n_steps_each": 100}, ALD(n_steps_each=100)),
])
def test_compact_specs_equal_their_long_form(spec, long_form, direct):
    name, options = parse_spec(spec)
    assert {"name": name, **options} == long_form
    assert build_sampler(spec) == build_sampler(long_form) == direct


@pytest.mark.parametrize("entry, message", [
    ({"name": "ddim", "stepz": 3}, r"'stepz' is not an option of sampler=ddim .*\['steps', 'eta', 'spacing', 'clip_x0', "
                                   r"'dynamic_percentile'\]"),
    ({"name": "ddim", "_target_": "os.system"}, r"'_target_' is not an option of sampler=ddim"),
    ({"name": "euler", "steps": 3}, r"'euler' is not a sampler config; choose one of \['ald', 'consistency', 'ddim', "
                                    r"'ddpm', 'dpmpp', 'heun', 'ode', 'pc'\]"),
    ("euler", r"'euler' is not a sampler config; choose one of \['ald'"),
    ("euler-3", r"sampler 'euler-3' is not understood; use ddpm\[-<steps>\]"),
    ("ddim-x", r"sampler 'ddim-x' is not understood"),
    ({"steps": 3}, r"has no name"),
    (7, r"neither a string .* nor a mapping"),
    ({"name": "ddim", "spacing": "cubic"}, r"spacing='cubic'"),  # values are the sampler class's to check
])
def test_unknown_names_and_options_are_refused_naming_the_allowed_ones(entry, message):
    with pytest.raises(Exception, match=message):
        build_samplers([entry])


def test_the_command_line_grammar_reaches_the_builder():
    """difflab-eval 'samplers=[ddim-50,{name:ddim,steps:20,spacing:trailing}]' (Hydra's override grammar)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", ["ckpt_path=x", "samplers=[ddim-50,{name:ddim,steps:20,spacing:trailing},heun-4]"])
        samplers = build_samplers(cfg.samplers)
    assert list(samplers.values()) == [DDIM(steps=50), DDIM(steps=20, spacing="trailing"), Heun(steps=4)]
    assert list(samplers) == ["ddim-50", "ddim(steps=20,spacing=trailing)", "heun-4"]


def test_your_own_sampler_configs_work_through_the_search_path(tmp_path):
    (tmp_path / "sampler").mkdir()
    (tmp_path / "sampler" / "ddim_trailing.yaml").write_text("defaults:\n  - ddim\n  - _self_\nspacing: trailing\nsteps: 7\n")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", ["ckpt_path=x", f"hydra.searchpath=[file://{tmp_path}]"], return_hydra_config=True)
        HydraConfig().set_config(cfg)  # as inside the running difflab-eval
        assert "ddim_trailing" in sampler_config_names()
        assert build_sampler({"name": "ddim_trailing", "eta": 0.5}) == DDIM(steps=7, spacing="trailing", eta=0.5)


def test_difflab_eval_scores_the_runs_configured_sampler_unless_samplers_are_named():
    from types import SimpleNamespace

    from difflab.cli.evaluate import default_samplers
    from difflab.samplers import DDIM

    listed = build_samplers(["ddim-50"])
    stochastic = {"_target_": "difflab.samplers.DDIM", "steps": 50, "eta": 1.0}
    configured = SimpleNamespace(module=object(), config={"sampler": stochastic})
    assert list(default_samplers(configured, listed, source="t").values()) == [DDIM(steps=50, eta=1.0)]
    plain = SimpleNamespace(module=object(), config={"sampler": None})
    assert default_samplers(plain, listed, source="t") is listed
    hostile = SimpleNamespace(module=object(), config={"sampler": {"_target_": "os.system"}})
    with pytest.raises(ValueError, match="not allowed"):
        default_samplers(hostile, listed, source="t")
