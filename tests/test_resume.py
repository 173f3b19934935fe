"""Exact resume after a hard kill, safe failure on a non-finite loss, and refusal of unsafe or
mismatched checkpoints; the CLI runs as subprocesses with test-only callbacks from tests/hydra_test_targets.py."""

from __future__ import annotations

import csv
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent

# epochs of 2 steps (limit_train_batches), validation every epoch, last.ckpt at every epoch end
BASE = [
    "logger=csv", "data.batch_size=16", "model.ch=8", "model.ch_mult=[1,2]", "model.num_res_blocks=1",
    "model.attn_resolutions=[4]", "schedule.T=50", "trainer.log_every_n_steps=1",
    "trainer.check_val_every_n_epoch=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "module.lr_warmup_steps=3",
    "callbacks.sample_grid=null", "callbacks.evaluation=null", "callbacks.progress_bar=null",
]


def cli(module: str, *args: str, cwd: Path, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a difflab entry point in a fresh process; tests/ is importable there (for hydra_test_targets)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max |diff| {(a[k].float() - b[k].float()).abs().max()})"


def assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    for i, sa in a["state"].items():
        for k, v in sa.items():
            assert torch.equal(v, b["state"][i][k]), f"optimizer state {i}.{k} differs"


# epochs of 4 steps, flips drawn per (seed, epoch, index), one data worker, a checkpoint after every step
EXACT = [*(o for o in BASE if not o.startswith("trainer.limit_train_batches")), "trainer.limit_train_batches=4",
         "data.hflip=true", "data.num_workers=1", "callbacks.checkpoint.every_n_train_steps=1",
         "callbacks.checkpoint.keep=-1"]
STEPS = 8


def csv_rows(run_dir: Path) -> dict[str, list[tuple[int, str]]]:
    """{"train/loss": [(step, value), ...], "val/loss": [...]} in file order."""
    with (run_dir / "csv" / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {key: [(int(r["step"]), r[key]) for r in rows if r.get(key)] for key in ("train/loss", "val/loss")}


def assert_same_run(a: dict, b: dict) -> None:
    """Weights, EMA, optimizer, LR schedule, loop counters and every rank's RNG streams agree bit for bit."""
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    assert any(k.startswith("ema.module.") for k in a["state_dict"])
    assert_same_tensors(a["state_dict"], b["state_dict"], "net + EMA weights")  # net.*, ema.module.*, ema.n_averaged
    assert int(a["state_dict"]["ema.n_averaged"]) == a["global_step"]
    assert_same_optimizer(a["optimizer_states"][0], b["optimizer_states"][0])
    assert a["lr_schedulers"] == b["lr_schedulers"]
    for ra, rb in zip(a["difflab"]["rng"], b["difflab"]["rng"], strict=True):
        assert torch.equal(ra["torch"], rb["torch"]) and ra["python"] == rb["python"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """STEPS steps in one go, checkpoints/step-<k>.ckpt after each."""
    root = tmp_path_factory.mktemp("resume")
    cli("difflab.cli.train", *EXACT, f"trainer.max_steps={STEPS}", f"hydra.run.dir={root / 'straight'}", cwd=root)
    return root / "straight"


@pytest.mark.parametrize("k", [1, 2, 4])  # the first step, the middle and the last step of the first epoch
def test_resume_from_a_checkpoint_at_any_step_equals_straight_training(straight, tmp_path, k):
    run = tmp_path / "resumed"
    cli("difflab.cli.train", *EXACT, f"trainer.max_steps={STEPS}", f"ckpt_path={straight / 'checkpoints' / f'step-{k:07d}.ckpt'}",
        f"hydra.run.dir={run}", cwd=tmp_path)
    assert_same_run(load(straight / "checkpoints" / "last.ckpt"), load(run / "checkpoints" / "last.ckpt"))
    # the resumed run logged steps k.. with the straight run's numbers and values (no shift, no repeat)
    a, b = csv_rows(straight), csv_rows(run)
    assert b["train/loss"] == [r for r in a["train/loss"] if r[0] >= k]
    assert b["val/loss"] == [r for r in a["val/loss"] if r[0] >= k]


def test_a_stopped_run_resumed_in_place_is_exact_and_keeps_its_whole_log(straight, tmp_path):
    run = tmp_path / "run"  # stopped by max_steps part-way through its first epoch, then continued
    cli("difflab.cli.train", *EXACT, "trainer.max_steps=3", f"hydra.run.dir={run}", cwd=tmp_path)
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == 3
    cli("difflab.cli.train", *EXACT, f"trainer.max_steps={STEPS}", "ckpt_path=last", f"hydra.run.dir={run}", cwd=tmp_path)
    assert_same_run(load(straight / "checkpoints" / "last.ckpt"), load(run / "checkpoints" / "last.ckpt"))
    assert csv_rows(run) == csv_rows(straight)  # every step once, the rows before the resume kept
    from difflab.cli.runs import read_run  # difflab-report: the best values over the whole run

    report, reference = read_run(run, tmp_path), read_run(straight, straight.parent)
    assert report.best == reference.best


def test_non_finite_loss_stops_and_leaves_checkpoint_and_ema_untouched(tmp_path):
    run_dir, snap = tmp_path / "run", tmp_path / "snapshot"
    # the net's 6th training forward (step 5 = batch 1 of epoch 2) returns NaN; last.ckpt holds step 4
    probes = ["model._target_=hydra_test_targets.NaNAfterUNet", "+model.nan_after=5",
              "+callbacks.dump._target_=hydra_test_targets.DumpOnException", f"+callbacks.dump.path={tmp_path / 'at_error.pt'}",
              "+callbacks.snap._target_=hydra_test_targets.SnapshotFiles", "+callbacks.snap.step=5",
              f"+callbacks.snap.src_dir={run_dir / 'checkpoints'}", f"+callbacks.snap.dst_dir={snap}"]
    proc = cli("difflab.cli.train", *BASE, *probes, "trainer.max_steps=8", f"hydra.run.dir={run_dir}",
               cwd=tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "FloatingPointError: non-finite training loss at global step 5, batch 1" in out, out[-3000:]
    files = lambda d: {p.name: p.read_bytes() for p in d.iterdir()}  # noqa: E731
    assert files(run_dir / "checkpoints") == files(snap)  # bytes as they were just before the failing step
    last = load(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4 and int(last["state_dict"]["ema.n_averaged"]) == 4
    state = torch.load(tmp_path / "at_error.pt", weights_only=True)  # the in-memory weights at the error
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert int(state["ema.n_averaged"]) == 5  # step 4 was averaged, the NaN step 5 was not


def _resume_refused(tmp_path: Path, ckpt: Path, match: str):
    """Lightning's own resume path (Trainer.fit(ckpt_path=...) -> AtomicCheckpointIO), in this process:
    it must raise `match` before any step; returns the trainer."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    from difflab.cli.trainer_setup import build_trainer

    from difflab.lit.from_config import build_module
    from difflab.cli.config import config_dir

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("train", overrides=[*BASE, "trainer.max_steps=8", f"hydra.run.dir={tmp_path}",
                                              f"paths.output_dir={tmp_path}"], return_hydra_config=True)
            HydraConfig().set_config(cfg)
            trainer = build_trainer(cfg)
            with pytest.raises(ValueError, match=match):
                trainer.fit(build_module(cfg), datamodule=instantiate(cfg.data), ckpt_path=str(ckpt))
    finally:
        GlobalHydra.instance().clear()
    return trainer


def test_resume_refuses_a_checkpoint_carrying_pickled_code(straight, tmp_path):

    from difflab.lit.checkpoint_io import read_checkpoint  # what difflab-sample and difflab-eval read with

    marker = tmp_path / "code_ran"
    ckpt = load(straight / "checkpoints" / "last.ckpt")
    ckpt["payload"] = _Exploit(str(marker))  # unpickling it would call Path.touch(marker)
    evil = tmp_path / "last.ckpt"
    torch.save(ckpt, evil)
    trainer = _resume_refused(tmp_path, evil, r"refusing to load checkpoint .*last.ckpt.*pickled Python objects")
    assert trainer.global_step == 0 and not marker.exists()
    with pytest.raises(ValueError, match="refusing to load checkpoint"):
        read_checkpoint(evil)
    assert not marker.exists()


def test_truncated_checkpoint_is_refused_by_name_and_left_untouched(straight, tmp_path):

    from difflab.lit.checkpoint_io import read_checkpoint

    data = (straight / "checkpoints" / "last.ckpt").read_bytes()
    cut = tmp_path / "checkpoints" / "last.ckpt"
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) // 2])  # as a kill during a non-atomic copy would leave it
    trainer = _resume_refused(tmp_path, cut, rf"checkpoint .*last.ckpt' \({len(data) // 2} bytes\) is truncated")
    assert trainer.global_step == 0 and cut.read_bytes() == data[: len(data) // 2]  # not overwritten
    with pytest.raises(ValueError, match="is truncated or not a torch checkpoint"):
        read_checkpoint(cut)  # difflab-sample / difflab-eval


class _Exploit:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_mismatched_architecture_is_named_on_resume_sample_and_eval(straight, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from difflab.lit.from_config import build_module
    from difflab.cli.config import config_dir, to_container
    from difflab.lit.checkpoint_io import load_run

    path = straight / "checkpoints" / "last.ckpt"
    ckpt = load(path)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("train", overrides=[o for o in BASE if not o.startswith("logger")] + ["model.ch=16"])
    finally:
        GlobalHydra.instance().clear()
    module = build_module(cfg)
    module.run_config = {"model": to_container(cfg.model)}
    with pytest.raises(ValueError) as err:  # what Lightning calls on resume before loading the weights
        module.on_load_checkpoint(ckpt)
    msg = str(err.value)
    assert "does not fit this model" in msg and "net.conv_in.weight: checkpoint (8, 1, 3, 3) vs model (16, 1, 3, 3)" in msg
    assert "'ch': 8" in msg and "'ch': 16" in msg  # the config that produced the checkpoint, and this one
    # sample/eval rebuild the net from the checkpoint's own config: a file whose config and weights disagree
    ckpt["difflab"]["config"]["model"]["ch_mult"] = [1, 2, 2]
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(ValueError, match=r"(?s)does not fit this model.*missing in checkpoint.*'ch_mult': \[1, 2, 2\]"):
        load_run(bad)


def test_rng_state_round_trip_and_per_rank_seeds():
    from difflab.lit.resume import rng_state, seed_rank, set_rng_state

    seed_rank(3, 0, 1)
    state = pickle.loads(pickle.dumps(rng_state()))
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])
    seed_rank(3, 0, 2)
    a = torch.rand(4)
    seed_rank(3, 1, 2)
    assert not torch.equal(a, torch.rand(4))  # ranks draw different noise


def test_timestep_sampler_state_is_saved_and_restored():
    from difflab.diffusion import linear_betas
    from difflab.diffusion.timesteps import UniformTimesteps
    from difflab.lit import DiffusionModule
    from difflab.nets import UNet

    class Counting(UniformTimesteps):  # a stateful sampler following the protocol
        def __init__(self) -> None:
            self.calls = 0

        def sample(self, batch_size, *, T, device, generator=None):
            self.calls += 1
            return super().sample(batch_size, T=T, device=device, generator=generator)

        def state_dict(self):
            return {"calls": self.calls}

        def load_state_dict(self, state):
            self.calls = state["calls"]

    def module(sampler):
        net = UNet(image_size=8, in_channels=1, ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
        return DiffusionModule(net=net, betas=linear_betas(50), optimizer=torch.optim.SGD, timestep_sampler=sampler)

    src = module(Counting())
    src.loss(torch.zeros(2, 1, 8, 8))
    src.loss(torch.zeros(2, 1, 8, 8))
    ckpt = {"state_dict": src.state_dict()}
    src.on_save_checkpoint(ckpt)
    ckpt = pickle.loads(pickle.dumps(ckpt))
    assert ckpt["difflab"]["timestep_sampler"] == {"calls": 2} and len(ckpt["difflab"]["rng"]) == 1
    dst = module(Counting())
    dst.on_load_checkpoint(ckpt)
    assert dst.timestep_sampler.calls == 2
    with pytest.raises(ValueError, match=r"UniformTimesteps has no state.*\['calls'\]"):
        module(UniformTimesteps()).on_load_checkpoint(ckpt)
