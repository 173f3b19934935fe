"""Loggers continue a resumed run (difflab.lit.loggers): CSV rows, TensorBoard events, one W&B run id."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from pytorch_lightning.loggers import CSVLogger as LightningCSVLogger

from difflab.lit.loggers import CSVLogger, TensorBoardLogger, WandbLogger, continue_loggers


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


def log_csv(logger: CSVLogger, steps: range, offset: float, *, lr: bool = False) -> None:
    for s in steps:
        logger.log_metrics({"train/loss": offset + s, **({"lr-AdamW": 0.1 * s} if lr else {})}, step=s)
        if s % 5 == 4:  # a validation row every 5 steps, with its own step
            logger.log_metrics({"val/loss": offset + s + 0.5}, step=s)


def test_csv_resume_keeps_rows_before_the_checkpoint_step(tmp_path):
    first = CSVLogger(save_dir=tmp_path, name="csv", version="")
    continue_loggers([first], None)
    log_csv(first, range(10), 0.0)
    first.save()
    path = tmp_path / "csv" / "metrics.csv"

    second = CSVLogger(save_dir=tmp_path, name="csv", version="")
    continue_loggers([second], 6)  # resumed from a checkpoint with global_step == 6
    log_csv(second, range(6, 8), 100.0, lr=True)  # a new column appears after the resume
    second.save()  # what the CLI calls when a checkpoint is written: rows reach the disk
    assert [int(r["step"]) for r in read_rows(path)[1] if r["train/loss"]] == list(range(8))
    log_csv(second, range(8, 10), 100.0, lr=True)
    second.finalize("success")

    header, rows = read_rows(path)
    assert header == ["lr-AdamW", "step", "train/loss", "val/loss"]
    train = {int(r["step"]): float(r["train/loss"]) for r in rows if r["train/loss"]}
    val = {int(r["step"]): float(r["val/loss"]) for r in rows if r["val/loss"]}
    assert sorted(train) == list(range(10)) and len(train) == sum(1 for r in rows if r["train/loss"])
    assert train == {s: (0.0 if s < 6 else 100.0) + s for s in range(10)}
    assert val == {4: 4.5, 9: 109.5}  # the interrupted run's step-9 validation row is gone
    assert all(r["lr-AdamW"] == "" for r in rows if int(r["step"]) < 6)


def test_csv_resume_drops_a_row_cut_short_by_a_kill(tmp_path):
    first = CSVLogger(save_dir=tmp_path, name="csv", version="")
    log_csv(first, range(3), 0.0)
    first.save()
    path = tmp_path / "csv" / "metrics.csv"
    with path.open("a") as file:
        file.write("1,0.2")  # step 1 of a row whose write was killed halfway
    second = CSVLogger(save_dir=tmp_path, name="csv", version="")
    second.continue_from(5)
    log_csv(second, range(5, 6), 100.0)
    second.save()
    assert [r["step"] for r in read_rows(path)[1]] == ["0", "1", "2", "5"]


def test_csv_fresh_run_starts_a_new_file_and_plain_loggers_are_left_alone(tmp_path):
    first = CSVLogger(save_dir=tmp_path, name="csv", version="")
    log_csv(first, range(10), 0.0)
    first.save()
    fresh, plain = CSVLogger(save_dir=tmp_path, name="csv", version=""), LightningCSVLogger(tmp_path / "plain")
    continue_loggers([fresh, plain], None)
    fresh.log_metrics({"train/loss": 7.0}, step=0)
    fresh.save()
    assert read_rows(tmp_path / "csv" / "metrics.csv")[1] == [{"step": "0", "train/loss": "7.0"}]
    with pytest.raises(RuntimeError, match="before anything is logged"):
        fresh.continue_from(3)
    with pytest.raises(ValueError, match="got -1"):
        CSVLogger(save_dir=tmp_path).continue_from(-1)


def test_tensorboard_resume_purges_later_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for resume, steps, offset in ((None, range(10), 0.0), (6, range(6, 10), 100.0)):
        logger = TensorBoardLogger(save_dir=tmp_path, name="tensorboard", version="", default_hp_metric=False)
        continue_loggers([logger], resume)
        for s in steps:
            logger.log_metrics({"train/loss": offset + s}, step=s)
        logger.finalize("success")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == list(range(10))
    assert [e.value for e in scalars] == [(0.0 if s < 6 else 100.0) + s for s in range(10)]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one directory


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
                        "WANDB_CONFIG_DIR": str(tmp_path / "config"), "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                        "WANDB_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(name, value)
    import wandb

    yield wandb
    wandb.finish()


def wandb_run_id(save_dir: Path, step: int | None, wandb) -> str:
    logger = WandbLogger(save_dir=save_dir, project="difflab-test")
    continue_loggers([logger], step)
    run_id = logger.experiment.id
    logger.log_metrics({"train/loss": 1.0}, step=step or 0)
    wandb.finish()
    assert (save_dir / "wandb" / "difflab_run_id").read_text().strip() == run_id == logger.version
    return run_id


def test_wandb_resume_continues_the_stored_run_id(tmp_path, wandb_offline):
    first = wandb_run_id(tmp_path, None, wandb_offline)
    assert wandb_run_id(tmp_path, 6, wandb_offline) == first
    # offline, each segment is its own folder carrying the same id (wandb sync uploads them in order)
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{first}*"))) == 2
    fresh = wandb_run_id(tmp_path, None, wandb_offline)
    assert fresh != first
    assert wandb_run_id(tmp_path / "elsewhere", 6, wandb_offline) not in (first, fresh)  # nothing stored there
