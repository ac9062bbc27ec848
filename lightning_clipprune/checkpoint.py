"""Reading checkpoints without running code from them.

A checkpoint is a pickle, and unpickling can call any function the file names (a ``__reduce__`` payload
calling ``os.system``). Every checkpoint the suite reads goes through ``torch.load(..., weights_only=True)``,
whose unpickler builds only tensors, containers and primitives, plus the few classes listed in
:data:`CHECKPOINT_GLOBALS` that Lightning checkpoints commonly hold (hyper-parameters given as Hydra/OmegaConf
configs, paths, numpy scalars). None of these runs user code when rebuilt.
Anything else is refused with one line naming the global and the file.

Example::

    from lightning_clipprune.checkpoint import check_checkpoint_file, load_checkpoint

    check_checkpoint_file("outputs/.../checkpoints/last.ckpt")  # CheckpointError (a ValueError) if unsafe or broken
    ckpt = load_checkpoint("outputs/.../checkpoints/last.ckpt")
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import functools
import importlib
import os
import pickle
import pickletools
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT_GLOBALS", "CheckpointError", "check_checkpoint_file", "load_checkpoint",
           "pickle_globals", "safe_checkpoint_globals"]

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
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
                         "SHORT_BINSTRING"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


def pickle_globals(data: bytes) -> list[str]:
    """The ``module.name`` of every global a pickle names, read from its opcodes without unpickling anything.

    Raises:
        ValueError: ``data`` is not a pickle (an unknown opcode, or it ends early).
    """
    found: list[str] = []
    pushed: list[Any] = []  # what each opcode pushed, enough to name the two strings under STACK_GLOBAL
    memo: dict[int, Any] = {}
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL" or op.name == "INST":
            found.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            module, name = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
            found.append(f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else "<unknown>")
        if op.name in _STRING_OPS:
            pushed.append(arg)
        elif op.name in _GET_OPS:
            pushed.append(memo.get(arg))
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in _PUT_OPS:
            memo[arg] = pushed[-1] if pushed else None
        elif op.stack_after:
            pushed.append(None)
    return list(dict.fromkeys(_python3_name(n) for n in found))


def _python3_name(qualname: str) -> str:
    """``__builtin__.dict`` -> ``builtins.dict``: the name the unpickler resolves (protocol 2 writes Python 2 names)."""
    module, _, name = qualname.rpartition(".")
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _refused(names: list[str]) -> str | None:
    allowed = _TORCH_DEFAULT_GLOBALS.union(CHECKPOINT_GLOBALS)
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


def _read_pickle(path: Path, size: int) -> bytes:
    """The checkpoint's pickle: ``data.pkl`` of a zip archive (checksums verified), or the file itself."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _ZIP_MAGIC:
        return path.read_bytes()
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise CheckpointError(path, f"corrupt: checksum mismatch in archive member {bad!r}")
            members = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not members:
                raise CheckpointError(path, "not a torch checkpoint (a zip archive without data.pkl)")
            return archive.read(members[0])
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(path, f"truncated or corrupt zip archive ({size:,} bytes): {err}") from None


def load_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint (Lightning ``.ckpt`` or ``torch.save``'d dict) without running code from it.

    The pickle's globals are read from its opcodes first (nothing is unpickled): one outside
    :data:`CHECKPOINT_GLOBALS` and torch's own list is refused by name. Then
    ``torch.load(..., weights_only=True)`` loads it with :data:`CHECKPOINT_GLOBALS` admitted.

    Args:
        path: the file.
        map_location: passed to ``torch.load`` (CPU by default).

    Returns:
        The checkpoint's top-level dict.

    Raises:
        CheckpointError: (a ``ValueError``) the path is missing, not a file, empty, truncated, corrupt, not a
            torch checkpoint, not a dict, or names a global outside the allowed list; one line naming the file.

    Example::

        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save({"state_dict": {"w": torch.ones(2)}}, path)
        >>> load_checkpoint(path)["state_dict"]["w"]
        tensor([1., 1.])
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(path, "no such file")
    if not path.is_file():
        raise CheckpointError(path, "not a file (a folder or a special file)")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(path, "empty file (0 bytes)")
    data = _read_pickle(path, size)
    try:
        refused = _refused(pickle_globals(data))
    except ValueError:
        raise CheckpointError(path, f"not a torch checkpoint ({size:,} bytes that are not a pickle)") from None
    if refused is not None:
        raise CheckpointError(path, f"refused to unpickle {refused}: not allowed (the file may be malicious)")
    try:
        with safe_checkpoint_globals():
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
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
    if not isinstance(ckpt, dict):
        raise CheckpointError(path, f"holds a {type(ckpt).__name__}, not a dict (a checkpoint or a state dict)")
    return ckpt


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
