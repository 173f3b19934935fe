"""Metrics room: extractors, reference cache, FID/IS/KID/PR wrappers, DDP equivalence.

Most tests use a tiny random classifier on scikit-learn's 8x8 digits, so they run in seconds;
the Inception test loads random weights of the real shapes through the real loading path.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from difflab.data import to_uint8
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from difflab.metrics import (
    INCEPTION_WEIGHTS_FILE,
    ClassifierExtractor,
    EfficientNetLite0Extractor,
    GenerativeMetrics,
    InceptionExtractor,
    ReferenceKey,
    ReferenceStats,
    load_or_compute,
    shared_reference,
)
from difflab.metrics.build import build_metrics, classifier_path, resolve_extractor_kind


class TinyClassifier(nn.Module):
    """The classifier contract: features(x) and forward(x) on x in [-1, 1]."""

    def __init__(self, *, in_channels: int = 1, image_size: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.in_channels, self.image_size = in_channels, image_size
        self.num_features, self.num_classes = 24, num_classes
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 24, 3, stride=2), nn.SiLU()
        )
        self.head = nn.Linear(24, num_classes)
        nn.init.normal_(self.head.weight, std=10.0)  # confident enough for a visible IS

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).mean(dim=(2, 3))  # (B, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def tiny_extractor(seed: int = 0) -> ClassifierExtractor:
    torch.manual_seed(seed)
    return ClassifierExtractor(net=TinyClassifier(), name="tiny")


def digits(n: int = 400, start: int = 0) -> torch.Tensor:
    """n real 8x8 handwritten digits as uint8 (n, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images[start : start + n]).float()
    return (x * 255 / 16).round().to(torch.uint8).unsqueeze(1)


def noisy(images: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (images.float() + sigma * torch.randn(images.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


def reference_of(images: torch.Tensor, extractor, max_features: int | None = None) -> ReferenceStats:
    return ReferenceStats.from_batches(
        images.split(64), extractor, num_images=len(images), max_features=max_features
    )


def scores(images: torch.Tensor, ref: ReferenceStats, extractor, metrics=("fid", "is", "kid", "precision_recall")):
    gm = GenerativeMetrics(extractor=extractor, metrics=metrics, kid_subsets=20)
    gm.set_reference(ref)
    for batch in images.split(50):
        gm.update_fake(batch)
    return gm.compute()


# ---------------------------------------------------------------- metric values


def test_fid_is_zero_against_itself_and_grows_with_noise():
    ext, real = tiny_extractor(), digits()
    ref = reference_of(real, ext)
    scale = ref.sigma.trace().item()
    fids = [scores(noisy(real, s) if s else real, ref, ext, ("fid",))["fid"] for s in (0, 20, 50, 100)]
    assert abs(fids[0]) < 1e-6 * scale, fids
    assert fids[0] < fids[1] < fids[2] < fids[3], fids


def test_inception_score_of_one_repeated_image_is_one():
    ext = tiny_extractor()
    gm = GenerativeMetrics(extractor=ext, metrics=("is",))
    gm.update_fake(digits(1).repeat(100, 1, 1, 1))
    out = gm.compute()
    assert set(out) == {"is_mean", "is_std"}
    assert out["is_mean"] == pytest.approx(1.0, abs=1e-5)
    varied = GenerativeMetrics(extractor=ext, metrics=("is",))
    varied.update_fake(digits(400))
    assert varied.compute()["is_mean"] > 1.0 + 1e-4


def test_kid_and_precision_recall_against_itself():
    ext, real = tiny_extractor(), digits()
    ref = reference_of(real, ext)
    same = scores(real, ref, ext, ("kid", "precision_recall"))
    far = scores(noisy(real, 100), ref, ext, ("kid", "precision_recall"))
    assert set(same) == {"kid_mean", "kid_std", "precision", "recall"}
    assert abs(same["kid_mean"]) < 0.05 * far["kid_mean"], (same, far)  # unbiased MMD: O(1/n) noise
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert far["precision"] < 0.9


def test_kid_subset_size_adapts_to_few_samples():
    ext, real = tiny_extractor(), digits(30)
    out = scores(real[:12], reference_of(real, ext), ext, ("kid",))  # torchmetrics' default 1000 would raise
    assert out["kid_std"] >= 0.0 and out["kid_mean"] == out["kid_mean"]


def test_scores_equal_torchmetrics_with_extractor_as_feature_module():
    """The extractors plug into torchmetrics directly; our one-pass path gives the same numbers."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore

    ext, real, fake = tiny_extractor(), digits(200), digits(150, start=200)
    fid = FrechetInceptionDistance(feature=ext)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    ours = scores(fake, reference_of(real, ext), ext, ("fid",))["fid"]
    assert ours == pytest.approx(fid.compute().item(), rel=1e-4)
    inception_score = InceptionScore(feature=ext.logits_module(), splits=1)
    inception_score.update(fake)
    gm = GenerativeMetrics(extractor=ext, metrics=("is",), is_splits=1)
    gm.update_fake(fake)
    assert gm.compute()["is_mean"] == pytest.approx(inception_score.compute()[0].item(), rel=1e-5)


def test_scores_equal_torch_fidelity_on_the_same_features():
    """FID, KID (one full-size subset) and IS (one split) agree with torch-fidelity's float64 code."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    ext, real, fake = tiny_extractor(), digits(200), noisy(digits(200, start=200), 20)
    gm = GenerativeMetrics(extractor=ext, metrics=("fid", "is", "kid"), is_splits=1, kid_subsets=1)
    gm.set_reference(reference_of(real, ext))
    gm.update_fake(fake)
    ours = gm.compute()
    (f_real, _), (f_fake, l_fake) = ext.features_and_logits(real), ext.features_and_logits(fake)
    stats = [fid_features_to_statistics(f.double()) for f in (f_fake, f_real)]
    fid = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    kid = kid_features_to_metric(f_fake.double(), f_real.double(), kid_subsets=1, kid_subset_size=200, verbose=False)
    isc = isc_features_to_metric(l_fake, splits=1)
    assert ours["fid"] == pytest.approx(fid, rel=1e-5)
    assert ours["kid_mean"] == pytest.approx(kid["kernel_inception_distance_mean"], rel=1e-6)
    assert ours["is_mean"] == pytest.approx(isc["inception_score_mean"], rel=1e-6)
    assert ours["is_std"] == isc["inception_score_std"] == 0.0


# ---------------------------------------------------------------- extractors


def test_classifier_extractor_converts_and_resizes():
    torch.manual_seed(0)
    ext = ClassifierExtractor(net=TinyClassifier(in_channels=3, image_size=16), name="rgb16")
    grey, rgb = digits(3), digits(3).repeat(1, 3, 1, 1)
    f, logits = ext.features_and_logits(grey)
    assert f.shape == (3, 24) and logits.shape == (3, 10) and f.dtype == torch.float32
    torch.testing.assert_close(ext(grey), ext(rgb))
    with pytest.raises(TypeError, match="uint8"):
        ext(grey.float())
    with pytest.raises(ValueError, match=r"C in \(1, 3\)"):
        ext(torch.zeros(2, 2, 8, 8, dtype=torch.uint8))
    ext.train()
    assert not ext.training and not ext.net.training


def test_to_uint8_maps_signed_unit_range():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 5)
    assert to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255]


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """Random weights of torch-fidelity's InceptionV3 shapes, under the file name it expects."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: None)  # no download
        mp_.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return path


def test_inception_extractor_loads_weights_file_end_to_end(inception_weights):
    ext = InceptionExtractor(weights_path=str(inception_weights))
    assert (ext.name, ext.num_features, ext.comparable_to_published) == ("inception_v3", 2048, True)
    rgb = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    grey = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    out = [ext.features_and_logits(x) for x in (rgb, grey)]
    features, logits = torch.cat([f for f, _ in out]), torch.cat([lg for _, lg in out])
    assert features.shape == (4, 2048) and features.dtype == torch.float32
    assert logits.shape == (4, 1008) and logits.dtype == torch.float32
    assert torch.isfinite(features).all() and torch.isfinite(logits).all()
    assert InceptionExtractor(weights_path=str(inception_weights.parent)).weights_path == str(inception_weights)


def test_inception_missing_weights_names_file_directory_and_config_key(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError) as err:
        InceptionExtractor(weights_path=None)
    message = str(err.value)
    assert INCEPTION_WEIGHTS_FILE in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    assert "metrics.extractor.weights_path" in message


def test_efficientnet_lite0_uses_packaged_imagenet_weights():
    ext = EfficientNetLite0Extractor()
    assert (ext.name, ext.num_features, ext.comparable_to_published) == ("efficientnet_lite0", 1280, False)
    assert ext(digits(2)).shape == (2, 1280)
    cbook = pytest.importorskip("matplotlib.cbook")
    from PIL import Image

    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    x = torch.frombuffer(bytearray(photo.tobytes()), dtype=torch.uint8).view(photo.height, photo.width, 3)
    noise = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    probs = ext.logits(x.permute(2, 0, 1)[None]).softmax(1)[0]  # resized 600x512 -> 224x224 inside
    assert 652 in probs.topk(5).indices.tolist()  # 'military uniform'
    assert probs.max() > 2 * ext.logits(noise).softmax(1).max()


# ---------------------------------------------------------------- reference cache


def test_reference_cache_is_reused_and_invalidated_by_every_key_field(tmp_path):
    ext, real = tiny_extractor(), digits(100)
    calls = []

    def batches():
        calls.append(1)
        return real.split(32)

    key = ReferenceKey(dataset="digits", split="train", resolution=8, num_images=100, extractor="tiny")
    assert str(key) == "digits-train-8px-n100-tiny"
    first = load_or_compute(key, batches, ext, tmp_path)
    again = load_or_compute(key, batches, ext, tmp_path)
    assert len(calls) == 1 and (tmp_path / "digits-train-8px-n100-tiny.pt").is_file()
    torch.testing.assert_close(again.sigma, first.sigma)
    assert again.mu.dtype == torch.float64 and again.features.dtype == torch.float32
    for change in (dict(dataset="mnist"), dict(split="test"), dict(resolution=16)):
        load_or_compute(ReferenceKey(**{**key.__dict__, **change}), batches, ext, tmp_path)
    assert len(calls) == 4
    with pytest.raises(ValueError, match="num_images=90"):  # the batches give 100 images
        load_or_compute(ReferenceKey(**{**key.__dict__, "num_images": 90}), batches, ext, tmp_path)
    retrained = tiny_extractor(seed=1)  # same name, other weights: recomputed
    load_or_compute(key, batches, retrained, tmp_path)
    assert len(calls) == 6
    with pytest.raises(ValueError, match="'other'"):
        load_or_compute(ReferenceKey(**{**key.__dict__, "extractor": "other"}), batches, ext, tmp_path)


def test_shared_reference_rank_zero_computes_then_the_others_read(tmp_path):
    """One place for the rank-zero-then-barrier dance (training callback and difflab-eval)."""
    ext, real, events = tiny_extractor(), digits(100), []

    class Data:
        image_size = 8

        def num_images(self, split):
            return len(real)

        def uint8_batches(self, split, *, limit=None):
            events.append(f"read {split} {limit}")
            return real[:limit].split(32)

    common = dict(dataset="digits", split="train", cache_dir=tmp_path, num_images=60, barrier=lambda: events.append("barrier"))
    zero = shared_reference(Data(), ext, is_rank_zero=True, **common)
    assert events == ["read train 60", "barrier"] and zero.num_images == 60
    other = shared_reference(Data(), ext, is_rank_zero=False, **common)
    assert events[2:] == ["barrier"]  # after the barrier: rank zero's cache, nothing recomputed
    torch.testing.assert_close(other.mu, zero.mu)
    assert (tmp_path / "digits-train-8px-n60-tiny.pt").is_file()


def test_build_metrics_gets_the_classifier_through_the_injected_loader(tmp_path):
    """The metrics room reads no checkpoints: the configs inject difflab.lit.checkpoint_io.load_classifier."""
    path = classifier_path(tmp_path, "digits", 8)
    kwargs = dict(extractor="auto", dataset="digits", image_size=8, cache_dir=tmp_path, metrics=["fid"])
    with pytest.raises(FileNotFoundError, match=r"digits_8px.ckpt \(difflab-train and difflab-eval create it on first "
                                                 r"use\); create it with: difflab-train-classifier data=digits"):
        build_metrics(**kwargs)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    with pytest.raises(ValueError, match="needs a classifier_loader"):
        build_metrics(**kwargs)
    loaded = []
    metrics = build_metrics(**kwargs, classifier_loader=lambda p: loaded.append(p) or TinyClassifier())
    assert loaded == [path] and metrics.extractor.name == "classifier_digits_8px"
    assert resolve_extractor_kind("auto", "cifar10") == "efficientnet_lite0"
    assert build_metrics(**{**kwargs, "extractor": "efficientnet_lite0"}).extractor.name.startswith("efficientnet")


def test_reference_subsamples_features_but_keeps_all_moments():
    ext, real = tiny_extractor(), digits(100)
    full, sub = reference_of(real, ext), reference_of(real, ext, max_features=30)
    assert sub.features.shape == (30, 24) and sub.num_images == 100
    torch.testing.assert_close(sub.sigma, full.sigma)
    direct = ext(real).double()
    torch.testing.assert_close(full.sigma, torch.cov(direct.T))


def test_reference_cache_never_leaves_corrupt_files(tmp_path):
    ext, real = tiny_extractor(), digits(64)
    key = ReferenceKey(dataset="digits", split="train", resolution=8, num_images=64, extractor="tiny")
    path = tmp_path / f"{key}.pt"

    def crashing():
        yield real[:32]
        raise RuntimeError("loader died")

    with pytest.raises(RuntimeError, match="loader died"):
        load_or_compute(key, crashing, ext, tmp_path)
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"half a file")
    with pytest.warns(UserWarning, match="unreadable reference cache"):
        stats = load_or_compute(key, lambda: real.split(32), ext, tmp_path)
    assert stats.num_images == 64 and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert torch.load(path, weights_only=True)["key"] == str(key)


# ---------------------------------------------------------------- argument checks


def test_constructor_errors_name_the_bad_value_and_the_allowed_ones():
    ext = tiny_extractor()
    with pytest.raises(ValueError, match=r"'fd'.*'fid', 'is', 'kid', 'precision_recall'"):
        GenerativeMetrics(extractor=ext, metrics=("fd",))
    with pytest.raises(ValueError, match="kid_max_subset_size=1"):
        GenerativeMetrics(extractor=ext, kid_max_subset_size=1)
    with pytest.raises(ValueError, match="dataset='my/data'"):
        ReferenceKey(dataset="my/data", split="train", resolution=8, num_images=10, extractor="tiny")
    with pytest.raises(ValueError, match="resolution=0"):
        ReferenceKey(dataset="d", split="train", resolution=0, num_images=10, extractor="tiny")
    with pytest.raises(RuntimeError, match="set_reference"):
        GenerativeMetrics(extractor=ext, metrics=("fid",)).compute()


# ---------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        ext, real, fake = tiny_extractor(), digits(300), noisy(digits(250, start=300), 30)
        gm = GenerativeMetrics(extractor=ext, kid_subsets=20)
        gm.set_reference(reference_of(real, ext, max_features=200))
        half = len(fake) // world_size  # contiguous shards: rank order = single-process order
        for batch in fake[rank * half : (rank + 1) * half].split(40):  # uneven batch counts per rank
            gm.update_fake(batch)
        result = gm.compute()
        lonely = GenerativeMetrics(extractor=ext, metrics=("is",))  # rank 1 sees no images
        if rank == 0:
            lonely.update_fake(fake[:100])
        result["lonely_is"] = lonely.compute()["is_mean"]
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_match_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ext, real, fake = tiny_extractor(), digits(300), noisy(digits(250, start=300), 30)
    gm = GenerativeMetrics(extractor=ext, kid_subsets=20)
    gm.set_reference(reference_of(real, ext, max_features=200))
    gm.update_fake(fake)
    single = gm.compute()
    lonely = GenerativeMetrics(extractor=ext, metrics=("is",))
    lonely.update_fake(fake[:100])
    single["lonely_is"] = lonely.compute()["is_mean"]
    assert set(single) == {"fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall", "lonely_is"}
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got == pytest.approx(single, rel=1e-4, abs=1e-6), (rank, got, single)
