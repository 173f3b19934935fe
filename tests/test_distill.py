"""Distillation: closed forms of the targets and the consistency parameterisation, one progressive round on analytic
Gaussian data, then a tiny teacher distilled through the CLI (native steps, refusals, the joint evaluation, exact
resume inside a round)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import open_dict

from difflab.cli.config import config_dir
from difflab.diffusion.distillation import (check_progressive_steps, consistency_distance, consistency_function,
                                            consistency_scalings, ddim_step, mu_schedule, n_schedule,
                                            progressive_target, target_ema_update, teacher_ode_step,
                                            truncated_snr_weight)
from difflab.diffusion.schedules import NoiseSchedule, linear_betas
from difflab.diffusion.sde import DiscreteVP
from difflab.samplers import ddim_sample
from difflab.samplers.ddim import ddim_timesteps

MU, S = 0.3, 0.5  # the analytic data: x0 ~ N(MU, S^2) per pixel


def exact_x0(z: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """E[x0 | z_t] of Gaussian data: MU + a S^2 / (a^2 S^2 + 1 - a^2) (z - a MU), a = sqrt(alpha_bar_t)."""
    ab = schedule.alpha_bar[t].reshape(-1, *([1] * (z.ndim - 1))).to(z.dtype)
    a = ab.sqrt()
    return MU + a * S**2 / (ab * S**2 + 1 - ab) * (z - a * MU)


def test_progressive_target_equals_the_teachers_two_ddim_steps():
    """With the exact denoiser as teacher, one student DDIM step to x~ lands where two teacher DDIM steps land."""
    sched = NoiseSchedule.from_betas(linear_betas(8, 0.05, 0.5, reference_T=None))
    assert ddim_timesteps(8, 4, "trailing") == [7, 5, 3, 1]
    x_T = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    states = {}
    out = ddim_sample(lambda x, t: exact_x0(x, t, sched), x_T, sched, steps=4, spacing="trailing",
                      parameterization="x0", clip_x0=False, callback=lambda d: states.__setitem__(d["i"], d["x"]))
    teacher = lambda z, t: exact_x0(z, t, sched)  # noqa: E731
    B = x_T.shape[0]
    full = lambda v: torch.full((B,), v, dtype=torch.long)  # noqa: E731
    target = progressive_target(teacher, x_T, full(7), full(5), full(3), sched.alpha_bar)
    student = ddim_step(x_T, target, sched.alpha_bar[7].expand(B), sched.alpha_bar[3].expand(B))
    torch.testing.assert_close(student, states[1], rtol=0, atol=1e-12)  # t = 7 -> 3 in one step
    last = progressive_target(teacher, states[1], full(3), full(1), full(-1), sched.alpha_bar)
    torch.testing.assert_close(last, out, rtol=0, atol=1e-12)  # t = 3 -> the data: x~ is the sample itself
    assert torch.allclose(truncated_snr_weight(torch.tensor([0.9, 0.5, 0.1])), torch.tensor([9.0, 1.0, 1.0]))


def test_one_round_on_gaussian_data_halves_the_steps_without_loss_of_accuracy():
    """An 8-step student (an affine x0 per level) trained on the progressive objective against the 16-step exact
    teacher samples what the teacher samples, and N(MU, S^2) as closely."""
    torch.manual_seed(0)
    sched = NoiseSchedule.from_betas(linear_betas(100))
    student_levels, teacher_levels = (sorted(ddim_timesteps(100, n, "trailing")) for n in (8, 16))
    coef = torch.zeros(8, 2, dtype=torch.float64, requires_grad=True)  # x0_hat = coef[k, 0] z + coef[k, 1]
    opt = torch.optim.Adam([coef], lr=0.05)
    levels = torch.tensor(student_levels)
    teacher = lambda z, t: exact_x0(z, t, sched)  # noqa: E731
    for _ in range(400):
        k = torch.randint(0, 8, (256,))
        t, t_mid = levels[k], torch.tensor(teacher_levels)[2 * k]
        t_next = torch.where(k > 0, levels[(k - 1).clamp(min=0)], torch.full_like(k, -1))
        x0 = MU + S * torch.randn(256, 1, 1, 1, dtype=torch.float64)
        ab = sched.alpha_bar[t].reshape(-1, 1, 1, 1)
        z = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn_like(x0)
        target = progressive_target(teacher, z, t, t_mid, t_next, sched.alpha_bar)
        pred = coef[k, 0].reshape(-1, 1, 1, 1) * z + coef[k, 1].reshape(-1, 1, 1, 1)
        loss = (truncated_snr_weight(ab.flatten()) * (pred - target).pow(2).flatten(1).mean(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    index = {t: i for i, t in enumerate(student_levels)}

    def student(z, t):
        c = coef.detach()[torch.tensor([index[int(v)] for v in t])]
        return c[:, 0].reshape(-1, 1, 1, 1) * z + c[:, 1].reshape(-1, 1, 1, 1)

    x_T = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = ddim_sample(student, x_T, sched, steps=8, spacing="trailing", parameterization="x0", clip_x0=False)
    b = ddim_sample(teacher, x_T, sched, steps=16, spacing="trailing", parameterization="x0", clip_x0=False)
    c = ddim_sample(teacher, x_T, sched, steps=8, spacing="trailing", parameterization="x0", clip_x0=False)
    assert (a - b).abs().max() < 0.02  # the same deterministic map, at half the steps
    error = {k: abs(float(v.std()) - S) + abs(float(v.mean()) - MU) for k, v in (("student", a), ("teacher", b), ("ddim", c))}
    assert error["student"] < error["teacher"] + 0.01 < error["ddim"], error  # the teacher's own 8 steps lose accuracy


def test_consistency_boundary_condition_is_exact():
    """f(x, sigma_min) = x bit for bit, for any denoiser output; away from sigma_min f follows D (Song et al. 2023)."""
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(4, 1, 8, 8, generator=g) * 80, torch.randn(4, 1, 8, 8, generator=g)
    s_min = 0.002
    assert torch.equal(consistency_function(x, d, torch.full((4,), s_min), s_min, 0.5), x)
    c_skip, c_out = consistency_scalings(torch.tensor([s_min, 80.0], dtype=torch.float64), s_min, 0.5)
    assert c_skip[0] == 1 and c_out[0] == 0 and c_skip[1] < 1e-4
    far = consistency_function(x, d, torch.full((4,), 80.0), s_min, 0.5)
    assert (far - d).abs().max() < 1e-2  # at large sigma f is the denoiser
    # the student's network: at the schedule's first level (sigma_hat(0) = sigma_min) it returns x_hat exactly
    from difflab.lit.consistency import ConsistencyNet
    from difflab.nets.unet import UNet

    sched = NoiseSchedule.from_betas(linear_betas(50))
    family = DiscreteVP(sched)
    net = ConsistencyNet(UNet(image_size=8, in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=()),
                         family, prediction="v", sigma_min=family.sigma_hat_min, sigma_data=0.5)
    x_t = torch.randn(3, 1, 8, 8, generator=g)
    with torch.no_grad():
        f = net(x_t, torch.zeros(3))
    assert torch.equal(f, x_t / family.alpha(torch.zeros(3, dtype=torch.float64)).reshape(-1, 1, 1, 1).float())
    assert net.in_channels == 1 and net.image_size == 8 and net.num_classes is None


def test_target_network_update_and_the_n_and_mu_schedules():
    """theta- <- mu theta- + (1 - mu) theta; N(k) goes s0 -> s1 + 1 and mu(k) = mu0 at N = s0 (Song et al. 2023, App. C)."""
    target, online = [torch.ones(3), torch.zeros(2)], [torch.zeros(3), torch.full((2,), 4.0)]
    target_ema_update(target, online, 0.9)
    assert torch.allclose(target[0], torch.full((3,), 0.9)) and torch.allclose(target[1], torch.full((2,), 0.4))
    Ns = [n_schedule(k, 100, 2, 150) for k in range(0, 101, 10)]
    assert Ns[0] == 2 and Ns[-1] == 151 and Ns == sorted(Ns)
    assert {n_schedule(k, 100, 18, 17) for k in range(101)} == {18} and mu_schedule(18, 18, 0.95) == pytest.approx(0.95)
    assert mu_schedule(150, 2, 0.9) > mu_schedule(2, 2, 0.9)
    dist = consistency_distance(torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8))
    c = 0.00054 * 8
    assert torch.allclose(dist, torch.full((2,), math.sqrt(64 + c**2) - c))


def test_teacher_ode_step_is_exact_on_gaussian_data():
    """The probability-flow ODE of N(0, S^2) data scales x by sqrt(S^2 + s'^2) / sqrt(S^2 + s^2); Heun is close, DDIM less."""
    den = lambda x, s: x * S**2 / (S**2 + torch.as_tensor(s).reshape(-1, 1) ** 2)  # noqa: E731
    x, s, s_next = torch.ones(1, 1, dtype=torch.float64), torch.tensor([2.0]), torch.tensor([1.6])
    exact = math.sqrt(S**2 + 1.6**2) / math.sqrt(S**2 + 2.0**2)
    heun = float(teacher_ode_step(den, x, s, s_next, "heun"))
    ddim = float(teacher_ode_step(den, x, s, s_next, "ddim"))
    assert abs(heun - exact) < 1e-3 and abs(heun - exact) < abs(ddim - exact)


@pytest.mark.parametrize("start, end, match", [(12, 4, "start_steps=12 is not a power of two times end_steps=4"),
                                               (4, 4, "start_steps=4 is not a power of two"),
                                               (2048, 4, "start_steps=2048 exceeds the schedule's T=1000")])
def test_bad_step_counts_are_refused_by_name(start, end, match):
    with pytest.raises(ValueError, match=match):
        check_progressive_steps(start, end, 1000)
    assert check_progressive_steps(64, 4, 1000) == 4


# -- the CLI end to end on a tiny teacher -------------------------------------------------------------------------

# test_resume's tiny settings (T = 50, epochs of 4 steps, validation every epoch, a checkpoint after every step):
# rounds of 3 steps, 8 -> 4 -> 2 teacher steps, 6 steps in all
from test_resume import BASE, EXACT  # noqa: E402

TINY = [*BASE, "callbacks.model_checkpoint=null"]
PD = [*EXACT, "callbacks.model_checkpoint=null", "experiment=digits_distill", "module.start_steps=8",
      "module.end_steps=2", "module.steps_per_round=3"]
CD = [*TINY, "experiment=digits_consistency", "trainer.max_steps=3", "module.n_start=4", "module.n_end=6"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    from test_resume import cli

    root = tmp_path_factory.mktemp("distill")
    cli("difflab.cli.train", *TINY, "trainer.max_steps=6", f"hydra.run.dir={root / 'teacher'}", cwd=root)
    teacher = root / "teacher" / "checkpoints" / "last.ckpt"
    cli("difflab.cli.train", *PD, f"teacher.ckpt_path={teacher}", f"hydra.run.dir={root / 'pd'}", cwd=root)
    cli("difflab.cli.train", *CD, f"teacher.ckpt_path={teacher}", f"hydra.run.dir={root / 'cd'}", cwd=root)
    return {"root": root, "teacher": teacher, "pd": root / "pd" / "checkpoints", "cd": root / "cd" / "checkpoints" / "last.ckpt"}


def composed(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(name, overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def sample_with(ckpt: Path, out: Path, *overrides: str) -> dict[str, Path]:
    from difflab.cli.sample import sample

    try:
        return sample(composed("sample", [f"ckpt_path={ckpt}", "num_samples=3", f"out_dir={out}", *overrides]))
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.slow
def test_progressive_rounds_write_students_that_sample_at_their_own_steps(runs, tmp_path, capsys):
    from test_resume import load

    names = sorted(p.name for p in runs["pd"].glob("pd-*.ckpt"))
    assert names == ["pd-2steps.ckpt", "pd-4steps.ckpt"]
    last = load(runs["pd"] / "last.ckpt")
    info = last["difflab"]["distillation"]
    assert last["global_step"] == 6 and info["steps"] == 2 and info["round"] == 2 and info["round_complete"]
    assert info["seconds"] > 0 and last["difflab"]["config"]["sampler"]["steps"] == 2
    assert load(runs["pd"] / "pd-4steps.ckpt")["difflab"]["distillation"]["steps"] == 4
    paths = sample_with(runs["pd"] / "last.ckpt", tmp_path)
    assert paths["npz"].name == "ddim-2_n3_seed0.npz"
    assert "sampler: ddim-2 (DDIM, 2 steps, spacing=trailing), NFE 2 per image" in capsys.readouterr().out
    assert sample_with(runs["pd"] / "pd-4steps.ckpt", tmp_path)["npz"].name == "ddim-4_n3_seed0.npz"
    for bad in (["sampler.steps=4"], ["sampler=heun"]):
        with pytest.raises(ValueError, match=r"cannot sample with .* distilled for ddim-2 \(sampler=ddim sampler.steps=2 "
                                             r"sampler.spacing=trailing\) only"):
            sample_with(runs["pd"] / "last.ckpt", tmp_path / "bad", *bad)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_consistency_student_samples_in_1_2_4_steps_and_refuses_the_rest(runs, tmp_path, capsys):
    assert sample_with(runs["cd"], tmp_path)["npz"].name == "consistency-1_n3_seed0.npz"
    assert sample_with(runs["cd"], tmp_path, "sampler.steps=4")["npz"].name == "consistency-4_n3_seed0.npz"
    assert "sampler: consistency-4 (Consistency, 4 steps), NFE 4 per image" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"cannot sample with consistency-3 .*consistency-1 .*consistency-2 .*consistency-4"):
        sample_with(runs["cd"], tmp_path, "sampler.steps=3")
    with pytest.raises(ValueError, match="sampler 'consistency-1' needs a consistency model"):
        sample_with(runs["teacher"], tmp_path, "sampler=consistency")
    from test_resume import load

    state = load(runs["cd"])["state_dict"]  # the target network moved, and is not the online net
    key = next(k for k in state if k.startswith("target.inner."))
    assert not torch.equal(state[key], state[key.replace("target.", "net.", 1)])


@pytest.mark.slow
def test_eval_of_teacher_and_students_writes_the_joint_table_and_plot(runs, tmp_path, capsys):
    from difflab.cli.evaluate import evaluate
    from test_ddp import random_classifier

    clf = random_classifier(tmp_path / "clf.ckpt")
    students = f"students=[{runs['pd'] / 'pd-4steps.ckpt'},{runs['pd'] / 'last.ckpt'},{runs['cd']}]"
    try:
        evaluate(composed("eval", [f"ckpt_path={runs['teacher']}", f"paths.cache_dir={tmp_path / 'cache'}",
                                   "num_samples=10", "batch_size=10", "samplers=[ddim-4,heun-2]", students,
                                   "bpd.num_images=0", "metrics.extractor=classifier", f"metrics.classifier_ckpt={clf}",
                                   "metrics.names=[fid,is,precision_recall]", "reference.num_images=32",
                                   f"out_dir={tmp_path / 'eval'}"]))
        with pytest.raises(ValueError, match=r"students\[0\]=.* is not a distilled student"):
            evaluate(composed("eval", [f"ckpt_path={runs['teacher']}", f"students=[{runs['teacher']}]"]))
    finally:
        GlobalHydra.instance().clear()
    rows = json.loads((tmp_path / "eval" / "metrics.json").read_text())["results"]
    got = [(r["model"], r["sampler"], r["nfe"]) for r in rows]
    assert got == [("teacher", "ddim-4", 4), ("teacher", "heun-2", 3), ("progressive", "ddim-4", 4),
                   ("progressive", "ddim-2", 2), ("consistency", "consistency-1", 1), ("consistency", "consistency-2", 2),
                   ("consistency", "consistency-4", 4)]
    assert all(r["distill_seconds"] > 0 for r in rows if r["model"] != "teacher")
    assert all(k in rows[2] for k in ("fid", "is_mean", "precision", "recall"))
    assert (tmp_path / "eval" / "teacher_vs_students_vs_nfe.png").is_file()
    assert "distill_s" in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_stopped_inside_a_round_resumes_exactly(runs, tmp_path):
    from test_resume import assert_same_optimizer, assert_same_tensors, cli, load

    teacher = f"teacher.ckpt_path={runs['teacher']}"
    run = tmp_path / "run"
    cli("difflab.cli.train", *PD, teacher, "trainer.max_steps=5", f"hydra.run.dir={run}", cwd=tmp_path)
    stopped = load(run / "checkpoints" / "last.ckpt")
    assert stopped["global_step"] == 5 and stopped["difflab"]["distillation"]["round"] == 2  # inside round 2
    cli("difflab.cli.train", *PD, teacher, "ckpt_path=last", f"hydra.run.dir={run}", cwd=tmp_path)
    a, b = load(runs["pd"] / "last.ckpt"), load(run / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 6 and a["epoch"] == b["epoch"]
    assert any(k.startswith("teacher.") for k in a["state_dict"]) and int(a["state_dict"]["round"]) == 1
    assert_same_tensors(a["state_dict"], b["state_dict"], "student, teacher, EMA and round")
    assert_same_optimizer(a["optimizer_states"][0], b["optimizer_states"][0])
    assert a["lr_schedulers"] == b["lr_schedulers"]
    for ra, rb in zip(a["difflab"]["rng"], b["difflab"]["rng"], strict=True):
        assert torch.equal(ra["torch"], rb["torch"]) and ra["python"] == rb["python"]
    assert b["difflab"]["distillation"]["seconds"] > stopped["difflab"]["distillation"]["seconds"]  # both runs counted


@pytest.mark.slow
@pytest.mark.parametrize("overrides, match", [
    (["experiment=digits_distill", "module.start_steps=8", "teacher.ckpt_path=null"], "module=progressive distils a teacher: set teacher.ckpt_path"),
    (["teacher.ckpt_path=TEACHER"], "teacher.ckpt_path=.* is set but module=DiffusionModule does not distil"),
    (["experiment=digits_distill", "module.start_steps=8", "teacher.ckpt_path=CLASSIFIER"], "is a difflab checkpoint of kind 'classifier', not 'diffusion'"),
    (["experiment=digits_distill", "module.start_steps=8", "teacher.ckpt_path=TEACHER", "model.ch=16"], "does not fit this model .a different architecture"),
    (["experiment=digits_distill", "module.start_steps=8", "teacher.ckpt_path=TEACHER", "schedule.T=100"], "a student keeps its teacher's noise schedule"),
    (["experiment=digits_distill", "teacher.ckpt_path=TEACHER", "module.start_steps=48"], "start_steps=48 is not a power of two"),
    (["experiment=digits_distill", "module.start_steps=8", "teacher.ckpt_path=TEACHER", "objective.parameterization=eps"],
     "a distilled student predicts one of .'v', 'x0'.*amplifies the error"),
    (["experiment=digits_consistency", "teacher.ckpt_path=TEACHER", "module.sigma_min=5", "module.sigma_max=1"],
     "sigma_min=5 >= sigma_max=1"),
])
def test_bad_input_is_refused_before_training(runs, tmp_path, overrides, match):
    from difflab.cli.train import train
    from test_ddp import random_classifier

    swap = {"TEACHER": str(runs["teacher"]), "CLASSIFIER": str(random_classifier(tmp_path / "clf.ckpt"))}
    overrides = [o.replace("TEACHER", swap["TEACHER"]).replace("CLASSIFIER", swap["CLASSIFIER"]) for o in overrides]
    tiny = [o for o in TINY if not o.startswith("schedule.T") or not any(x.startswith("schedule.T") for x in overrides)]
    try:
        cfg = composed("train", [*tiny, *overrides, f"paths.output_dir={tmp_path}", f"hydra.run.dir={tmp_path}"])
        with pytest.raises((ValueError, InstantiationException), match=match):  # a module's refusal: via Hydra
            train(cfg)
    finally:
        GlobalHydra.instance().clear()
    assert not (tmp_path / "checkpoints").exists()


def test_a_class_conditional_teacher_is_distilled_guided_at_the_modules_scale():
    """Meng et al. 2023, stage one: the teacher's x0 is that of eps_null + w (eps_label - eps_null), clipped."""
    import functools

    from difflab.lit.progressive import ProgressiveDistillation
    from difflab.nets.conditioning import Conditioning
    from difflab.nets.unet import UNet

    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_classes=3)
    with torch.no_grad():  # zero-initialised output layers would make every prediction 0
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    make = functools.partial(ProgressiveDistillation, net=net, betas=linear_betas(1000),
                             optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    z, t, labels = torch.randn(4, 1, 8, 8), torch.tensor([999, 500, 100, 10]), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():  # the teacher is a frozen copy in eval mode (no dropout)
        net.eval()
        eps_c = net(z, t, Conditioning(labels=labels))
        eps_u = net(z, t, Conditioning(labels=torch.full_like(labels, 3)))  # the null label
        net.train()
    ab = NoiseSchedule.from_betas(linear_betas(1000)).alpha_bar[t].reshape(-1, 1, 1, 1).float()
    for w in (None, 3.0):
        module = make(guidance_scale=w)
        module.teacher_parameterization = "eps"
        eps = eps_c if w is None else eps_u + w * (eps_c - eps_u)
        expected = ((z - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
        with torch.no_grad():
            got = module.teacher_x0(labels)(z, t)
        assert torch.allclose(got, expected, atol=1e-5), w
    with pytest.raises(ValueError, match=r"guidance_scale=-1.0 must be >= 0"):
        make(guidance_scale=-1.0)
