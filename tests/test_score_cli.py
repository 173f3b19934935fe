"""Score models through the real CLI: digits_vpsde / digits_ncsn train, remember their family, sample by default."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_cli import run

pytestmark = pytest.mark.slow

TINY = [
    "logger=csv", "data.batch_size=16", "model.ch=8", "model.num_res_blocks=1", "model.attn_resolutions=[]",
    "trainer.max_steps=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
    "callbacks.sample_grid.num_samples=2", "callbacks.evaluation=null",
]
EXTRA = {
    "digits_vpsde": ["score_samplers.pc.steps=2", "score_samplers.pc.predictor=euler_maruyama",
                     "score_samplers.dpmpp.steps=2", "sampler.steps=2"],  # reverse diffusion on vp needs > 20 steps
    "digits_ncsn": ["sde.levels=3", "sampler.n_steps_each=2", "score_samplers.dpmpp.steps=2"],
}


@pytest.fixture(scope="module", params=sorted(EXTRA))
def trained(request, tmp_path_factory) -> tuple[str, Path]:
    run_dir = tmp_path_factory.mktemp(request.param)
    run("difflab.cli.train", f"experiment={request.param}", *TINY, *EXTRA[request.param], f"hydra.run.dir={run_dir}",
        cwd=run_dir)
    return request.param, run_dir


def test_checkpoint_remembers_family_and_grids_use_its_samplers(trained):
    name, run_dir = trained
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["difflab"]["family"] == {"digits_vpsde": "vp", "digits_ncsn": "ncsn"}[name]
    grids = sorted(p.name.split("_step")[0] for p in (run_dir / "samples").iterdir())
    assert grids == (["dpmpp", "pc"] if name == "digits_vpsde" else ["ald", "dpmpp"])


def test_sample_without_a_sampler_uses_the_runs_sampler(trained, tmp_path):
    name, run_dir = trained
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    # the experiment's sampler (ALD 2 steps per level / DPM-Solver++ 2 steps here), not the global default
    stem = {"digits_ncsn": "ald-2xL", "digits_vpsde": "dpmpp-2"}[name]
    run("difflab.cli.sample", f"ckpt_path={ckpt}", "num_samples=2", f"out_dir={tmp_path}", cwd=tmp_path)
    assert [p.name for p in tmp_path.glob("*.npz")] == [f"{stem}_n2_seed0.npz"]
    if name == "digits_ncsn":  # an option the run's sampler does not have is refused by name
        proc = run("difflab.cli.sample", f"ckpt_path={ckpt}", "sampler.steps=3", cwd=tmp_path, check=False)
        assert proc.returncode != 0 and "'steps' is not an option of the run's configured sampler" in proc.stderr


def test_fast_solvers_sample_score_models_and_ddim_is_refused(trained, tmp_path):
    _, run_dir = trained
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    run("difflab.cli.sample", f"ckpt_path={ckpt}", "sampler=heun", "sampler.steps=2", "num_samples=2",
        f"out_dir={tmp_path}", cwd=tmp_path)
    proc = run("difflab.cli.sample", f"ckpt_path={ckpt}", "sampler=ddim", "sampler.steps=2", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "needs a discrete-time DDPM model" in proc.stderr
