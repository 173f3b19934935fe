"""The one checkpoint reader (safe: tensors and plain containers only) and writing that never leaves a
half-written file in place of a good one.

`read_checkpoint` reads a file once; `load_run` rebuilds a training run's module from the config the
checkpoint carries (difflab-sample, difflab-eval, notebooks); `load_classifier` rebuilds a feature or
noise-aware classifier (metrics, classifier guidance); resume goes through `AtomicCheckpointIO`,
which reads with the same `safe_load`.
"""

from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from difflab.lit.from_config import (autoencoder_from_config, build_module, checked_stored_config,
                                     classifier_net_from_config, clip_net_from_config)
from difflab.lit.resume import check_state_dict_fits
from difflab.nets.text import FrozenTextEncoder


# Globals a difflab checkpoint may hold beyond tensors and plain containers. Nothing so far:
# configs are stored as plain containers, RNG states as tensors and tuples (difflab.lit.resume).
SAFE_GLOBALS: list[Any] = []


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds pickled Python objects that loading would have to execute."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file is truncated or not a torch checkpoint at all."""


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """torch.load(weights_only=True): tensors and plain containers only, never pickled code;
    a truncated or foreign file is refused by name (CorruptCheckpointError) and left as it is."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError) as err:  # zip reader: "failed finding central directory", short reads
        size = Path(path).stat().st_size if Path(path).is_file() else 0
        raise CorruptCheckpointError(
            f"checkpoint {str(path)!r} ({size} bytes) is truncated or not a torch checkpoint: "
            f"{str(err).splitlines()[0]}. difflab writes checkpoints atomically, so a file cut short comes "
            "from elsewhere (a copy or download); use another checkpoint, e.g. a best-*.ckpt of the same run"
        ) from err
    except pickle.UnpicklingError as err:
        reason = str(err).split("\n\n")[-1].strip().splitlines()
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint {str(path)!r}: it holds pickled Python objects (not just tensors "
            f"and plain containers) whose loading would execute code [{'; '.join(reason[:2])}]. difflab "
            "checkpoints never contain such objects; only load files you trust through other means."
        ) from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a hidden temporary file in the same directory, then os.replace it over the target;
    load with weights_only=True (the resume path never executes pickled code).

    Lightning's own save truncates the target before writing, so a kill during a save of
    last.ckpt can destroy the previous good checkpoint; a rename within a directory is atomic.
    """

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Callable | Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if "://" in str(path):  # remote filesystems: Lightning's loader, still weights_only
            return super().load_checkpoint(path, map_location, weights_only=True)
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return safe_load(path, map_location)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        target = Path(path)
        if "://" in str(path):  # remote filesystems: keep Lightning's behaviour
            return super().save_checkpoint(checkpoint, path, storage_options)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{TMP_PREFIX}{target.name}.tmp-{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            with tmp.open("rb") as f:  # on disk before the rename: a node crash leaves the old file or the new
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


TMP_PREFIX = "."  # AtomicCheckpointIO's temporary files: .<name>.tmp-<pid>, never a resume candidate


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of saves whose process is gone (a SIGKILL during a save leaves one)."""
    removed = []
    for tmp in Path(directory).glob(f"{TMP_PREFIX}*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def resume_candidates(run_dir: str | os.PathLike) -> list[Path]:
    """Every checkpoint a run directory holds: checkpoints/*.ckpt (last, periodic step-*, best-*) and the
    hpc_ckpt_*.ckpt a SLURM preemption leaves in the run directory itself."""
    run_dir = Path(run_dir)
    files = [*(run_dir / "checkpoints").glob("*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    return sorted(f for f in files if f.is_file() and not f.name.startswith(TMP_PREFIX))


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step a checkpoint was taken at, read without loading its tensors (memory-mapped)."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))


def check_resume_fits(path: str | os.PathLike, *, kind: str, latent: bool) -> None:
    """Refuse to resume a run of `kind` (pixel or latent) from a checkpoint of another kind, naming both, before
    any work (read memory-mapped, without loading its tensors)."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            contents = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError):
        return  # not loadable: the resume itself refuses it by name (safe_load)
    meta = contents.get("difflab") or {} if isinstance(contents, dict) else {}
    found = meta.get("kind", "diffusion")
    if found != kind:
        raise ValueError(f"ckpt_path={str(path)!r} is a difflab checkpoint of kind {found!r}, but this run trains a "
                         f"{kind!r} model; resume a {kind} run from its own checkpoints"
                         + ("; to train on an autoencoder's latents, give it as first_stage=ckpt "
                            "first_stage.ckpt_path=<it>" if found == "autoencoder" else ""))
    stored_latent = bool((meta.get("config") or {}).get("first_stage"))
    if kind == "diffusion" and stored_latent != latent:
        where = {True: "latent diffusion (it has a first stage)", False: "pixel-space (first_stage=null)"}
        raise ValueError(f"ckpt_path={str(path)!r} is a {where[stored_latent]} run, but this run is "
                         f"{where[latent]}; resume with the first_stage setting the run was trained with")


def newest_checkpoint(run_dir: str | os.PathLike) -> tuple[Path, int] | None:
    """(path, global step) of the run directory's checkpoint with the highest global step, the most
    recently written among equals; None when it holds none. What `ckpt_path=last` resumes from."""
    best: tuple[int, float, Path] | None = None
    for path in resume_candidates(run_dir):
        try:
            step = checkpoint_step(path)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as err:  # not written by difflab's atomic save
            warnings.warn(f"ignoring {path} as a resume candidate: it does not load ({str(err).splitlines()[0]})",
                          stacklevel=2)
            continue
        key = (step, path.stat().st_mtime, path)
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else (best[2], best[0])


# what difflab.kind says in a checkpoint; training runs written before kinds existed have none
RUN_KINDS = ("diffusion", "classifier", "noisy_classifier", "autoencoder", "clip")


@dataclass(frozen=True)
class Checkpoint:
    """A difflab checkpoint read once: the file's contents and what callers ask of them."""

    path: Path
    contents: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        """The resolved Hydra config of the run that wrote it."""
        return self.contents["difflab"]["config"]

    @property
    def kind(self) -> str:
        """'diffusion' (a difflab-train run: DDPM or score model), 'autoencoder' (a first stage trained by
        difflab-train module=autoencoder), 'classifier' or 'noisy_classifier'."""
        return self.contents["difflab"].get("kind", "diffusion")

    @property
    def family(self) -> str:
        """The model family: 'ddpm' (also for checkpoints written before families existed), 'ncsn', 'vp', 'subvp', 've'."""
        return self.contents["difflab"].get("family", "ddpm")

    @property
    def state_dict(self) -> dict[str, Any]:
        return self.contents["state_dict"]

    @property
    def global_step(self) -> int:
        return int(self.contents.get("global_step", 0))

    def require_kind(self, kind: str, *, hint: str = "") -> None:
        """Raise unless this checkpoint is of `kind`, naming what it is instead."""
        if self.kind != kind:
            raise ValueError(f"{str(self.path)!r} is a difflab checkpoint of kind {self.kind!r}, not {kind!r}{hint}")


def read_checkpoint(path: str | os.PathLike, *, name: str = "ckpt_path", missing_hint: str = "") -> Checkpoint:
    """Read a difflab checkpoint once, safely (weights_only: no pickled code runs); refuse non-difflab files."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{name}={str(path)!r} does not exist or is not a file{missing_hint}")
    try:
        contents = safe_load(path, map_location="cpu")
    except (UnsafeCheckpointError, CorruptCheckpointError):
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with the path and the reason
        raise ValueError(f"{name}={str(path)!r} is not a readable difflab checkpoint: {err}") from err
    if not isinstance(contents, dict) or not (contents.get("difflab") or {}).get("config"):
        raise ValueError(f"{name}={str(path)!r} holds no difflab run config; was it written by difflab-train?")
    return Checkpoint(path=path, contents=contents)


@dataclass(frozen=True)
class LoadedRun:
    """A training run's module rebuilt from its checkpoint, in eval mode, with what callers need besides."""

    module: Any  # DiffusionModule | ScoreModule
    checkpoint: Checkpoint
    config: dict[str, Any]  # the run's config, moved _target_ names updated and checked (from_config.py)

    @property
    def family(self) -> str:
        return self.checkpoint.family


def load_run(path: str | os.PathLike, device: torch.device | str = "cpu", *, name: str = "ckpt_path",
             hint: str = "; difflab-sample and difflab-eval read difflab-train checkpoints") -> LoadedRun:
    """Read a difflab-train checkpoint once, rebuild its module from the stored config and load its weights; a
    checkpoint of another kind is refused with `hint` appended."""
    ckpt = read_checkpoint(path, name=name)
    ckpt.require_kind("diffusion", hint=hint)
    source = f"{name}={str(ckpt.path)!r}"
    config = checked_stored_config(ckpt.config, source=source)
    module = build_module(config, load_clip_text=load_clip_text_encoder)
    check_state_dict_fits(module.state_dict(), ckpt.state_dict, source=source, produced_by=ckpt.config.get("model"))
    module.load_state_dict(ckpt.state_dict)
    return LoadedRun(module=module.to(device).eval(), checkpoint=ckpt, config=config)


CLASSIFIER_KINDS = ("classifier", "noisy_classifier")


def load_classifier(path: str | os.PathLike, *, kind: str = "classifier", T: int | None = None,
                    missing_hint: str = "", name: str = "classifier_ckpt") -> nn.Module:
    """The net of a difflab-train-classifier checkpoint of `kind`, in eval mode; a noise-aware one must match T."""
    if kind not in CLASSIFIER_KINDS:
        raise ValueError(f"kind={kind!r} is not a classifier kind; choose one of {CLASSIFIER_KINDS}")
    ckpt = read_checkpoint(path, name=name, missing_hint=missing_hint)
    ckpt.require_kind(kind, hint=missing_hint.replace("; create it", "; create one"))
    if T is not None:
        trained_T = int((ckpt.config.get("schedule") or {}).get("T", -1))
        if trained_T != T:
            raise ValueError(
                f"{name}={str(ckpt.path)!r} was trained on a schedule with T={trained_T}, the model has T={T}; "
                f"train it with schedule.T={T} (and the model's schedule) for classifier guidance"
            )
    net = classifier_net_from_config(ckpt.config, source=f"{name}={str(ckpt.path)!r}")
    net.load_state_dict({k.removeprefix("net."): v for k, v in ckpt.state_dict.items() if k.startswith("net.")})
    return net.eval()


def load_first_stage(path: str | os.PathLike, *, device: torch.device | str = "cpu",
                     name: str = "first_stage.ckpt_path") -> nn.Module:
    """The AutoencoderKL of a difflab-train module=autoencoder checkpoint, frozen (requires_grad False) in eval
    mode; `stored_config` holds its first_stage_model config (what rebuilds it)."""
    ckpt = read_checkpoint(path, name=name)
    ckpt.require_kind("autoencoder", hint="; a first stage is trained with difflab-train experiment=digits_autoencoder "
                      "(or module=autoencoder)")
    source = f"{name}={str(ckpt.path)!r}"
    net_cfg = checked_stored_config(ckpt.config, ("first_stage_model",), source=source).get("first_stage_model")
    net = autoencoder_from_config(net_cfg or {}, source=source)
    weights = {k.removeprefix("net."): v for k, v in ckpt.state_dict.items() if k.startswith("net.")}
    check_state_dict_fits(net.state_dict(), weights, source=source, produced_by=net_cfg)
    net.load_state_dict(weights)
    net.stored_config = dict(net_cfg)
    return net.to(device).eval().requires_grad_(False)


CLIP_HINT = "; a mini_clip is trained with difflab-train experiment=digits_clip (or fashion_clip)"


def load_clip(path: str | os.PathLike, *, device: torch.device | str = "cpu", name: str = "clip_ckpt_path") -> nn.Module:
    """The MiniCLIP of a difflab-train module=mini_clip checkpoint, frozen (requires_grad False) in eval mode;
    `stored_config` holds what it was trained on (data_name, data image_size / channels, schedule)."""
    ckpt = read_checkpoint(path, name=name, missing_hint=CLIP_HINT)
    ckpt.require_kind("clip", hint=CLIP_HINT)
    source = f"{name}={str(ckpt.path)!r}"
    config = checked_stored_config(ckpt.config, ("clip_model", "schedule"), source=source)
    net = clip_net_from_config(config, source=source)
    weights = {k.removeprefix("net."): v for k, v in ckpt.state_dict.items() if k.startswith("net.")}
    check_state_dict_fits(net.state_dict(), weights, source=source, produced_by=config.get("clip_model"))
    net.load_state_dict(weights)
    data = config.get("data") or {}
    net.stored_config = {"path": str(ckpt.path), "data_name": config.get("data_name"), "schedule": config.get("schedule"),
                         "image_size": data.get("image_size"), "channels": data.get("channels"),
                         "global_step": ckpt.global_step,
                         "text_tower": dict((config.get("clip_model") or {}).get("text_encoder") or {})}
    return net.to(device).eval().requires_grad_(False)


def load_clip_text_encoder(path: str | os.PathLike, *, name: str = "text_encoder.ckpt_path") -> nn.Module:
    """mini_clip's text tower as a frozen text encoder of a text-to-image model (nets/text.py FrozenTextEncoder);
    `stored_config` is the text_encoder config a run stores: the tower's architecture and where it came from."""
    clip = load_clip(path, name=name)
    encoder = FrozenTextEncoder(tower=clip.text_encoder, ckpt_path=clip.stored_config["path"])
    encoder.stored_config = {"_target_": "difflab.nets.text.FrozenTextEncoder", "ckpt_path": encoder.ckpt_path,
                             "tower": clip.stored_config["text_tower"]}
    return encoder
