"""Untrusted files: no code runs from a checkpoint, a CIFAR batch or a sparse file, and each bad file is one line.

Hostile pickles here carry a ``__reduce__`` payload that would create a marker file; every test asserts the
marker never appears. Crafted ``.lcps`` files are built byte by byte (with a valid checksum, so that the
structural checks behind the checksum are what is exercised).
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import stat
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lightning_clipprune import GradientClipCallback, MagnitudePruneCallback, SparsityLogger
from lightning_clipprune._io import atomic_path, atomic_write_bytes, atomic_write_text
from lightning_clipprune.checkpoint import (
    CheckpointError,
    check_checkpoint_file,
    load_checkpoint,
    pickle_globals,
    safe_checkpoint_globals,
)
from lightning_clipprune.data import read_cifar_batch
from lightning_clipprune.export import SparseFormatError, load_sparse, save_sparse
from tests.helpers import TinyClassifier, random_loader, tiny_trainer

from .conftest import write_cifar10


class _Payload:
    """Unpickling this runs ``os.system`` (creates the marker file) with a normal unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _one_line(message: str, path: Path) -> None:
    assert "\n" not in message.strip() and str(path) in message, message


# ----------------------------------------------------------------------------------------------- checkpoints


def _suite_trainer(tmp: Path, max_epochs: int) -> L.Trainer:
    """The three callbacks with the most state to checkpoint (AutoClip history, Taylor gradient averages)."""
    return tiny_trainer(
        tmp, max_epochs=max_epochs, limit_train_batches=4,
        callbacks=[
            GradientClipCallback(clip_val=None, algorithm="autoclip"),
            MagnitudePruneCallback(sparsity=0.5, schedule="oneshot", start=2, criterion="taylor"),
            SparsityLogger(),
        ],
    )


@pytest.fixture(scope="module")
def suite_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint of a model trained with the three callbacks."""
    tmp = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    trainer = _suite_trainer(tmp, max_epochs=1)
    trainer.fit(TinyClassifier(), random_loader())
    path = tmp / "suite.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_the_suites_checkpoints_load_safely(suite_checkpoint: Path, tmp_path: Path) -> None:
    check_checkpoint_file(suite_checkpoint)
    ckpt = load_checkpoint(suite_checkpoint)
    assert set(ckpt["state_dict"]) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    assert any(k.startswith("MagnitudePruneCallback") for k in ckpt["callbacks"])
    # What users' modules commonly put in hyper-parameters is admitted explicitly.
    hp = {"cfg": OmegaConf.create({"model": {"lr": 0.1, "layers": [1, 2]}}), "root": pathlib.Path("/data"),
          "lr": np.float64(0.1), "depth": np.int64(20)}
    path = tmp_path / "hp.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": hp}, path)
    loaded = load_checkpoint(path)["hyper_parameters"]
    assert loaded["cfg"].model.layers == [1, 2] and loaded["root"] == pathlib.Path("/data") and loaded["lr"] == 0.1


def test_resume_through_lightning_loads_with_weights_only(suite_checkpoint: Path, tmp_path: Path) -> None:
    """What the app does for ``ckpt_path=``: check the file, then let Lightning load it with weights_only=True."""
    check_checkpoint_file(suite_checkpoint)
    trainer = _suite_trainer(tmp_path, max_epochs=2)
    with safe_checkpoint_globals():
        trainer.fit(TinyClassifier(), random_loader(), ckpt_path=str(suite_checkpoint), weights_only=True)
    assert trainer.current_epoch == 2 and trainer.global_step == 8


def _hostile_files(tmp_path: Path, suite_checkpoint: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    """``{case: (path, expected message fragment)}``."""
    good = suite_checkpoint.read_bytes()
    files: dict[str, tuple[Path, str]] = {}

    def add(case: str, data: bytes | None, expected: str) -> None:
        path = tmp_path / f"{case}.ckpt"
        if data is not None:
            path.write_bytes(data)
        files[case] = (path, expected)

    torch.save({"state_dict": {"w": torch.ones(2)}, "x": _Payload(marker)}, tmp_path / "reduce.ckpt")
    files["reduce_os_system"] = (tmp_path / "reduce.ckpt", r"refused to unpickle (posix|nt)\.system: not allowed")
    torch.save({"state_dict": {}, "x": _ExecPayload(marker)}, tmp_path / "exec.ckpt")
    files["reduce_exec"] = (tmp_path / "exec.ckpt", r"refused to unpickle builtins\.exec")
    add("raw_pickle", pickle.dumps(_Payload(marker)), r"refused to unpickle (posix|nt)\.system")
    add("raw_pickle_proto0", pickle.dumps(_Payload(marker), protocol=0), r"refused to unpickle (posix|nt)\.system")
    add("random", np.random.default_rng(0).bytes(4096), "not a torch checkpoint")
    add("zeros", bytes(64), "not a torch checkpoint")
    add("zip_magic_then_random", b"PK\x03\x04" + np.random.default_rng(1).bytes(4096), "truncated or corrupt zip")
    add("empty", b"", r"empty file \(0 bytes\)")
    for cut in (1, 100, len(good) // 2, len(good) - 1):
        add(f"truncated_{cut}", good[:cut], "truncated|not a torch checkpoint")
    flipped = bytearray(good)
    flipped[len(good) // 3] ^= 0xFF
    add("bit_flip", bytes(flipped), "corrupt|not a torch checkpoint|refused")
    torch.save([torch.ones(2)], tmp_path / "list.ckpt")
    files["not_a_dict"] = (tmp_path / "list.ckpt", "holds a list, not a dict")
    torch.save({"w": torch.ones(2)}, tmp_path / "bare.ckpt")
    files["bare_state_dict"] = (tmp_path / "bare.ckpt", r"not a Lightning checkpoint \(no 'state_dict' entry\)")
    (tmp_path / "folder.ckpt").mkdir()
    files["directory"] = (tmp_path / "folder.ckpt", "not a file")
    files["missing"] = (tmp_path / "missing.ckpt", "no such file")
    return files


def test_check_checkpoint_file_refuses_every_bad_file_in_one_line(suite_checkpoint: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    cases = _hostile_files(tmp_path, suite_checkpoint, marker)
    assert len(cases) >= 15
    for case, (path, expected) in cases.items():
        with pytest.raises(CheckpointError, match=expected) as info:
            check_checkpoint_file(path)
        assert isinstance(info.value, ValueError), case
        _one_line(str(info.value), path)
        assert str(info.value).startswith(f"checkpoint {path}: "), case
    assert not marker.exists()


def test_pickle_globals_reads_names_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        names = pickle_globals(pickle.dumps({"a": [_Payload(marker)]}, protocol=protocol))
        assert names in (["posix.system"], ["nt.system"]), (protocol, names)
    assert pickle_globals(pickle.dumps({"a": [1, b"x", 2.0]}, protocol=4)) == []
    with pytest.raises(ValueError):
        pickle_globals(b"\xff\x00garbage")
    assert not marker.exists()


def test_export_cli_refuses_a_hostile_checkpoint(tmp_path: Path) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    ckpt = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {"w": torch.ones(4)}, "x": _Payload(marker)}, ckpt)
    out = tmp_path / "out.lcps"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_clipprune.export", str(ckpt), str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert str(ckpt) in proc.stderr and "refused to unpickle" in proc.stderr and "malicious" in proc.stderr
    assert not marker.exists() and not out.exists() and proc.stdout == ""


def test_export_cli_unsafe_load_is_explicit_and_warns(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lightning_clipprune.export import main

    ckpt = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(64)}}, ckpt)
    assert main([str(ckpt), str(tmp_path / "a.lcps")]) == 0
    assert "WARNING" not in capsys.readouterr().err  # safe by default, no warning
    assert main([str(ckpt), str(tmp_path / "b.lcps"), "--unsafe-load"]) == 0
    err = capsys.readouterr().err
    assert "WARNING: --unsafe-load" in err and "runs any code" in err
    assert torch.equal(load_sparse(tmp_path / "b.lcps")["w"], torch.zeros(64))


# ----------------------------------------------------------------------------------------------- CIFAR-10


def test_hostile_cifar_batch_is_refused_and_its_payload_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    root = write_cifar10(tmp_path / "cifar", per_batch=4)
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    for protocol in (0, 2, 3, pickle.HIGHEST_PROTOCOL):  # 0 and 2 spell bytes with _codecs.encode: refused first
        batch.write_bytes(pickle.dumps({b"data": _Payload(marker), b"labels": [1]}, protocol=protocol))
        with pytest.raises(ValueError, match=r"refused to unpickle [\w.]+: not allowed in a CIFAR-10 batch") as info:
            read_cifar_batch(batch)
        _one_line(str(info.value), batch)
    batch.write_bytes(pickle.dumps({"data": _Payload(marker)}, protocol=2))
    with pytest.raises(ValueError, match=r"refused to unpickle (posix|nt)\.system: not allowed"):
        read_cifar_batch(batch)
    batch.write_bytes(pickle.dumps({b"data": _ExecPayload(marker), b"labels": [1]}))
    with pytest.raises(ValueError, match=r"refused to unpickle builtins\.exec"):
        read_cifar_batch(batch)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "not a CIFAR-10 python batch"),
        (b"\x80\x04garbage", "not a CIFAR-10 python batch|not a pickle|unpickling"),
        (pickle.dumps([1, 2, 3]), r"no b'data'/b'labels'"),
        (pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [1, 2]}), r"shape \(N, 3072\)"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [1, 2]}), "uint8"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}), "list of 2 ints"),
    ],
)
def test_malformed_cifar_batch_is_one_line(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "data_batch_1"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=expected) as info:
        read_cifar_batch(path)
    _one_line(str(info.value), path)


# ----------------------------------------------------------------------------------------------- .lcps


_MAGIC, _END = b"LCPSPARS", b"LCPSEND\x00"
F32, I64, BOOL = 1, 9, 10
DENSE, BITMASK, SIGNS, ALIAS = 0, 1, 2, 3


def _record(name: bytes | str, code: int, encoding: int, shape: tuple[int, ...], payload: bytes = b"") -> bytes:
    name = name.encode() if isinstance(name, str) else name
    return (
        struct.pack("<H", len(name)) + name + struct.pack("<BBB", code, encoding, len(shape))
        + b"".join(struct.pack("<Q", d) for d in shape) + payload
    )


def _craft(
    records: list[bytes], *, version: int = 1, flags: int = 0, n_records: int | None = None,
    meta: bytes = b"{}", meta_len: int | None = None, extra: bytes = b"",
) -> bytes:
    """A file in the format with a valid checksum, every header field settable."""
    n = len(records) if n_records is None else n_records
    body = struct.pack("<8sHHII", _MAGIC, version, flags, n, len(meta) if meta_len is None else meta_len)
    body += meta + b"".join(records) + extra
    return body + struct.pack("<I8s", zlib.crc32(body), _END)


_GOOD = [
    _record("a", F32, DENSE, (2,), struct.pack("<2f", 1.0, 2.0)),
    _record("m", F32, BITMASK, (8,), bytes([0b00000101]) + struct.pack("<2f", 3.0, 4.0)),
]

# (case, file bytes, expected message fragment)
_CRAFTED: list[tuple[str, bytes, str]] = [
    ("absurd empty shape (0, 2**64-1)", _craft([_record("w", F32, DENSE, (0, 2**64 - 1))]), "absurd shape"),
    ("absurd empty shape, 3 dims", _craft([_record("w", F32, DENSE, (2**63, 2**63, 0))]), "absurd shape"),
    ("huge dense shape", _craft([_record("w", F32, DENSE, (2**32, 2**32), b"\0" * 16)]), "needs at least"),
    ("huge 1-d bitmask", _craft([_record("w", F32, BITMASK, (2**64 - 1,), b"\0" * 16)]), "needs at least"),
    ("huge shape, signs", _craft([_record("w", F32, SIGNS, (2**40,))]), "needs at least"),
    ("dense payload short", _craft([_record("w", F32, DENSE, (4,), b"\0" * 15)]), "needs at least"),
    ("bitmask values missing", _craft([_record("w", F32, BITMASK, (8,), b"\xff" + b"\0" * 4)]), "runs past the end"),
    ("unknown dtype code 0", _craft([_record("w", 0, DENSE, (1,), b"\0" * 4)]), "unknown dtype code 0"),
    ("unknown dtype code 255", _craft([_record("w", 255, DENSE, (1,), b"\0" * 4)]), "unknown dtype code 255"),
    ("unknown encoding", _craft([_record("w", F32, 7, (1,), b"\0" * 4)]), "unknown encoding 7"),
    ("records count absurd", _craft(_GOOD, n_records=2**32 - 1), "records cannot fit"),
    ("records count one too many", _craft(_GOOD, n_records=3), "runs past the end"),
    ("records count too few", _craft(_GOOD, n_records=1), "unexpected bytes after the last record"),
    ("metadata length absurd", _craft(_GOOD, meta_len=2**32 - 1), "metadata length"),
    ("metadata length past records", _craft(_GOOD, meta_len=40), "malformed"),
    ("metadata not JSON", _craft(_GOOD, meta=b"{nope"), "malformed metadata"),
    ("metadata a JSON list", _craft(_GOOD, meta=b"[1]"), "not an object"),
    ("metadata not UTF-8", _craft(_GOOD, meta=b'"\xff"'), "malformed metadata"),
    ("version 0", _craft(_GOOD, version=0), "version field holds 0"),
    ("version noise", _craft(_GOOD, version=25492), "version field holds 25492, not a format version"),
    ("unknown flags", _craft(_GOOD, flags=1), "header flags"),
    ("name not UTF-8", _craft([_record(b"\xff\xfe", F32, DENSE, (1,), b"\0" * 4)]), "not UTF-8"),
    ("name repeated", _craft([_GOOD[0], _GOOD[0]]), "repeats the name 'a'"),
    ("alias of nothing", _craft([_record("t", F32, ALIAS, (2,), struct.pack("<H", 1) + b"z")]), "aliases 'z'"),
    ("alias shape mismatch", _craft([_GOOD[0], _record("t", F32, ALIAS, (3,), struct.pack("<H", 1) + b"a")]), "aliases"),
    ("alias dtype mismatch", _craft([_GOOD[0], _record("t", I64, ALIAS, (2,), struct.pack("<H", 1) + b"a")]), "aliases"),
    ("bool holds 2", _craft([_record("b", BOOL, DENSE, (2,), b"\x01\x02")]), "other than 0 and 1"),
    ("mask padding bits", _craft([_record("w", F32, BITMASK, (4,), b"\x10")]), "padding bits"),
    ("trailing bytes", _craft(_GOOD, extra=b"\0\0\0"), "unexpected bytes"),
    ("ndim 255, shape cut", _craft([_record("w", F32, DENSE, ())[:-1] + b"\xff"]), "runs past the end"),
    ("name length past end", _craft([struct.pack("<H", 60000) + b"abc"]), "runs past the end"),
    ("no end marker", _craft(_GOOD)[:-8] + b"XXXXXXXX", "end marker is missing"),
    ("checksum wrong", _craft(_GOOD)[:-12] + b"\0\0\0\0" + _END, "checksum mismatch"),
    ("version 2, checksum wrong", _craft(_GOOD, version=2)[:-12] + b"\0\0\0\0" + _END, "checksum mismatch.*version 2"),
    ("newer version, rest intact", _craft(_GOOD, version=2), "version 2 is newer than this reader"),
    ("foreign", b"PK\x03\x04" + bytes(100), "wrong magic bytes"),
]
for _seed in range(12):  # random bytes after the magic (a plausible version for half), with and without an end marker
    _rng = np.random.default_rng(_seed)
    _noise = _MAGIC + (struct.pack("<H", 2 + _seed) if _seed % 2 else b"") + _rng.bytes(int(_rng.integers(0, 3000)))
    _CRAFTED.append((f"random bytes {_seed}", _noise, "truncated|end marker"))
    _CRAFTED.append((f"random bytes {_seed} + end marker", _noise + _END, "corrupt|truncated|malformed"))


def test_crafted_sparse_files_are_refused_in_one_line(tmp_path: Path) -> None:
    good = tmp_path / "good.lcps"
    good.write_bytes(_craft(_GOOD))
    assert {k: v.tolist() for k, v in load_sparse(good).items()} == {"a": [1.0, 2.0], "m": [3.0, 0, 4.0, 0, 0, 0, 0, 0]}
    assert len(_CRAFTED) >= 50
    for case, data, expected in _CRAFTED:
        path = tmp_path / "crafted.lcps"
        path.write_bytes(data)
        with pytest.raises(SparseFormatError) as info:
            load_sparse(path)
        message = str(info.value)
        assert re.search(expected, message), (case, message)
        _one_line(message, path)
        if not case.startswith("newer"):
            assert "upgrade" not in message, (case, message)


def test_every_prefix_of_a_real_file_is_refused(tmp_path: Path) -> None:
    """Truncation at every byte, header boundaries included: always SparseFormatError, never another error."""
    source = tmp_path / "real.lcps"
    tied = nn.Linear(8, 8)
    state = {"w": tied.weight.detach() * (torch.rand(8, 8) > 0.7), "b": tied.bias.detach(), "n": torch.tensor(3),
             "flag": torch.tensor([True, False]), "tied": None}
    state["tied"] = state["w"]
    save_sparse(state, source)
    data = source.read_bytes()
    cut_file = tmp_path / "cut.lcps"
    for cut in range(len(data)):
        cut_file.write_bytes(data[:cut])
        with pytest.raises(SparseFormatError, match="truncated|wrong magic") as info:
            load_sparse(cut_file)
        _one_line(str(info.value), cut_file)


def test_every_header_field_flipped_is_refused(tmp_path: Path) -> None:
    """Each header field set to 0, 1, its maximum and a random value, checksum refreshed: refused or loaded."""
    body = _craft(_GOOD)[:-12]
    fields = [(8, "<H"), (10, "<H"), (12, "<I"), (16, "<I")]  # version, flags, records, metadata length
    path = tmp_path / "flipped.lcps"
    refused = 0
    for offset, fmt in fields:
        size = struct.calcsize(fmt)
        for value in (0, 1, 2, 2 ** (8 * size) - 1, 12345 % 2 ** (8 * size)):
            altered = body[:offset] + struct.pack(fmt, value) + body[offset + size :]
            path.write_bytes(altered + struct.pack("<I8s", zlib.crc32(altered), _END))
            try:
                load_sparse(path)
            except SparseFormatError as err:
                refused += 1
                _one_line(str(err), path)
    assert refused >= 15


# ----------------------------------------------------------------------------------------------- atomic writes


def test_atomic_path_renames_on_success_and_cleans_up_on_error(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    atomic_write_text(target, json.dumps({"val_acc": 0.5}))
    assert json.loads(target.read_text()) == {"val_acc": 0.5}
    mode = stat.S_IMODE(target.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and tmp.exists()
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert json.loads(target.read_text()) == {"val_acc": 0.5}  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary left
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01" and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "no" / "such" / "dir.txt", "x")


def test_save_sparse_failure_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_clipprune.export.format as fmt

    path = tmp_path / "m.lcps"
    save_sparse({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    real_encode = fmt._encode
    calls: list[int] = []

    def fail_on_second(tensor: torch.Tensor, keep_zero_signs: bool) -> tuple[int, list[bytes]]:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")  # half of the file is written by now
        return real_encode(tensor, keep_zero_signs)

    monkeypatch.setattr(fmt, "_encode", fail_on_second)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_sparse({"a": torch.zeros(100), "b": torch.ones(3)}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.lcps"]
