"""Export of pruned models: a compact sparse file format, and 2:4 semi-structured conversion for CUDA inference.

The sparse file stores each tensor of a state dict either dense or as a bitmask of the kept (non-zero)
positions plus the kept values, whichever is smaller (the size formula is
:func:`lightning_clipprune.sparsity.encoded_sizes`, shared with the logged ``size/compressed_bytes``).
Loading gives back the exact bits (fp32, fp16, bf16, negative zeros and NaNs included) into the original
module class, since the state-dict keys of a model pruned in place do not change.

File layout (little-endian; version 1)::

    header   magic b"LCPSPARS" | u16 version | u16 flags (0) | u32 records | u32 metadata length
    metadata UTF-8 JSON object (producer, versions, the caller's ``metadata``)
    records  u16 name length | name (UTF-8) | u8 dtype code | u8 encoding | u8 ndim | u64 x ndim shape
             then by encoding:
             0 dense          values (numel x itemsize bytes)
             1 bitmask        mask (ceil(numel/8) bytes, LSB first) | kept values (nonzero x itemsize)
             2 bitmask+signs  mask | sign bits of the zeros (ceil(zeros/8) bytes) | kept values
             3 alias          u16 length | name of an earlier record holding the same tensor (tied weights)
    footer   u32 CRC-32 of every byte before it | magic b"LCPSEND\\0"

Loading reads no pickle: a corrupt, truncated or foreign file raises :class:`SparseFormatError` naming it.

Command line::

    python -m lightning_clipprune.export CHECKPOINT OUT
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import struct
import sys
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_clipprune.sparsity import encoded_sizes, format_bytes

__all__ = [
    "FORMAT_VERSION",
    "SparseFormatError",
    "is_n_m_sparse",
    "load_sparse",
    "load_sparse_into",
    "main",
    "read_sparse_metadata",
    "record_overhead_bytes",
    "save_sparse",
    "to_semi_structured",
]

FORMAT_VERSION = 1
_MAGIC = b"LCPSPARS"
_END_MAGIC = b"LCPSEND\x00"
_HEADER = struct.Struct("<8sHHII")
_FOOTER = struct.Struct("<I8s")
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
_INFO = struct.Struct("<BBB")

_DENSE, _BITMASK, _BITMASK_SIGNS, _ALIAS = 0, 1, 2, 3

# Codes are part of the file format: append, never renumber.
_DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float64: 4,
    torch.uint8: 5,
    torch.int8: 6,
    torch.int16: 7,
    torch.int32: 8,
    torch.int64: 9,
    torch.bool: 10,
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


class SparseFormatError(ValueError):
    """A file is not a readable sparse export (foreign, truncated, corrupt or malformed).

    Attributes:
        path: the file.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {reason}")


def record_overhead_bytes(name: str, ndim: int) -> int:
    """Bytes a record spends besides its payload (:func:`~lightning_clipprune.sparsity.compressed_size_bytes`)."""
    return _U16.size + len(name.encode("utf-8")) + _INFO.size + _U64.size * ndim


def _bits_np_dtype(itemsize: int) -> np.dtype:
    return np.dtype("<u1") if itemsize == 1 else np.dtype(f"<i{itemsize}")


def _tensor_bits(tensor: Tensor) -> np.ndarray:
    """The raw bits of a CPU tensor as a flat little-endian integer array (numpy has no bfloat16)."""
    flat = tensor.reshape(-1)
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    arr = flat.view(view).numpy()
    return arr.astype(_bits_np_dtype(tensor.element_size()), copy=False)


def _encode(tensor: Tensor, keep_zero_signs: bool) -> tuple[int, list[bytes]]:
    bits = _tensor_bits(tensor)
    if tensor.is_floating_point():
        # A float is zero when every bit but the sign is; the sign bit alone is -0.0.
        keep = (bits & np.iinfo(bits.dtype).max) != 0
        negative = keep_zero_signs and bool((bits == np.iinfo(bits.dtype).min).any())
    else:
        keep = bits != 0
        negative = False
    nonzero = int(np.count_nonzero(keep))
    dense, bitmask = encoded_sizes(tensor.numel(), nonzero, tensor.element_size(), negative)
    if bitmask >= dense:
        if not keep_zero_signs and tensor.is_floating_point():
            bits = np.where(keep, bits, 0).astype(bits.dtype)
        return _DENSE, [bits.tobytes()]
    parts = [np.packbits(keep, bitorder="little").tobytes()]
    if negative:
        parts.append(np.packbits(bits[~keep] != 0, bitorder="little").tobytes())
    parts.append(bits[keep].tobytes())
    return (_BITMASK_SIGNS if negative else _BITMASK), parts


class _Reader:
    """Bounds-checked reads from the verified body of a file; every failure names the file."""

    def __init__(self, data: bytes, end: int, path: str) -> None:
        self.view = memoryview(data)
        self.pos = 0
        self.end = end
        self.path = path

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.end:
            raise SparseFormatError(self.path, f"malformed: {what} runs past the end of the data")
        out = self.view[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, st: struct.Struct, what: str) -> tuple:
        return st.unpack(self.take(st.size, what))


def _decode(r: _Reader, dtype: torch.dtype, encoding: int, shape: tuple[int, ...], name: str) -> Tensor:
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    np_bits = _bits_np_dtype(itemsize)
    if encoding == _DENSE:
        arr = np.frombuffer(r.take(numel * itemsize, f"values of {name!r}"), dtype=np_bits).copy()
    elif encoding in (_BITMASK, _BITMASK_SIGNS):
        packed = np.frombuffer(r.take((numel + 7) // 8, f"mask of {name!r}"), dtype=np.uint8)
        keep = np.unpackbits(packed, bitorder="little").astype(bool)
        if keep[numel:].any():
            raise SparseFormatError(r.path, f"malformed: padding bits set in the mask of {name!r}")
        keep = keep[:numel]
        nonzero = int(keep.sum())
        signs = None
        if encoding == _BITMASK_SIGNS:
            zeros = numel - nonzero
            packed_signs = np.frombuffer(r.take((zeros + 7) // 8, f"zero signs of {name!r}"), dtype=np.uint8)
            signs = np.unpackbits(packed_signs, count=zeros, bitorder="little").astype(bool)
        values = np.frombuffer(r.take(nonzero * itemsize, f"values of {name!r}"), dtype=np_bits)
        arr = np.zeros(numel, dtype=np_bits)
        arr[keep] = values
        if signs is not None:
            arr[np.flatnonzero(~keep)[signs]] = np.iinfo(np_bits).min  # the sign bit alone: -0.0
    else:
        raise SparseFormatError(r.path, f"malformed: unknown encoding {encoding} for {name!r}")
    native = arr.astype(np_bits.newbyteorder("="), copy=False)
    torch_bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]
    return torch.from_numpy(native).view(torch_bits).view(dtype).reshape(shape)


def _state_dict_of(obj: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        return obj
    raise TypeError(f"expected an nn.Module or a state dict (a mapping of names to tensors), got {type(obj).__name__}")


def _alias_key(t: Tensor) -> tuple | None:
    if t.numel() == 0:
        return None
    return (t.untyped_storage().data_ptr(), t.device, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def save_sparse(
    module_or_state_dict: nn.Module | Mapping[str, Tensor],
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    keep_zero_signs: bool = True,
) -> int:
    """Write a model's state dict in the compact sparse format; returns the file size in bytes.

    Each tensor is stored as a bitmask of its non-zero positions plus the non-zero values, or dense
    when that is smaller; a tensor shared under two names (tied weights) is stored once. The file is
    written to a temporary file beside ``path`` and renamed, so a crash never leaves a half file.

    Args:
        module_or_state_dict: an ``nn.Module`` (its ``state_dict()``, buffers included) or a state dict.
        path: the file to write.
        metadata: a JSON-serialisable mapping stored with the tensors (:func:`read_sparse_metadata`).
        keep_zero_signs: keep the sign of negative zeros (``-0.0``, what multiplying a negative weight by
            a 0 mask gives) so the round trip is bit-exact. It costs one bit per zero in the tensors
            that hold one; ``False`` stores them as ``+0.0`` (equal in value, not in bits).

    Raises:
        TypeError: a value is not a tensor, its dtype is not supported, or ``metadata`` is not JSON.
        ValueError: a name or a shape does not fit the format.

    Example::

        >>> import tempfile, os
        >>> net = nn.Linear(64, 64)
        >>> with torch.no_grad():
        ...     _ = net.weight[:, 8:].zero_()
        >>> path = os.path.join(tempfile.mkdtemp(), "net.lcps")
        >>> save_sparse(net, path) < 64 * 64 * 4 // 4
        True
        >>> all(torch.equal(a, b) for a, b in zip(load_sparse(path).values(), net.state_dict().values()))
        True
    """
    state = _state_dict_of(module_or_state_dict)
    for name, value in state.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(value).__name__}, not a tensor")
        if value.dtype not in _DTYPE_CODES:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in _DTYPE_CODES)
            raise TypeError(f"state dict entry {name!r} has dtype {value.dtype}; supported dtypes: {allowed}")
        if value.is_sparse or value.layout != torch.strided:
            raise TypeError(f"state dict entry {name!r} has layout {value.layout}; only dense tensors are supported")
        if len(name.encode("utf-8")) > 0xFFFF or value.dim() > 255:
            raise ValueError(f"state dict entry {name!r}: name longer than 65535 bytes or more than 255 dimensions")
    meta = {
        "producer": "lightning_clipprune.export",
        "format_version": FORMAT_VERSION,
        "torch_version": torch.__version__,
        "user": dict(metadata or {}),
    }
    try:
        meta_bytes = json.dumps(meta, sort_keys=True).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise TypeError(f"`metadata` must be JSON-serialisable: {err}") from err

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    crc = 0
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:

            def write(*chunks: bytes) -> None:
                nonlocal crc, size
                for chunk in chunks:
                    crc = zlib.crc32(chunk, crc)
                    size += len(chunk)
                    f.write(chunk)

            write(_HEADER.pack(_MAGIC, FORMAT_VERSION, 0, len(state), len(meta_bytes)), meta_bytes)
            first_name: dict[tuple, str] = {}
            for name, value in state.items():
                tensor = value.detach()
                name_bytes = name.encode("utf-8")
                key = _alias_key(tensor)
                target = first_name.get(key) if key is not None else None
                if target is None:
                    tensor = tensor.cpu().contiguous()
                    encoding, parts = _encode(tensor, keep_zero_signs)
                    if key is not None:
                        first_name[key] = name
                else:
                    encoding, target_bytes = _ALIAS, target.encode("utf-8")
                    parts = [_U16.pack(len(target_bytes)), target_bytes]
                write(_U16.pack(len(name_bytes)), name_bytes)
                write(_INFO.pack(_DTYPE_CODES[tensor.dtype], encoding, tensor.dim()))
                write(*(_U64.pack(d) for d in tensor.shape), *parts)
            f.write(_FOOTER.pack(crc, _END_MAGIC))
            size += _FOOTER.size
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return size


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _HEADER.size or data[: len(_MAGIC)] != _MAGIC:
        if _MAGIC.startswith(data[: len(_MAGIC)]) and len(data) < _HEADER.size:
            raise SparseFormatError(path, f"truncated: {len(data)} bytes, shorter than the header")
        raise SparseFormatError(path, "not a lightning_clipprune sparse file (wrong magic bytes)")
    magic, version, _flags, n_records, meta_len = _HEADER.unpack_from(data)
    if version > FORMAT_VERSION:
        raise SparseFormatError(
            path, f"format version {version} is newer than this reader (version {FORMAT_VERSION}); upgrade"
        )
    if len(data) < _HEADER.size + _FOOTER.size or data[-len(_END_MAGIC) :] != _END_MAGIC:
        raise SparseFormatError(path, f"truncated or incomplete: the end marker is missing ({len(data)} bytes)")
    body_end = len(data) - _FOOTER.size
    stored_crc, _ = _FOOTER.unpack_from(data, body_end)
    actual_crc = zlib.crc32(memoryview(data)[:body_end])
    if stored_crc != actual_crc:
        raise SparseFormatError(path, f"corrupt: checksum mismatch (stored {stored_crc:#010x}, computed {actual_crc:#010x})")

    r = _Reader(data, body_end, path)
    r.take(_HEADER.size, "header")
    try:
        meta = json.loads(bytes(r.take(meta_len, "metadata")).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SparseFormatError(path, f"malformed metadata: {err}") from err
    try:
        out = _read_records(r, n_records)
    except (RuntimeError, ValueError, OverflowError, MemoryError) as err:
        if isinstance(err, SparseFormatError):
            raise
        raise SparseFormatError(path, f"malformed: {err}") from err
    return meta, out


def _read_records(r: _Reader, n_records: int) -> dict[str, Tensor]:
    path, body_end = r.path, r.end
    out: dict[str, Tensor] = {}
    for i in range(n_records):
        (name_len,) = r.unpack(_U16, f"record {i}")
        try:
            name = bytes(r.take(name_len, f"name of record {i}")).decode("utf-8")
        except UnicodeDecodeError as err:
            raise SparseFormatError(path, f"malformed: name of record {i} is not UTF-8") from err
        code, encoding, ndim = r.unpack(_INFO, f"record {name!r}")
        if code not in _CODE_DTYPES:
            raise SparseFormatError(path, f"malformed: unknown dtype code {code} for {name!r}")
        shape = tuple(r.unpack(_U64, f"shape of {name!r}")[0] for _ in range(ndim))
        if encoding == _ALIAS:
            (target_len,) = r.unpack(_U16, f"alias of {name!r}")
            target = bytes(r.take(target_len, f"alias of {name!r}")).decode("utf-8", errors="replace")
            if target not in out or tuple(out[target].shape) != shape or out[target].dtype != _CODE_DTYPES[code]:
                raise SparseFormatError(path, f"malformed: {name!r} aliases {target!r}, which does not match")
            out[name] = out[target]
        else:
            out[name] = _decode(r, _CODE_DTYPES[code], encoding, shape, name)
    if r.pos != body_end:
        raise SparseFormatError(path, f"malformed: {body_end - r.pos} unexpected bytes after the last record")
    return out


def load_sparse(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a file written by :func:`save_sparse` into a state dict of dense CPU tensors (bit-exact).

    Tensors stored once for several names (tied weights) come back as the same tensor under each name.

    Raises:
        SparseFormatError: (a ``ValueError``) the file is not a sparse export, or is truncated or corrupt;
            the message names the file.
        OSError: the file cannot be read.
    """
    return _read(path)[1]


def read_sparse_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata stored by :func:`save_sparse` (``producer``, ``torch_version``, ``user``...).

    Raises:
        SparseFormatError: as :func:`load_sparse`.
    """
    return _read(path)[0]


def load_sparse_into(module: nn.Module, path: str | os.PathLike, *, strict: bool = True, prefix: str = ""):  # type: ignore[no-untyped-def]
    """Load a sparse export into ``module`` (``module.load_state_dict``) and return its result.

    Args:
        module: an instance of the class that was saved (or any module with the same state-dict keys).
        path: the file written by :func:`save_sparse`.
        strict: passed to ``load_state_dict``.
        prefix: only keys starting with it are loaded, with it removed: ``prefix="model."`` loads the
            inner network of a LightningModule saved whole into the bare network.

    Returns:
        ``load_state_dict``'s named tuple of missing and unexpected keys.

    Raises:
        SparseFormatError: as :func:`load_sparse`.
    """
    state = load_sparse(path)
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return module.load_state_dict(state, strict=strict)


# ---------------------------------------------------------------------------------------------------------------
# 2:4 semi-structured sparsity for CUDA inference
# ---------------------------------------------------------------------------------------------------------------


def is_n_m_sparse(tensor: Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every group of ``m`` consecutive elements along the last dimension has at most ``n`` non-zeros.

    That is the layout ``torch.sparse.to_sparse_semi_structured`` needs for ``n=2, m=4`` (along the
    input dimension of a ``Linear`` weight). A last dimension that is not a multiple of ``m`` is not.

    Example::

        >>> is_n_m_sparse(torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]]))
        True
        >>> is_n_m_sparse(torch.tensor([[1.0, 1.0, 2.0, 0.0]]))
        False
    """
    if tensor.dim() == 0 or tensor.shape[-1] % m:
        return False
    groups = (tensor.detach() != 0).reshape(-1, m)
    return bool((groups.sum(dim=1) <= n).all())


def _semi_structured_constraints() -> dict[torch.dtype, tuple[int, int]]:
    """``{dtype: (min_rows, min_cols)}`` of the backend ``to_sparse_semi_structured`` will use."""
    try:
        from torch.sparse import semi_structured as ss

        cls = (
            ss.SparseSemiStructuredTensorCUTLASS
            if ss.SparseSemiStructuredTensor._FORCE_CUTLASS
            else ss.SparseSemiStructuredTensorCUSPARSELT
        )
        return {
            dt: (c.sparse_min_rows, c.sparse_min_cols)
            for dt, c in cls._DTYPE_SHAPE_CONSTRAINTS.items()
            if dt in (torch.float16, torch.bfloat16, torch.int8)
        }
    except (ImportError, AttributeError):  # a torch without these internals: the CUTLASS minimums
        return {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.int8: (32, 128)}


def to_semi_structured(module: nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """Convert 2:4-sparse ``Linear`` weights to ``torch.sparse.to_sparse_semi_structured``, in place, for inference.

    Sparse tensor cores need a CUDA GPU of compute capability 8.0 or newer (Ampere, Hopper, ...), a
    half-precision weight (float16 or bfloat16; int8 works too) whose both dimensions are multiples of the
    backend's minimum block, and at most 2 non-zeros in every group of 4 along the input dimension
    (``MagnitudePruneCallback(pattern="2:4")``). Every problem is collected and reported in one message
    before anything is changed. The converted weights no longer train.

    Args:
        module: the network, already on the GPU and in its inference dtype (``model.half().cuda()``).
        names: the ``Linear`` submodules to convert, by module name (``"fc1"``; ``"fc1.weight"`` also
            accepted). ``None``: every ``Linear`` whose weight follows the 2:4 pattern (the others,
            such as layers kept dense, are left alone).

    Returns:
        The names of the converted modules.

    Raises:
        ValueError: a named module is not a ``Linear`` or not 2:4 sparse, no ``Linear`` is 2:4 sparse, or a
            dtype or shape is not supported (one line per problem).
        RuntimeError: CUDA is not available, a weight is not on a CUDA device, or the device's compute
            capability is below 8.0 (with any dtype or shape problems in the same message).

    Example::

        model = model.half().cuda().eval()
        converted = to_semi_structured(model)
    """
    linears = {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    value_problems: list[str] = []
    if names is None:
        candidates = [n for n, m in linears.items() if is_n_m_sparse(m.weight)]
        if not candidates:
            raise ValueError(
                f"no Linear weight in {type(module).__name__} follows the 2:4 pattern (at most 2 non-zeros in "
                "every 4 along the input dimension); prune with MagnitudePruneCallback(pattern='2:4') first"
            )
    else:
        candidates = []
        all_modules = dict(module.named_modules())
        for raw in names:
            name = raw.removesuffix(".weight")
            if name not in all_modules:
                value_problems.append(f"{raw!r}: no such submodule")
            elif name not in linears:
                value_problems.append(f"{raw!r}: a {type(all_modules[name]).__name__}, not a Linear")
            elif not is_n_m_sparse(linears[name].weight):
                value_problems.append(f"{raw!r}: the weight does not follow the 2:4 pattern")
            else:
                candidates.append(name)

    constraints = _semi_structured_constraints()
    allowed = ", ".join(str(d).removeprefix("torch.") for d in constraints)
    device_problems: list[str] = []
    if not torch.cuda.is_available():
        device_problems.append(
            "CUDA is not available: 2:4 semi-structured sparsity needs a CUDA GPU of compute capability 8.0 or newer"
        )
    for name in candidates:
        weight = linears[name].weight
        if weight.dtype not in constraints:
            value_problems.append(
                f"{name!r}: dtype {str(weight.dtype).removeprefix('torch.')} is not supported (supported: {allowed}); "
                "convert the model first, for example model.half()"
            )
        else:
            rows, cols = constraints[weight.dtype]
            out_f, in_f = weight.shape
            if out_f % rows or in_f % cols:
                value_problems.append(
                    f"{name!r}: shape {out_f}x{in_f} is not supported: out_features must be a multiple of {rows} "
                    f"and in_features a multiple of {cols} for {str(weight.dtype).removeprefix('torch.')}"
                )
        if torch.cuda.is_available():
            if weight.device.type != "cuda":
                device_problems.append(f"{name!r}: the weight is on {weight.device}; move the model to a CUDA device")
            else:
                major, minor = torch.cuda.get_device_capability(weight.device)
                if (major, minor) < (8, 0):
                    device_problems.append(
                        f"{name!r}: {torch.cuda.get_device_name(weight.device)} has compute capability "
                        f"{major}.{minor}; 2:4 semi-structured sparsity needs 8.0 or newer"
                    )
    problems = list(dict.fromkeys(device_problems + value_problems))
    if problems:
        message = "cannot convert to 2:4 semi-structured sparsity:\n  " + "\n  ".join(problems)
        raise (RuntimeError if device_problems else ValueError)(message)

    from torch.sparse import to_sparse_semi_structured

    for name in candidates:
        lin = linears[name]
        lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight.detach().contiguous()), requires_grad=False)
    return candidates


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _checkpoint_state_dict(path: str) -> dict[str, Tensor]:
    # Lightning checkpoints hold more than tensors (hyper-parameters, loop state), so they need the full
    # unpickler: only run this on checkpoints you trust.
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("state_dict"), Mapping):
        return dict(ckpt["state_dict"])
    if isinstance(ckpt, Mapping) and ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
        return dict(ckpt)  # a bare torch.save(model.state_dict())
    raise ValueError("neither a Lightning checkpoint (no 'state_dict' entry) nor a state dict of tensors")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_clipprune.export CHECKPOINT OUT``: write a checkpoint's weights in the sparse format.

    Returns:
        The exit status: 0 on success, 1 when the checkpoint cannot be read or the output cannot be written.
    """
    parser = argparse.ArgumentParser(
        prog="python -m lightning_clipprune.export",
        description="Write the weights of a Lightning checkpoint (or a torch.save'd state dict) in the compact "
        "sparse format of lightning_clipprune.export, and print the sizes before and after. The checkpoint is "
        "unpickled: only use checkpoints you trust.",
    )
    parser.add_argument("checkpoint", help="a Lightning .ckpt file, or a torch.save(state_dict) file")
    parser.add_argument("out", help="the sparse file to write")
    parser.add_argument(
        "--drop-zero-signs",
        action="store_true",
        help="store -0.0 as +0.0 (smaller when the pruning left negative zeros; equal in value, not in bits)",
    )
    args = parser.parse_args(argv)

    try:
        state = _checkpoint_state_dict(args.checkpoint)
    except Exception as err:  # a CLI reports any failure to read as one line, not a traceback
        sys.stderr.write(f"error: cannot read checkpoint {args.checkpoint!r}: {err}\n")
        return 1
    buffer = io.BytesIO()
    torch.save(state, buffer)
    dense = buffer.getbuffer().nbytes
    try:
        compact = save_sparse(
            state, args.out, keep_zero_signs=not args.drop_zero_signs,
            metadata={"source": os.path.basename(args.checkpoint)},
        )
    except (OSError, TypeError, ValueError) as err:
        sys.stderr.write(f"error: cannot write {args.out!r}: {err}\n")
        return 1
    ckpt_size = os.path.getsize(args.checkpoint)
    sys.stdout.write(
        f"checkpoint   {args.checkpoint}: {format_bytes(ckpt_size)} ({ckpt_size:,} bytes), {len(state)} tensors\n"
        f"dense        torch.save(state_dict): {format_bytes(dense)} ({dense:,} bytes)\n"
        f"compact      {args.out}: {format_bytes(compact)} ({compact:,} bytes)\n"
        f"ratio        {compact / dense:.3f}x of the dense state dict\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
