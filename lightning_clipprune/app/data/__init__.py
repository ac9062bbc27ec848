"""In-memory tensor data modules: digits (embedded), MNIST / Fashion-MNIST (IDX files), CIFAR-10 (pickles)."""

from lightning_clipprune.app.data.cifar import CIFAR10DataModule, read_cifar_batch
from lightning_clipprune.app.data.digits import DigitsDataModule
from lightning_clipprune.app.data.idx import FashionMNISTDataModule, IDXDataModule, MNISTDataModule, read_idx
from lightning_clipprune.app.data.locate import DataNotFoundError
from lightning_clipprune.app.data.tensors import (
    ShuffleSampler,
    TensorBatches,
    TensorDataModule,
    random_crop_flip,
)

__all__ = [
    "CIFAR10DataModule",
    "DataNotFoundError",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "IDXDataModule",
    "MNISTDataModule",
    "ShuffleSampler",
    "TensorBatches",
    "TensorDataModule",
    "random_crop_flip",
    "read_cifar_batch",
    "read_idx",
]
