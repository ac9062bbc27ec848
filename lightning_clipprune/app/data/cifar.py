"""CIFAR-10 from its python pickle batches (``cifar-10-batches-py``): found on disk or downloaded."""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_clipprune._io import MAX_LOAD_BYTES_ENV, max_load_bytes, open_regular
from lightning_clipprune.app.data.locate import (
    FileDataModule,
    cache_dir,
    candidate_dirs,
    download,
    download_error_text,
    find_dir,
    not_found,
)

__all__ = ["CIFAR10DataModule", "CIFAR10_MD5", "CIFAR10_URL", "read_cifar_batch"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
#: The published MD5 of ``cifar-10-python.tar.gz`` (https://www.cs.toronto.edu/~kriz/cifar.html).
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST = "test_batch"


def _numpy_multiarray() -> Any:
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    return multiarray


# What the official batches (pickled by Python 2 with numpy 1) and re-pickled ones name; nothing else.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_multiarray()._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_multiarray()._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RefusedGlobal(pickle.UnpicklingError):
    """The batch names a global outside :data:`_ALLOWED_GLOBALS`."""


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds only containers, bytes, numbers and numpy arrays: no other global is reachable."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(
                f"refused to unpickle {module}.{name}: not allowed in a CIFAR-10 batch (the file may be malicious)"
            ) from None


def read_cifar_batch(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR pickle batch: a dict with ``b"data"`` (``uint8``, ``(N, 3072)``, channel-major) and ``b"labels"``.

    The file is read with a restricted unpickler that admits only what the official batches hold (dicts,
    lists, bytes, numbers, numpy arrays): a file crafted to run code when unpickled is refused, and its
    code never runs.

    Returns:
        ``(images (N, 3, 32, 32) uint8, labels (N,) int64)``.

    Raises:
        ValueError: if the file names any other global, is not a pickle, or does not hold such a dict; one
            line naming the file.
    """
    where = f"read_cifar_batch: {os.fspath(path)}"
    try:
        with open_regular(path) as f:
            if os.fstat(f.fileno()).st_size > max_load_bytes():
                raise ValueError(f"over the load limit (raise it with {MAX_LOAD_BYTES_ENV}=<bytes> if you trust the file)")
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except _RefusedGlobal as err:
        raise ValueError(f"{where}: {err}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as err:
        raise ValueError(f"{where}: not a CIFAR-10 python batch ({type(err).__name__}: {err})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{where}: not a CIFAR-10 python batch (no b'data'/b'labels')")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise ValueError(f"{where}: b'data' is not a uint8 array of shape (N, 3072) (got {type(data).__name__} {shape})")
    if not isinstance(labels, list) or len(labels) != len(data) or not all(isinstance(v, int) for v in labels):
        raise ValueError(f"{where}: b'labels' is not a list of {len(data)} ints")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.as_tensor(labels, dtype=torch.long)


class CIFAR10DataModule(FileDataModule):
    """CIFAR-10 (Krizhevsky 2009): 50,000 training and 10,000 test 32x32 colour images, 10 classes.

    The batches ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` are looked for in ``root``,
    ``root/cifar-10-batches-py``, the same under ``$DATA_DIR``, and the download cache; if absent and
    ``download`` is set, ``cifar-10-python.tar.gz`` (163 MB) is downloaded, checked against its published
    MD5 and extracted there. The batches are read without running code from them (:func:`read_cifar_batch`).
    Normalised with the usual per-channel mean and std; ``augment=True`` (the default) applies the
    standard random crop (4 px zero padding) and horizontal flip on the device.

    Args:
        root: folder holding the batches (``None``: search the default locations).
        download: try to download the archive when the batches are not found.
        **kwargs: the :class:`~lightning_clipprune.app.data.tensors.TensorDataModule` arguments.

    Raises:
        DataNotFoundError: if the batches are neither found nor downloadable (from ``prepare_data``/``setup``),
            or ``root`` is not a folder (at construction).
    """

    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    num_classes = 10
    display_name = "CIFAR-10"

    def __init__(self, root: str | None = None, download: bool = True, augment: bool = True, **kwargs) -> None:
        super().__init__(root, download, augment=augment, **kwargs)

    def _locate(self) -> Path:
        """The folder holding the six batches; downloads and extracts the archive if needed and allowed."""
        required = [(name,) for name in (*_TRAIN, _TEST)]
        cache = cache_dir("cifar10")
        dirs = list(dict.fromkeys([*candidate_dirs(self.root, "cifar10", ("cifar-10-batches-py",), ()), cache / "cifar-10-batches-py"]))
        found = find_dir(dirs, required)
        error = None
        if found is None and self.download:
            dest = self._download_dest(cache)
            archive = dest / "cifar-10-python.tar.gz"
            try:
                download(CIFAR10_URL, archive, md5=CIFAR10_MD5)
                with tarfile.open(archive) as tar:
                    tar.extractall(dest, filter="data")
                found = find_dir([dest / "cifar-10-batches-py"], required)
            except (OSError, tarfile.TarError) as err:
                error = f"{CIFAR10_URL}: {download_error_text(err)}"
        if found is None:
            files = [f"cifar-10-batches-py/{name}" for name in (*_TRAIN, _TEST)]
            hint = f"download {CIFAR10_URL} and extract it (tar xzf) into a folder"
            raise not_found(self.display_name, [files[0], "...", files[-1]], dirs, error if self.download else None, hint)
        return found

    def load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        folder = self.locate()
        parts = [read_cifar_batch(folder / name) for name in _TRAIN]
        train = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        return {"train": train, "test": read_cifar_batch(folder / _TEST)}
