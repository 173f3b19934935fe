"""Saving and loading the feature classifier of difflab-train-classifier (checkpoint kind "classifier")."""

from __future__ import annotations

import re
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate

from difflab.cli.sample import load_checkpoint
from difflab.nets.classifiers import ImageClassifier

CHECKPOINT_KIND = "classifier"
_NET_PREFIX = "difflab.nets."
_DEFAULT_NAME = re.compile(r"^(?P<data>[A-Za-z0-9_]+)_(?P<size>\d+)px\.ckpt$")  # out_path's default file name


def train_command(path: str | Path) -> str:
    """The command that writes a classifier to `path` (data and size read from a default file name)."""
    match = _DEFAULT_NAME.match(Path(path).name)
    data, size = (match["data"], match["size"]) if match else ("digits", "8")
    out_path = Path(path).expanduser().resolve()
    return f"difflab-train-classifier data={data} data.image_size={size} out_path={out_path}"


def save_atomic(trainer: pl.Trainer, path: str | Path) -> Path:
    """trainer.save_checkpoint(path): weights + on_save_checkpoint's config. Atomic through the
    trainer's AtomicCheckpointIO plugin (trainer/default.yaml), which every difflab trainer uses."""
    path = Path(path).expanduser().resolve()
    trainer.save_checkpoint(path, weights_only=True)
    return path


def _load_net(path: str | Path, kind: str):
    """The net of a difflab checkpoint of the given kind, rebuilt from its stored config, in eval mode."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no {kind} checkpoint at {str(path)!r}; create it with: {train_command(path)}")
    ckpt = load_checkpoint(path)
    found = ckpt["difflab"].get("kind")
    if found != kind:
        raise ValueError(f"{str(path)!r} is a difflab checkpoint of kind {found!r}, not {kind!r}")
    net_cfg = (ckpt["difflab"]["config"].get("classifier") or {}).get("net") or {}
    target = str(net_cfg.get("_target_", ""))
    if not target.startswith(_NET_PREFIX):  # the stored config picks what gets called: nets only
        raise ValueError(f"{str(path)!r}: classifier.net._target_={target!r} is not allowed; it must name a class in {_NET_PREFIX}*")
    net = instantiate(net_cfg, _convert_="all")
    net.load_state_dict({k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")})
    return net.eval(), ckpt["difflab"]["config"]


def load_noisy_classifier(path: str | Path, T: int):
    """The noise-aware classifier (x_t, t) -> logits saved by `difflab-train-classifier classifier=noisy_digits`; refuses another T."""
    net, config = _load_net(path, "noisy_classifier")
    trained_T = int((config.get("schedule") or {}).get("T", -1))
    if trained_T != T:
        raise ValueError(
            f"classifier_ckpt={str(path)!r} was trained on a schedule with T={trained_T}, the model has T={T}; "
            f"train it with schedule.T={T} (and the model's schedule) for classifier guidance"
        )
    return net


def load_classifier(path: str | Path) -> ImageClassifier:
    """The classifier saved at `path` by difflab-train-classifier, rebuilt from its stored config, in eval mode.

    Loads with weights_only (no pickled code runs); refuses files that are not difflab classifier
    checkpoints. A missing file raises FileNotFoundError naming the path and the command that
    creates it.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"no classifier checkpoint at {str(path)!r}; create it with: {train_command(path)}"
        )
    ckpt = load_checkpoint(path)
    kind = ckpt["difflab"].get("kind")
    if kind != CHECKPOINT_KIND:
        raise ValueError(
            f"{str(path)!r} is a difflab checkpoint of kind {kind!r} (a diffusion run?), not "
            f"{CHECKPOINT_KIND!r}; create a classifier with: {train_command(path)}"
        )
    net_cfg = (ckpt["difflab"]["config"].get("classifier") or {}).get("net") or {}
    target = str(net_cfg.get("_target_", ""))
    if not target.startswith(_NET_PREFIX):  # the stored config picks what gets called: nets only
        raise ValueError(
            f"{str(path)!r}: classifier.net._target_={target!r} is not allowed; it must name a class in {_NET_PREFIX}*"
        )
    net = instantiate(net_cfg, _convert_="all")
    weights = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(weights)
    return net.eval()
