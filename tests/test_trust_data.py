"""Data files are untrusted too: the IDX and CIFAR-10 readers read only regular files, no more than declared,
and a download never writes through a planted link."""

from __future__ import annotations

import gzip
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from lightning_clipprune._io import MAX_LOAD_BYTES_ENV, RefusedPathError
from lightning_clipprune.app.data.cifar import read_cifar_batch
from lightning_clipprune.app.data.idx import read_idx
from lightning_clipprune.app.data.locate import download
from tests.conftest import write_idx


def _idx_header(shape: tuple[int, ...]) -> bytes:
    return bytes([0, 0, 0x08, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape)


@pytest.mark.parametrize("reader", [read_idx, read_cifar_batch])
def test_a_fifo_or_device_is_refused_without_blocking(tmp_path: Path, reader) -> None:
    fifo = tmp_path / "train-images-idx3-ubyte"
    os.mkfifo(fifo)
    with pytest.raises(RefusedPathError, match="FIFO|special|not a regular file"):
        reader(fifo)
    with pytest.raises(RefusedPathError, match="not a regular file"):
        reader(Path("/dev/zero"))


def test_a_gzip_bomb_is_read_only_as_far_as_its_header_declares(tmp_path: Path) -> None:
    bomb = tmp_path / "labels-idx1-ubyte.gz"
    with gzip.open(bomb, "wb") as f:
        f.write(_idx_header((10,)) + bytes(10))
        zeros = bytes(1 << 20)
        for _ in range(200):  # 200 MiB of trailing zeros, about 200 KiB on disk
            f.write(zeros)
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        out = read_idx(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (10,)
    assert peak < 16 << 20  # the 200 MiB tail is never decompressed into memory


def test_a_header_declaring_more_than_the_load_limit_is_refused_before_reading(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "images-idx3-ubyte"
    path.write_bytes(_idx_header((60000, 28, 28)) + bytes(64))
    monkeypatch.setenv(MAX_LOAD_BYTES_ENV, str(1 << 20))
    with pytest.raises(ValueError, match=r"declares \(60000, 28, 28\).*over the load limit") as err:
        read_idx(path)
    assert "\n" not in str(err.value)


def test_idx_still_reads_real_files_plain_and_gzipped(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a-idx3-ubyte", array)
    with open(tmp_path / "a-idx3-ubyte", "rb") as src, gzip.open(tmp_path / "a-idx3-ubyte.gz", "wb") as dst:
        dst.write(src.read())
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte"), array)
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), array)
    (tmp_path / "broken.gz").write_bytes(b"\x1f\x8b not gzip")
    with pytest.raises(ValueError, match="broken.gz"):
        read_idx(tmp_path / "broken.gz")


def test_a_download_never_writes_through_a_planted_link(tmp_path: Path) -> None:
    source = tmp_path / "served.bin"
    source.write_bytes(b"payload")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    dest_dir = tmp_path / "cache"
    dest_dir.mkdir()
    dest = dest_dir / "archive.tar.gz"
    dest.symlink_to(victim)
    with pytest.raises(RefusedPathError, match="symbolic link"):
        download(source.as_uri(), dest)
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in dest_dir.iterdir()) == ["archive.tar.gz"]  # no temporary left behind
    dest.unlink()
    download(source.as_uri(), dest)
    assert dest.read_bytes() == b"payload"
