"""scikit-learn's bundled 8x8 handwritten digits: the embedded default data set (offline, seconds to train)."""

from __future__ import annotations

import torch

from lightning_clipprune.app.data.tensors import TensorDataModule

__all__ = ["DigitsDataModule"]


class DigitsDataModule(TensorDataModule):
    """The 1,797 8x8 digit images of ``sklearn.datasets.load_digits`` (UCI optdigits test set), 10 classes.

    There is no official split: a fixed ``test_fraction`` is held out as the test set (seeded by
    ``split_seed``), then ``val_fraction`` of the rest for validation. Images are ``(1, 8, 8)`` with pixel
    values 0..16, scaled to [0, 1] and normalised with the training-set mean and std.

    Args:
        test_fraction: fraction of the 1,797 images held out as the test set, in (0, 1).
        **kwargs: the :class:`~lightning_clipprune.app.data.tensors.TensorDataModule` arguments.

    Raises:
        ValueError: if ``test_fraction`` is not in (0, 1).

    Example::

        >>> dm = DigitsDataModule(batch_size=64)
        >>> dm.setup(); dm.sizes()
        {'train': 1294, 'val': 144, 'test': 359}
    """

    scale = 1.0 / 16.0
    mean = (0.3053,)
    std = (0.3760,)
    num_classes = 10
    display_name = "digits"

    def __init__(self, test_fraction: float = 0.2, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"DigitsDataModule: `test_fraction` must be in (0, 1), got {test_fraction!r}")
        self.test_fraction = test_fraction

    def load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        from sklearn.datasets import load_digits  # lazy: scikit-learn is optional outside the digits data

        bunch = load_digits()
        x = torch.as_tensor(bunch.data, dtype=torch.uint8).view(-1, 1, 8, 8)
        y = torch.as_tensor(bunch.target, dtype=torch.long)
        # the test split uses its own generator so the validation split (split_seed) leaves it alone
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.split_seed + 12345))
        n_test = round(self.test_fraction * len(x))
        test, train = order[:n_test], order[n_test:]
        return {"train": (x[train], y[train]), "test": (x[test], y[test])}
