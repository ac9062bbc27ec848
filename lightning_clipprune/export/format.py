"""The compact sparse file format (``.lcps``): :func:`save_sparse`, :func:`load_sparse` and friends.

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

Every later version keeps the header and the footer as they are, so that a reader can tell an intact file of
a newer version ("upgrade") from a damaged one.

Loading reads no pickle and trusts no field: every header field and record is checked against the file's
size before anything is allocated, so a corrupt, truncated, foreign or crafted file raises
:class:`SparseFormatError` (one line naming the file), never another exception and never a huge allocation.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor, nn

from lightning_clipprune._io import (
    MAX_LOAD_BYTES_ENV,
    RefusedPathError,
    atomic_file,
    max_load_bytes,
    open_regular,
)
from lightning_clipprune.export._reparam import fold_pruning_masks
from lightning_clipprune.sparsity import BITS_DTYPE, encoded_sizes, storage_key

__all__ = [
    "FORMAT_VERSION",
    "SparseFormatError",
    "load_sparse",
    "load_sparse_into",
    "read_sparse_metadata",
    "record_overhead_bytes",
    "save_sparse",
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

#: A version above this is not a format version but noise: only up to it is "newer, upgrade" believed.
_PLAUSIBLE_VERSION = 255
#: Elements of a tensor with no data (a 0 in its shape), its other sizes multiplied: torch's int64 limit.
_MAX_ELEMENTS = 2**62
#: Smallest record: name length, an empty name, dtype/encoding/ndim, no shape, no payload.
_MIN_RECORD = 2 + 3


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
    return np.dtype(f"<i{itemsize}")


def _tensor_bits(tensor: Tensor) -> np.ndarray:
    """The raw bits of a CPU tensor as a flat little-endian integer array (numpy has no bfloat16)."""
    arr = tensor.reshape(-1).view(BITS_DTYPE[tensor.element_size()]).numpy()
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

    def __init__(self, data: bytes, end: int, path: str, limit: int) -> None:
        self.view = memoryview(data)
        self.pos = 0
        self.end = end
        self.path = path
        self.limit = limit
        self.budget = limit - len(data)  # bytes decoding may still allocate: the load limit less the file itself

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
        # one byte per element for the mask, on top of the tensor itself: no other temporary of that size
        packed = np.frombuffer(r.take((numel + 7) // 8, f"mask of {name!r}"), dtype=np.uint8)
        if numel % 8 and int(packed[-1]) >> (numel % 8):
            raise SparseFormatError(r.path, f"malformed: padding bits set in the mask of {name!r}")
        keep = np.unpackbits(packed, count=numel, bitorder="little").view(bool)
        nonzero = int(np.count_nonzero(keep))
        values = None
        if encoding == _BITMASK_SIGNS:
            zeros = numel - nonzero
            packed_signs = np.frombuffer(r.take((zeros + 7) // 8, f"zero signs of {name!r}"), dtype=np.uint8)
            values = np.frombuffer(r.take(nonzero * itemsize, f"values of {name!r}"), dtype=np_bits)
            negative = np.zeros(numel, dtype=bool)
            negative[~keep] = np.unpackbits(packed_signs, count=zeros, bitorder="little").view(bool)
        else:
            values = np.frombuffer(r.take(nonzero * itemsize, f"values of {name!r}"), dtype=np_bits)
            negative = None
        arr = np.zeros(numel, dtype=np_bits)
        arr[keep] = values
        if negative is not None:
            arr[negative] = np.iinfo(np_bits).min  # the sign bit alone: -0.0
    else:
        raise SparseFormatError(r.path, f"malformed: unknown encoding {encoding} for {name!r}")
    if dtype == torch.bool and bool((arr > 1).any()):
        raise SparseFormatError(r.path, f"malformed: bool tensor {name!r} holds values other than 0 and 1")
    native = arr.astype(np_bits.newbyteorder("="), copy=False)
    return torch.from_numpy(native).view(BITS_DTYPE[itemsize]).view(dtype).reshape(shape)


def _state_dict_of(obj: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    if isinstance(obj, nn.Module):
        return fold_pruning_masks(obj.state_dict())
    if isinstance(obj, Mapping):
        return fold_pruning_masks(obj)
    raise TypeError(f"expected an nn.Module or a state dict (a mapping of names to tensors), got {type(obj).__name__}")


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
    _check_storable(state)
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

    with atomic_file(path) as f:
        return _write_body(f, state, meta_bytes, keep_zero_signs)


def _check_storable(state: Mapping[str, Any]) -> None:
    """Every entry is a dense tensor of a supported dtype, with a name and a rank the format can hold."""
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


def _write_body(f: BinaryIO, state: Mapping[str, Tensor], meta_bytes: bytes, keep_zero_signs: bool) -> int:
    """Header, metadata, records and footer into ``f``; returns the bytes written."""
    crc = 0
    size = 0

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
        # keyed on the state dict's own tensor (alive all along) so an identity key is never reused
        key = storage_key(value) if value.numel() else None
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
    return size + _FOOTER.size


def _check_header(path: str, data: bytes) -> tuple[int, int]:
    """Check the header and footer against the file's size; returns ``(records, metadata length)``."""
    size = len(data)
    if data[: len(_MAGIC)] != _MAGIC:
        if size < len(_MAGIC) and _MAGIC.startswith(data):
            raise SparseFormatError(path, f"truncated: {size} bytes, shorter than the header")
        raise SparseFormatError(path, "not a lightning_clipprune sparse file (wrong magic bytes)")
    if size < _HEADER.size:
        raise SparseFormatError(path, f"truncated: {size} bytes, shorter than the {_HEADER.size}-byte header")
    _magic, version, flags, n_records, meta_len = _HEADER.unpack_from(data)
    if size < _HEADER.size + _FOOTER.size or data[-len(_END_MAGIC) :] != _END_MAGIC:
        raise SparseFormatError(path, f"truncated or incomplete: the end marker is missing ({size} bytes)")
    body_end = size - _FOOTER.size
    stored_crc, _ = _FOOTER.unpack_from(data, body_end)
    actual_crc = zlib.crc32(memoryview(data)[:body_end])
    plausible = FORMAT_VERSION < version <= _PLAUSIBLE_VERSION
    if stored_crc != actual_crc:
        # The version field of a damaged file is not believed: no "upgrade" advice for noise.
        said = f"; its header says version {version}" if version != FORMAT_VERSION else ""
        raise SparseFormatError(
            path, f"corrupt: checksum mismatch (stored {stored_crc:#010x}, computed {actual_crc:#010x}){said}"
        )
    if plausible:  # every version keeps this header and footer, so an intact file of a newer one is known
        raise SparseFormatError(
            path, f"format version {version} is newer than this reader (version {FORMAT_VERSION}); upgrade"
        )
    if version != FORMAT_VERSION:
        raise SparseFormatError(path, f"corrupt: the version field holds {version}, not a format version")
    if flags != 0:
        raise SparseFormatError(path, f"malformed: header flags {flags:#06x}, version {FORMAT_VERSION} defines none")
    if meta_len > body_end - _HEADER.size:
        raise SparseFormatError(
            path, f"malformed: metadata length {meta_len:,} exceeds the {body_end - _HEADER.size:,} bytes after the header"
        )
    room = body_end - _HEADER.size - meta_len
    if n_records * _MIN_RECORD > room:
        raise SparseFormatError(
            path, f"malformed: {n_records:,} records cannot fit in the {room:,} bytes after the metadata"
        )
    return n_records, meta_len


def _read_file(path: str, limit: int) -> bytes:
    """The file's bytes: a regular file only (a FIFO or a device is refused without blocking), within the limit."""
    try:
        f = open_regular(path)
    except RefusedPathError as err:
        raise SparseFormatError(path, f"{err.kind or 'a special file'}, not a regular file: refusing to read it") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise SparseFormatError(path, f"{size:,} bytes, over {_over_limit(limit)}")
        return f.read(size)


def _over_limit(limit: int) -> str:
    return f"the {limit:,}-byte load limit (raise it with {MAX_LOAD_BYTES_ENV}=<bytes> if you trust the file)"


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    path = os.fspath(path)
    try:
        limit = max_load_bytes()
    except ValueError as err:
        raise SparseFormatError(path, str(err)) from None
    data = _read_file(path, limit)
    n_records, meta_len = _check_header(path, data)
    r = _Reader(data, len(data) - _FOOTER.size, path, limit)
    r.take(_HEADER.size, "header")
    try:
        meta = json.loads(bytes(r.take(meta_len, "metadata")).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise SparseFormatError(path, f"malformed metadata: {_one_line(err)}") from None
    if not isinstance(meta, dict):
        raise SparseFormatError(path, f"malformed metadata: a JSON {type(meta).__name__}, not an object")
    try:
        out = _read_records(r, n_records)
    except SparseFormatError:
        raise
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError, IndexError) as err:
        raise SparseFormatError(path, f"malformed: {_one_line(err)}") from None
    return meta, out


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_shape(r: _Reader, shape: tuple[int, ...], itemsize: int, encoding: int, name: str) -> None:
    """Refuse a shape the rest of the file cannot hold, before anything of that size is allocated."""
    numel = math.prod(shape)
    if numel == 0:
        # no data to check against the file: bound the other sizes so torch can represent the shape
        if math.prod(d for d in shape if d) > _MAX_ELEMENTS:
            raise SparseFormatError(r.path, f"malformed: absurd shape {shape} for {name!r}")
        return
    left = r.end - r.pos
    least = numel * itemsize if encoding == _DENSE else (numel + 7) // 8
    if least > left:
        raise SparseFormatError(
            r.path, f"malformed: shape {shape} of {name!r} needs at least {least:,} bytes, {left:,} are left"
        )
    # what decoding allocates: the tensor, plus one byte per element for a mask (two with zero signs)
    r.budget -= numel * (itemsize + (0 if encoding == _DENSE else 1 if encoding == _BITMASK else 3))
    if r.budget < 0:
        raise SparseFormatError(r.path, f"decoding {name!r} (shape {shape}) would go over {_over_limit(r.limit)}")


def _read_records(r: _Reader, n_records: int) -> dict[str, Tensor]:
    path, body_end = r.path, r.end
    out: dict[str, Tensor] = {}
    for i in range(n_records):
        (name_len,) = r.unpack(_U16, f"record {i}")
        try:
            name = bytes(r.take(name_len, f"name of record {i}")).decode("utf-8")
        except UnicodeDecodeError:
            raise SparseFormatError(path, f"malformed: name of record {i} is not UTF-8") from None
        if name in out:
            raise SparseFormatError(path, f"malformed: record {i} repeats the name {name!r}")
        code, encoding, ndim = r.unpack(_INFO, f"record {name!r}")
        if code not in _CODE_DTYPES:
            raise SparseFormatError(path, f"malformed: unknown dtype code {code} for {name!r}")
        if encoding not in (_DENSE, _BITMASK, _BITMASK_SIGNS, _ALIAS):
            raise SparseFormatError(path, f"malformed: unknown encoding {encoding} for {name!r}")
        shape = tuple(r.unpack(_U64, f"shape of {name!r}")[0] for _ in range(ndim))
        dtype = _CODE_DTYPES[code]
        if encoding == _ALIAS:
            (target_len,) = r.unpack(_U16, f"alias of {name!r}")
            target = bytes(r.take(target_len, f"alias of {name!r}")).decode("utf-8", errors="replace")
            if target not in out or tuple(out[target].shape) != shape or out[target].dtype != dtype:
                raise SparseFormatError(path, f"malformed: {name!r} aliases {target!r}, which does not match")
            out[name] = out[target]
        else:
            _check_shape(r, shape, torch.empty((), dtype=dtype).element_size(), encoding, name)
            out[name] = _decode(r, dtype, encoding, shape, name)
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


def _check_fits(module: nn.Module, state: Mapping[str, Tensor], path: str, strict: bool) -> None:
    """Every key, shape and dtype of the file against the module, before anything is written into it."""
    target = module.state_dict()
    model = type(module).__name__
    for key, value in state.items():
        if key not in target:
            if strict:
                extra = sum(k not in target for k in state)
                raise SparseFormatError(
                    path, f"does not fit {model}: the file's {key!r} is not in the model ({extra} such keys; "
                    "another model, or a `prefix=` to strip?)"
                )
            continue
        want = target[key]
        if tuple(value.shape) != tuple(want.shape):
            raise SparseFormatError(
                path, f"does not fit {model}: {key!r} has shape {tuple(value.shape)} in the file, the model expects "
                f"{tuple(want.shape)}"
            )
        if value.dtype != want.dtype:
            raise SparseFormatError(
                path, f"does not fit {model}: {key!r} is {value.dtype} in the file, the model's is {want.dtype} "
                f"(convert the model first, e.g. module.to({value.dtype}))"
            )
    missing = [k for k in target if k not in state]
    if strict and missing:
        raise SparseFormatError(
            path, f"does not fit {model}: the model's {missing[0]!r} is not in the file ({len(missing)} missing keys; "
            "another model, or `strict=False` (of load_sparse_into / load_inference) to load only what is there?)"
        )


def load_sparse_into(module: nn.Module, path: str | os.PathLike, *, strict: bool = True, prefix: str = "") -> Any:
    """Load a sparse export into ``module`` (``module.load_state_dict``) and return its result.

    Every key, shape and dtype is checked before any tensor of ``module`` is written: a file of another
    model changes nothing.

    Args:
        module: an instance of the class that was saved (or any module with the same state-dict keys).
        path: the file written by :func:`save_sparse`.
        strict: every key of the file in the module and every key of the module in the file (as
            ``load_state_dict``); with ``False`` only the keys both have are loaded. Shapes and dtypes of those
            must match either way.
        prefix: only keys starting with it are loaded, with it removed: ``prefix="model."`` loads the
            inner network of a LightningModule saved whole into the bare network.

    Returns:
        ``load_state_dict``'s named tuple of missing and unexpected keys.

    Raises:
        SparseFormatError: (a ``ValueError``) as :func:`load_sparse`, or the file does not fit ``module``: one
            line naming the first bad key and the shape or dtype expected and found.
    """
    state = load_sparse(path)
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    _check_fits(module, state, os.fspath(path), strict)
    return module.load_state_dict(state, strict=strict)
