"""FID, IS, KID and precision/recall of generated images against cached reference statistics.

How it works: `update_fake` runs the extractor ONCE per batch and stores features and logits in
`FeatureBank`, a torchmetrics Metric with `cat` list states. `compute()` gathers the bank from
every rank (torchmetrics does this when torch.distributed is initialised; rank 0's samples come
first, then rank 1's, ...) and then evaluates each requested metric on the gathered features with
local torchmetrics / torch-fidelity code (difflab.metrics.scores), seeded, so every rank returns
the same numbers.

Conditional samples: `update_fake(images, targets)` with the class each image was asked for (its label,
or the class of its prompt) adds `class_accuracy` (the fraction the extractor's classifier assigns to that
class; meaningful for the project's classifier extractors, whose classes are the data's) and, with
per-class references (`set_class_references`), the FID of each class's samples against that class's real
images (`class_fid`, a list).

DDP rules: call `set_reference`, `update_fake` and `compute` on EVERY rank (`compute` is a
collective: never inside `rank_zero_only`); only rank zero should write files or log. Keep this
object off the LightningModule (EMA deep-copies the module; checkpoints would carry the backbone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from difflab.metrics.clip_score import CLIPScoreBank, CLIPScorer
from difflab.metrics.extractors.base import FeatureExtractor
from difflab.metrics.reference import ReferenceStats
from difflab.metrics.scores import frechet_distance, inception_score, kernel_distance, precision_recall

MetricName = Literal["fid", "is", "kid", "precision_recall"]
METRIC_NAMES: tuple[str, ...] = get_args(MetricName)
NEEDS_REFERENCE = ("fid", "kid", "precision_recall")
RESULT_KEYS = ("fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall", "class_accuracy",
               "class_accuracies", "class_fid", "clip_score", "clip_scores")


class FeatureBank(Metric):
    """This rank's fake features (N, D) and logits (N, K); `compute()` returns all ranks' rows.

    A kind not kept is stored with zero columns, so every state stays a 2-d tensor on every rank.
    """

    full_state_update = False

    def __init__(self, *, keep_features: bool, keep_logits: bool) -> None:
        super().__init__()
        self.keep_features = keep_features
        self.keep_logits = keep_logits
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")  # (N,) the class asked for; -1 = none

    def update(self, features: Tensor, logits: Tensor, targets: Tensor | None = None) -> None:
        keep_logits = self.keep_logits or targets is not None
        self.features.append(features if self.keep_features else features[:, :0])
        self.logits.append(logits if keep_logits else logits[:, :0])
        self.targets.append(torch.full((features.shape[0],), -1, dtype=torch.long, device=features.device)
                            if targets is None else targets.to(features.device, torch.long))

    def compute(self) -> tuple[Tensor, Tensor, Tensor]:
        return dim_zero_cat(self.features), dim_zero_cat(self.logits), dim_zero_cat(self.targets)


class GenerativeMetrics(nn.Module):
    """Scores of generated uint8 images against a ReferenceStats.

    `compute()` returns plain floats under the keys of the chosen metrics, in this order:
    fid -> fid; is -> is_mean, is_std; kid -> kid_mean, kid_std; precision_recall -> precision,
    recall. KID uses subsets of min(kid_max_subset_size, n_fake, n_real) samples; precision/recall
    use k = prc_neighborhood nearest neighbours; `seed` fixes the IS/KID permutations.
    """

    def __init__(
        self,
        *,
        extractor: FeatureExtractor,
        metrics: Sequence[MetricName] = METRIC_NAMES,
        is_splits: int = 10,
        kid_subsets: int = 100,
        kid_max_subset_size: int = 1000,
        prc_neighborhood: int = 3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
        unknown = [m for m in metrics if m not in METRIC_NAMES]
        if unknown or not metrics:
            raise ValueError(f"metrics={list(metrics)} is not allowed: choose one or more of {list(METRIC_NAMES)}")
        for name, value, minimum in (
            ("is_splits", is_splits, 1),
            ("kid_subsets", kid_subsets, 1),
            ("kid_max_subset_size", kid_max_subset_size, 2),
            ("prc_neighborhood", prc_neighborhood, 1),
        ):
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}={value!r} is not allowed: use an int >= {minimum}")
        self.extractor = extractor
        self.metrics = tuple(dict.fromkeys(metrics))
        self.is_splits = is_splits
        self.kid_subsets = kid_subsets
        self.kid_max_subset_size = kid_max_subset_size
        self.prc_neighborhood = prc_neighborhood
        self.seed = seed
        needs_features = any(m in self.metrics for m in NEEDS_REFERENCE)
        self.bank = FeatureBank(keep_features=needs_features, keep_logits="is" in self.metrics)
        self.reference: ReferenceStats | None = None
        self.class_references: list[ReferenceStats] | None = None
        self.clip_scorer: CLIPScorer | None = None
        self.clip_bank = CLIPScoreBank()

    def set_clip_scorer(self, scorer: CLIPScorer | None) -> None:
        """A CLIP (metrics/clip_score.py) that scores images given with their prompts: clip_score (Hessel et al. 2021)."""
        self.clip_scorer = scorer

    def set_class_references(self, references: Sequence[ReferenceStats] | None) -> None:
        """Per-class real-image statistics (index = class) for `class_fid`; None turns it off."""
        for ref in references or []:
            if ref.extractor != self.extractor.name:
                raise ValueError(f"class reference statistics come from {ref.extractor!r}, not {self.extractor.name!r}")
        self.class_references = None if references is None else list(references)

    def set_reference(self, reference: ReferenceStats) -> None:
        if reference.extractor != self.extractor.name or reference.num_features != self.extractor.num_features:
            raise ValueError(
                f"reference statistics come from {reference.extractor!r} ({reference.num_features} features) "
                f"but this extractor is {self.extractor.name!r} ({self.extractor.num_features} features)"
            )
        self.reference = reference

    @torch.no_grad()
    def update_fake(self, images: Tensor, targets: Tensor | None = None, prompts: Sequence[str] | None = None,
                    prompt_ids: Tensor | None = None) -> None:
        """Add generated uint8 images (B, C, H, W), with the class each was asked for (targets (B,)) if any, and the
        prompt each was asked for (and its id, for the per-prompt CLIP score) when a CLIP scorer is set."""
        if self.clip_scorer is not None and prompts is not None:
            ids = torch.zeros(len(prompts), dtype=torch.long) if prompt_ids is None else prompt_ids
            self.clip_bank.update(self.clip_scorer(images, list(prompts)).to(self.bank.device), ids.to(self.bank.device))
        features, logits = self.extractor.features_and_logits(images)  # (B, D), (B, K)
        if targets is not None and int(targets.max()) >= self.extractor.num_classes:
            raise ValueError(f"target class {int(targets.max())} is outside the extractor's {self.extractor.num_classes} "
                             f"classes ({self.extractor.name}); class accuracy needs the data's own classifier "
                             "(metrics.extractor=classifier)")
        self.bank.update(features, logits, targets)

    def reset(self) -> None:
        """Forget the fake images; the reference stays."""
        self.bank.reset()
        self.clip_bank.reset()

    def compute(self) -> dict[str, float]:
        """Collective under DDP: call on every rank; every rank gets the same dict."""
        missing = [m for m in self.metrics if m in NEEDS_REFERENCE]
        if missing and self.reference is None:
            raise RuntimeError(f"call set_reference(...) before compute(): {missing} compare against real images")
        if self.bank.update_count == 0:  # this rank saw no images: still take part in the gather
            self.bank.update(self._empty(self.extractor.num_features), self._empty(self.extractor.num_classes))
        features, logits, targets = self.bank.compute()
        out = {**self._reference_scores(features), **self._inception_score(logits)}
        if (targets >= 0).any():
            out |= self._class_scores(features, logits, targets)
        if self.clip_scorer is not None:  # a collective too: every rank takes part, images or not
            out |= self.clip_bank.compute()
        return {k: out[k] for k in RESULT_KEYS if k in out}

    def _class_scores(self, features: Tensor, logits: Tensor, targets: Tensor) -> dict[str, float | list[float]]:
        """class_accuracy overall and per class; class_fid per class (with class references and fid)."""
        asked = targets >= 0
        hit = (logits[asked].argmax(dim=1) == targets[asked]).float()
        classes = range(int(targets.max()) + 1)
        per_class = [float(hit[targets[asked] == k].mean()) if (targets[asked] == k).any() else float("nan")
                     for k in classes]
        out: dict[str, float | list[float]] = {"class_accuracy": float(hit.mean()), "class_accuracies": per_class}
        if self.class_references is not None and "fid" in self.metrics and features.shape[1]:
            out["class_fid"] = [
                frechet_distance(features[targets == k], mu_real=ref.mu, sigma_real=ref.sigma, num_real=ref.num_images)
                if k < len(self.class_references) and int((targets == k).sum()) >= 2 else float("nan")
                for k, ref in zip(classes, self.class_references)]
        return out

    def _empty(self, columns: int) -> Tensor:
        return torch.zeros(0, columns, device=self.bank.device)

    def _inception_score(self, logits: Tensor) -> dict[str, float]:
        if "is" not in self.metrics:
            return {}
        is_mean, is_std = inception_score(logits, splits=self.is_splits, seed=self.seed)
        return {"is_mean": is_mean, "is_std": is_std}

    def _reference_scores(self, features: Tensor) -> dict[str, float]:
        ref, out = self.reference, {}
        if "fid" in self.metrics:
            out["fid"] = frechet_distance(features, mu_real=ref.mu, sigma_real=ref.sigma, num_real=ref.num_images)
        if "kid" in self.metrics:
            kid = kernel_distance(
                features, ref.features, subsets=self.kid_subsets, max_subset_size=self.kid_max_subset_size,
                seed=self.seed,
            )
            out["kid_mean"], out["kid_std"] = kid
        if "precision_recall" in self.metrics:
            out["precision"], out["recall"] = precision_recall(
                features, ref.features, neighborhood=self.prc_neighborhood
            )
        return out
