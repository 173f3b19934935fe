"""rFID of a first stage: FID of reconstructions vs their originals in the offline classifier's features
(metrics.reconstruction), sharded over ranks as the evaluation engine does, logged as val/rfid by the
ReconstructionFID callback, and its default classifier trained on first use by difflab-train."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from difflab.callbacks.reconstruction_fid import ReconstructionFID
from difflab.cli.config import config_dir
from difflab.data import DigitsDataModule
from difflab.data.transforms import to_model_range, to_uint8
from difflab.lit.autoencoder import AutoencoderModule
from difflab.metrics import ClassifierExtractor, GenerativeMetrics, ReferenceStats
from difflab.metrics.reconstruction import ReconstructionMetrics, evaluate_reconstructions
from difflab.nets.autoencoder import AutoencoderKL
from difflab.nets.classifiers import ImageClassifier


def extractor(seed: int = 0) -> ClassifierExtractor:
    """A randomly initialised classifier: features enough to tell reconstructions apart, no training."""
    torch.manual_seed(seed)
    net = ImageClassifier(image_size=8, in_channels=1, num_classes=10, ch=8, feature_dim=16, dropout=0.0)
    return ClassifierExtractor(net=net, name="tiny")


def digits(n: int = 300) -> torch.Tensor:
    """n real 8x8 digits, uint8 (n, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    return (torch.from_numpy(load_digits().images[:n]) * 255 / 16).round().to(torch.uint8).unsqueeze(1)


def noisy(images: torch.Tensor, sigma: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (images.float() + sigma * torch.randn(images.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


def rfid(originals: torch.Tensor, reconstructions: torch.Tensor, ext: ClassifierExtractor) -> float:
    metrics = ReconstructionMetrics(extractor=ext)
    for o, r in zip(originals.split(64), reconstructions.split(64)):
        metrics.update(o, r)
    return metrics.compute()["rfid"]


def test_rfid_is_zero_for_perfect_reconstructions_and_grows_as_they_worsen():
    ext, x = extractor(), digits()
    perfect = rfid(x, x, ext)
    scores = [rfid(x, noisy(x, sigma), ext) for sigma in (8, 32, 96)]
    assert abs(perfect) < 1e-9 and 1e3 * abs(perfect) < scores[0] < scores[1] < scores[2], (perfect, scores)
    # the same number as the evaluation engine's FID against reference statistics of the originals
    reference = ReferenceStats.from_batches(x.split(64), ext, num_images=len(x), max_features=None)
    fid = GenerativeMetrics(extractor=ext, metrics=("fid",))
    fid.set_reference(reference)
    fid.update_fake(noisy(x, 32))
    assert scores[1] == pytest.approx(fid.compute()["fid"], rel=1e-4)


def test_the_originals_features_are_computed_once_per_key():
    ext, x = extractor(), digits()
    seen: list[int] = []
    ext.register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
    blur = lambda images: torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1)  # noqa: E731
    metrics = ReconstructionMetrics(extractor=ext)

    def run(key, transform=blur):
        seen.clear()
        out = evaluate_reconstructions(transform, lambda i: x[i], metrics, num_images=100, batch_size=64,
                                       originals_key=key)["rfid"]
        return out, sum(seen)

    first, n_first = run("val")
    again, n_again = run("val")
    assert (n_first, n_again) == (200, 100) and again == pytest.approx(first, rel=1e-9)
    assert run("val", lambda images: images) == (pytest.approx(0.0, abs=1e-9), 100)  # reused, still exact
    assert run(None)[1] == 200 and run(None)[1] == 200  # no key: nothing is reused


def test_bad_input_is_refused_by_name():
    metrics = ReconstructionMetrics(extractor=extractor())
    with pytest.raises(ValueError, match=r"originals \(2, 1, 8, 8\) and reconstructions \(3, 1, 8, 8\)"):
        metrics.update(digits(2), digits(3))
    with pytest.raises(ValueError, match="num_images=1 and batch_size=4: need num_images >= 2"):
        evaluate_reconstructions(lambda x: x, lambda i: digits()[i], metrics, num_images=1, batch_size=4)
    with pytest.raises(ValueError, match=r"callbacks.reconstruction_fid.num_images=1 is not allowed: use an int >= 2"):
        ReconstructionFID(metrics=metrics, num_images=1)


# ---------------------------------------------------------------------------------------- DDP


class KeepFeatures(ReconstructionMetrics):
    """compute() returns this rank's features instead of the score (what DDP's gather would concatenate)."""

    def compute(self) -> dict[str, torch.Tensor]:
        return {"real": self.real.compute()[0], "fake": self.fake.compute()[0]}


def test_each_rank_scores_its_block_and_together_they_are_one_process():
    """Rank r takes the contiguous block metrics.evaluation.shard gives it, in batches; FeatureBank's gather (tested
    with 2 gloo processes in test_metrics) concatenates the blocks in rank order: the single-process features."""
    x, ext = digits(), extractor()
    blur = lambda images: torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1)  # noqa: E731
    seen: list[list[int]] = []

    def run(rank: int, world_size: int, batch_size: int) -> dict[str, torch.Tensor]:
        seen.append([])
        images_at = lambda indices: (seen[-1].extend(indices), x[indices])[1]  # noqa: E731
        return evaluate_reconstructions(blur, images_at, KeepFeatures(extractor=ext), num_images=251,
                                        batch_size=batch_size, rank=rank, world_size=world_size)

    single = run(0, 1, 64)
    ranks = [run(rank, 2, 40) for rank in range(2)]
    assert seen[1] == list(range(126)) and seen[2] == list(range(126, 251))
    for kind in ("real", "fake"):
        torch.testing.assert_close(torch.cat([r[kind] for r in ranks]), single[kind])
    direct = ReconstructionMetrics(extractor=ext)
    direct.update(x[:251], to_uint8(blur(to_model_range(x[:251]))))
    assert direct.compute()["rfid"] > 0


# ---------------------------------------------------------------------------- the callback in training


def tiny_autoencoder() -> AutoencoderModule:
    torch.manual_seed(0)
    net = AutoencoderKL(image_size=8, in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                        z_channels=2)
    return AutoencoderModule(net=net, optimizer=lambda params: torch.optim.Adam(params, lr=1e-3))


def test_the_callback_logs_val_rfid_at_every_validation_and_at_the_end(tmp_path):
    data = DigitsDataModule(image_size=8, channels=1, batch_size=32, num_workers=0, val_fraction=0.1, seed=0,
                            hflip=False)
    callback = ReconstructionFID(metrics=ReconstructionMetrics(extractor=extractor()), num_images=100, batch_size=32)
    trainer = pl.Trainer(accelerator="cpu", max_steps=5, val_check_interval=2, limit_val_batches=1,
                         check_val_every_n_epoch=None, logger=pl.loggers.CSVLogger(tmp_path, name="", version=""),
                         default_root_dir=tmp_path, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=1, callbacks=[callback])
    module = tiny_autoencoder()
    trainer.fit(module, datamodule=data)
    assert [r["step"] for r in callback.history] == [2, 4, 5]  # validations at 2 and 4 (no sanity check), then the end
    assert all(r["num_images"] == 100 and r["rfid"] > 0 for r in callback.history)
    rows = [r for r in (tmp_path / "metrics.csv").read_text().splitlines()[1:] if r]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    logged = [float(v.split(",")[header.index("val/rfid")]) for v in rows if v.split(",")[header.index("val/rfid")]]
    assert logged == pytest.approx([r["rfid"] for r in callback.history])
    assert json.loads((tmp_path / "eval" / "reconstruction.json").read_text())["results"][-1]["step"] == 5
    # the final value is the rFID of the trained module's reconstructions of the first 100 held-out images
    x = torch.cat(list(data.uint8_batches("val", limit=100)))
    again = evaluate_reconstructions(module.reconstruct, lambda i: x[i], ReconstructionMetrics(extractor=extractor()),
                                     num_images=100, batch_size=100)["rfid"]
    assert again == pytest.approx(callback.history[-1]["rfid"], rel=1e-5)
    assert float(trainer.callback_metrics["val/rfid"]) == pytest.approx(again, rel=1e-5)


def test_the_callback_refuses_a_module_without_reconstruct():
    callback = ReconstructionFID(metrics=ReconstructionMetrics(extractor=extractor()))
    with pytest.raises(ValueError, match="LightningModule has no reconstruct"):
        callback.setup(pl.Trainer(logger=False), pl.LightningModule(), "fit")


# ------------------------------------------------------------------ difflab-train's config and classifier


@pytest.mark.slow
def test_autoencoder_experiment_trains_its_classifier_first_and_logs_rfid(tmp_path, monkeypatch):
    """experiment=digits_autoencoder: the default digits classifier (16 px) is missing, so it is trained once into
    paths.cache_dir before the Trainer is built (cut to 20 steps here), and the run logs val/rfid."""
    from difflab.cli.feature_classifier import ensure_callback_classifiers
    from difflab.cli.trainer_setup import build_trainer
    from difflab.lit.from_config import build_module

    monkeypatch.setenv("DIFFLAB_CLASSIFIER_OVERRIDES", "trainer.max_steps=20")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("train", return_hydra_config=True, overrides=[
                "experiment=digits_autoencoder", f"hydra.run.dir={tmp_path}", f"paths.output_dir={tmp_path}",
                f"paths.cache_dir={tmp_path / 'cache'}", f"paths.data_dir={tmp_path / 'data'}", "logger=csv",
                "trainer.max_steps=4", "trainer.check_val_every_n_epoch=null", "+trainer.val_check_interval=4",
                "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
                "callbacks.reconstruction_fid.num_images=50", "callbacks.reconstruction_grid=null",
            ])
        HydraConfig().set_config(cfg)
        ensure_callback_classifiers(cfg)  # what difflab-train runs before it builds the Trainer
        trainer = build_trainer(cfg)
        assert (tmp_path / "cache" / "classifiers" / "digits_16px.ckpt").is_file()
        trainer.fit(build_module(cfg), datamodule=instantiate(cfg.data))
    finally:
        GlobalHydra.instance().clear()
    history = json.loads((tmp_path / "eval" / "reconstruction.json").read_text())["results"]
    assert [r["step"] for r in history] == [4] and history[0]["extractor"] == "classifier_digits_16px"
    assert history[0]["num_images"] == 50 and history[0]["rfid"] > 0
    assert float(trainer.callback_metrics["val/rfid"]) == pytest.approx(history[0]["rfid"])
