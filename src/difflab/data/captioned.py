"""A split read with its captions: batches (images, labels, captions) with captions a list[str].

Training keys come from EpochPermutationSampler with `epoch_keys=True`: (index, flip, epoch). The caption
of index i is picked from its phrasings by (seed, epoch, i) (data/captions.py), so it depends on nothing
a resume or the process count could change. Validation keys are plain indices and get the fixed caption
of VAL_EPOCH. The wrapped dataset (images, a FlipKeyedView or a LatentDataset) sees the keys it knows:
(index, flip) pairs with hflip, plain indices without.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset

from difflab.data.captions import VAL_EPOCH, pick_caption


class CaptionedView(Dataset):
    """`dataset` with the captions of `phrasings[i]` (one tuple of phrasings per index) added to its batches."""

    def __init__(self, dataset: Dataset, phrasings: Sequence[Sequence[str]], *, seed: int, flip_keys: bool) -> None:
        if len(phrasings) != len(dataset):
            raise ValueError(f"{len(phrasings)} caption lists for a dataset of {len(dataset)} images")
        self.dataset, self.phrasings, self.seed, self.flip_keys = dataset, phrasings, int(seed), flip_keys

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, keys: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        if keys and isinstance(keys[0], (tuple, list)):  # (index, flip, epoch): training
            index, epochs = [int(k[0]) for k in keys], [int(k[2]) for k in keys]
            inner = [(int(k[0]), bool(k[1])) for k in keys] if self.flip_keys else index
        else:  # plain indices: validation
            index = [int(k) for k in keys]
            epochs, inner = [VAL_EPOCH] * len(index), index
        images, labels = _batch(self.dataset, inner)
        captions = [pick_caption(self.phrasings[i], seed=self.seed, epoch=e, index=i) for i, e in zip(index, epochs)]
        return images, labels, captions


def _batch(dataset: Dataset, keys: list) -> tuple[torch.Tensor, torch.Tensor]:
    if getattr(dataset, "__getitems__", None) is not None:
        return dataset.__getitems__(keys)
    items = [dataset[k] for k in keys]  # one (image, label) per item
    return torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items])
