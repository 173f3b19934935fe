"""Post-hoc EMA (Karras et al. 2024, EDM2): power-function profiles against their closed forms, reconstruction
against directly tracked profiles, snapshots under exact resume, export and the sigma_rel sweep of difflab-eval."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from torch import nn

from difflab.callbacks.ema_snapshots import EMASnapshots, snapshot_steps
from difflab.cli.config import config_dir
from difflab.diffusion.ema_profiles import (GAMMA_PEAK, SIGMA_REL_MAX, gamma_of_sigma_rel, posthoc_coefficients,
                                            power_beta, power_profile_weights, profile_inner_product,
                                            sigma_rel_of_gamma, weighting_tv_distance)
from difflab.lit.checkpoint_io import load_run, safe_load
from difflab.lit.posthoc_ema import apply_to, find_run, read_snapshots, reconstruct
from difflab.lit.power_ema import PowerEMA
from difflab.samplers import DDIM
from test_ddp import random_classifier


# -- the mathematics ----------------------------------------------------------------------------------------


def test_sigma_rel_and_gamma_are_the_papers_and_invert_each_other():
    assert gamma_of_sigma_rel(0.05) == pytest.approx(16.97, abs=5e-3)  # EDM2, Sec. 3.1
    assert gamma_of_sigma_rel(0.10) == pytest.approx(6.94, abs=5e-3)
    assert gamma_of_sigma_rel(0.3) == pytest.approx(-1 / 3, abs=1e-12)  # sqrt((2/3) / ((5/3)^2 (8/3))) = 0.3
    assert SIGMA_REL_MAX == pytest.approx(0.300283, abs=1e-6) and sigma_rel_of_gamma(GAMMA_PEAK) == SIGMA_REL_MAX
    for s in (0.005, 0.02, 0.05, 0.1, 0.2, 0.29, 0.3):
        g = gamma_of_sigma_rel(s)
        assert sigma_rel_of_gamma(g) == pytest.approx(s, rel=1e-12)
        roots = np.roots([1, 7, 16 - s ** -2, 12 - s ** -2])  # EDM2's Algorithm 2: the largest real root
        assert g == pytest.approx(roots[np.isreal(roots)].real.max(), rel=1e-9)
    for bad in (0.0, -0.1, 0.31, float("nan")):
        with pytest.raises(ValueError, match=r"sigma_rel=.* has no power-function EMA profile; it must lie in \(0, 0.3"):
            gamma_of_sigma_rel(bad)


def test_power_ema_weights_match_the_closed_form_profile():
    """Weights e_i at step i: after t steps each profile holds its weights w_i = ((i/t)^(g+1) - ((i-1)/t)^(g+1))."""
    T = 40
    net = nn.Linear(1, T, bias=False)
    ema = PowerEMA(net, (0.05, 0.10, 0.25))
    for i in range(1, T + 1):
        with torch.no_grad():
            net.weight.zero_()
            net.weight[i - 1, 0] = 1.0
        ema.update(net)
    assert ema.num_updates == T
    for profile, g in zip(ema.profiles, ema.gammas):
        w = power_profile_weights(g, T)
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
        torch.testing.assert_close(profile.module.weight[:, 0].double(), w, atol=1e-7, rtol=1e-6)
        # the same weights by the recursion of Eq. 4 in float64
        rec = torch.zeros(T, dtype=torch.float64)
        for i in range(1, T + 1):
            rec = power_beta(g, i) * rec + (1 - power_beta(g, i)) * torch.eye(T, dtype=torch.float64)[i - 1]
        torch.testing.assert_close(rec, w, atol=1e-13, rtol=0)
    big = power_profile_weights(gamma_of_sigma_rel(0.1), 4000)  # its std over training time is sigma_rel * t
    tau = torch.arange(4000, dtype=torch.float64) + 0.5
    mean = (big * tau).sum()
    assert math.sqrt(float((big * (tau - mean) ** 2).sum())) / 4000 == pytest.approx(0.1, rel=1e-3)


def test_inner_products_and_tv_distance_match_sums_over_steps():
    ga, gb = gamma_of_sigma_rel(0.05), gamma_of_sigma_rel(0.2)
    for ta, tb in ((3000, 3000), (1800, 3000), (3000, 1200)):
        wa = torch.cat([power_profile_weights(ga, ta), torch.zeros(3000 - ta, dtype=torch.float64)])
        wb = torch.cat([power_profile_weights(gb, tb), torch.zeros(3000 - tb, dtype=torch.float64)])
        assert float(profile_inner_product(ta, ga, tb, gb)) == pytest.approx(float((wa * wb).sum()), rel=2e-3)
    t_in, g_in = [100, 100, 200, 200], [gamma_of_sigma_rel(s) for s in (0.05, 0.1, 0.05, 0.1)]
    x, _ = posthoc_coefficients(t_in, g_in, [200], [gamma_of_sigma_rel(0.15)])
    rec = sum(float(x[j, 0]) * torch.cat([power_profile_weights(g, t), torch.zeros(200 - t, dtype=torch.float64)])
              for j, (t, g) in enumerate(zip(t_in, g_in)))
    direct = 0.5 * (rec - power_profile_weights(gamma_of_sigma_rel(0.15), 200)).abs().sum()
    assert float(weighting_tv_distance(t_in, g_in, x, [200], [gamma_of_sigma_rel(0.15)], chunk=7)) == \
        pytest.approx(float(direct), rel=1e-9)
    assert float(x.sum()) == pytest.approx(1.0)


# -- reconstruction from snapshots --------------------------------------------------------------------------


def tracked_run(root: Path, sigma_rels: tuple[float, ...], steps: int = 400, every: int = 8) -> PowerEMA:
    """A random-walk 'training' of a small net with the profiles tracked, snapshotted every `every` steps."""
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.GroupNorm(4, 16), nn.Linear(16, 3))
    ema = PowerEMA(net, sigma_rels)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen) + 0.002)  # drift + noise
        ema.update(net)
        if step % every == 0:
            torch.save(ema.snapshot(step=step, model_config={"name": "toy"}), root / f"step-{step:07d}.pt")
    return ema


def relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in b)
    return math.sqrt(num / sum(float((b[k].double() ** 2).sum()) for k in b))


def test_reconstruction_agrees_with_directly_tracked_profiles(tmp_path):
    ema = tracked_run(tmp_path, (0.05, 0.075, 0.10))
    snapshots = read_snapshots(tmp_path)
    assert [s.step for s in snapshots] == list(range(8, 401, 8)) and snapshots[-1].t == 400
    tracked = {s: p.module.state_dict() for s, p in zip(ema.sigma_rels, ema.profiles)}
    # 0.075 from the 0.05 and 0.10 profiles only (what a default run stores), and 0.10 itself
    (mid,) = reconstruct(snapshots, [0.075], profiles=[0.05, 0.10])
    assert mid.error < 1e-3 and relative_error(mid.state_dict, tracked[0.075]) <= 1e-3
    (same,) = reconstruct(snapshots, [0.10], profiles=[0.05, 0.10])
    assert same.error < 1e-9 and relative_error(same.state_dict, tracked[0.10]) <= 1e-6


def test_reconstruction_at_an_earlier_step_uses_only_snapshots_up_to_it(tmp_path):
    tracked_run(tmp_path, (0.05, 0.10), steps=200, every=10)
    early = reconstruct(read_snapshots(tmp_path), [0.07, 0.2], step=100)
    for path in tmp_path.glob("step-*.pt"):  # what came after step 100 does not matter
        if int(path.stem[5:]) > 100:
            path.unlink()
    again = reconstruct(read_snapshots(tmp_path), [0.07, 0.2])
    for a, b in zip(early, again):
        assert a.step == b.step == 100 and a.snapshots == 10
        assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_default_profiles_represent_sigma_rel_from_002_to_03_with_50_snapshots(tmp_path):
    t_in = [t for k in range(1, 51) for t in (30 * k, 30 * k)]
    g_in = [gamma_of_sigma_rel(s) for _ in range(50) for s in (0.05, 0.10)]
    targets = [0.02, 0.05, 0.1, 0.15, 0.2, 0.3]
    g_out = [gamma_of_sigma_rel(s) for s in targets]
    x, _ = posthoc_coefficients(t_in, g_in, [1500] * 6, g_out)
    tv = weighting_tv_distance(t_in, g_in, x, [1500] * 6, g_out)
    assert bool((tv < 0.1).all()), dict(zip(targets, tv.tolist()))  # max_error defaults to 0.15


def test_bad_targets_and_snapshots_are_refused_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="no EMA snapshots in .*module.ema=power"):
        read_snapshots(tmp_path)
    tracked_run(tmp_path, (0.05, 0.10), steps=40, every=8)
    snapshots = read_snapshots(tmp_path)
    with pytest.raises(ValueError, match=r"sigma_rel 0.005 \(error .*\) lies outside the range the snapshots can "
                                         r"represent: at step 40 these snapshots represent sigma_rel in about \[0"):
        reconstruct(snapshots, [0.1, 0.005])
    with pytest.raises(ValueError, match=r"\[0.5\] cannot be reconstructed; a power-function EMA has sigma_rel in"):
        reconstruct(snapshots, [0.5])
    with pytest.raises(ValueError, match=r"ema.step=41 is not allowed.* span steps 8..40; give a step in 1..40"):
        reconstruct(snapshots, [0.1], step=41)
    with pytest.raises(ValueError, match=r"ema.step=5: no EMA snapshot at or before it .*the first is at step 8"):
        reconstruct(snapshots, [0.1], step=5)
    with pytest.raises(ValueError, match=r"ema.max_error=0 must be > 0"):
        reconstruct(snapshots, [0.1], max_error=0)
    other = safe_load(snapshots[1].path)
    other["profiles"][0]["2.weight"] = torch.zeros(4, 16)
    torch.save(other, snapshots[1].path)
    with pytest.raises(ValueError, match=r"(?s)EMA snapshot .*step-0000016.pt.* does not fit .*2.weight: checkpoint "
                                         r"\(4, 16\) vs model \(3, 16\)"):
        reconstruct(snapshots, [0.1])
    with pytest.raises(ValueError, match="is not allowed; give one or more distinct values in"):
        PowerEMA(nn.Linear(1, 1), (0.1, 0.1))
    with pytest.raises(ValueError, match=r"every_n_steps=0 is not allowed; an integer >= 1"):
        EMASnapshots(dirpath=str(tmp_path), every_n_steps=0)


# -- training, resume, export and evaluation through the CLI --------------------------------------------------

TRAIN = [
    "logger=csv", "data.batch_size=16", "model.ch=8", "model.ch_mult=[1,2]", "model.num_res_blocks=1",
    "model.attn_resolutions=[4]", "schedule.T=50", "trainer.limit_train_batches=4", "trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "module.lr_warmup_steps=3",
    "callbacks.sample_grid=null", "callbacks.evaluation=null", "callbacks.progress_bar=null",
    "callbacks.model_checkpoint=null", "callbacks.checkpoint.every_n_train_steps=1", "callbacks.checkpoint.keep=-1",
    "module.ema=power", "callbacks.ema_snapshots.every_n_steps=2", "trainer.max_steps=8",
]


def train_run(run_dir: Path, *extra: str) -> None:
    """difflab-train's own function in this process (no interpreter start): TRAIN into run_dir."""
    from difflab.cli.train import train

    try:
        train(composed("train", [*TRAIN, *extra, f"paths.output_dir={run_dir}", f"hydra.run.dir={run_dir}"]))
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("posthoc") / "straight"
    train_run(run_dir)
    return run_dir


def test_snapshots_hold_the_tracked_profiles_and_load_weights_only(straight):
    steps = snapshot_steps(straight / "ema_snapshots")
    assert list(steps) == [2, 4, 6, 8]
    last = torch.load(steps[8], map_location="cpu", weights_only=True)
    ckpt = safe_load(straight / "checkpoints" / "last.ckpt")["state_dict"]
    assert last["t"] == 8 and last["sigma_rels"] == [0.05, 0.1] and last["model"]["ch"] == 8
    for k, profile in enumerate(last["profiles"]):
        for name, tensor in profile.items():
            assert tensor.dtype == torch.float32 or not tensor.is_floating_point()
            assert torch.equal(tensor, ckpt[f"power_ema.profiles.{k}.module.{name}"])
    (rec,) = reconstruct(read_snapshots(straight / "ema_snapshots"), [0.10])
    assert relative_error(rec.state_dict, last["profiles"][1]) <= 1e-6


def test_resume_mid_run_writes_the_same_snapshots_as_a_straight_run(straight, tmp_path):
    """Resumed from step 4 whose snapshot the interrupted run did not write, with a stale step 6 left by an
    abandoned continuation: the resumed run rewrites both and ends with the straight run's files, bit for bit."""
    run = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints", run / "checkpoints")
    (run / "ema_snapshots").mkdir()
    shutil.copy(straight / "ema_snapshots" / "step-0000002.pt", run / "ema_snapshots")
    torch.save({"format": "stale"}, run / "ema_snapshots" / "step-0000006.pt")
    for p in (run / "checkpoints").glob("step-*.ckpt"):
        if int(p.stem[5:]) > 4:
            p.unlink()
    (run / "checkpoints" / "last.ckpt").unlink()
    train_run(run, "ckpt_path=last")
    a, b = snapshot_steps(straight / "ema_snapshots"), snapshot_steps(run / "ema_snapshots")
    assert list(a) == list(b) == [2, 4, 6, 8]
    for step in a:
        sa, sb = (torch.load(s[step], map_location="cpu", weights_only=True) for s in (a, b))
        assert {k: v for k, v in sa.items() if k != "profiles"} == {k: v for k, v in sb.items() if k != "profiles"}
        for pa, pb in zip(sa["profiles"], sb["profiles"], strict=True):
            assert all(torch.equal(pa[k], pb[k]) for k in pa), f"step {step} differs"


def composed(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(name, overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def test_exported_checkpoint_samples_bit_identically_to_the_reconstruction(straight, tmp_path):
    from difflab.cli.export import export

    try:
        out = export(composed("export", [f"ckpt_path={straight}", "ema.sigma_rel=0.07", f"out={tmp_path / 'e.ckpt'}"]))
        with pytest.raises(ValueError, match="lies in the run's checkpoints/ folder"):
            export(composed("export", [f"ckpt_path={straight / 'checkpoints' / 'last.ckpt'}", "ema.sigma_rel=0.07",
                                       f"out={straight / 'checkpoints' / 'x.ckpt'}"]))
    finally:
        GlobalHydra.instance().clear()
    ckpt, snapshot_dir = find_run(straight)
    (rec,) = reconstruct(read_snapshots(snapshot_dir), [0.07])
    reference = load_run(ckpt).module
    apply_to(reference, rec, source="test")
    exported = load_run(out)
    assert exported.module.power_ema is None and exported.config["module"]["ema"] == "constant"
    assert exported.checkpoint.contents["difflab"]["posthoc_ema"]["sigma_rel"] == 0.07
    sampler = DDIM(steps=4)
    a, b = (m.sample(sampler, [3, 4, 5]) for m in (reference, exported.module))
    assert torch.equal(a, b)
    assert not torch.equal(a, load_run(ckpt).module.sample(sampler, [3, 4, 5]))  # not the stored EMA
    toy = tmp_path / "toy"
    toy.mkdir()
    tracked_run(toy, (0.05, 0.10), steps=16, every=8)  # snapshots of another network
    (other,) = reconstruct(read_snapshots(toy), [0.1])
    with pytest.raises(ValueError, match=r"(?s)the EMA snapshots of .* does not fit this model.*missing in checkpoint"):
        apply_to(reference, other, source=f"the EMA snapshots of {str(toy)!r}")


def test_difflab_eval_sweeps_sigma_rel_with_the_same_seeds(straight, tmp_path):
    from difflab.cli.evaluate import evaluate

    clf = random_classifier(tmp_path / "clf.ckpt")
    common = [f"ckpt_path={straight}", f"paths.cache_dir={tmp_path / 'cache'}", "num_samples=6", "batch_size=6",
              "samplers=[ddim-2]", "bpd.num_images=4", "bpd.batch_size=4", "metrics.extractor=classifier",
              f"metrics.classifier_ckpt={clf}", "metrics.names=[fid]", "reference.num_images=64"]
    try:
        out = evaluate(composed("eval", [*common, "ema.sigma_rel=[0.05,0.2]", "ema.bpd=true", f"out_dir={tmp_path / 'sweep'}"]))
        with pytest.raises(ValueError, match=r"sigma_rel 0.01 \(error .*\) lies outside the range"):
            evaluate(composed("eval", [*common, "ema.sigma_rel=[0.01]", f"out_dir={tmp_path / 'bad'}"]))
    finally:
        GlobalHydra.instance().clear()
    rows = json.loads((tmp_path / "sweep" / "metrics.json").read_text())
    assert [r["sigma_rel"] for r in rows["results"]] == [0.05, 0.2]
    assert [r["sampler"] for r in rows["results"]] == ["ddim-2-ema0.05", "ddim-2-ema0.2"]
    assert all(r["ema_step"] == 8 and r["seed"] == 0 for r in rows["results"])
    assert [p["sigma_rel"] for p in rows["posthoc_ema"]] == [0.05, 0.2]
    assert sorted(rows["likelihood"]) == ["0.05", "0.2"] and rows["likelihood"]["0.2"]["bpd_images"] == 4
    assert (tmp_path / "sweep" / "metrics_vs_sigma_rel.png").is_file()
    assert out["results"][0]["fid"] != out["results"][1]["fid"]
    assert not (tmp_path / "bad").exists()


def test_only_rank_zero_writes_snapshots(tmp_path):
    from types import SimpleNamespace

    class Module:
        power_ema = PowerEMA(nn.Linear(2, 2))

        def ema_snapshot(self):
            return self.power_ema.snapshot(step=4)

    written = []
    io = SimpleNamespace(save_checkpoint=lambda payload, path: written.append(path))
    callback = EMASnapshots(dirpath=str(tmp_path), every_n_steps=2)
    for rank in (1, 0):
        trainer = SimpleNamespace(global_step=4, is_global_zero=rank == 0, max_steps=8,
                                  strategy=SimpleNamespace(checkpoint_io=io))
        callback.on_train_start(trainer, Module())
        callback.on_train_batch_end(trainer, Module(), None, None, 0)
    assert written == [tmp_path / "step-0000004.pt"] and callback.every == 2


def test_module_ema_composes_for_both_module_kinds_and_constant_is_unchanged(tmp_path):
    from difflab.lit.from_config import build_module

    def build(overrides):
        small = ["model.ch=8", "model.ch_mult=[1,2]", "model.num_res_blocks=1"]
        return build_module(composed("train", [f"paths.output_dir={tmp_path}", *small, *overrides]))

    try:
        constant = build([])
        assert constant.power_ema is None and constant.ema_kind == "constant"
        assert not [k for k in constant.state_dict() if not k.startswith(("net.", "ema."))]  # as before
        power = build(["module.ema=power"])
        assert [p.gammas for p in [power.power_ema]] == [(gamma_of_sigma_rel(0.05), gamma_of_sigma_rel(0.1))]
        assert {k[len("power_ema.profiles.0.module."):] for k in power.state_dict()
                if k.startswith("power_ema.profiles.0.module.")} == set(power.net.state_dict())
        score = build(["experiment=digits_vpsde", "module.ema=power", "module.ema_sigma_rels=[0.05,0.1,0.2]"])
        assert score.power_ema.sigma_rels == (0.05, 0.1, 0.2)
        with pytest.raises(Exception, match=r"module.ema='karras' is not supported; choose one of \('constant', "):
            build(["module.ema=karras"])
        with pytest.raises(Exception, match=r"module.ema_sigma_rels=\[0.05, 0.4\] is not allowed"):
            build(["module.ema=power", "module.ema_sigma_rels=[0.05,0.4]"])
    finally:
        GlobalHydra.instance().clear()


def test_resume_with_the_other_ema_kind_is_refused_by_name(straight):
    from difflab.lit.from_config import build_module

    try:
        small = [o for o in TRAIN if o.startswith(("model.", "schedule."))]
        module = build_module(composed("train", [f"paths.output_dir={straight}", *small]))  # module.ema=constant
    finally:
        GlobalHydra.instance().clear()
    with pytest.raises(ValueError, match=r"was trained with module.ema=power, this run has module.ema=constant: the "
                                         r"power-function EMA profiles average every step from the first"):
        module.on_load_checkpoint(safe_load(straight / "checkpoints" / "last.ckpt"))


def test_optuna_searches_sigma_rel_post_hoc(straight, tmp_path):
    """hparams_search=posthoc_ema: each trial reconstructs one sigma_rel and returns its FID to the sweeper."""
    import yaml
    from test_resume import cli

    clf = random_classifier(tmp_path / "clf.ckpt")
    cli("difflab.cli.evaluate", "-m", "hparams_search=posthoc_ema", f"ckpt_path={straight}",
        f"paths.cache_dir={tmp_path / 'cache'}", "num_samples=6", "batch_size=6", "samplers=[ddim-2]",
        "metrics.extractor=classifier", f"metrics.classifier_ckpt={clf}", "metrics.names=[fid]",
        "reference.num_images=64", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
        "ema.max_error=0.5", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert 0.02 <= best["best_params"]["ema.sigma_rel"] <= 0.3 and best["best_value"] >= 0
    trials = [json.loads(p.read_text())["results"][0] for p in (tmp_path / "sweep").glob("*/metrics.json")]
    assert len(trials) == 2 and min(t["fid"] for t in trials) == pytest.approx(best["best_value"])
