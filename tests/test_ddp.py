"""2-process CPU DDP through the real CLI (strategy=ddp re-executes the command line, so it runs as a
subprocess with an explicit hydra.run.dir), sampling from its checkpoint, and DDP/trainer bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from PIL import Image

from difflab.cli.trainer_setup import build_trainer
from difflab.cli.config import config_dir
from difflab.data.base import per_device_batch_size
from test_resume import assert_same_run, cli, load

pytestmark = pytest.mark.slow

CLASSIFIER_NET = {"_target_": "difflab.nets.classifiers.ImageClassifier", "image_size": 8, "in_channels": 1,
                  "num_classes": 10, "ch": 8, "feature_dim": 16, "dropout": 0.0}


def random_classifier(path: Path) -> Path:
    """A difflab classifier checkpoint with random weights: real features for the metric machinery."""
    torch.manual_seed(0)
    net = instantiate(CLASSIFIER_NET)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "difflab": {"kind": "classifier", "config": {"classifier": {"net": CLASSIFIER_NET}}}}, path)
    return path


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    run_dir, probe = root / "run", root / "probe"
    args = [
        "trainer=ddp_cpu", "logger=many", "data.batch_size=32", "model.ch=8", "model.ch_mult=[1,2]",
        "model.num_res_blocks=1", "model.attn_resolutions=[4]", "schedule.T=50", "trainer.max_steps=4",
        "trainer.log_every_n_steps=1", "trainer.check_val_every_n_epoch=1", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
        "callbacks.sample_grid.every_n_steps=2", "callbacks.sample_grid.num_samples=5",  # 3 + 2 per rank
        "callbacks.sample_grid.samplers.ddim.steps=5", "callbacks.sample_grid.samplers.ddpm=null",
        f"callbacks.evaluation.metrics.classifier_ckpt={random_classifier(root / 'clf.ckpt')}",
        "callbacks.evaluation.metrics.extractor=classifier", f"paths.cache_dir={root / 'cache'}",
        "callbacks.evaluation.every_n_steps=2", "callbacks.evaluation.num_samples=10", "callbacks.evaluation.batch_size=4",
        "callbacks.evaluation.samplers.ddim.steps=3", "+callbacks.evaluation.reference_images=64",
        "data.hflip=true", "callbacks.checkpoint.every_n_train_steps=1", "callbacks.checkpoint.keep=-1",
        "+callbacks.probe._target_=hydra_test_targets.RankWeights",
        "module.ema=power", "callbacks.ema_snapshots.every_n_steps=2",  # post-hoc EMA profiles under DDP
    ]
    proc = cli("difflab.cli.train", *args, f"+callbacks.probe.out_dir={probe}", f"hydra.run.dir={run_dir}", cwd=root)
    return {"root": root, "run": run_dir, "probe": probe, "stdout": proc.stdout, "stderr": proc.stderr, "args": args}


def test_ddp_run_shares_one_directory_and_writes_everything_once(ddp_run):
    root, run = ddp_run["root"], ddp_run["run"]
    assert {"cache", "clf.ckpt", "probe", "run"} <= {p.name for p in root.iterdir()}
    assert not [p for p in root.iterdir() if p.name not in ("cache", "clf.ckpt", "probe", "run", "resumed", "probe-resumed")]
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert sorted(p.name for p in run.glob("*.log")) == ["train.log", "train_ddp_process_1.log"]
    assert "run directory" not in (run / "train_ddp_process_1.log").read_text()  # rank zero reports
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1  # one W&B run
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "best-0000004.ckpt", "last.ckpt", *(f"step-{k:07d}.ckpt" for k in range(1, 5))]
    ckpt = load(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4 and ckpt["difflab"]["config"]["trainer"]["devices"] == 2
    rng = ckpt["difflab"]["rng"]  # one RNG state per rank, and the ranks draw different streams
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    # every metric row once per evaluation; logged once per step
    rows = json.loads((run / "eval" / "metrics.json").read_text())["results"]
    assert [(r["sampler"], r["step"], r["num_samples"]) for r in rows] == [("ddim-3", 2, 10), ("ddim-3", 4, 10)]
    assert all(np.isfinite(r["fid"]) for r in rows)
    lines = (run / "csv" / "metrics.csv").read_text().splitlines()
    col = lines[0].split(",").index("eval/fid/ddim-3")
    assert [l.split(",")[col] for l in lines[1:] if l.split(",")[col]] == [f"{r['fid']}" for r in rows]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["ddim_step0000002.png", "ddim_step0000004.png"]


def test_ddp_ranks_hold_identical_weights_and_split_the_global_batch(ddp_run):
    r0, r1 = (torch.load(ddp_run["probe"] / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["batch_sizes"] == r1["batch_sizes"] == [16] * 4  # data.batch_size=32 is the global batch
    ckpt = load(ddp_run["run"] / "checkpoints" / "last.ckpt")["state_dict"]
    for k, v in r0["state_dict"].items():
        assert torch.equal(v, r1["state_dict"][k]), f"{k} differs between ranks"
        assert torch.equal(v, ckpt[k]), f"{k} differs from the checkpoint"


def test_ddp_power_ema_snapshots_hold_the_profiles_every_rank_holds(ddp_run):
    """module.ema=power: the ranks' power_ema.* entries agree (the test above compares every entry); the
    snapshots rank zero wrote are those profiles, float32, and load with weights_only."""
    snaps = sorted((ddp_run["run"] / "ema_snapshots").glob("*"))
    assert [p.name for p in snaps] == ["step-0000002.pt", "step-0000004.pt"]
    last = torch.load(snaps[-1], map_location="cpu", weights_only=True)
    r1 = torch.load(ddp_run["probe"] / "rank1.pt", weights_only=True)["state_dict"]
    assert last["t"] == 4 and len(last["profiles"]) == 2
    for k, profile in enumerate(last["profiles"]):
        for name, tensor in profile.items():
            assert torch.equal(tensor, r1[f"power_ema.profiles.{k}.module.{name}"].float()), name


def test_ddp_resume_from_mid_epoch_equals_straight_training(ddp_run):
    """Both ranks resume part-way through an epoch (step 1 of 2): each draws its own share of the same
    global batches, flips and RNG streams, so weights, EMA, optimizer and the evaluations agree bit for bit."""
    root, run, resumed = ddp_run["root"], ddp_run["run"], ddp_run["root"] / "resumed"
    cli("difflab.cli.train", *ddp_run["args"], f"+callbacks.probe.out_dir={root / 'probe-resumed'}",
        f"ckpt_path={run / 'checkpoints' / 'step-0000001.ckpt'}", f"hydra.run.dir={resumed}", cwd=root)
    assert_same_run(load(run / "checkpoints" / "last.ckpt"), load(resumed / "checkpoints" / "last.ckpt"))
    metrics = lambda d: [{k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
                         for r in json.loads((d / "eval" / "metrics.json").read_text())["results"]]
    assert metrics(resumed) == metrics(run)


def test_sample_from_the_ddp_checkpoint_matches_the_gathered_grid(ddp_run, tmp_path):
    ckpt = ddp_run["run"] / "checkpoints" / "last.ckpt"
    cli("difflab.cli.sample", f"ckpt_path={ckpt}", "sampler=ddim", "sampler.steps=5", "num_samples=5", "seed=0",
        f"out_dir={tmp_path}", cwd=tmp_path)
    single = np.asarray(Image.open(tmp_path / "ddim-5_n5_seed0.png"))
    gathered = np.asarray(Image.open(ddp_run["run"] / "samples" / "ddim_step0000004.png"))
    assert single.shape == gathered.shape
    # seeds 0..2 drawn on rank 0 and 3..4 on rank 1 during training = seeds 0..4 in one process now
    assert np.array_equal(single, gathered), np.abs(single.astype(int) - gathered.astype(int)).max()


def test_multirun_with_relaunching_ddp_is_refused_before_work(tmp_path):
    from hydra.core.hydra_config import HydraConfig

    from difflab.cli.train import refuse_relaunch_in_multirun

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            for mode, strategy, start in (("MULTIRUN", "ddp_cpu", "popen"), ("RUN", "ddp_cpu", "popen"),
                                          ("MULTIRUN", "cpu", None), ("MULTIRUN", "ddp_cpu", "spawn")):
                extra = [f"trainer.strategy.start_method={start}"] if start else []
                cfg = compose("train", overrides=[f"hydra.mode={mode}", f"paths.output_dir={tmp_path}", f"trainer={strategy}",
                                                  "logger=csv", "callbacks.evaluation=null", *extra], return_hydra_config=True)
                HydraConfig().set_config(cfg)
                trainer = build_trainer(cfg)
                if (mode, strategy, start) != ("MULTIRUN", "ddp_cpu", "popen"):
                    refuse_relaunch_in_multirun(trainer)  # single runs and single-process sweeps are fine
                    continue
                with pytest.raises(ValueError, match=r"Hydra multirun \(-m\) with trainer.strategy=DDPStrategy on 2 devices"
                                                     r".*start_method=spawn.*hydra/launcher=submitit_slurm"):
                    refuse_relaunch_in_multirun(trainer)
    finally:
        GlobalHydra.instance().clear()


def test_multirun_with_ddp_spawn_runs_each_job_once_in_its_own_directory(tmp_path):
    """-m over 2 schedules x 2 spawned ranks: 2 job directories, each trained once to the same step."""
    sweep = tmp_path / "sweep"
    cli("difflab.cli.train", "-m", "trainer=ddp_cpu", "trainer.strategy.start_method=spawn", "logger=csv",
        "data.batch_size=16", "model.ch=8", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[]",
        "schedule.T=50", "schedule=linear,cosine", "trainer.max_steps=3", "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
        "callbacks.sample_grid.num_samples=3", "callbacks.sample_grid.samplers.ddim.steps=3",
        "callbacks.sample_grid.samplers.ddpm=null", "callbacks.evaluation=null", f"hydra.sweep.dir={sweep}",
        cwd=tmp_path, timeout=400)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"]  # no rank re-ran the sweep: no extra job directories
    schedules = set()
    for job in jobs:
        status = json.loads((job / "status.json").read_text())
        assert status["status"] == "finished" and status["global_step"] == 3, status
        assert load(job / "checkpoints" / "last.ckpt")["global_step"] == 3
        schedules.add(load(job / "checkpoints" / "last.ckpt")["difflab"]["config"]["schedule"]["_target_"])
        assert [p.name for p in (job / "samples").glob("*.png")] == ["ddim_step0000003.png"]
    assert len(schedules) == 2  # each job trained its own configuration


def compose_train(overrides: list[str]):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose("train", overrides=["paths.output_dir=/nonexistent", "logger=csv",
                                               "callbacks.evaluation=null", *overrides])
    finally:
        GlobalHydra.instance().clear()


def test_per_device_batch_is_the_global_batch_over_world_size():
    assert per_device_batch_size(64, 1) == 64 and per_device_batch_size(64, 4) == 16
    with pytest.raises(ValueError, match=r"data.batch_size=30 is the global batch, split over 4 processes.*e.g. 28 or 32"):
        per_device_batch_size(30, 4)


@pytest.mark.parametrize("overrides, message", [
    (["trainer.strategy=ddp_typo"], "You selected an invalid strategy name: `strategy='ddp_typo'`"),
    (["trainer=gpu"], "trainer.accelerator=gpu (devices=1) but no CUDA GPU is visible here"),
    (["trainer=ddp", "trainer.devices=4"], "trainer.accelerator=gpu (devices=4) but no CUDA GPU is visible here"),
])
def test_impossible_trainer_settings_fail_when_the_trainer_is_built(overrides, message):
    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    with pytest.raises(Exception) as err:
        build_trainer(compose_train(overrides))
    assert message in str(err.value) or message in str(err.value.__cause__)


def test_ddp_with_more_processes_than_cores_is_allowed_on_cpu():
    trainer = build_trainer(compose_train(["trainer=ddp_cpu", "trainer.devices=4"]))
    assert trainer.num_devices == 4 and trainer.world_size == 4


def test_unknown_config_key_names_it():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=r"Could not override 'modle.ch'") as err:
        compose_train(["modle.ch=8"])
    assert "Key 'modle' is not in struct" in str(err.value.__cause__)  # the CLI prints both (see test_cli)
