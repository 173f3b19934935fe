"""Judge digit samples with an independent classifier (an RBF SVM on scikit-learn's 8x8 digits).

    python benchmarks/judge_digits.py path/to/samples.npz

Samples (uint8 NHWC, any square size) are area-resized to 8x8 and scaled to the 0..16 range of
`load_digits`. Prints the classifier's held-out accuracy on real digits (its own sanity check),
then for the samples: the mean top-class probability, the share classified with probability
> 0.5, and the class histogram (every class should appear, ideally near 10% each).
"""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.calibration import CalibratedClassifierCV
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC


def fit_judge(seed: int = 0) -> tuple[SVC | CalibratedClassifierCV, float]:
    """SVC(gamma=0.001) on 80% of the digits; returns it and its accuracy on the other 20%.

    Probabilities are libsvm's (SVC(probability=True), every README figure). scikit-learn 1.9
    deprecates that parameter and 1.11 removes it; there the judge falls back to the suggested
    CalibratedClassifierCV(SVC(), ensemble=False), whose probabilities are more confident (on
    2026-12-03: real digits 100 % confident, mean top probability 0.95, against 99.6 % and 0.97),
    so figures judged after the switch are not comparable with the README's.
    """
    d = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(d.data, d.target, test_size=0.2, random_state=seed, stratify=d.target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecation above; the fallback handles 1.11
        try:
            clf = SVC(gamma=0.001, C=10.0, probability=True, random_state=seed)
        except TypeError:
            clf = CalibratedClassifierCV(SVC(gamma=0.001, C=10.0, random_state=seed), ensemble=False)
        clf.fit(x_tr, y_tr)
    return clf, float(clf.score(x_te, y_te))


def to_digits_features(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, 64) floats in 0..16 like load_digits().data."""
    x = torch.from_numpy(images).float().permute(0, 3, 1, 2).mean(dim=1, keepdim=True)  # (N, 1, H, W)
    if x.shape[-1] != 8:
        x = F.interpolate(x, size=(8, 8), mode="area")
    return (x / 255.0 * 16.0).flatten(1).numpy()


def judge(images: np.ndarray, clf: SVC | CalibratedClassifierCV) -> dict:
    """Mean top-class probability, share above 0.5 and class histogram of uint8 NHWC digit images."""
    proba = clf.predict_proba(to_digits_features(images))
    pred = proba.argmax(axis=1)
    hist = np.bincount(pred, minlength=10) / len(pred)
    return {
        "n": int(len(pred)),
        "mean_top_probability": float(proba.max(axis=1).mean()),
        "confident_share": float((proba.max(axis=1) > 0.5).mean()),
        "class_histogram": [round(float(h), 4) for h in hist],
        "classes_present": int((hist > 0.02).sum()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("npz")
    args = p.parse_args()
    clf, acc = fit_judge()
    out = {"judge_accuracy_on_real_digits": acc, **judge(np.load(args.npz)["images"], clf)}
    real = load_digits()
    real_imgs = (real.images[:1000, :, :, None] / 16.0 * 255).round().astype(np.uint8)
    out["real_digits_reference"] = judge(real_imgs, clf)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
