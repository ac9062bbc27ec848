"""Atomic file writes: every file the suite writes goes to a temporary name beside it and is renamed.

A reader (another process, a resumed run, a user's ``cat``) sees either the old file or the complete new
one, never a half-written file, and a crash or an error leaves no temporary file behind. The rename is
``os.replace``, atomic on POSIX and Windows when both names are in the same folder, which is why the
temporary file is created there and not in ``/tmp``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it is renamed over ``path``, on error removed.

    The temporary file exists (empty) when the block starts; write it by name, with any library
    (``torch.save(obj, tmp)``, ``df.to_csv(tmp)``). The final file gets the usual permissions
    (``0o666`` less the umask), not the ``0o600`` of a fresh temporary file.

    Args:
        path: the file to write; its folder must exist.
        fsync: flush the file's data to disk before the rename, so that a power cut cannot leave an
            empty file under the final name.

    Raises:
        OSError: the folder does not exist or is not writable (before the block runs), or the rename fails.

    Example::

        >>> import tempfile, os
        >>> target = os.path.join(tempfile.mkdtemp(), "out.txt")
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> open(target).read()
        'done'
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`).

    Raises:
        OSError: the file cannot be written.
    """
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", fsync: bool = True) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`), in ``encoding`` (UTF-8 by default).

    Raises:
        OSError: the file cannot be written.

    Example::

        >>> import tempfile, os, json
        >>> target = os.path.join(tempfile.mkdtemp(), "results.json")
        >>> atomic_write_text(target, json.dumps({"val_acc": 0.9}))
        >>> json.load(open(target))["val_acc"]
        0.9
    """
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding=encoding)
