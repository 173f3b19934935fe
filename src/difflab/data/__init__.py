"""LightningDataModules; every loader yields (x float32 (B, C, H, W) in [-1, 1], y int64 (B,))."""

from difflab.data.base import ImageDataModule
from difflab.data.cifar10 import CIFAR10DataModule
from difflab.data.digits import DigitsDataModule
from difflab.data.errors import DatasetNotFoundError
from difflab.data.folder import ImageFolderDataModule
from difflab.data.mnist import FashionMNISTDataModule, MNISTDataModule
from difflab.data.transforms import to_model_range, to_uint8

__all__ = [
    "CIFAR10DataModule",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "to_model_range",
    "to_uint8",
]
