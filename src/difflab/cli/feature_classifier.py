"""The feature classifier of small labelled data sets, trained on first use by difflab-train and difflab-eval.

With `extractor: auto` (or `classifier`) and no `classifier_ckpt`, digits, mnist and fashion_mnist are
scored in the features of a small CNN at `<cache_dir>/classifiers/<data>_<size>px.ckpt`. When that
file is missing it is trained here, by the code path of

    difflab-train-classifier data=<data> data.image_size=<size> out_path=<that file>

(conf/train_classifier.yaml's defaults, about a minute on a CPU), once: later runs read the file.
The nested run writes its logs below `<cache_dir>/classifiers/runs/`, never into the calling run's
directory, and leaves the caller's random state, thread count and environment as they were, so a
run that trained the classifier first trains exactly like one that found it. Under DDP (torchrun,
srun) local rank zero trains it and the other ranks wait for the file.

`DIFFLAB_CLASSIFIER_OVERRIDES` adds difflab-train-classifier overrides to that run (space
separated, e.g. `trainer.max_steps=100`); the tests use it to keep the run short.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from pytorch_lightning.utilities.seed import isolate_rng

from difflab.cli.sampler_specs import compose_config
from difflab.metrics.build import classifier_path, default_classifier_needed, train_classifier_command

log = logging.getLogger("difflab")

OVERRIDES_ENV = "DIFFLAB_CLASSIFIER_OVERRIDES"
WAIT_SECONDS = 3600.0  # how long ranks other than local rank zero wait for the file
# what makes Lightning see a multi-process job: hidden from the nested single-process run
_DISTRIBUTED_ENV = re.compile(
    r"^(RANK|LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|GROUP_RANK|GROUP_WORLD_SIZE|ROLE_\w+|NODE_RANK|MASTER_ADDR|"
    r"MASTER_PORT|TORCHELASTIC_\w+|SLURM_\w+|OMPI_\w+|PMI_\w+|PMIX_\w+|LSB_\w+|JSM_\w+)$"
)


def local_rank() -> int:
    """This process's rank on its machine under torchrun / Lightning (LOCAL_RANK) or srun (SLURM_LOCALID); else 0."""
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = os.environ.get(var, "")
        if value.strip():
            return int(value)
    return 0


def env_overrides() -> list[str]:
    """Extra difflab-train-classifier overrides from $DIFFLAB_CLASSIFIER_OVERRIDES."""
    return shlex.split(os.environ.get(OVERRIDES_ENV, ""))


def ensure_feature_classifier(
    *,
    extractor: str,
    dataset: str,
    image_size: int,
    cache_dir: str | Path,
    classifier_ckpt: str | None = None,
    data_dir: str | Path | None = None,
    before_training: Callable[[], None] | None = None,
    overrides: Sequence[str] | None = None,
    timeout: float = WAIT_SECONDS,
    poll_seconds: float = 2.0,
) -> Path | None:
    """The default classifier file when the metrics need it (None when they do not), trained first if missing.

    `before_training` runs first on the process that will train (the callers check the rest of their
    config there, so a bad override reports itself before a minute of classifier training).
    """
    if not default_classifier_needed(extractor, dataset, classifier_ckpt):
        return None
    path = classifier_path(cache_dir, dataset, image_size)
    if path.is_file():
        return path
    command = train_classifier_command(dataset, image_size, path)
    if local_rank() != 0:
        return wait_for(path, command=command, timeout=timeout, poll_seconds=poll_seconds)
    if before_training is not None:
        before_training()
    log.info("the feature classifier %s does not exist yet: training it now, a one-time cost of about a minute "
             "on a CPU (the same as `%s`); later runs reuse it", path, command)
    train_feature_classifier(dataset, image_size, path, data_dir=data_dir,
                             overrides=env_overrides() if overrides is None else overrides)
    return path


def callback_metrics_configs(cfg: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """{callback name: its `metrics` config} for a run's callbacks whose metrics name a data set's features
    (dataset, image_size, cache_dir): the evaluation callback's and the autoencoder's rFID callback's."""
    found = {}
    for name, entry in (cfg.get("callbacks") or {}).items():
        metrics = entry.get("metrics") if isinstance(entry, Mapping) else None
        if isinstance(metrics, Mapping) and all(k in metrics for k in ("dataset", "image_size", "cache_dir")):
            found[name] = metrics
    return found


def ensure_callback_classifiers(cfg: Mapping[str, Any], *, before_training: Callable[[], None] | None = None) -> None:
    """Before a run's Trainer is built: the default classifier of every callback whose metrics need it, trained
    here when missing (`before_training` runs first, once, on the process that trains)."""
    for metrics in callback_metrics_configs(cfg).values():
        kind, ckpt = metrics.get("extractor", "auto"), metrics.get("classifier_ckpt")
        dataset, size, cache_dir = metrics["dataset"], metrics["image_size"], metrics["cache_dir"]
        if not default_classifier_needed(kind, dataset, ckpt) or classifier_path(cache_dir, dataset, size).is_file():
            continue  # the common case: paths.data_dir (which needs Hydra's runtime) is not even read
        ensure_feature_classifier(extractor=kind, dataset=dataset, image_size=size, cache_dir=cache_dir,
                                  classifier_ckpt=ckpt, data_dir=(cfg.get("paths") or {}).get("data_dir"),
                                  before_training=before_training)
        before_training = None


def wait_for(path: Path, *, command: str, timeout: float, poll_seconds: float = 2.0) -> Path:
    """Wait until local rank zero has written `path`."""
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"waited {timeout:.0f} s for the feature classifier {path}, which local rank 0 trains on first use; "
                f"if that failed, its log says why. Create it before starting the job with: {command}"
            )
        time.sleep(poll_seconds)
    return path


def train_feature_classifier(dataset: str, image_size: int, path: Path, *, data_dir: str | Path | None = None,
                             overrides: Sequence[str] = ()) -> dict[str, float | str]:
    """`difflab-train-classifier data=<dataset> data.image_size=<size> out_path=<path>` in this process."""
    from difflab.cli.train_classifier import train_classifier

    cfg = compose_config("train_classifier", [f"data={dataset}", f"data.image_size={image_size}", *overrides])
    cfg.out_path = str(Path(path).expanduser().resolve())
    cfg.data_name = dataset
    cfg.paths.output_dir = str(Path(path).parent / "runs" / f"{Path(path).stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    cfg.paths.cache_dir = str(Path(path).parent.parent)
    # conf/paths' default, also outside a Hydra app (whose ${hydra:runtime.cwd} the default reads)
    cfg.paths.data_dir = str(data_dir if data_dir is not None else os.environ.get("DIFFLAB_DATA_DIR", Path.cwd() / "data"))
    with isolated_process_state():
        return train_classifier(cfg)


@contextmanager
def isolated_process_state() -> Iterator[None]:
    """Run a nested training as if alone: a single process (distributed variables hidden), and the caller's
    random states, torch thread count, environment and Lightning rank restored afterwards."""
    from pytorch_lightning.utilities import rank_zero_only

    environ, threads, rank = dict(os.environ), torch.get_num_threads(), getattr(rank_zero_only, "rank", None)
    for key in [k for k in os.environ if _DISTRIBUTED_ENV.match(k)]:
        del os.environ[key]
    try:
        with isolate_rng(include_cuda=torch.cuda.is_available()):
            yield
    finally:
        for key in [k for k in os.environ if k not in environ]:
            del os.environ[key]
        os.environ.update({k: v for k, v in environ.items() if os.environ.get(k) != v})
        torch.set_num_threads(threads)
        if rank is not None:
            rank_zero_only.rank = rank
