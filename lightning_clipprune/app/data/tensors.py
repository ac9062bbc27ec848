"""In-memory tensor data: a data set held as two tensors, batched by slicing, augmented batched on the device.

Small image data sets (digits, MNIST, Fashion-MNIST, CIFAR-10) fit in memory many times over. Holding
them as one ``uint8`` tensor on the accelerator and cutting batches out of it replaces a ``DataLoader``
with worker processes and per-sample ``__getitem__`` calls, which on these data sets costs more than the
network itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import lightning as L
import torch
import torch.nn.functional as F

__all__ = ["ShuffleSampler", "TensorBatches", "TensorDataModule", "random_crop_flip"]

Transform = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]


def random_crop_flip(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """The standard CIFAR augmentation, batched: zero-pad by ``padding``, random crop back, random h-flip.

    Every image draws its own crop offset and flip, as ``RandomCrop(32, padding=4)`` +
    ``RandomHorizontalFlip()`` applied per image would, but in a few tensor ops on the batch's device.

    Args:
        x: images ``(N, C, H, W)``.
        padding: pixels of zero padding on every side; the crop offset is uniform in ``[0, 2 * padding]``.
        generator: random generator on ``x.device`` (``None``: the global one).

    Returns:
        A new ``(N, C, H, W)`` tensor.

    Example::

        >>> random_crop_flip(torch.ones(8, 3, 32, 32)).shape
        torch.Size([8, 3, 32, 32])
    """
    n, c, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device, generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device, generator=generator)
        rows = (oy + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = (ox + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        chans = torch.arange(c, device=x.device).view(1, c, 1, 1)
        x = padded[batch, chans, rows, cols]
    flip = torch.rand(n, device=x.device, generator=generator) < 0.5
    return torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)


class ShuffleSampler:
    """The order of one epoch: a seeded permutation (or the identity), this rank's share of it.

    Lightning calls ``set_epoch`` at the start of every epoch (it looks for a ``sampler`` attribute on the
    loader), so each epoch draws a new permutation from ``seed + epoch`` and every rank draws the same one
    and keeps every ``world_size``-th element starting at its ``rank``.

    Args:
        n: number of samples.
        shuffle: draw a permutation per epoch (else keep the order).
        seed: seed of the permutation.
        rank: this process's rank.
        world_size: number of processes.
        drop_uneven: drop the ``n % world_size`` last samples of the permutation so every rank gets as many
            (for training, where ranks must take the same number of steps).
    """

    def __init__(
        self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1, drop_uneven: bool = False
    ) -> None:
        self.n = n
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_uneven = drop_uneven
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_uneven:
            return self.n // self.world_size
        return len(range(self.rank, self.n, self.world_size))

    def indices(self) -> torch.Tensor | None:
        """This rank's indices for the current epoch; ``None`` when that is simply ``0..n-1``."""
        if not self.shuffle and self.world_size == 1:
            return None
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        if self.drop_uneven:
            order = order[: len(self) * self.world_size]
        return order[self.rank :: self.world_size]


class TensorBatches:
    """A loader over two tensors: each epoch reorders them once (if shuffling), then yields slices.

    It defines ``__len__`` (Lightning's progress bar and ``limit_*_batches`` rely on it) and ``sampler``
    (Lightning calls ``sampler.set_epoch``; ``batch_sampler`` is None, as on a ``DataLoader`` that batches
    itself, so Lightning's checks read it as such). ``transform(x, generator)`` runs on every batch, on the
    tensors' device, with a generator seeded from the sampler's seed and epoch.

    Args:
        x: inputs, first dimension the sample.
        y: labels, same length.
        batch_size: samples per batch.
        sampler: the epoch order; ``None``: in order, one process.
        drop_last: drop the last, smaller batch.
        transform: batched ``(x, generator) -> x``, e.g. normalisation and augmentation.

    Example::

        >>> loader = TensorBatches(torch.arange(10.0), torch.arange(10), batch_size=4)
        >>> len(loader), [len(b[0]) for b in loader]
        (3, [4, 4, 2])
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        sampler: ShuffleSampler | None = None,
        drop_last: bool = False,
        transform: Transform | None = None,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"TensorBatches: `x` and `y` must have the same length, got {len(x)} and {len(y)}")
        if batch_size < 1:
            raise ValueError(f"TensorBatches: `batch_size` must be >= 1, got {batch_size!r}")
        self.x = x
        self.y = y
        self.batch_size = batch_size
        self.sampler = sampler if sampler is not None else ShuffleSampler(len(x), shuffle=False)
        self.batch_sampler = None
        self.drop_last = drop_last
        self.transform = transform
        self._skip = 0

    def skip_batches(self, n: int) -> None:
        """Start the next epoch's iteration at batch ``n``: its first ``n`` batches were trained on before a
        mid-epoch checkpoint. The order and the augmentation of the batches after them stay as they were."""
        self._skip = max(0, int(n))

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.x, self.y
        idx = self.sampler.indices()
        if idx is not None:
            idx = idx.to(x.device)
        generator = None
        if self.transform is not None:
            generator = torch.Generator(device=x.device)
            s = self.sampler
            generator.manual_seed((s.seed * 1_000_003 + s.epoch * 1009 + s.rank) % (2**63))
        skip, self._skip = self._skip, 0
        for i in range(len(self)):
            if i < skip and self.transform is None:
                continue
            rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
            if idx is None:
                xb, yb = x[rows], y[rows]
            else:  # batch by batch: the first batch at once, an epoch of 54k images 7x cheaper
                xb, yb = x.index_select(0, idx[rows]), y.index_select(0, idx[rows])
            if self.transform is not None:
                xb = self.transform(xb, generator)  # on skipped batches too: the generator moves on as it did
            if i >= skip:
                yield xb, yb


def _validate_common(name: str, batch_size: int, val_fraction: float) -> None:
    if batch_size < 1:
        raise ValueError(f"{name}: `batch_size` must be >= 1, got {batch_size!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"{name}: `val_fraction` must be in (0, 1), got {val_fraction!r}")


class TensorDataModule(L.LightningDataModule):
    """Base of the in-memory data modules: split, device placement, normalisation, augmentation, loaders.

    A subclass implements :meth:`load` (and :meth:`prepare_data` to find or download files); this class
    holds out ``val_fraction`` of the training set for validation (a fixed split, seeded by ``split_seed``
    so it does not move with the run's seed), moves the raw (often ``uint8``) tensors to the Trainer's
    device in ``setup``, and turns each batch into normalised ``float32`` there:
    ``((x * scale) [-> augment] - mean) / std``.

    Args:
        batch_size: training batch size.
        val_fraction: fraction of the training set held out for validation, in (0, 1).
        eval_batch_size: validation/test batch size (``None``: 4 x ``batch_size``).
        seed: seed of the shuffling and augmentation; ``None``: drawn from torch's global generator
            (so ``seed_everything`` makes it reproducible), then shared by all ranks.
        split_seed: seed of the train/validation split.
        augment: apply :func:`random_crop_flip` to training batches.
        crop_padding: padding of the random crop.
        drop_last: drop the last incomplete training batch.
        on_device: move the data to the Trainer's device in ``setup`` (else batches travel per step).
        mean: per-channel mean of the scaled pixels (``None``: the data set's published value).
        std: per-channel standard deviation (``None``: the data set's published value).
    """

    #: per-channel normalisation, set by subclasses
    scale: float = 1.0 / 255.0
    mean: Sequence[float] = (0.5,)
    std: Sequence[float] = (0.5,)
    num_classes: int = 10
    display_name: str = "data"

    def __init__(
        self,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        eval_batch_size: int | None = None,
        seed: int | None = None,
        split_seed: int = 0,
        augment: bool = False,
        crop_padding: int = 4,
        drop_last: bool = False,
        on_device: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if mean is not None:
            self.mean = tuple(float(m) for m in mean)
        if std is not None:
            self.std = tuple(float(s) for s in std)
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError(
                f"{type(self).__name__}: `mean` and `std` need one value per channel and std > 0, got {self.mean}, {self.std}"
            )
        _validate_common(type(self).__name__, batch_size, val_fraction)
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"{type(self).__name__}: `eval_batch_size` must be >= 1, got {eval_batch_size!r}")
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.eval_batch_size = eval_batch_size or 4 * batch_size
        self.seed = seed
        self.split_seed = split_seed
        self.augment = augment
        self.crop_padding = crop_padding
        self.drop_last = drop_last
        self.on_device = on_device
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._shuffle_seed: int | None = None

    def load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The raw data: ``{"train": (x, y), "test": (x, y)}`` (``"test"`` optional), ``x`` as ``(N, C, H, W)``."""
        raise NotImplementedError

    @property
    def has_test(self) -> bool:
        """Whether the data set has a test split (known after ``setup``; before it, assumed)."""
        return self._splits is None or "test" in self._splits

    def _device(self) -> torch.device:
        if self.on_device and self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cpu")

    def setup(self, stage: str | None = None) -> None:
        if self._splits is None:
            raw = self.load()
            x, y = raw["train"]
            g = torch.Generator().manual_seed(self.split_seed)
            order = torch.randperm(len(x), generator=g)
            n_val = max(1, round(self.val_fraction * len(x)))
            splits = {"train": (x[order[n_val:]], y[order[n_val:]]), "val": (x[order[:n_val]], y[order[:n_val]])}
            if "test" in raw:
                splits["test"] = raw["test"]
            self._splits = splits
        device = self._device()
        self._splits = {k: (x.to(device), y.to(device)) for k, (x, y) in self._splits.items()}
        if self._shuffle_seed is None:
            seed = self.seed if self.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
            if self.trainer is not None and self.trainer.world_size > 1:
                seed = int(self.trainer.strategy.broadcast(seed, src=0))
            self._shuffle_seed = seed

    def _normalise(self, x: torch.Tensor, generator: torch.Generator | None, augment: bool) -> torch.Tensor:
        x = x.float() * self.scale
        if augment:
            x = random_crop_flip(x, self.crop_padding, generator)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def _loader(self, split: str, train: bool) -> TensorBatches:
        if self._splits is None or self._shuffle_seed is None:
            self.setup()
        splits, seed = self._splits or {}, self._shuffle_seed or 0
        x, y = splits[split]
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        sampler = ShuffleSampler(len(x), shuffle=train, seed=seed, rank=rank, world_size=world, drop_uneven=train)
        augment = train and self.augment
        return TensorBatches(
            x,
            y,
            self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            drop_last=train and self.drop_last,
            transform=lambda xb, g: self._normalise(xb, g, augment),
        )

    def train_dataloader(self) -> TensorBatches:
        return self._loader("train", train=True)

    def val_dataloader(self) -> TensorBatches:
        return self._loader("val", train=False)

    def test_dataloader(self) -> TensorBatches:
        if self._splits is not None and "test" not in self._splits:
            raise ValueError(f"{type(self).__name__}: this data set has no test split")
        return self._loader("test", train=False)

    def sizes(self) -> dict[str, int]:
        """Number of samples per split (after ``setup``)."""
        return {} if self._splits is None else {k: len(v[1]) for k, v in self._splits.items()}
