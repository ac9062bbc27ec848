"""Sparse export: bit-exact round trips, sizes that match the logged formula, clear errors, the CLI, 2:4 checks."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_clipprune.export import (
    SparseFormatError,
    is_n_m_sparse,
    load_sparse,
    load_sparse_into,
    main,
    read_sparse_metadata,
    record_overhead_bytes,
    save_sparse,
    to_semi_structured,
)
from lightning_clipprune.sparsity import compressed_size_bytes
from tests.helpers import TinyClassifier, random_loader, tiny_trainer

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(_BITS[t.element_size()])


def _assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_bits(a[k].contiguous()), _bits(b[k].contiguous())), k


def _pruned(model: nn.Module, sparsity: float, dtype: torch.dtype, negative_zeros: bool = False) -> nn.Module:
    """Zero the smallest ``sparsity`` of every weight matrix (as +0.0, or by multiplication: -0.0 for w < 0)."""
    model = model.to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() > 1:
                k = int(sparsity * p.numel())
                idx = p.abs().flatten().float().argsort()[:k]
                mask = torch.ones(p.numel(), dtype=torch.bool)
                mask[idx] = False
                mask = mask.view_as(p)
                if negative_zeros:
                    p.mul_(mask.to(dtype))
                else:
                    p.masked_fill_(~mask, 0.0)
    return model


def _expected_size(state: dict[str, torch.Tensor], path: Path) -> int:
    """The file size from the format's layout: header, metadata, records (overhead + payload), footer."""
    data = path.read_bytes()
    (meta_len,) = struct.unpack_from("<I", data, 16)
    return 20 + meta_len + sum(record_overhead_bytes(k, v.dim()) + compressed_size_bytes(v) for k, v in state.items()) + 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("negative_zeros", [False, True])
def test_round_trip_is_bit_exact(tmp_path, dtype, negative_zeros):
    torch.manual_seed(0)
    model = _pruned(TinyClassifier(), 0.8, dtype, negative_zeros=negative_zeros)
    with torch.no_grad():  # odd values must survive too
        model.net[0].bias[:3] = torch.tensor([float("nan"), float("inf"), -0.0])
    state = model.state_dict()
    if negative_zeros:
        assert any(bool((torch.signbit(v) & (v == 0)).any()) for v in state.values())
    path = tmp_path / "model.lcps"
    size = save_sparse(model, path)
    assert size == path.stat().st_size == _expected_size(state, path)
    _assert_bit_equal(load_sparse(path), state)

    fresh = TinyClassifier().to(dtype)
    result = load_sparse_into(fresh, path)
    assert not result.missing_keys and not result.unexpected_keys
    _assert_bit_equal(fresh.state_dict(), state)


def test_sparse_tensors_take_the_bitmask_dense_ones_stay_dense(tmp_path):
    torch.manual_seed(0)
    sparse_w = torch.randn(64, 64)
    sparse_w[sparse_w.abs() < 1.5] = 0.0  # about 87% zeros
    dense_w = torch.randn(64, 64)
    state = {"sparse": sparse_w, "dense": dense_w}
    path = tmp_path / "two.lcps"
    save_sparse(state, path)
    nnz = int((sparse_w != 0).sum())
    assert compressed_size_bytes(sparse_w) == 64 * 64 // 8 + nnz * 4
    assert compressed_size_bytes(dense_w) == 64 * 64 * 4
    assert path.stat().st_size == _expected_size(state, path)
    _assert_bit_equal(load_sparse(path), state)


def test_other_dtypes_scalars_and_empty_tensors(tmp_path):
    bn = nn.BatchNorm1d(4)  # num_batches_tracked is a 0-dim int64 buffer
    state = dict(bn.state_dict())
    state.update(
        flags=torch.tensor([True, False, False, False, False, False, False, False, False, True]),
        f64=torch.tensor([[0.0, 1e-300], [0.0, 0.0]], dtype=torch.float64),
        i8=torch.tensor([0, -3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7], dtype=torch.int8),
        empty=torch.zeros(0, 3),
        scalar=torch.tensor(2.5),
        strided=torch.arange(12.0).view(3, 4).t(),  # not contiguous
    )
    path = tmp_path / "misc.lcps"
    save_sparse(state, path, metadata={"note": "hello"})
    _assert_bit_equal(load_sparse(path), {k: v.contiguous() for k, v in state.items()})
    meta = read_sparse_metadata(path)
    assert meta["user"] == {"note": "hello"} and meta["format_version"] == 1


def test_negative_zero_signs_cost_bits_and_can_be_dropped(tmp_path):
    w = torch.randn(128, 128)
    w = w * (w.abs() > 1.0)  # multiplying keeps the sign: about a third of the zeros are -0.0
    exact, dropped = tmp_path / "exact.lcps", tmp_path / "dropped.lcps"
    save_sparse({"w": w}, exact)
    save_sparse({"w": w}, dropped, keep_zero_signs=False)
    zeros = int((w == 0).sum())
    assert exact.stat().st_size - dropped.stat().st_size == (zeros + 7) // 8
    _assert_bit_equal(load_sparse(exact), {"w": w})
    back = load_sparse(dropped)["w"]
    assert torch.equal(back, w) and not bool(torch.signbit(back[back == 0]).any())


def test_tied_weights_stored_once_and_loaded_strictly(tmp_path):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(300, 64)
            self.head = nn.Linear(64, 300, bias=False)
            self.head.weight = self.emb.weight

    torch.manual_seed(0)
    model = Tied()
    path = tmp_path / "tied.lcps"
    save_sparse(model, path)
    assert path.stat().st_size < 300 * 64 * 4 * 1.05  # one copy, not two
    state = load_sparse(path)
    assert state["emb.weight"] is state["head.weight"]
    fresh = Tied()
    load_sparse_into(fresh, path)
    assert torch.equal(fresh.head.weight, model.emb.weight) and fresh.head.weight is fresh.emb.weight


def test_prefix_loads_the_inner_network(tmp_path):
    model = _pruned(TinyClassifier(), 0.5, torch.float32)
    path = tmp_path / "m.lcps"
    save_sparse(model, path)
    inner = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    load_sparse_into(inner, path, prefix="net.")
    _assert_bit_equal(inner.state_dict(), {k.removeprefix("net."): v for k, v in model.state_dict().items()})


@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "good.lcps"
    save_sparse(_pruned(TinyClassifier(), 0.9, torch.float16), path)
    return path


def test_truncated_file_is_a_clear_error(saved):
    data = saved.read_bytes()
    for cut in (0, 5, 19, 40, len(data) // 2, len(data) - 13, len(data) - 1):
        saved.write_bytes(data[:cut])
        with pytest.raises(SparseFormatError, match="truncated") as info:
            load_sparse(saved)
        assert str(saved) in str(info.value)
        assert isinstance(info.value, ValueError) and info.value.path == str(saved)


def test_corrupt_file_is_a_clear_error(saved):
    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 0x10
    saved.write_bytes(bytes(data))
    with pytest.raises(SparseFormatError, match="checksum mismatch") as info:
        load_sparse(saved)
    assert str(saved) in str(info.value)


def test_foreign_file_and_newer_version(tmp_path, saved):
    foreign = tmp_path / "state.pt"
    torch.save({"w": torch.ones(3)}, foreign)
    with pytest.raises(SparseFormatError, match="not a lightning_clipprune sparse file") as info:
        load_sparse(foreign)
    assert str(foreign) in str(info.value)
    data = bytearray(saved.read_bytes())
    data[8:10] = struct.pack("<H", 99)
    saved.write_bytes(bytes(data))
    with pytest.raises(SparseFormatError, match="version 99"):
        load_sparse(saved)
    with pytest.raises(FileNotFoundError, match="missing.lcps"):
        load_sparse(tmp_path / "missing.lcps")


def _refresh_crc(body: bytes) -> bytes:
    return body + struct.pack("<I8s", zlib.crc32(body), b"LCPSEND\x00")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(min_value=20, max_value=10_000), value=st.integers(min_value=0, max_value=255))
def test_malformed_records_with_a_valid_checksum_fail_cleanly(saved, position, value):
    """A record altered so that the checksum still matches is rejected (or decodes) without a crash."""
    body = saved.read_bytes()[:-12]
    position = position % len(body)
    altered = bytearray(body)
    altered[position] = value
    bad = saved.with_name("bad.lcps")
    bad.write_bytes(_refresh_crc(bytes(altered)))
    try:
        load_sparse(bad)
    except SparseFormatError as err:
        assert str(bad) in str(err)


def test_save_rejects_what_it_cannot_store(tmp_path):
    path = tmp_path / "x.lcps"
    with pytest.raises(TypeError, match="'extra'.*not a tensor"):
        save_sparse({"w": torch.ones(2), "extra": 3}, path)
    with pytest.raises(TypeError, match="'c'.*complex64"):
        save_sparse({"c": torch.ones(2, dtype=torch.complex64)}, path)
    with pytest.raises(TypeError, match="metadata"):
        save_sparse({"w": torch.ones(2)}, path, metadata={"x": object()})
    with pytest.raises(TypeError, match="nn.Module or a state dict"):
        save_sparse([torch.ones(2)], path)
    assert os.listdir(tmp_path) == []  # no half-written or temporary file left behind


# ----------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def checkpoint(tmp_path) -> tuple[Path, TinyClassifier]:
    torch.manual_seed(0)
    model = TinyClassifier(hidden=64)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    trainer.fit(model, random_loader())
    _pruned(model, 0.9, torch.float32)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return path, model


def test_cli_writes_the_compact_file_and_prints_sizes(checkpoint, tmp_path, capsys):
    ckpt, model = checkpoint
    out = tmp_path / "model.lcps"
    assert main([str(ckpt), str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{out.stat().st_size:,} bytes" in printed and "torch.save(state_dict)" in printed and "ratio" in printed
    fresh = TinyClassifier(hidden=64)
    load_sparse_into(fresh, out)
    _assert_bit_equal(fresh.state_dict(), model.state_dict())
    assert read_sparse_metadata(out)["user"] == {"source": "model.ckpt"}


def test_cli_bad_path_is_one_line_and_exit_1(tmp_path, capsys):
    missing = tmp_path / "nope.ckpt"
    assert main([str(missing), str(tmp_path / "out.lcps")]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and str(missing) in captured.err and "Traceback" not in captured.err
    not_a_ckpt = tmp_path / "junk.ckpt"
    not_a_ckpt.write_bytes(b"not a checkpoint")
    assert main([str(not_a_ckpt), str(tmp_path / "out.lcps")]) == 1
    assert str(not_a_ckpt) in capsys.readouterr().err
    assert not (tmp_path / "out.lcps").exists()


def test_cli_a_distributed_checkpoint_folder_says_how_to_consolidate_it(tmp_path, capsys):
    """ModelParallelStrategy saves a folder of shards (torch.distributed.checkpoint, indexed by `.metadata`)."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "last.ckpt"
    dcp.save({"w": torch.ones(2)}, checkpoint_id=str(folder), no_dist=True)
    assert main([str(folder), str(tmp_path / "out.lcps")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a distributed checkpoint folder" in err
    assert f"python -m lightning.fabric.utilities.consolidate_checkpoint {folder}` and export {folder}.consolidated" in err


def test_cli_never_replaces_the_checkpoint_or_a_file_of_another_format(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    before = ckpt.read_bytes()
    other = tmp_path / "last.ckpt"
    other.write_bytes(b"another checkpoint")
    same = tmp_path / "sub" / ".." / ckpt.name  # the same file by another path
    (tmp_path / "sub").mkdir()
    for out, words in ((ckpt, "it is the checkpoint being read"), (same, "it is the checkpoint being read"),
                       (other, "not a file of this sparse format")):
        assert main([str(ckpt), str(out)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and str(out) in err
    assert ckpt.read_bytes() == before and other.read_bytes() == b"another checkpoint"
    sparse = tmp_path / "model.lcps"
    assert main([str(ckpt), str(sparse)]) == 0 and main([str(ckpt), str(sparse)]) == 0  # an earlier export is replaced


def test_the_clis_magic_is_the_formats():
    from lightning_clipprune.export import __main__ as cli
    from lightning_clipprune.export import format as fmt

    assert cli._SPARSE_MAGIC == fmt._MAGIC


def test_cli_as_a_module(tmp_path):
    missing = tmp_path / "nope.ckpt"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_clipprune.export", str(missing), str(tmp_path / "o.lcps")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1 and str(missing) in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "RuntimeWarning" not in proc.stderr  # no double import of __main__


def test_package_exports_every_public_name():
    import lightning_clipprune.export as export
    from lightning_clipprune.export import __main__ as cli
    from lightning_clipprune.export import format as fmt
    from lightning_clipprune.export import semi_structured

    for name in export.__all__:
        assert getattr(export, name) is not None, name
    assert export.main is cli.main and export.save_sparse is fmt.save_sparse
    assert export.to_semi_structured is semi_structured.to_semi_structured
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        export.nope  # noqa: B018


# ----------------------------------------------------------------------------------------------- 2:4


def _two_four(out_f: int, in_f: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    w = torch.randn(out_f, in_f)
    w.view(-1, 4)[:, 1::2] = 0.0  # positions 1 and 3 of every group of 4
    return w.to(dtype)


def test_is_n_m_sparse():
    assert is_n_m_sparse(_two_four(8, 16))
    w = _two_four(8, 16)
    w[3, 5] = 1.0  # three non-zeros in one group
    assert not is_n_m_sparse(w)
    assert is_n_m_sparse(torch.zeros(4, 8))
    assert not is_n_m_sparse(torch.zeros(4, 6))  # not a multiple of 4
    assert is_n_m_sparse(torch.tensor([[1.0, 0, 0, 0, 1, 1, 1, 0]]), n=3, m=4)


def test_to_semi_structured_explains_what_is_missing():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(ValueError, match="no Linear weight .* 2:4 pattern"):
        to_semi_structured(model)
    with torch.no_grad():
        model[0].weight.copy_(_two_four(32, 64, torch.float32))
    # float32 on the CPU: the dtype, and the device (a RuntimeError when the device is a problem).
    with pytest.raises(RuntimeError) as info:
        to_semi_structured(model)
    message = str(info.value)
    assert "'0'" in message and "dtype float32 is not supported" in message and "'2'" not in message
    if not torch.cuda.is_available():
        assert "CUDA is not available" in message and "compute capability 8.0" in message
    else:
        assert "move the model to a CUDA device" in message
    with pytest.raises((ValueError, RuntimeError)) as info:
        to_semi_structured(model, names=["2", "1", "missing"])
    message = str(info.value)
    assert "'2': the weight does not follow the 2:4 pattern" in message
    assert "'1': a ReLU, not a Linear" in message and "'missing': no such submodule" in message


def test_to_semi_structured_shape_and_device_messages(monkeypatch):
    model = nn.Sequential(nn.Linear(20, 24)).half()
    with torch.no_grad():
        model[0].weight.copy_(_two_four(24, 20))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # pretend: the CPU weight is the problem
    with pytest.raises(RuntimeError) as info:
        to_semi_structured(model, names=["0.weight"])
    message = str(info.value)
    assert "shape 24x20 is not supported" in message and "multiple of" in message
    assert "the weight is on cpu; move the model to a CUDA device" in message


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0), reason="needs a CUDA GPU with sm >= 80"
)
def test_to_semi_structured_on_gpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64)).half().cuda().eval()
    with torch.no_grad():
        model[0].weight.copy_(_two_four(128, 128).cuda())
    x = torch.randn(64, 128, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        expected = model(x)
    assert to_semi_structured(model) == ["0"]
    assert isinstance(model[0].weight, torch.sparse.SparseSemiStructuredTensor)
    assert not isinstance(model[2].weight, torch.sparse.SparseSemiStructuredTensor)  # not 2:4: left dense
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
