"""The LightningDataModule every dataset shares: its options, argument checks, the held-out split, loaders.

The constructor is generated (a keyword-only dataclass; eq=False keeps comparison and hashing by
identity) from the options declared below. Every subclass carries the same decorator, so errors
name it, and declares as fields only the options that are its own (root, download, ...), never
these again. No option has a dataset-specific default: the values live in conf/data/<name>.yaml
alone (tests/test_data.py checks that every constructor default agrees with every YAML).

A subclass sets `num_classes` and implements `_build_dataset()`, returning a Dataset whose
`__getitems__(indices)` gives a uint8 batch (B, C, image_size, image_size) and int64 labels (B,).
The loaders turn that into float32 in [-1, 1] per batch (BatchToModelRange).

`batch_size` is the GLOBAL batch: under a Trainer with world size W (devices x num_nodes) each
process loads batch_size / W images, and the train order is a permutation drawn from (seed, epoch)
alone (DistributedSampler), so the images of global batch k are the same for any W. Where training is in that order is part of
its checkpoints (ResumableLoader), and flips are keyed by (seed, epoch, index), so a run resumed
from any step, even part-way through an epoch, sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Literal

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from difflab.data.captioned import CaptionedView
from difflab.data.captions import class_prompts, phrasings_by_label
from difflab.data.latents import LatentDataset, collate_latents
from difflab.data.transforms import BatchToModelRange, check_channels


def check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} is not allowed; it must be a positive integer")


def check_val_fraction(val_fraction: float) -> None:
    if isinstance(val_fraction, bool) or not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(
            f"val_fraction={val_fraction!r} is not allowed; it must lie strictly between 0 and 1"
        )


def check_num_workers(num_workers: int) -> None:
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers={num_workers!r} is not allowed; it must be an integer >= 0")


def per_device_batch_size(global_batch: int, world_size: int) -> int:
    """The batch each of world_size processes loads so that together they load global_batch."""
    if global_batch % world_size:
        lower, upper = global_batch - global_batch % world_size, global_batch + world_size - global_batch % world_size
        raise ValueError(
            f"data.batch_size={global_batch} is the global batch, split over {world_size} processes "
            f"(trainer.devices x trainer.num_nodes); it must be divisible by {world_size}, "
            f"e.g. {lower or upper} or {upper}"
        )
    return global_batch // world_size


class EpochPermutationSampler(DistributedSampler):
    """DistributedSampler's train order (a permutation of (seed, epoch); rank r takes every
    world_size-th index) that can start part-way through an epoch, and decides each image's
    horizontal flip from (seed, epoch, index) instead of a global RNG.

    The epoch is read from `epoch_of` when iteration starts, when given: Lightning 2.6 calls
    set_epoch with its epoch_progress counter, which after resuming step-based training from an
    end-of-epoch checkpoint is one ahead of trainer.current_epoch, the right one in both cases.
    With hflip it yields (index, flip) keys, which FlipKeyedView turns into flipped images: the
    flips are then the same whatever the worker count, the prefetching, or where a run resumed.
    With epoch_keys (captions) it yields (index, flip, epoch) keys (flip False without hflip), which
    CaptionedView reads.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int, hflip: bool = False,
                 epoch_of: Callable[[], int] | None = None, epoch_keys: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.epoch_of, self.hflip, self.epoch_keys = epoch_of, hflip, epoch_keys
        self._resume: tuple[int, int] | None = None  # (epoch, images of it already seen by all ranks)

    def resume(self, epoch: int, images: int) -> None:
        """The next iteration, if it is of `epoch`, skips the first `images` images of its global order."""
        self._resume = (int(epoch), int(images))

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, bool]]:
        if self.epoch_of is not None:
            self.epoch = int(self.epoch_of())
        start = 0
        if self._resume is not None:
            epoch, images = self._resume
            self._resume = None  # once: later epochs start at their beginning
            if epoch == self.epoch and images < self.total_size:
                if images % self.num_replicas:
                    warnings.warn(f"resuming at image {images} of epoch {epoch}, not a multiple of the "
                                  f"{self.num_replicas} processes: the data order is not exact", stacklevel=2)
                start = images // self.num_replicas
        g = torch.Generator().manual_seed(self.seed + self.epoch)  # DistributedSampler's permutation
        order = torch.randperm(len(self.dataset), generator=g)[: self.total_size]
        mine = order[self.rank: self.total_size: self.num_replicas][start:].tolist()
        if not self.hflip and not self.epoch_keys:
            return iter(mine)
        flips = (torch.rand(len(self.dataset), generator=g) < 0.5).tolist() if self.hflip else None  # after the order
        if not self.epoch_keys:
            return iter([(i, flips[i]) for i in mine])
        return iter([(i, bool(flips and flips[i]), self.epoch) for i in mine])


class FlipKeyedView(Dataset):
    """A dataset read through (index, flip) keys (EpochPermutationSampler with hflip): a batch of
    __getitems__ comes back with the images whose flag is set flipped left-right."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, keys: list[tuple[int, bool]]) -> tuple[torch.Tensor, torch.Tensor]:
        indices = [int(k[0]) for k in keys]
        if getattr(self.dataset, "__getitems__", None) is not None:
            images, labels = self.dataset.__getitems__(indices)
        else:  # one (image, label) per item
            items = [self.dataset[i] for i in indices]
            images, labels = torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items])
        flip = torch.tensor([bool(k[1]) for k in keys]).view(-1, 1, 1, 1)
        return torch.where(flip, images.flip(-1), images), labels


class ResumableLoader(DataLoader):
    """The train DataLoader as Lightning checkpoints it (its state_dict / load_state_dict protocol):
    the state is where the run is in the data order, (epoch, images all ranks have consumed), so a
    run resumed from a checkpoint taken part-way through an epoch draws the batches the uninterrupted
    run would have drawn, on any number of processes.

    `progress` (set by the DataModule) gives (epoch, batches this process has trained on in it); it is
    read from the Trainer's loop counters, not counted here, because the loader runs ahead of training
    (prefetching, workers).
    """

    progress: Callable[[], tuple[int, int]] | None = None
    global_batch_size: int = 0

    def state_dict(self) -> dict[str, int]:
        """{"epoch", "images"}: the position in the global train order at this moment of training."""
        if self.progress is None:
            return {}
        epoch, batches = self.progress()
        return {"epoch": int(epoch), "images": int(batches) * self.global_batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Start the next iteration where state_dict() was taken (ignored if that epoch is over)."""
        if state and isinstance(self.sampler, EpochPermutationSampler):
            self.sampler.resume(state["epoch"], state["images"])


def split_indices(n: int, *, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) index lists: a permutation drawn from `seed` alone."""
    n_val = max(1, round(n * val_fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


@dataclass(kw_only=True, eq=False)
class ImageDataModule(pl.LightningDataModule):
    """Base of all difflab DataModules; yields (x float32 (B, C, H, W) in [-1, 1], y int64 (B,))."""

    num_classes: ClassVar[int | None] = None
    caption_set: ClassVar[str | None] = None  # the class captions (data/captions.py) data.captions=true uses

    # the options of every dataset, set from conf/data/<name>.yaml; only pin_memory, which no
    # dataset decides, has a default
    image_size: int
    channels: int
    batch_size: int  # global: split over the processes of a Trainer (see the module docstring)
    num_workers: int
    val_fraction: float
    seed: int  # fixes the train/val split
    hflip: bool  # random horizontal flip, training batches only
    pin_memory: bool | None = None  # None: True when CUDA is available
    captions: bool = False  # True: batches (images, labels, captions list[str]) (data/captions.py)

    def __post_init__(self) -> None:
        super().__init__()
        check_positive_int("image_size", self.image_size)
        check_channels(self.channels)
        check_positive_int("batch_size", self.batch_size)
        check_num_workers(self.num_workers)
        check_val_fraction(self.val_fraction)
        self.val_fraction = float(self.val_fraction)
        if self.pin_memory is None:
            self.pin_memory = torch.cuda.is_available()
        self._train: Dataset | None = None
        self._val: Dataset | None = None
        self._train_latents: LatentDataset | None = None  # cached first-stage moments (latent diffusion)
        self._phrasings: dict[str, list[tuple[str, ...]]] = {}  # per split, per index: its phrasings (captions)
        self._world_size, self._rank = 1, 0
        self.device_batch_size = self.batch_size  # batch_size / world size once a Trainer sets us up
        # the train permutation's seed: the run's seed (set by seed_everything) else the split seed
        self.shuffle_seed = self.seed

    def _build_dataset(self) -> Dataset:
        raise NotImplementedError(f"{type(self).__name__} must implement _build_dataset()")

    def full_dataset(self) -> Dataset:
        """Every image of the data set in its stored order, before the train/val split (difflab-edit's source=name:i-j)."""
        self.prepare_data()
        return self._build_dataset()

    def setup(self, stage: str | None = None) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            self._world_size, self._rank = trainer.world_size, trainer.global_rank
            self.device_batch_size = per_device_batch_size(self.batch_size, self._world_size)
            self.shuffle_seed = int(os.environ.get("PL_GLOBAL_SEED", self.seed))
        if self._train is not None:
            return
        full = self._build_dataset()
        train_idx, val_idx = split_indices(
            len(full), val_fraction=self.val_fraction, seed=self.seed
        )
        if len(train_idx) < self.batch_size:
            self._fit_batch_to(len(train_idx), len(full))
        if self.captions:  # read (and checked) here, before any training
            phrasings = self._caption_phrasings(full)
            self._phrasings = {"train": [phrasings[i] for i in train_idx], "val": [phrasings[i] for i in val_idx]}
        self._train, self._val = Subset(full, train_idx), Subset(full, val_idx)

    def _caption_phrasings(self, full: Dataset) -> list[tuple[str, ...]]:
        """Per image of the full data set, the phrasings its training caption is drawn from."""
        labels = getattr(full, "labels", None)
        if self.caption_set is None or labels is None:
            raise ValueError(f"data.captions=true is not supported by {type(self).__name__}; allowed: digits, mnist, "
                             "fashion_mnist (captions from class names) and image_folder (sidecar caption files)")
        return phrasings_by_label(self.caption_set, labels.tolist())

    def split_phrasings(self, split: Literal["train", "val"] = "train") -> list[tuple[str, ...]]:
        """Per index of a split, the phrasings its caption is drawn from (data.captions=true only)."""
        self._setup_standalone()
        if not self.captions:
            raise ValueError(f"{type(self).__name__} was built with captions=false; set data.captions=true")
        return self._phrasings[split]

    def class_prompt_sets(self) -> dict[str, list[list[str]]] | None:
        """{"train": per class its training phrasings, "heldout": its held-out ones} (None: no class captions)."""
        if self.caption_set is None:
            return None
        return {split: class_prompts(self.caption_set, split) for split in ("train", "heldout")}

    def _fit_batch_to(self, n_train: int, n_total: int) -> None:
        """A train split smaller than batch_size (a first try on a few own images): one batch of the whole
        split (a multiple of the process count), with a warning; drop_last would otherwise yield no batch."""
        fitted = n_train - n_train % self._world_size
        where = (f"{type(self).__name__}: the train split holds {n_train} images ({n_total} in total, "
                 f"val_fraction={self.val_fraction}), fewer than batch_size={self.batch_size}")
        if fitted < 1:
            raise ValueError(f"{where}; {self._world_size} processes need at least one image each")
        warnings.warn(f"{where}: training with batch_size={fitted} (set data.batch_size to choose)", stacklevel=2)
        self.batch_size = fitted
        self.device_batch_size = per_device_batch_size(fitted, self._world_size)

    def _setup_standalone(self) -> None:
        """Used outside a Trainer (scripts, notebooks): prepare then set up on first access."""
        if self._train is None:
            self.prepare_data()
            self.setup("fit")

    @property
    def train_dataset(self) -> Dataset:
        self._setup_standalone()
        return self._train

    @property
    def val_dataset(self) -> Dataset:
        self._setup_standalone()
        return self._val

    def uint8_batches(
        self, split: Literal["train", "val"] = "train", *, batch_size: int = 500, limit: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Un-augmented uint8 images (B, C, H, W) of a split, in a fixed order (for reference statistics)."""
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} is not supported; choose 'train' or 'val'")
        dataset = self.train_dataset if split == "train" else self.val_dataset
        n = len(dataset) if limit is None else min(limit, len(dataset))
        for start in range(0, n, batch_size):
            images, _ = dataset.__getitems__(list(range(start, min(start + batch_size, n))))
            yield images

    def class_uint8_batches(self, split: Literal["train", "val"], label: int, *, batch_size: int = 500) -> Iterator[torch.Tensor]:
        """The un-augmented uint8 images of one class of a split, in the split's order (per-class reference statistics)."""
        for images, labels in self._labelled_batches(split, batch_size):
            if (labels == label).any():
                yield images[labels == label]

    def class_counts(self, split: Literal["train", "val"] = "train") -> list[int]:
        """Images per class in a split (index = class)."""
        counts: dict[int, int] = {}
        for _, labels in self._labelled_batches(split, 2000):
            for k, n in zip(*labels.unique(return_counts=True)):
                counts[int(k)] = counts.get(int(k), 0) + int(n)
        return [counts.get(k, 0) for k in range(max(counts) + 1)] if counts else []

    def _labelled_batches(self, split: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} is not supported; choose 'train' or 'val'")
        dataset = self.train_dataset if split == "train" else self.val_dataset
        for start in range(0, len(dataset), batch_size):
            images, labels = dataset.__getitems__(list(range(start, min(start + batch_size, len(dataset)))))
            if labels is None or (labels < 0).any():
                raise ValueError(f"{type(self).__name__} has no class labels; per-class statistics need labelled data")
            yield images, labels

    def num_images(self, split: Literal["train", "val"] = "train") -> int:
        """How many images a split holds."""
        return len(self.train_dataset if split == "train" else self.val_dataset)

    def use_train_latents(self, latents: LatentDataset) -> None:
        """Train on cached first-stage moments instead of images (validation keeps the images)."""
        if len(latents) != self.num_images("train"):
            raise ValueError(f"the latent cache holds {len(latents)} entries but the train split has "
                             f"{self.num_images('train')} images; rebuild the cache")
        self._train_latents = latents

    def train_dataloader(self) -> DataLoader:
        if self._train_latents is not None:
            return self._loader(self._train_latents, train=True)
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, train=False)

    def _loader(self, dataset: Dataset, *, train: bool) -> DataLoader:
        # train: a permutation from (shuffle_seed, epoch) only, this rank's strided share of it, flips
        # keyed by (shuffle_seed, epoch, index), resumable part-way (ResumableLoader); val: left to
        # Lightning (sequential, split over ranks under DDP)
        trainer = getattr(self, "trainer", None)
        latent = isinstance(dataset, LatentDataset)  # (index, flip) keys are read by the cache itself
        sampler = EpochPermutationSampler(
            dataset, num_replicas=self._world_size, rank=self._rank, seed=self.shuffle_seed, hflip=self.hflip,
            epoch_of=(lambda: trainer.current_epoch) if trainer is not None else None, epoch_keys=self.captions,
        ) if train else None
        view = FlipKeyedView(dataset) if train and self.hflip and not latent else dataset
        if self.captions:  # (images, labels, captions): by (shuffle_seed, epoch, index) in training, fixed in val
            self._setup_standalone()
            view = CaptionedView(view, self._phrasings["train" if train else "val"], flip_keys=train and self.hflip,
                                 seed=self.shuffle_seed if train else self.seed)
        loader = (ResumableLoader if train else DataLoader)(
            view,
            batch_size=self.device_batch_size,
            sampler=sampler,
            shuffle=False,
            drop_last=train,
            collate_fn=collate_latents if latent else BatchToModelRange(),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            # every new iterator draws its workers' base seed from this generator, not from the global RNG
            # (which training's noise comes from): when Lightning creates an iterator cannot change training
            generator=torch.Generator().manual_seed(self.shuffle_seed + int(not train)),
        )
        if train:
            loader.global_batch_size = self.batch_size
            if trainer is not None:
                loader.progress = lambda: (trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        return loader
