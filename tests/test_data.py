"""In-memory tensor data: slicing loaders, sharding, batched augmentation, the data sets and their lookup."""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_clipprune.app.data import (
    CIFAR10DataModule,
    DataNotFoundError,
    DigitsDataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    ShuffleSampler,
    TensorBatches,
    locate,
    random_crop_flip,
    read_cifar_batch,
    read_idx,
)
from lightning_clipprune.app.data.cifar import CIFAR10_MD5

from .conftest import write_cifar10, write_idx, write_mnist_like
from .helpers import tiny_trainer

pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture(autouse=True)
def _isolated_lookup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No $DATA_DIR and an empty cache, so only what a test puts on disk is found."""
    monkeypatch.delenv("DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


# ------------------------------------------------------------------ loaders


def test_tensor_batches_cover_every_sample_once_per_epoch_in_a_new_order() -> None:
    x, y = torch.arange(100.0).view(100, 1), torch.arange(100)
    loader = TensorBatches(x, y, batch_size=32, sampler=ShuffleSampler(100, shuffle=True, seed=7))
    assert len(loader) == 4
    epoch0 = torch.cat([b[1] for b in loader])
    assert sorted(epoch0.tolist()) == list(range(100))
    assert [len(b[1]) for b in loader] == [32, 32, 32, 4]
    assert torch.equal(torch.cat([b[1] for b in loader]), epoch0)  # same epoch, same order
    loader.sampler.set_epoch(1)
    epoch1 = torch.cat([b[1] for b in loader])
    assert sorted(epoch1.tolist()) == list(range(100)) and not torch.equal(epoch1, epoch0)
    for xb, yb in loader:  # inputs and labels travel together
        assert torch.equal(xb.view(-1).long(), yb)


@pytest.mark.parametrize("augment", [False, True])
def test_skipped_batches_leave_the_rest_of_the_epoch_as_it_was(augment: bool) -> None:
    """A mid-epoch resume: the epoch restarts at batch 3 with the batches (and their augmentation) it had."""

    def noisy(xb: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        return xb + torch.rand(xb.shape, generator=g)

    x, y = torch.arange(100.0).view(100, 1), torch.arange(100)
    loader = TensorBatches(x, y, batch_size=16, sampler=ShuffleSampler(100, shuffle=True, seed=3),
                           transform=noisy if augment else None)
    loader.sampler.set_epoch(2)
    whole = list(loader)
    loader.skip_batches(3)
    rest = list(loader)
    assert len(rest) == len(whole) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, whole[3:], strict=True))
    assert len(list(loader)) == len(whole)  # once: the next epoch is whole again


def test_tensor_batches_follow_the_samplers_order_exactly() -> None:
    # the batches are gathered one by one: they must be the slices of the epoch's whole gather (same runs as before)
    x = torch.randint(0, 255, (103, 1, 4, 4), dtype=torch.uint8)
    y = torch.arange(103)
    for sampler in (ShuffleSampler(103, shuffle=True, seed=5), ShuffleSampler(103, shuffle=True, seed=5, rank=1, world_size=2)):
        sampler.set_epoch(3)
        loader = TensorBatches(x, y, batch_size=16, sampler=sampler)
        idx = sampler.indices()
        assert torch.equal(torch.cat([b[0] for b in loader]), x[idx])
        assert torch.equal(torch.cat([b[1] for b in loader]), y[idx])


def test_tensor_batches_drop_last_and_in_order_slices() -> None:
    x, y = torch.arange(10.0), torch.arange(10)
    loader = TensorBatches(x, y, batch_size=4, drop_last=True)
    assert len(loader) == 2
    batches = list(loader)
    assert [b[1].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert batches[0][0].data_ptr() == x.data_ptr()  # unshuffled: views of the tensor, no copy


@pytest.mark.parametrize(("n", "world"), [(100, 2), (101, 2), (103, 4)])
def test_sampler_shards_are_disjoint_and_equal_in_training(n: int, world: int) -> None:
    shards = [ShuffleSampler(n, shuffle=True, seed=3, rank=r, world_size=world, drop_uneven=True) for r in range(world)]
    idx = [s.indices() for s in shards]
    assert len({len(i) for i in idx}) == 1 and all(len(i) == len(s) == n // world for i, s in zip(idx, shards, strict=True))
    flat = torch.cat(idx).tolist()
    assert len(set(flat)) == len(flat)


def test_sampler_shards_cover_everything_once_in_evaluation() -> None:
    shards = [ShuffleSampler(101, shuffle=False, rank=r, world_size=2) for r in range(2)]
    flat = sorted(torch.cat([s.indices() for s in shards]).tolist())
    assert flat == list(range(101)) and [len(s) for s in shards] == [51, 50]


def test_bad_loader_arguments_raise() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        TensorBatches(torch.zeros(3), torch.zeros(3), batch_size=0)
    with pytest.raises(ValueError, match="same length"):
        TensorBatches(torch.zeros(3), torch.zeros(4), batch_size=1)
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.0)
    with pytest.raises(ValueError, match="test_fraction"):
        DigitsDataModule(test_fraction=0.0)
    with pytest.raises(ValueError, match="std"):
        DigitsDataModule(mean=[0.1], std=[0.0])


# ------------------------------------------------------------------ augmentation


def test_random_crop_flip_returns_shifted_windows_of_the_zero_padded_image() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8) + 1.0  # no zeros in the image: zeros can only come from the padding
    out = random_crop_flip(x, padding=2, generator=g)
    assert out.shape == x.shape
    padded = F.pad(x, (2, 2, 2, 2))
    n_flipped = 0
    for i in range(64):
        windows = [padded[i, :, a : a + 8, b : b + 8] for a in range(5) for b in range(5)]
        plain = any(torch.equal(out[i], w) for w in windows)
        flipped = any(torch.equal(out[i], w.flip(2)) for w in windows)
        assert plain or flipped
        n_flipped += flipped and not plain
    assert 10 < n_flipped < 54  # about half flipped
    offsets = {(int((out[i] == 0).all(0).any(1).sum()), int((out[i] == 0).all(0).any(0).sum())) for i in range(64)}
    assert len(offsets) > 3  # crops differ between images


def test_random_crop_flip_is_reproducible_from_the_generator() -> None:
    x = torch.rand(16, 3, 32, 32)
    a = random_crop_flip(x, generator=torch.Generator().manual_seed(5))
    b = random_crop_flip(x, generator=torch.Generator().manual_seed(5))
    c = random_crop_flip(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------ digits


def test_digits_splits_are_fixed_and_batches_normalised() -> None:
    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup()
    sizes = dm.sizes()
    assert sum(sizes.values()) == 1797 and sizes["test"] == round(0.2 * 1797)
    assert sizes["val"] == round(0.1 * (1797 - sizes["test"]))
    x = torch.cat([b[0] for b in dm.train_dataloader()])
    assert x.shape == (sizes["train"], 1, 8, 8) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05
    other = DigitsDataModule(batch_size=64, seed=1)
    other.setup()
    assert torch.equal(other._splits["val"][1], dm._splits["val"][1])  # the run's seed does not move the split
    first = lambda d: next(iter(d.train_dataloader()))[1]  # noqa: E731
    assert not torch.equal(first(other), first(dm))  # but it does change the order


# ------------------------------------------------------------------ IDX (MNIST, Fashion-MNIST)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trips(tmp_path: Path, gz: bool) -> None:
    a = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    path = tmp_path / ("x.idx.gz" if gz else "x.idx")
    write_idx(path, a)
    assert np.array_equal(read_idx(path), a)


def test_read_idx_rejects_other_files(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")


@pytest.mark.parametrize("gz", [True, False])
def test_idx_data_module_loads_from_root(tmp_path: Path, gz: bool) -> None:
    root = write_mnist_like(tmp_path / "mnist", gz=gz)
    dm = MNISTDataModule(root=str(root), batch_size=16, val_fraction=0.25)
    dm.prepare_data()
    dm.setup()
    assert dm.sizes() == {"train": 90, "val": 30, "test": 40}
    labels = read_idx(root / f"t10k-labels-idx1-ubyte{'.gz' if gz else ''}")
    assert torch.equal(dm._splits["test"][1], torch.from_numpy(labels.astype(np.int64)))
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (40, 1, 28, 28)


def test_idx_data_found_through_data_dir_subfolder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_mnist_like(tmp_path / "data" / "fashion-mnist")
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    dm = FashionMNISTDataModule()
    assert dm.locate() == tmp_path / "data" / "fashion-mnist"


def test_missing_root_folder_fails_at_construction_naming_it(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="data.root=.*nowhere.*is not a folder"):
        FashionMNISTDataModule(root=str(tmp_path / "nowhere"))


def test_absent_data_and_no_network_give_one_line_naming_the_paths(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(FashionMNISTDataModule, "system_dirs", (tmp_path / "system",))
    empty = tmp_path / "empty"
    empty.mkdir()
    dm = FashionMNISTDataModule(root=str(empty))
    with pytest.raises(DataNotFoundError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert "\n" not in msg
    for expected in (str(empty), str(tmp_path / "system"), str(locate.cache_dir("fashion-mnist")), "offline (tests)"):
        assert expected in msg
    assert "data.root=FOLDER" in msg and "DATA_DIR" in msg and "dataset-fashion-mnist" in msg
    assert not list(empty.iterdir())  # no partial download left behind


def test_download_disabled_says_so(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(MNISTDataModule, "system_dirs", ())
    with pytest.raises(DataNotFoundError, match="download disabled"):
        MNISTDataModule(download=False).prepare_data()


def test_download_fills_the_root_when_the_server_answers(tmp_path: Path, monkeypatch) -> None:
    source = write_mnist_like(tmp_path / "server")
    monkeypatch.setattr(MNISTDataModule, "system_dirs", ())

    class Response(io.BytesIO):  # what urlopen returns, as far as download() cares
        pass

    urls: list[str] = []
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: urls.append(url) or Response((source / url.rsplit("/", 1)[1]).read_bytes()))
    root = tmp_path / "root"
    root.mkdir()
    dm = MNISTDataModule(root=str(root))
    dm.prepare_data()
    assert len(urls) == 4 and all(u.endswith(".gz") for u in urls)
    dm.setup()
    assert dm.sizes()["test"] == 40


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_is_found_in_the_system_folder_and_normalised() -> None:
    dm = FashionMNISTDataModule(batch_size=1000)
    dm.setup()
    assert dm.sizes() == {"train": 54000, "val": 6000, "test": 10000}
    x, _ = next(iter(dm.train_dataloader()))
    assert abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1) < 0.1  # mean 0.2860, std 0.3530 fit


# ------------------------------------------------------------------ CIFAR-10


def test_cifar_batches_load_in_the_real_format(cifar_root: Path) -> None:
    x, y = read_cifar_batch(cifar_root / "cifar-10-batches-py" / "test_batch")
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.long
    dm = CIFAR10DataModule(root=str(cifar_root), batch_size=32)
    dm.setup()
    assert dm.sizes() == {"train": 288, "val": 32, "test": 64}
    (xt, _), (xv, _) = next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))
    assert xt.shape == (32, 3, 32, 32) and xv.shape == (32, 3, 32, 32)
    # augmentation on training batches only: zero padding shows up as constant borders (-mean/std)
    pad_value = -torch.tensor(dm.mean) / torch.tensor(dm.std)
    border = (xt[:, :, 0, :] - pad_value.view(1, 3, 1)).abs().amax(dim=(1, 2)) < 1e-5
    assert border.any()
    assert not ((xv[:, :, 0, :] - pad_value.view(1, 3, 1)).abs().amax(dim=(1, 2)) < 1e-5).any()


def test_cifar_found_in_root_or_its_batches_folder(tmp_path: Path) -> None:
    root = write_cifar10(tmp_path / "c", per_batch=4)
    assert CIFAR10DataModule(root=str(root)).locate() == root / "cifar-10-batches-py"
    assert CIFAR10DataModule(root=str(root / "cifar-10-batches-py")).locate() == root / "cifar-10-batches-py"


def test_cifar_absent_names_the_archive_and_paths(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"CIFAR-10 not found: .*cifar-10-python.tar.gz.*offline \(tests\)"):
        CIFAR10DataModule(root=str(tmp_path)).prepare_data()


# ------------------------------------------------------------------ with a Trainer


class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(y.clone())
        return F.cross_entropy(self.layer(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_trainer_uses_len_limit_and_set_epoch(tmp_path: Path) -> None:
    model = _Recorder()
    dm = DigitsDataModule(batch_size=100, seed=0)
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.num_training_batches == 3 and len(model.seen) == 6 and trainer.global_step == 6
    first, second = torch.cat(model.seen[:3]), torch.cat(model.seen[3:])
    assert not torch.equal(first, second)  # Lightning called sampler.set_epoch(1): a new order

    full = _Recorder()
    tiny_trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(full, datamodule=DigitsDataModule(batch_size=100, seed=0))
    assert len(full.seen) == 13  # 1,294 training images in batches of 100
    assert torch.equal(torch.cat(full.seen[:3]), first)  # same seed, same first epoch


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote the official batches: bytes as (SHORT_)BINSTRING, not ``_codecs.encode``."""

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes


def test_cifar_batch_pickled_by_python2_and_numpy1_loads(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump({b"batch_label": b"testing batch 1 of 1", b"labels": [7, 0, 9],
                                        b"data": images, b"filenames": [b"a.png", b"b.png", b"c.png"]})
    data = buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")  # numpy 1's name
    assert b"cnumpy.core.multiarray\n_reconstruct" in data and b"_codecs" not in data
    path = tmp_path / "test_batch"
    path.write_bytes(data)
    x, y = read_cifar_batch(path)
    assert y.tolist() == [7, 0, 9] and torch.equal(x.reshape(3, -1), torch.from_numpy(images))


def _serve(monkeypatch: pytest.MonkeyPatch, payload: bytes) -> list[str]:
    urls: list[str] = []

    def urlopen(url: str, timeout: float) -> io.BytesIO:
        urls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    return urls


def _cifar_archive(tmp_path: Path) -> bytes:
    source = write_cifar10(tmp_path / "server", per_batch=4)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive.read_bytes()


def test_cifar_download_with_the_wrong_md5_is_refused_and_deleted(tmp_path: Path, monkeypatch) -> None:
    urls = _serve(monkeypatch, _cifar_archive(tmp_path))  # a valid archive, but not the official one
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DataNotFoundError) as info:
        CIFAR10DataModule(root=str(root)).prepare_data()
    msg = str(info.value)
    assert "\n" not in msg and len(urls) == 1
    assert f"is not the published {CIFAR10_MD5}" in msg and "cifar-10-python.tar.gz: MD5 " in msg
    assert list(root.iterdir()) == []  # neither the archive nor extracted batches are kept


def test_cifar_download_with_the_published_md5_is_extracted(tmp_path: Path, monkeypatch) -> None:
    payload = _cifar_archive(tmp_path)
    _serve(monkeypatch, payload)
    monkeypatch.setattr("lightning_clipprune.app.data.cifar.CIFAR10_MD5", hashlib.md5(payload).hexdigest())
    root = tmp_path / "root"
    root.mkdir()
    dm = CIFAR10DataModule(root=str(root), batch_size=4)
    assert dm.locate() == root / "cifar-10-batches-py"
    assert locate.file_md5(root / "cifar-10-python.tar.gz") == hashlib.md5(payload).hexdigest()
