"""Fixtures shared by the data and app tests: small data sets written in the real on-disk formats."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest


def write_cifar10(root: Path, per_batch: int = 64, seed: int = 0) -> Path:
    """A small CIFAR-10 in the real format: ``root/cifar-10-batches-py/data_batch_1..5`` and ``test_batch``.

    Each file is a pickled dict with ``b"data"`` (``uint8``, ``(per_batch, 3072)``, channel-major rows) and
    ``b"labels"`` (a list of ints), as in the official archive. Returns ``root``.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an IDX file, gzipped when ``path`` ends in ``.gz``."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_mnist_like(root: Path, n_train: int = 120, n_test: int = 40, gz: bool = True, seed: int = 0) -> Path:
    """The four IDX files of an MNIST-format data set with random 28x28 images; returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ext = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{split}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(root / f"{split}-labels-idx1-ubyte{ext}", rng.integers(0, 10, n, dtype=np.uint8))
    return root


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CIFAR-10 (64 images per batch file) in the real pickle format."""
    return write_cifar10(tmp_path_factory.mktemp("cifar"))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: a download attempt fails at once, as on an offline machine (``usefixtures("offline")``)."""
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline (tests)")

    monkeypatch.setattr("urllib.request.urlopen", offline)
