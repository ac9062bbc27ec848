"""The networks of the experiments: an MLP, LeNet-300-100, LeNet-5, the seed CNN and the CIFAR ResNets of He et al.
(2016).

Each is a plain ``nn.Module`` that maps a batch of inputs to class logits, so any of them can be wrapped
by :class:`~lightning_clipprune.app.models.Classifier` or used on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "LeNet300100", "LeNet5", "SeedCNN", "CifarResNet", "resnet20", "resnet32", "resnet56"]


class MLP(nn.Module):
    """A fully connected ReLU network; inputs of any shape are flattened.

    Args:
        in_features: number of input features after flattening (64 for the 8x8 digits).
        hidden: widths of the hidden layers, in order.
        num_classes: number of output logits.
        dropout: dropout probability after every hidden layer (0 turns it off).

    Raises:
        ValueError: if a width is not positive or ``dropout`` is not in [0, 1).

    Example::

        >>> MLP(64, [128, 64], 10)(torch.zeros(2, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_features: int, hidden: Sequence[int] = (256, 256), num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        widths = [in_features, *hidden, num_classes]
        if any(int(w) <= 0 for w in widths):
            raise ValueError(f"MLP: `in_features`, `hidden` and `num_classes` must be positive, got {widths}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MLP: `dropout` must be in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.Linear(int(w_in), int(w_out)))
            if i < len(widths) - 2:
                layers.append(nn.ReLU(inplace=True))
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LeNet300100(MLP):
    """LeNet-300-100 (LeCun et al. 1998): 784-300-100-10 with ReLU, the MLP baseline of Han et al. (2015).

    Args:
        in_features: input size after flattening (28 * 28 for MNIST and Fashion-MNIST).
        num_classes: number of output logits.

    Example::

        >>> LeNet300100()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__(in_features, (300, 100), num_classes)


class LeNet5(nn.Module):
    """A LeNet-5 style CNN: two 5x5 conv + ReLU + 2x2 max-pool stages, then three linear layers.

    With the defaults it is LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling; ``channels=(20, 50)``,
    ``hidden=(500,)`` gives the Caffe "LeNet" that Han et al. (2015) prune.

    Args:
        in_channels: image channels (1 for MNIST).
        num_classes: number of output logits.
        channels: output channels of the two convolutions.
        hidden: widths of the hidden linear layers.
        image_size: height (= width) of the input images.

    Example::

        >>> LeNet5()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: Sequence[int] = (6, 16),
        hidden: Sequence[int] = (120, 84),
        image_size: int = 28,
    ) -> None:
        super().__init__()
        if len(channels) != 2:
            raise ValueError(f"LeNet5: `channels` must hold two numbers, got {list(channels)}")
        c1, c2 = int(channels[0]), int(channels[1])
        # padding=2 keeps 28x28 at 28x28 after the first conv, as the 32x32 input of the original did.
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = ((image_size // 2) - 4) // 2
        self.classifier = MLP(c2 * side * side, hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SeedCNN(nn.Module):
    """The small CNN of the method's worked example (``+experiment=seed``).

    ``Conv2d(in_channels, 32, 3)``, ReLU, ``Conv2d(32, 64, 3)``, ReLU, 2x2 average pooling, flatten,
    ``Linear(64 * s * s, hidden)``, ReLU, ``Linear(hidden, num_classes)`` with ``s = (image_size - 4) // 2``
    (12 for 28x28 inputs: 0.94 M parameters, 98 % of them in the first linear layer). No padding, as in the
    example.

    Args:
        in_channels: image channels (1 for MNIST and Fashion-MNIST).
        num_classes: number of output logits.
        image_size: height (= width) of the input images, at least 6.
        hidden: width of the hidden linear layer (100 in the example).

    Raises:
        ValueError: if ``image_size`` < 6 or a width is not positive.

    Example::

        >>> SeedCNN()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, hidden: int = 100) -> None:
        super().__init__()
        if image_size < 6:
            raise ValueError(f"SeedCNN: `image_size` must be >= 6 (two 3x3 convs and a 2x2 pool), got {image_size!r}")
        if min(in_channels, num_classes, hidden) <= 0:
            raise ValueError(
                "SeedCNN: `in_channels`, `num_classes` and `hidden` must be positive, got "
                f"{in_channels!r}, {num_classes!r}, {hidden!r}"
            )
        side = (image_size - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.AvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut_kind = shortcut
        self.pad = c_out - c_in
        self.stride = stride
        self.shortcut: nn.Module = nn.Identity()
        if (stride != 1 or c_in != c_out) and shortcut == "B":
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def _option_a(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = self._option_a(x) if self.shortcut_kind == "A" else self.shortcut(x)
        return F.relu(out + identity)


class CifarResNet(nn.Module):
    """The CIFAR-10 ResNets of He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, sec. 4.2.

    A 3x3 conv with 16 channels, then three stages of ``n`` basic blocks with 16, 32 and 64 channels (the
    first block of stages 2 and 3 halves the resolution), global average pooling and one linear layer:
    ``depth = 6 n + 2`` (20, 32, 44, 56, 110). ResNet-20 has 0.27 M parameters with option A.

    Shortcuts where the shape changes:

    - ``"A"`` (the paper's CIFAR choice, the default): identity on a stride-2 subsample, the new channels
      zero-padded, so the shortcut has no parameters.
    - ``"B"``: a 1x1 convolution + BatchNorm projection.

    Args:
        depth: ``6 n + 2``.
        num_classes: number of output logits.
        shortcut: ``"A"`` or ``"B"``.
        in_channels: image channels.

    Raises:
        ValueError: if ``depth`` is not ``6 n + 2`` or ``shortcut`` is neither "A" nor "B".

    Example::

        >>> CifarResNet(20)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, shortcut: str = "A", in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CifarResNet: `depth` must be 6n+2 (20, 32, 44, 56, 110), got {depth!r}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"CifarResNet: `shortcut` must be one of 'A', 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        c_in = 16
        for stage, c_out in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(_BasicBlock(c_in, c_out, stride, shortcut))
                c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def resnet20(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    """ResNet-20 for CIFAR (0.27 M parameters)."""
    return CifarResNet(20, num_classes, shortcut)


def resnet32(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    """ResNet-32 for CIFAR (0.46 M parameters)."""
    return CifarResNet(32, num_classes, shortcut)


def resnet56(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    """ResNet-56 for CIFAR (0.85 M parameters)."""
    return CifarResNet(56, num_classes, shortcut)
