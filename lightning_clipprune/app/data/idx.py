"""MNIST and Fashion-MNIST from their IDX files (gzipped or not): found on disk or downloaded."""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_clipprune._io import MAX_LOAD_BYTES_ENV, max_load_bytes, open_regular
from lightning_clipprune.app.data.locate import (
    FileDataModule,
    candidate_dirs,
    download,
    download_error_text,
    find_dir,
    not_found,
)

__all__ = ["IDX_FILES", "FashionMNISTDataModule", "IDXDataModule", "MNISTDataModule", "read_idx"]

#: The four files of an MNIST-format data set, by split.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (LeCun's MNIST format), gzipped when its name ends in ``.gz``.

    Only a regular file is read (a FIFO or a device is refused), and no more bytes than its header declares:
    a gzip bomb stops at the declared size, and a header declaring more than the load limit
    (``$LIGHTNING_CLIPPRUNE_MAX_LOAD_BYTES``, 8 GiB by default) is refused before anything is read.

    Raises:
        ValueError: if the file is not in IDX format, is truncated, or declares too much; one line naming it.
        OSError: not a regular file, or unreadable.
    """
    path = Path(path)
    with open_regular(path) as raw:
        f = gzip.GzipFile(fileobj=raw, mode="rb") if path.suffix == ".gz" else raw
        try:
            return _read_idx_stream(f, str(path))
        except (OSError, EOFError, gzip.BadGzipFile) as err:
            raise ValueError(f"read_idx: {str(path)!r} cannot be read as IDX ({type(err).__name__}: {err})") from None


def _read_idx_stream(f: Any, where: str) -> np.ndarray:
    head = f.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _DTYPES:
        raise ValueError(f"read_idx: {where!r} is not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_DTYPES[head[2]]), head[3]
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise ValueError(f"read_idx: {where!r} is truncated in its header")
    shape = tuple(int.from_bytes(dims[4 * i : 4 + 4 * i], "big") for i in range(ndim))
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_load_bytes():
        raise ValueError(
            f"read_idx: {where!r} declares {shape} ({nbytes:,} bytes), over the load limit"
            f" (raise it with {MAX_LOAD_BYTES_ENV}=<bytes> if you trust the file)"
        )
    data = f.read(nbytes)
    if len(data) < nbytes:
        raise ValueError(f"read_idx: {where!r} is truncated: header says {shape}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


class IDXDataModule(FileDataModule):
    """A data set in MNIST's IDX format: 60,000 training and 10,000 test ``28x28`` images, 10 classes.

    The four files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``, each optionally ``.gz``) are looked for in ``root``, ``$DATA_DIR`` (and
    their sub-folders named like the data set, e.g. ``fashion-mnist`` or torchvision's
    ``FashionMNIST/raw``), the system folder of the Debian package, and the download cache; if absent
    they are downloaded (``download=True``) into ``root``, else ``$DATA_DIR``, else the cache.

    Args:
        root: folder holding the files (``None``: search the default locations).
        download: try to download the files when they are not found.
        **kwargs: the :class:`~lightning_clipprune.app.data.tensors.TensorDataModule` arguments.

    Raises:
        DataNotFoundError: from :meth:`prepare_data`/:meth:`setup`, if the files are neither found nor
            downloadable, or ``root`` is not a folder (at construction).
    """

    name = "mnist"
    subdirs: tuple[str, ...] = ("mnist", "MNIST/raw")
    system_dirs: tuple[Path, ...] = (Path("/usr/share/datasets/mnist"),)
    urls: tuple[str, ...] = ("https://ossci-datasets.s3.amazonaws.com/mnist/",)
    hint = "download the four MNIST IDX files (train-images-idx3-ubyte.gz, ...) into a folder"

    def _required(self) -> list[tuple[str, str]]:
        return [(f, f + ".gz") for pair in IDX_FILES.values() for f in pair]

    def _dirs(self) -> list[Path]:
        return candidate_dirs(self.root, self.name, self.subdirs, self.system_dirs)

    def _locate(self) -> Path:
        """The folder holding the four files; downloads them if needed and allowed."""
        dirs = self._dirs()
        found = find_dir(dirs, self._required())
        if found is None:
            error = None
            if self.download:
                dest = self._download_dest(dirs[-1])
                for base in self.urls:
                    try:
                        for _, gz in self._required():
                            if not (dest / gz).is_file():
                                download(base + gz, dest / gz)
                        found = dest
                        break
                    except OSError as err:
                        error = f"{base}: {download_error_text(err)}"
            if found is None:
                files = [f"{f}[.gz]" for f, _ in self._required()]
                raise not_found(self.display_name, files, dirs, error if self.download else None, self.hint)
        return found

    def load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        folder = self.locate()

        def read(stem: str) -> np.ndarray:
            path = folder / stem if (folder / stem).is_file() else folder / (stem + ".gz")
            return read_idx(path)

        out = {}
        for split, (images, labels) in IDX_FILES.items():
            x = torch.from_numpy(read(images).copy()).unsqueeze(1)
            y = torch.from_numpy(read(labels).astype(np.int64))
            out[split] = (x, y)
        return out


class MNISTDataModule(IDXDataModule):
    """MNIST (LeCun et al. 1998): handwritten digits, mean 0.1307, std 0.3081. See :class:`IDXDataModule`."""

    mean = (0.1307,)
    std = (0.3081,)
    display_name = "MNIST"


class FashionMNISTDataModule(IDXDataModule):
    """Fashion-MNIST (Xiao et al. 2017): 10 clothing classes, mean 0.2860, std 0.3530. See :class:`IDXDataModule`.

    Found without network where the Debian package ``dataset-fashion-mnist`` is installed
    (``/usr/share/datasets/fashion-mnist``).
    """

    name = "fashion-mnist"
    subdirs = ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw")
    system_dirs = (Path("/usr/share/datasets/fashion-mnist"),)
    urls = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
    mean = (0.2860,)
    std = (0.3530,)
    display_name = "Fashion-MNIST"
    hint = (
        "install the Debian package dataset-fashion-mnist, or download the four IDX files "
        "(train-images-idx3-ubyte.gz, ...) from https://github.com/zalandoresearch/fashion-mnist into a folder"
    )
