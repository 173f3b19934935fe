"""Periodic checkpoints' options and the choice of the checkpoint `ckpt_path=last` resumes from."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from difflab.callbacks.checkpoint import PeriodicCheckpoint, parse_interval
from difflab.lit.checkpoint_io import newest_checkpoint, remove_stale_temporaries, resume_candidates


@pytest.mark.parametrize("value, seconds", [("00:30:00", 1800), ("1:00:00:00", 86400), ("90", 90), (45, 45),
                                            (timedelta(minutes=2), 120), (None, None)])
def test_train_time_interval_reads_like_max_time(value, seconds):
    got = parse_interval(value)
    assert (got is None and seconds is None) or got.total_seconds() == seconds


@pytest.mark.parametrize("kwargs, message", [
    ({"train_time_interval": "half an hour"}, r"train_time_interval='half an hour' is not allowed; give 'HH:MM:SS'"),
    ({"train_time_interval": 0}, r"train_time_interval=0 is not allowed; it must be longer than 0 s"),
    ({"every_n_train_steps": -1}, r"every_n_train_steps=-1 is not allowed; an integer >= 0"),
    ({"every_n_train_steps": 10, "train_time_interval": "00:10:00"}, r"are both set; choose one"),
    ({"keep": 0}, r"keep=0 is not allowed; the number of newest periodic checkpoints kept"),
])
def test_periodic_checkpoint_refuses_bad_settings_by_name(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        PeriodicCheckpoint(dirpath=str(tmp_path), **kwargs)


def test_periodic_checkpoint_is_off_by_default_and_keeps_the_newest(tmp_path):
    assert not PeriodicCheckpoint(dirpath=str(tmp_path)).enabled
    cb = PeriodicCheckpoint(dirpath=str(tmp_path), every_n_train_steps=100, keep=3)
    assert cb.enabled and (cb.monitor, cb.mode, cb.save_top_k, cb._every_n_epochs) == ("step", "max", 3, 0)
    assert PeriodicCheckpoint(dirpath=str(tmp_path), train_time_interval="00:30:00")._train_time_interval == timedelta(minutes=30)


def test_newest_checkpoint_is_the_highest_step_of_any_kind(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()

    def save(path: Path, step: int) -> None:
        torch.save({"global_step": step, "state_dict": {"w": torch.zeros(2)}}, path)
        time.sleep(0.01)  # distinct modification times

    assert newest_checkpoint(tmp_path) is None
    save(ckpts / "last.ckpt", 8)
    save(ckpts / "best-0000004.ckpt", 4)
    save(ckpts / "step-0000012.ckpt", 12)
    assert newest_checkpoint(tmp_path) == (ckpts / "step-0000012.ckpt", 12)
    save(tmp_path / "hpc_ckpt_1.ckpt", 13)  # a preemption's checkpoint lives in the run directory
    assert newest_checkpoint(tmp_path) == (tmp_path / "hpc_ckpt_1.ckpt", 13)
    save(ckpts / "last.ckpt", 13)  # equal steps: the one written last
    assert newest_checkpoint(tmp_path) == (ckpts / "last.ckpt", 13)
    # a save killed mid-write leaves a temporary: never a candidate, removed once its process is gone
    (ckpts / f".last.ckpt.tmp-{os.getpid()}").write_bytes(b"partial")
    dead = ckpts / ".step-0000014.ckpt.tmp-999999999"
    dead.write_bytes(b"partial")
    assert all(not p.name.startswith(".") for p in resume_candidates(tmp_path))
    assert remove_stale_temporaries(ckpts) == [dead] and (ckpts / f".last.ckpt.tmp-{os.getpid()}").exists()
    (ckpts / "foreign.ckpt").write_bytes(b"not a checkpoint")  # skipped with a warning naming it
    with pytest.warns(UserWarning, match=r"ignoring .*foreign.ckpt as a resume candidate"):
        assert newest_checkpoint(tmp_path) == (ckpts / "last.ckpt", 13)
