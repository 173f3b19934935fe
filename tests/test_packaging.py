"""difflab installs like a framework: the wheel carries its configs (pkg://difflab.conf), runs from any
directory, keeps its cache in the user's cache directory, and composes with a user's own config folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from difflab.cli.config import PACKAGE_CONFIG, config_dir, config_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clear_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def write_own_configs(root: Path) -> Path:
    """A user's config folder laid out like ours: a model extending our default and an experiment using it."""
    (root / "model").mkdir(parents=True)
    (root / "experiment").mkdir()
    (root / "model" / "tiny.yaml").write_text("defaults:\n  - default\nch: 8\nnum_res_blocks: 1\n")
    (root / "experiment" / "my_exp.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - override /model: tiny\n  - override /schedule: cosine\n"
        "schedule:\n  T: 50\n"
        "data:\n  batch_size: 16\n"
        "trainer:\n  max_steps: 2\n"
        "callbacks:\n  sample_grid:\n    num_samples: 4\n"
    )
    return root


def test_config_tree_is_the_package_and_the_repository_conf():
    assert config_path() == PACKAGE_CONFIG == "pkg://difflab.conf"
    assert Path(config_dir()) == ROOT / "conf"  # editable install: src/difflab/conf links to conf/
    assert (ROOT / "src" / "difflab" / "conf" / "train.yaml").is_file()


def test_config_dir_override(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CONFIG_DIR", str(tmp_path))  # no train.yaml there: ours
    assert Path(config_dir()) == ROOT / "conf"
    (tmp_path / "train.yaml").write_text("seed: 0\n")
    assert config_dir() == str(tmp_path.resolve()) == config_path()


def test_own_config_folder_composes_with_ours(tmp_path):
    mine = write_own_configs(tmp_path / "my_configs")
    with initialize_config_module(config_module="difflab.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra.searchpath=[file://{mine}]", "experiment=my_exp", "seed=3"])
    assert cfg.model.ch == 8 and cfg.model.num_res_blocks == 1 and list(cfg.model.ch_mult) == [1, 2, 2]
    assert cfg.schedule.T == 50 and "cosine" in cfg.schedule._target_
    assert cfg.trainer.max_steps == 2 and cfg.data.batch_size == 16 and cfg.seed == 3


def test_cache_dir_follows_the_user_cache(tmp_path, monkeypatch):
    with initialize_config_module(config_module="difflab.conf", version_base="1.3"):
        cfg = compose("train")
    monkeypatch.setenv("DIFFLAB_CACHE_DIR", str(tmp_path / "mine"))
    assert cfg.paths.cache_dir == str(tmp_path / "mine")
    monkeypatch.delenv("DIFFLAB_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cfg.paths.cache_dir == str(tmp_path / "xdg" / "difflab")
    assert cfg.callbacks.evaluation.cache_dir == str(tmp_path / "xdg" / "difflab" / "reference")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/xdg")  # the XDG spec says to ignore relative paths
    assert cfg.paths.cache_dir == str(Path.home() / ".cache" / "difflab")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cfg.paths.cache_dir == str(Path.home() / ".cache" / "difflab")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_built_wheel_trains_from_an_empty_directory(tmp_path):
    """pip wheel + pip install --target; difflab-train then runs on the wheel's code and configs alone,
    from an empty directory, with a user's config folder on the search path."""
    # a clean copy of the project: a stale build/ of the checkout cannot leak into the wheel
    project = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(ROOT / "src", project / "src", symlinks=True, ignore=ignore)
    shutil.copytree(ROOT / "conf", project / "conf", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, project / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(project), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")],
                   check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("difflab-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, cwd=tmp_path)
    assert (site / "difflab" / "conf" / "train.yaml").is_file() and not (site / "difflab" / "conf").is_symlink()
    assert (site / "difflab" / "conf" / "hydra" / "launcher").is_dir()  # nested groups ship too

    mine = write_own_configs(tmp_path / "my_configs")
    cwd = tmp_path / "empty"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("DIFFLAB_CONFIG_DIR", "PYTHONPATH")}
    env |= {"PYTHONPATH": str(site), "DIFFLAB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    program = (
        "import difflab; from difflab.cli.config import config_dir; "
        "print('FILE', difflab.__file__); print('CONF', config_dir()); "
        "from difflab.cli.train import main; main()"
    )
    out = subprocess.run(
        [sys.executable, "-c", program, "--config-dir", str(mine), "experiment=my_exp", "logger=csv",
         "callbacks.evaluation=null", "hydra.run.dir=run"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=150,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("FILE ", "CONF ")))
    assert Path(lines["FILE"]).resolve().is_relative_to(site.resolve())
    assert Path(lines["CONF"]).resolve() == (site / "difflab" / "conf").resolve()
    run = cwd / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["ddim_step0000002.png", "ddpm_step0000002.png"]
    resolved = (run / ".hydra" / "config.yaml").read_text()
    assert "ch: 8" in resolved and "num_res_blocks: 1" in resolved  # the user's model option was used
    assert sorted(p.name for p in cwd.iterdir()) == ["run"]  # nothing else lands in the working directory
