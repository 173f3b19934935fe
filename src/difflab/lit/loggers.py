"""Lightning's CSV, TensorBoard and W&B loggers, made to continue a resumed run instead of restarting it.

The CLI calls `continue_loggers(trainer.loggers, step)` once, before anything is logged, with the global step
of the checkpoint being resumed (None for a fresh run). Training after a resume from step k logs steps
k, k+1, ... again, so whatever the interrupted process logged at steps >= k is dropped or hidden:

- CSV: rows with step < k are kept (rewritten atomically), new rows are appended after them;
- TensorBoard: the SummaryWriter gets `purge_step=k`, which hides earlier events at steps >= k;
- W&B: the run id stored in `<save_dir>/wandb/difflab_run_id` is reused with `resume="allow"`.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

from lightning_fabric.utilities.rank_zero import rank_zero_only
from pytorch_lightning.loggers import CSVLogger as _LightningCSVLogger
from pytorch_lightning.loggers import Logger
from pytorch_lightning.loggers import TensorBoardLogger as _LightningTensorBoardLogger
from pytorch_lightning.loggers import WandbLogger as _LightningWandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

RUN_ID_FILE = "difflab_run_id"  # in <save_dir>/wandb/, next to wandb's own files


def continue_loggers(loggers: Iterable[Logger], step: int | None) -> None:
    """Call `continue_from(step)` on every logger that has it (Lightning's own loggers are left alone)."""
    for logger in loggers:
        continue_from = getattr(logger, "continue_from", None)
        if callable(continue_from):
            continue_from(step)


def _check_step(step: int | None, logger: Logger) -> None:
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ValueError(f"{type(logger).__name__}.continue_from: step must be None or an int >= 0, got {step!r}")
    if getattr(logger, "_experiment", None) is not None:
        raise RuntimeError(f"{type(logger).__name__}.continue_from must be called before anything is logged")


def _latest_version(logger: _LightningCSVLogger | _LightningTensorBoardLogger) -> None:
    """With automatic versions (version=None) a resumed run continues the newest version_N, not a new one."""
    if logger._version is None:
        logger._version = max(logger._get_next_version() - 1, 0)


def _replace_file(path: Path, write: Callable[[TextIO], None]) -> None:
    """Write through `write` into a temporary file in path's directory, fsync, then os.replace: all or nothing."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _is_local(fs: Any) -> bool:
    return "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol))


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer that keeps the rows before `keep_before` instead of deleting metrics.csv,
    and rewrites the file atomically when new columns appear."""

    def __init__(self, log_dir: str, *, keep_before: int) -> None:
        self._keep_before = keep_before
        super().__init__(log_dir)  # calls _check_log_dir_exists, which keeps the old rows here

    def _check_log_dir_exists(self) -> None:
        if not _is_local(self._fs):
            raise ValueError(f"continuing a CSV log needs a local directory, got {self.log_dir!r}")
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        text = path.read_text()
        if not text.endswith("\n"):  # a row cut short by a kill while writing
            text = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames:
            path.unlink()
            return
        rows = [r for r in reader if _step_of(r) is not None and _step_of(r) < self._keep_before]
        self.metrics_keys = list(reader.fieldnames)
        _replace_file(path, lambda f: _write_rows(f, self.metrics_keys, rows))

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        if not _is_local(self._fs):
            return super()._rewrite_with_new_header(fieldnames)
        path = Path(self.metrics_file_path)
        with path.open(newline="") as file:
            rows = list(csv.DictReader(file))
        _replace_file(path, lambda f: _write_rows(f, fieldnames, rows))


def _step_of(row: dict[str, str | None]) -> int | None:
    """A row's step, or None for a row that is cut short or has no readable step."""
    if None in row.values() or None in row:
        return None
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


def _write_rows(file: TextIO, fieldnames: list[str], rows: list[dict[str, Any]]) -> None:
    writer = csv.DictWriter(file, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger whose metrics.csv survives a resume: rows before the resumed step are kept."""

    _continue_step: int | None = None

    def continue_from(self, step: int | None) -> None:
        """Keep the rows of metrics.csv with step < `step` and append after them; None: a fresh file."""
        _check_step(step, self)
        self._continue_step = step
        if step is not None:
            _latest_version(self)

    @property
    def experiment(self) -> ExperimentWriter:
        """Lightning's writer, or on a resumed run one that continues the existing metrics.csv."""
        if self._experiment is None and self._continue_step is not None and rank_zero_only.rank == 0:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, keep_before=self._continue_step)
        return super().experiment


class TensorBoardLogger(_LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger that hides, on resume, the events the interrupted run wrote at later steps."""

    def continue_from(self, step: int | None) -> None:
        """Open the SummaryWriter with purge_step=`step` in the same directory; None: a fresh run, and a
        directory that already holds events gets purge_step=0 (its old events are hidden)."""
        _check_step(step, self)
        _latest_version(self)
        if step is None and any(Path(self.log_dir).glob("events.out.tfevents.*")):
            step = 0
        if step is not None:
            self._kwargs["purge_step"] = step


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger that keeps one W&B run id per run directory, so a resumed job continues it."""

    @property
    def run_id_file(self) -> Path:
        """Where the run id is stored: <save_dir>/wandb/difflab_run_id."""
        return Path(self.save_dir or ".") / "wandb" / RUN_ID_FILE

    def continue_from(self, step: int | None) -> None:
        """Resume the stored run id (resume="allow") when `step` is not None, else start and store a new id;
        an id given to the constructor is always used."""
        _check_step(step, self)
        run_id = self._id or (self._stored_id() if step is not None else None) or _new_run_id()
        self._id = self._wandb_init["id"] = run_id
        self._wandb_init["resume"] = "allow"
        self._store_id(run_id)

    def _stored_id(self) -> str | None:
        path = self.run_id_file
        return (path.read_text().strip() or None) if path.is_file() else None

    @rank_zero_only
    def _store_id(self, run_id: str) -> None:
        self.run_id_file.parent.mkdir(parents=True, exist_ok=True)
        _replace_file(self.run_id_file, lambda f: f.write(run_id + "\n"))


def _new_run_id() -> str:
    from wandb.sdk.lib.runid import generate_id  # what wandb.init uses (wandb.util.generate_id is gone in 0.31)

    return generate_id()
