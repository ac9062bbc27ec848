"""Networks (MLP, LeNet-300-100, LeNet-5, the seed CNN, CIFAR ResNet-20/32/56) and the ``Classifier`` LightningModule."""

from lightning_clipprune.app.models.classifier import LR_SCHEDULES, Classifier
from lightning_clipprune.app.models.networks import (
    MLP,
    CifarResNet,
    LeNet5,
    LeNet300100,
    SeedCNN,
    resnet20,
    resnet32,
    resnet56,
)

__all__ = [
    "LR_SCHEDULES",
    "MLP",
    "CifarResNet",
    "Classifier",
    "LeNet300100",
    "LeNet5",
    "SeedCNN",
    "resnet20",
    "resnet32",
    "resnet56",
]
