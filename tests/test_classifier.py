"""The feature classifier: net shapes and argument checks, the Lightning module, its config, the CLI, loading."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from difflab.cli.config import config_dir
from difflab.cli.feature_classifier import ensure_feature_classifier
from difflab.cli.train_classifier import build_classifier_module, load_classifier, train_classifier, train_command
from difflab.data import DigitsDataModule
from difflab.lit.classifier import ClassifierModule, random_translate
from difflab.metrics.build import build_extractor, classifier_path
from difflab.nets.classifiers import ImageClassifier, NoisyImageClassifier

CONF = Path(config_dir())
CREATE = "difflab-train-classifier data=digits data.image_size=8"


def small_net(**kwargs) -> ImageClassifier:
    return ImageClassifier(**{"image_size": 8, "in_channels": 1, "num_classes": 10, "ch": 8, **kwargs})


# --- net -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size, in_channels", [(8, 1), (28, 1), (32, 3), (5, 1)])
def test_net_shapes_and_attributes(image_size, in_channels):
    net = ImageClassifier(image_size=image_size, in_channels=in_channels, num_classes=7, ch=8, feature_dim=24)
    x = torch.rand(3, in_channels, image_size, image_size) * 2 - 1
    assert net(x).shape == (3, 7)
    assert net.features(x).shape == (3, 24)
    assert (net.image_size, net.in_channels, net.num_classes, net.num_features) == (image_size, in_channels, 7, 24)


def test_net_defaults_and_eval_is_deterministic():
    net = ImageClassifier(image_size=8, in_channels=1, num_classes=10).eval()
    assert net.num_features == 128 and net.ch == 32
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    assert torch.equal(net(x), net(x))  # dropout off in eval mode
    assert torch.allclose(net(x[:1]), net(x)[:1], atol=1e-6)  # no cross-sample mixing (GroupNorm, not BatchNorm)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 2}, "image_size=2 must be an int >= 4"),
        ({"image_size": 8.0}, "image_size=8.0 must be an int"),
        ({"in_channels": 0}, "in_channels=0 must be an int >= 1"),
        ({"num_classes": 1}, "num_classes=1 must be an int >= 2"),
        ({"ch": True}, "ch=True must be an int"),
        ({"feature_dim": 0}, "feature_dim=0 must be an int >= 1"),
        ({"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout=-0.1 must be in \[0, 1\)"),
    ],
)
def test_net_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_net(**kwargs)


def test_net_constructor_is_keyword_only():
    with pytest.raises(TypeError):
        ImageClassifier(8, 1, 10)  # type: ignore[misc]


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 8, 8), r"expects x of shape \(B, C, H, W\)"),
        ((2, 3, 8, 8), "x has 3 channels but this ImageClassifier has in_channels=1"),
        ((2, 1, 16, 16), "x has spatial size 16x16 but this ImageClassifier has image_size=8"),
    ],
)
def test_net_rejects_bad_input(shape, message):
    with pytest.raises(ValueError, match=message):
        small_net()(torch.zeros(shape))


# --- augmentation and module -------------------------------------------------------------------------


def test_random_translate_shifts_without_flipping():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    assert random_translate(x, 0) is x
    gen = torch.Generator().manual_seed(0)
    out = random_translate(x, 1, generator=gen)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    crops = [padded[..., dy : dy + 6, dx : dx + 6] for dy in range(3) for dx in range(3)]
    for b in range(2):  # every image is one of the 9 crops of its padded self (all channels alike)
        assert any(torch.equal(out[b], c[b]) for c in crops)
    again = random_translate(x, 1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"label_smoothing": 1.0}, r"label_smoothing=1.0 must be in \[0, 1\)"),
        ({"max_shift": -1}, "max_shift=-1 must be an int >= 0"),
        ({"lr_schedule": "linear"}, r"lr_schedule='linear' is not supported; allowed: \('constant', 'cosine'\)"),
    ],
)
def test_module_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassifierModule(net=small_net(), optimizer=partial(torch.optim.SGD, lr=0.1), **kwargs)


def test_module_logs_metrics_and_marks_checkpoint(tmp_path):
    pl.seed_everything(0)
    module = ClassifierModule(net=small_net(), optimizer=partial(torch.optim.AdamW, lr=1e-3))
    module.run_config = {"classifier": {"net": {}}}
    trainer = pl.Trainer(
        max_steps=3, limit_train_batches=3, limit_val_batches=1, check_val_every_n_epoch=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=DigitsDataModule(image_size=8, channels=1, batch_size=32, num_workers=0,
                                                    val_fraction=0.1, seed=0, hflip=False))
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(trainer.callback_metrics)
    trainer.save_checkpoint(tmp_path / "c.ckpt", weights_only=True)
    ckpt = torch.load(tmp_path / "c.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["difflab"] == {"config": {"classifier": {"net": {}}}, "kind": "classifier"}


# --- config ------------------------------------------------------------------------------------------


@pytest.fixture
def compose_cfg(tmp_path):
    def _compose(overrides: list[str]):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(
                "train_classifier", overrides=[f"hydra.run.dir={tmp_path}", *overrides], return_hydra_config=True
            )
        HydraConfig().set_config(cfg)
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "classifier").glob("*.yaml")))
def test_every_classifier_option_composes_and_instantiates(compose_cfg, option):
    cfg = compose_cfg([f"classifier={option}"])
    module = build_classifier_module(cfg)
    assert isinstance(module, ClassifierModule) and isinstance(module.net, (ImageClassifier, NoisyImageClassifier))
    assert module.net.image_size == cfg.data.image_size and module.net.in_channels == cfg.data.channels
    x = torch.rand(2, cfg.data.channels, cfg.data.image_size, cfg.data.image_size) * 2 - 1
    args = (torch.tensor([0, 999]),) if isinstance(module.net, NoisyImageClassifier) else ()  # x_t and t
    assert module(x, *args).shape == (2, module.net.num_classes)


def test_default_config(compose_cfg, monkeypatch):
    monkeypatch.delenv("DIFFLAB_CACHE_DIR", raising=False)
    cfg = compose_cfg([])
    assert cfg.trainer.max_time is None and cfg.trainer.max_steps > 0
    assert cfg.trainer.enable_checkpointing is False
    assert cfg.out_path.endswith("/.cache/difflab/classifiers/digits_8px.ckpt")
    cfg = compose_cfg(["data=mnist", "data.image_size=16"])
    assert cfg.out_path.endswith("/classifiers/mnist_16px.ckpt")


@pytest.mark.parametrize(
    "override, message",
    [
        ("classifier.net.num_classes=5", "set classifier.net.num_classes=10"),
        ("classifier.module.lr_schedule=linear", "lr_schedule='linear' is not supported"),
        ("data.image_size=3", "image_size=3 must be an int >= 4"),
        ("num_threads=0", "num_threads=0 must be a positive int"),
    ],
)
def test_bad_settings_fail_before_training(compose_cfg, tmp_path, override, message):
    cfg = compose_cfg([override, f"out_path={tmp_path}/c.ckpt"])
    with pytest.raises(Exception, match=message):  # ValueError, or Hydra's InstantiationException wrapping it
        train_classifier(cfg)
    assert not (tmp_path / "c.ckpt").exists()


# --- loading -----------------------------------------------------------------------------------------


def test_missing_classifier_names_path_and_command(tmp_path):
    path = tmp_path / "elsewhere" / "digits_8px.ckpt"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_classifier(path)
    with pytest.raises(FileNotFoundError) as err:  # a named classifier_ckpt that is missing is not trained for you
        build_extractor("auto", dataset="digits", image_size=8, cache_dir=tmp_path, classifier_ckpt=str(path),
                        classifier_loader=load_classifier)
    assert str(path) in str(err.value) and CREATE in str(err.value)
    assert train_command(tmp_path / "fashion_mnist_32px.ckpt").startswith(
        "difflab-train-classifier data=fashion_mnist data.image_size=32 out_path="
    )


# --- created on first use (difflab.cli.feature_classifier) ---------------------------------------------


@pytest.mark.parametrize("extractor, dataset, ckpt", [
    ("inception", "digits", None), ("efficientnet_lite0", "digits", None), ("auto", "cifar10", None),
    ("auto", "digits", "given.ckpt"), ("classifier", "mnist", "given.ckpt"),
])
def test_first_use_only_when_the_default_classifier_is_needed(tmp_path, extractor, dataset, ckpt):
    assert ensure_feature_classifier(extractor=extractor, dataset=dataset, image_size=8, cache_dir=tmp_path,
                                     classifier_ckpt=ckpt, before_training=pytest.fail) is None
    assert not (tmp_path / "classifiers").exists()


def test_an_existing_classifier_is_used_as_it_is(tmp_path):
    path = classifier_path(tmp_path, "digits", 8)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    assert ensure_feature_classifier(extractor="auto", dataset="digits", image_size=8, cache_dir=tmp_path,
                                     before_training=pytest.fail) == path


def test_other_ranks_wait_for_local_rank_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    path = classifier_path(tmp_path, "digits", 8)
    kwargs = dict(extractor="auto", dataset="digits", image_size=8, cache_dir=tmp_path, before_training=pytest.fail)
    with pytest.raises(TimeoutError, match=f"local rank 0 trains on first use.*{CREATE}"):
        ensure_feature_classifier(**kwargs, timeout=0.2, poll_seconds=0.05)
    writer = threading.Timer(0.2, lambda: (path.parent.mkdir(parents=True), path.write_bytes(b"x")))
    writer.start()
    assert ensure_feature_classifier(**kwargs, timeout=30, poll_seconds=0.05) == path
    writer.join()


@pytest.mark.timeout(300)
def test_classifier_is_trained_on_first_use_in_isolation(tmp_path, monkeypatch):
    """The nested difflab-train-classifier run (a few steps here) writes the default file, logs below
    classifiers/runs/, and hands back the caller's random state, threads and torchrun environment."""
    torchrun = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0"}
    for key, value in torchrun.items():  # Lightning would see a 2-process job and refuse devices=1
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(123)
        expected = torch.rand(3)
        torch.manual_seed(123)
        path = ensure_feature_classifier(
            extractor="auto", dataset="digits", image_size=8, cache_dir=tmp_path,
            overrides=["trainer.max_steps=3", "trainer.check_val_every_n_epoch=1000", "trainer.enable_progress_bar=false",
                       "trainer.enable_model_summary=false"])
        assert torch.equal(torch.rand(3), expected) and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert path == classifier_path(tmp_path, "digits", 8) and path.is_file()
    assert {k: os.environ.get(k) for k in torchrun} == torchrun
    assert list((tmp_path / "classifiers" / "runs").glob("digits_8px-*/csv/metrics.csv"))
    assert isinstance(load_classifier(path), ImageClassifier)


def test_bad_override_reports_itself_before_the_classifier(tmp_path):
    """difflab-train trainer.max_steps=abc with no classifier yet: the trainer's error, nothing trained."""
    from difflab.cli.train import train

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=[f"hydra.run.dir={tmp_path / 'run'}", f"paths.output_dir={tmp_path / 'run'}",
                                               f"paths.cache_dir={tmp_path / 'cache'}", "data.image_size=8", "model.ch=8",
                                               "trainer.max_steps=abc"], return_hydra_config=True)
            HydraConfig().set_config(cfg)
            with open_dict(cfg):
                del cfg["hydra"]  # as in the app, which hands train() the job's config only
            with pytest.raises(Exception, match="'<' not supported"):  # Hydra's InstantiationException
                train(cfg)
    finally:
        GlobalHydra.instance().clear()
    assert not (tmp_path / "cache" / "classifiers").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ({"state_dict": {}}, "holds no difflab run config"),
        ({"state_dict": {}, "difflab": {"config": {"a": 1}, "parameterization": "eps"}}, "of kind 'diffusion', not 'classifier'"),
        (
            {"state_dict": {}, "difflab": {"config": {"classifier": {"net": {"_target_": "os.system"}}}, "kind": "classifier"}},
            "_target_='os.system' is not allowed",
        ),
    ],
)
def test_load_refuses_other_checkpoints(tmp_path, content, message):
    path = tmp_path / "x.ckpt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=message):
        load_classifier(path)


# --- the CLI end to end --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_trains_saves_and_load_classifier_is_accurate(tmp_path):
    out_path = tmp_path / "cache" / "digits_8px.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "difflab.cli.train_classifier", "trainer.max_steps=300",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         f"hydra.run.dir={tmp_path / 'run'}", f"out_path={out_path}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"classifier: {out_path}" in proc.stdout and "val/acc: " in proc.stdout
    assert sorted(p.name for p in out_path.parent.iterdir()) == ["digits_8px.ckpt"]  # no temporary left over
    metrics = (tmp_path / "run" / "csv" / "metrics.csv").read_text()
    assert all(k in metrics for k in ("train/loss", "train/acc", "val/loss", "val/acc"))

    net = load_classifier(out_path)
    assert isinstance(net, ImageClassifier) and not net.training
    dm = DigitsDataModule(image_size=8, channels=1, batch_size=64, num_workers=0, val_fraction=0.1, seed=0,
                          hflip=False)  # the CLI's split (conf/data/digits.yaml)
    correct, total = 0, 0
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            correct += int((net(x).argmax(dim=1) == y).sum())
            total += len(y)
            assert net.features(x).shape == (len(y), 128)
    assert total == 180 and correct / total > 0.95, f"val accuracy {correct / total:.3f}"
