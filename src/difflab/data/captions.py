"""Captions built from class names: templates x synonyms, split into training and held-out phrasings.

Each labelled data set with a caption set (digits and MNIST share one; Fashion-MNIST has its own) names every
class by a few synonyms (Fashion-MNIST's sneaker: "a sneaker", "a running shoe", "a trainer") and phrases
them with templates ("a photo of {}", "{}, black and white"). The phrasings of a class split in two:

- TRAINING: the training templates x synonyms, except the pairs with (template - synonym) % 3 == 1;
- HELD-OUT: those excluded pairs (known words in combinations never seen) and every phrasing of the
  held-out templates (never used in training), for measuring how prompts generalise.

Every synonym (the class words) occurs in training phrasings: an encoder trained from scratch on these
captions cannot know a word it never saw, so only the phrasing is held out, never the class word.
The first phrasing of a class (first template, first synonym) is its canonical prompt ("a handwritten
seven", "a pair of trousers"), always a training phrasing.

The caption of training image i in epoch e of a run seeded s is `phrasings[i][caption_choice(s, e, i, n)]`:
a pure function of (seed, epoch, index), so resumed and multi-process runs see the captions an
uninterrupted single-process run would; validation image i always gets the phrasing of epoch -1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence, get_args

CaptionSet = Literal["digits", "fashion_mnist"]
Split = Literal["train", "heldout"]
VAL_EPOCH = -1  # the "epoch" whose choice validation captions use (never a training epoch)
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class ClassCaptions:
    """The class names, per-class synonyms and the two template lists of a caption set."""

    class_names: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...]  # per class; the first is the canonical one
    train_templates: tuple[str, ...]  # the first is the canonical one
    heldout_templates: tuple[str, ...]


_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

CAPTION_SETS: dict[str, ClassCaptions] = {
    "digits": ClassCaptions(
        class_names=_DIGIT_WORDS,
        synonyms=tuple((word, str(k)) for k, word in enumerate(_DIGIT_WORDS)),
        train_templates=("a handwritten {}", "the digit {}", "the number {}, handwritten",
                         "a picture of a handwritten {}", "{}, written by hand", "{} drawn with a pen"),
        heldout_templates=("a photo of a handwritten {}", "the handwritten digit {}", "someone wrote the number {}",
                           "{} in handwriting"),
    ),
    "fashion_mnist": ClassCaptions(
        class_names=("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                     "ankle boot"),
        synonyms=(
            ("a t-shirt", "a top", "a tee"),
            ("a pair of trousers", "a pair of pants", "a pair of slacks"),
            ("a pullover", "a sweater", "a jumper"),
            ("a dress", "a frock", "a gown"),
            ("a coat", "a jacket", "an overcoat"),
            ("a sandal", "a strappy sandal", "a summer sandal"),
            ("a shirt", "a button-up shirt", "a blouse"),
            ("a sneaker", "a running shoe", "a trainer"),
            ("a bag", "a handbag", "a purse"),
            ("an ankle boot", "a boot", "a short boot"),
        ),
        train_templates=("{}", "a picture of {}", "a photo of {}", "a grayscale photo of {}", "{}, black and white",
                         "a product shot of {}"),
        heldout_templates=("a black and white photo of {}", "an image of {}", "{} on a plain background",
                           "a low-resolution picture of {}"),
    ),
}


def _caption_set(dataset: str) -> ClassCaptions:
    if dataset not in CAPTION_SETS:
        raise ValueError(f"dataset={dataset!r} has no class captions; allowed: {sorted(CAPTION_SETS)} "
                         "(image_folder reads its own captions from sidecar files)")
    return CAPTION_SETS[dataset]


def is_heldout_pair(template: int, synonym: int) -> bool:
    """Whether the training template `template` with synonym `synonym` is held out: (t - s) % 3 == 1."""
    return (template - synonym) % 3 == 1


def class_prompts(dataset: str, split: Split) -> list[list[str]]:
    """Per class, its phrasings of a split ("train": what training captions are drawn from; "heldout": never
    seen in training), in a fixed order; the first training phrasing is the canonical prompt."""
    if split not in get_args(Split):
        raise ValueError(f"split={split!r} is not allowed; choose one of {get_args(Split)}")
    spec = _caption_set(dataset)
    out = []
    for words in spec.synonyms:
        if split == "train":
            out.append([t.format(w) for ti, t in enumerate(spec.train_templates)
                        for si, w in enumerate(words) if not is_heldout_pair(ti, si)])
        else:
            pairs = [t.format(w) for ti, t in enumerate(spec.train_templates)
                     for si, w in enumerate(words) if is_heldout_pair(ti, si)]
            out.append(pairs + [t.format(w) for t in spec.heldout_templates for w in words])
    return out


def canonical_prompts(dataset: str) -> list[str]:
    """One prompt per class: the first training template with the first synonym ("a handwritten seven")."""
    return [prompts[0] for prompts in class_prompts(dataset, "train")]


def class_names(dataset: str) -> list[str]:
    """The class names of a caption set, in label order."""
    return list(_caption_set(dataset).class_names)


def caption_choice(seed: int, epoch: int, index: int, n: int) -> int:
    """Which of n phrasings image `index` gets in `epoch` of a run seeded `seed`: splitmix64 of the three,
    mod n (a pure function: the same on every process and after any resume)."""
    if n < 1:
        raise ValueError(f"n={n} phrasings; an image needs at least one caption")
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(epoch) + 1) * 0xBF58476D1CE4E5B9 + int(index) * 0x94D049BB133111EB)
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) % n


def pick_caption(phrasings: Sequence[str], *, seed: int, epoch: int, index: int) -> str:
    """The caption of image `index` in `epoch` among its phrasings (VAL_EPOCH for validation)."""
    return phrasings[caption_choice(seed, epoch, index, len(phrasings))]


def phrasings_by_label(dataset: str, labels: Sequence[int]) -> list[tuple[str, ...]]:
    """Per image, the training phrasings of its class (shared tuples: one per class, not per image)."""
    per_class = [tuple(p) for p in class_prompts(dataset, "train")]
    k = len(per_class)
    bad = next((int(y) for y in labels if not 0 <= int(y) < k), None)
    if bad is not None:
        raise ValueError(f"label {bad} has no captions in caption set {dataset!r}; labels must lie in 0..{k - 1}")
    return [per_class[int(y)] for y in labels]
