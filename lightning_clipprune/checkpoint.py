"""Reading checkpoints without running code from them, and within bounds.

A checkpoint is a pickle, and unpickling can call any function the file names (a ``__reduce__`` payload
calling ``os.system``). Every checkpoint the suite reads (export, app, search) goes through ONE function,
:func:`load_checkpoint` (or :func:`read_state_dict` for the weights only), and so through
``torch.load(..., weights_only=True)``, whose unpickler builds only tensors, containers and primitives, plus
the few classes listed in :data:`CHECKPOINT_GLOBALS` that Lightning checkpoints commonly hold
(hyper-parameters given as Hydra/OmegaConf configs, paths, numpy scalars). None of these runs user code
when rebuilt. Anything else is refused with one line naming the global and the file.

The read is bounded: only a regular file is opened (a FIFO cannot hang it, ``/dev/zero`` is refused), the
archive's declared sizes are checked against the file and each other before anything is allocated (a zip
bomb, a storage declaring more bytes than its member holds), and the whole load against a limit
(``$LIGHTNING_CLIPPRUNE_MAX_LOAD_BYTES``, default 8 GiB).

Example::

    from lightning_clipprune.checkpoint import check_checkpoint_file, load_checkpoint, read_state_dict

    check_checkpoint_file("outputs/.../checkpoints/last.ckpt")  # CheckpointError (a ValueError) if unsafe or broken
    ckpt = load_checkpoint("outputs/.../checkpoints/last.ckpt")
    weights = read_state_dict("outputs/.../checkpoints/last.ckpt")  # its state_dict, or a bare state dict
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import pickle
import re
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from lightning_clipprune._io import MAX_LOAD_BYTES_ENV, RefusedPathError, max_load_bytes, open_regular
from lightning_clipprune._pickle_scan import PickleScan, pickle_globals, python3_name

__all__ = ["CHECKPOINT_GLOBALS", "MAX_COMPRESSION_RATIO", "CheckpointError", "check_checkpoint_file",
           "load_checkpoint", "pickle_globals", "read_state_dict", "safe_checkpoint_globals"]

#: ``module.qualname`` of every class or function a checkpoint may name besides what ``weights_only``
#: admits by itself. Each is a plain value type: rebuilding it stores data, it runs no code of the file's.
CHECKPOINT_GLOBALS: tuple[str, ...] = (
    "builtins.dict",  # types referenced as values (OmegaConf's ref_type / object_type)
    "builtins.list",
    "builtins.tuple",
    "builtins.set",
    "builtins.int",
    "builtins.float",
    "builtins.str",
    "builtins.bool",
    "builtins.bytes",
    "typing.Any",
    "collections.defaultdict",
    "pathlib.Path",
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "pathlib.PurePath",
    "pathlib.PurePosixPath",
    "pathlib.PureWindowsPath",
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode",
    "omegaconf.nodes.StringNode",
    "omegaconf.nodes.IntegerNode",
    "omegaconf.nodes.FloatNode",
    "omegaconf.nodes.BooleanNode",
    "omegaconf.nodes.BytesNode",
    "omegaconf.nodes.PathNode",
    "numpy.dtype",  # numpy scalars in hyper-parameters (np.float64 learning rates from a sweep)
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtypes.Float64DType",
    "numpy.dtypes.Float32DType",
    "numpy.dtypes.Int64DType",
    "numpy.dtypes.Int32DType",
    "numpy.dtypes.BoolDType",
)

_ZIP_MAGIC = b"PK\x03\x04"
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class CheckpointError(ValueError):
    """A checkpoint that cannot or must not be loaded; the message is one line naming the file.

    Attributes:
        path: the file.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        super().__init__(f"checkpoint {self.path}: {reason}")


def _resolve(qualname: str) -> Any | None:
    module, _, name = qualname.rpartition(".")
    try:
        obj: Any = importlib.import_module(module)
    except Exception:  # an optional package (omegaconf, numpy's old module path) that is not installed
        return None
    for part in name.split("."):
        obj = getattr(obj, part, None)
    return obj


@functools.cache
def _allowed_globals() -> list[Any]:
    # Classes registered under a name other than the one pickle records (a re-export) go as (obj, name).
    out: list[Any] = []
    for qualname in CHECKPOINT_GLOBALS:
        obj = _resolve(qualname)
        if obj is None:
            continue
        real = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
        out.append(obj if real == qualname else (obj, qualname))
    return out


@contextlib.contextmanager
def safe_checkpoint_globals() -> Iterator[None]:
    """Within the block, ``torch.load(..., weights_only=True)`` also admits :data:`CHECKPOINT_GLOBALS`.

    Wrap Lightning's own loading in it (``trainer.fit(..., ckpt_path=..., weights_only=True)``) so that it
    reads the same checkpoints as :func:`load_checkpoint`.
    """
    with torch.serialization.safe_globals(_allowed_globals()):
        yield


# Globals torch's weights_only unpickler admits by itself outside the torch namespace (torch.* is left to it).
_TORCH_DEFAULT_GLOBALS = frozenset(
    {"collections.OrderedDict", "collections.Counter", "builtins.set", "builtins.frozenset", "builtins.bytearray",
     "builtins.complex", "builtins.slice", "builtins.range", "_codecs.encode"}
)
def _registered_safe_globals() -> set[str]:
    """Names the user admitted with ``torch.serialization.add_safe_globals`` / ``safe_globals`` (torch admits them too)."""
    names: set[str] = set()
    for entry in torch.serialization.get_safe_globals():
        if isinstance(entry, tuple):
            names.add(str(entry[1]))
        else:
            names.add(f"{getattr(entry, '__module__', '')}.{getattr(entry, '__qualname__', '')}")
    return names


def _refused(names: list[str]) -> str | None:
    allowed = _TORCH_DEFAULT_GLOBALS.union(CHECKPOINT_GLOBALS)
    if any(name not in allowed and name.split(".")[0] != "torch" for name in names):
        allowed = allowed.union(_registered_safe_globals())
    for name in names:
        if name not in allowed and name.split(".")[0] != "torch":
            return name
    return None


def _key_line(err: BaseException) -> str:
    """The line of a ``torch.load`` error that says what is wrong (torch wraps it in paragraphs of advice)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    skip = ("Weights only load failed", "Please file an issue", "Check the documentation", "return ")
    useful = [ln for ln in lines if not ln.startswith(skip)]
    line = (useful or lines or [type(err).__name__])[0]
    return line.split(". This is an internal miniz error")[0].removeprefix("WeightsUnpickler error: ")


#: A compressed archive member may expand at most this many times (torch writes its members uncompressed).
MAX_COMPRESSION_RATIO = 10
#: Bytes of a file that is not a zip archive read to say what it is (it is refused either way).
_NON_ZIP_SCAN_BYTES = 16 * 2**20
#: A tensor may present this many bytes more than the data stored for it (a small expanded buffer).
_VIEW_SLACK_BYTES = 2**16


def _over_limit(limit: int) -> str:
    return f"the {limit:,}-byte load limit (raise it with {MAX_LOAD_BYTES_ENV}=<bytes> if you trust the file)"


@contextlib.contextmanager
def _open_checkpoint(path: Path) -> Iterator[tuple[BinaryIO, int]]:
    """The opened regular file and its size: a folder, FIFO or device is refused without reading or blocking."""
    try:
        f = open_regular(path)
    except FileNotFoundError:
        raise CheckpointError(path, "no such file") from None
    except RefusedPathError as err:
        raise CheckpointError(path, f"not a file: {err.kind or 'a special file'}, not a regular file") from None
    except OSError as err:
        raise CheckpointError(path, f"cannot open: {err.strerror or err}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise CheckpointError(path, "empty file (0 bytes)")
        yield f, size


def _refuse_non_zip(f: BinaryIO, path: Path, size: int, unsafe: bool) -> None:
    """A file that is not a zip archive: name a refused global if its (bounded) start is a pickle, then refuse."""
    data = f.read(min(size, _NON_ZIP_SCAN_BYTES))
    try:
        refused = _refused(pickle_globals(data))
    except ValueError:
        raise CheckpointError(path, f"not a torch checkpoint ({size:,} bytes that are not a pickle)") from None
    if refused is not None and not unsafe:
        raise CheckpointError(path, f"refused to unpickle {refused}: not allowed (the file may be malicious)")
    raise CheckpointError(
        path, "not a torch checkpoint in the zip format (a bare pickle, or the legacy format of torch < 1.6): "
        "load it in a trusted session and save it again with torch.save"
    )


def _check_members(infos: list[zipfile.ZipInfo], path: Path, limit: int) -> None:
    """Every member's declared size against its stored size, the compression ratio and the load limit."""
    total = 0
    for info in infos:
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise CheckpointError(
                path, f"corrupt: archive member {info.filename!r} declares {info.file_size:,} bytes but stores "
                f"{info.compress_size:,}"
            )
        if info.file_size > MAX_COMPRESSION_RATIO * info.compress_size + _VIEW_SLACK_BYTES:
            ratio = info.file_size / max(info.compress_size, 1)
            raise CheckpointError(
                path, f"archive member {info.filename!r} would expand {ratio:,.0f}x ({info.compress_size:,} -> "
                f"{info.file_size:,} bytes): refused as a compression bomb (torch writes checkpoints uncompressed)"
            )
        total += info.file_size
    if total > limit:
        raise CheckpointError(path, f"its archive declares {total:,} bytes uncompressed, over {_over_limit(limit)}")


def _read_archive(f: BinaryIO, path: Path, size: int, limit: int) -> tuple[bytes, dict[str, int], str]:
    """``data.pkl`` of the zip archive (sizes bounded, checksums verified), every member's size, the root folder."""
    try:
        with zipfile.ZipFile(f) as archive:
            infos = archive.infolist()
            _check_members(infos, path, limit)
            bad = archive.testzip()
            if bad is not None:
                raise CheckpointError(path, f"corrupt: checksum mismatch in archive member {bad!r}")
            members = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not members:
                raise CheckpointError(path, "not a torch checkpoint (a zip archive without data.pkl)")
            return archive.read(members[0]), {i.filename: i.file_size for i in infos}, members[0][: -len("data.pkl")]
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, RuntimeError, NotImplementedError, zlib.error) as err:
        raise CheckpointError(path, f"truncated or corrupt zip archive ({size:,} bytes): {_key_line(err)}") from None


@functools.cache
def _storage_itemsize(kind: str) -> int | None:
    """Bytes per element of a storage type the pickle names (``torch.FloatStorage`` -> 4); None if unknown."""
    if kind in ("torch.UntypedStorage", "torch.storage.UntypedStorage"):
        return 1
    module, _, name = kind.rpartition(".")
    if module != "torch" or not name.endswith("Storage"):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage's deprecation warning
        dtype = getattr(getattr(torch, name, None), "dtype", None)
    return torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else None


def _check_pickle(data: bytes, entries: dict[str, int], root: str, path: Path, size: int, unsafe: bool) -> None:
    """Globals against the allowed list, each storage's declared bytes against its archive member."""
    try:
        scan = PickleScan(data)
    except ValueError:
        raise CheckpointError(path, f"not a torch checkpoint ({size:,} bytes whose data.pkl is not a pickle)") from None
    refused = _refused([python3_name(n) for n in scan.globals])
    if refused is not None and not unsafe:
        raise CheckpointError(path, f"refused to unpickle {refused}: not allowed (the file may be malicious)")
    for kind, key, location, numel in scan.storages:
        member = f"{root}data/{key}"
        if location == "meta":  # no data is written for a storage on the meta device
            continue
        if member not in entries:
            raise CheckpointError(path, f"corrupt: storage {key!r} named by the pickle is missing from the archive")
        itemsize = _storage_itemsize(kind)
        if itemsize is not None and numel * itemsize != entries[member]:
            raise CheckpointError(
                path, f"corrupt: storage {key!r} declares {numel * itemsize:,} bytes ({numel:,} x {itemsize}), "
                f"the archive holds {entries[member]:,}"
            )


def _torch_load(f: BinaryIO, path: Path, size: int, map_location: Any, unsafe: bool) -> Any:
    """``torch.load`` of the OPENED file (``/proc/self/fd/N`` on Linux), every failure one line."""
    fd_path = f"/proc/self/fd/{f.fileno()}"
    source: Any = fd_path if os.path.exists(fd_path) else f
    f.seek(0)
    try:
        if unsafe:
            return torch.load(source, map_location=map_location, weights_only=False)
        with safe_checkpoint_globals():
            return torch.load(source, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a bad file; each becomes one line
        line = _key_line(err)
        match = _UNSUPPORTED_GLOBAL.search(str(err)) or re.search(r"unsupported GLOBAL ([\w.]+)", str(err))
        if match:
            reason = f"refused to unpickle {match.group(1)}: not allowed (the file may be malicious)"
        elif isinstance(err, pickle.UnpicklingError):
            reason = f"refused to unpickle: {line} (the file may be malicious)"
        elif isinstance(err, EOFError):
            reason = f"truncated ({size:,} bytes): the data ends early"
        else:
            reason = f"corrupt or not a torch checkpoint ({size:,} bytes): {line}"
        raise CheckpointError(path, reason) from None


def _check_tensor_sizes(obj: Any, path: Path, limit: int) -> None:
    """Refuse a tensor presenting more bytes than the data stored for it, or tensors over the load limit."""
    total, seen, todo = 0, set(), [obj]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        if isinstance(item, torch.Tensor):
            seen.add(id(item))
            if item.layout != torch.strided:
                continue
            logical = item.numel() * item.element_size()
            stored = item.untyped_storage().nbytes()
            if logical > stored + _VIEW_SLACK_BYTES:
                raise CheckpointError(
                    path, f"a tensor of shape {tuple(item.shape)} presents {logical:,} bytes over {stored:,} bytes of "
                    "stored data (an expanded view): refused"
                )
            total += logical
        elif isinstance(item, dict):
            seen.add(id(item))
            todo.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            seen.add(id(item))
            todo.extend(item)
    if total > limit:
        raise CheckpointError(path, f"its tensors hold {total:,} bytes, over {_over_limit(limit)}")


def load_checkpoint(
    path: str | os.PathLike, *, map_location: Any = "cpu", max_bytes: int | None = None, unsafe: bool = False
) -> dict[str, Any]:
    """Load a checkpoint (Lightning ``.ckpt`` or ``torch.save``'d dict) without running code from it, bounded.

    The one function through which the suite reads a checkpoint (export, app, search). In order:

    1. Only a regular file is opened (``O_NONBLOCK``, checked on the opened descriptor): a FIFO cannot hang
       it, ``/dev/zero`` behind a symlink is refused, a swap after the check is harmless.
    2. The zip archive's members: a stored member's declared size must match its stored size, a compressed
       one may expand at most :data:`MAX_COMPRESSION_RATIO` times, their sum must stay within ``max_bytes``;
       then every checksum is verified. A file that is not a zip archive (a bare pickle, torch's legacy
       format) is refused.
    3. The pickle's opcodes are read without unpickling: a global outside :data:`CHECKPOINT_GLOBALS` and
       torch's own list is refused by name, and each storage's declared bytes must equal its member's size.
    4. ``torch.load(..., weights_only=True)`` with :data:`CHECKPOINT_GLOBALS` admitted, of the opened file.
    5. No tensor may present more bytes than the data stored for it (a stride-0 view), nor all of them
       together more than ``max_bytes``.

    Args:
        path: the file.
        map_location: passed to ``torch.load`` (CPU by default).
        max_bytes: the most bytes the load may allocate; default :func:`~lightning_clipprune._io.max_load_bytes`,
            8 GiB or ``$LIGHTNING_CLIPPRUNE_MAX_LOAD_BYTES``.
        unsafe: unpickle fully (``weights_only=False``): ANY code the file holds runs. Only for a file you
            made or trust; the bounds of steps 1, 2 and 5 still apply.

    Returns:
        The checkpoint's top-level dict.

    Raises:
        CheckpointError: (a ``ValueError``) the path is missing, not a regular file, empty, truncated, corrupt,
            not a torch checkpoint, not a dict, over the load limit, or names a global outside the allowed
            list; one line naming the file.

    Example::

        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save({"state_dict": {"w": torch.ones(2)}}, path)
        >>> load_checkpoint(path)["state_dict"]["w"]
        tensor([1., 1.])
    """
    path = Path(path).expanduser()
    try:
        limit = max_load_bytes() if max_bytes is None else int(max_bytes)
    except ValueError as err:
        raise CheckpointError(path, str(err)) from None
    with _open_checkpoint(path) as (f, size):
        if f.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
            f.seek(0)
            _refuse_non_zip(f, path, size, unsafe)
        data, entries, root = _read_archive(f, path, size, limit)
        _check_pickle(data, entries, root, path, size, unsafe)
        del data
        ckpt = _torch_load(f, path, size, map_location, unsafe)
    if not isinstance(ckpt, dict):
        raise CheckpointError(path, f"holds a {type(ckpt).__name__}, not a dict (a checkpoint or a state dict)")
    _check_tensor_sizes(ckpt, path, limit)
    return ckpt


def read_state_dict(
    path: str | os.PathLike, *, map_location: Any = "cpu", max_bytes: int | None = None, unsafe: bool = False
) -> dict[str, torch.Tensor]:
    """The model weights in a checkpoint: a Lightning checkpoint's ``state_dict``, or a bare state dict.

    Read through :func:`load_checkpoint` (same arguments, same bounds, no code run).

    Raises:
        CheckpointError: as :func:`load_checkpoint`, or the file holds neither a ``state_dict`` entry nor a
            dict of tensors, or a ``state_dict`` entry that is not a dict of tensors.

    Example::

        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save({"w": torch.zeros(3)}, path)
        >>> read_state_dict(path)["w"]
        tensor([0., 0., 0.])
    """
    ckpt = load_checkpoint(path, map_location=map_location, max_bytes=max_bytes, unsafe=unsafe)
    state, where = (ckpt["state_dict"], "its 'state_dict' entry") if "state_dict" in ckpt else (ckpt, "the file")
    if not isinstance(state, dict) or (state is ckpt and not state):
        raise CheckpointError(path, "neither a Lightning checkpoint (no 'state_dict' entry) nor a state dict of tensors")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                path, f"{where} holds {key!r}: a {type(value).__name__}, not a tensor (not a state dict of tensors)"
            )
    return dict(state)


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Check, before training, that ``path`` is a Lightning checkpoint that loads safely.

    The file is loaded as :func:`load_checkpoint` does (no code runs) and must hold a ``state_dict``.

    Raises:
        CheckpointError: (a ``ValueError``) one line naming the file and what is wrong with it.

    Example::

        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "x.ckpt")
        >>> _ = open(path, "wb").write(b"\\x00" * 10)
        >>> check_checkpoint_file(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_clipprune.checkpoint.CheckpointError: checkpoint ...x.ckpt: not a torch checkpoint (10 bytes that are not a pickle)
    """
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(path, "not a Lightning checkpoint (no 'state_dict' entry)")
