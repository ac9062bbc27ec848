"""Safe file I/O: atomic writes that never follow what they find, and bounded reads of regular files only.

Writes. Every file the suite writes goes to a temporary name in the SAME folder (created with
``O_EXCL | O_NOFOLLOW``), is flushed to disk (``fsync``), renamed over the final name (``os.replace``, atomic
on POSIX when both names are in one folder, which is why the temporary file is not in ``/tmp``), and the folder
is flushed too. A reader (another process, a resumed run, a user's ``cat``) sees either the old file or the
complete new one, never a half-written file; an error removes the temporary file. A destination that is a
symbolic link or not a regular file (``/dev/full``, a FIFO, a folder) is refused, never replaced or written
through. A full disk or quota (``ENOSPC``/``EDQUOT``) is one line naming the folder (:class:`StorageFullError`).

Reads. :func:`open_regular` opens with ``O_NONBLOCK`` and checks the OPENED file (``fstat``): a FIFO cannot
hang the reader, a device (``/dev/zero``, ``/dev/urandom``, also behind a symlink) is refused, and a file
swapped after the check is harmless because the open descriptor is what gets read. :func:`max_load_bytes`
is the bound on what one load may allocate, raised or lowered with the environment variable
``LIGHTNING_CLIPPRUNE_MAX_LOAD_BYTES`` (bytes; default 8 GiB).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "DEFAULT_MAX_LOAD_BYTES",
    "MAX_LOAD_BYTES_ENV",
    "RefusedPathError",
    "StorageFullError",
    "atomic_file",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_destination",
    "file_kind",
    "max_load_bytes",
    "open_regular",
    "read_regular",
]

#: Environment variable holding the most bytes one load (a checkpoint, a ``.lcps``) may allocate.
MAX_LOAD_BYTES_ENV = "LIGHTNING_CLIPPRUNE_MAX_LOAD_BYTES"
#: Its default: 8 GiB, more than any model this suite trains, less than what ends a workstation.
DEFAULT_MAX_LOAD_BYTES = 8 * 2**30

_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_NOCTTY = getattr(os, "O_NOCTTY", 0)


class StorageFullError(OSError):
    """No space left (disk full or quota exceeded) in the folder a file was being written to; one line.

    The previous version of the file, if there was one, is unchanged and no temporary file is left.

    Attributes:
        folder: the folder that is full.
    """

    def __init__(self, path: str | os.PathLike, err_no: int = errno.ENOSPC, *, folder_only: bool = False) -> None:
        path = Path(path)
        self.folder = str(path if folder_only else path.parent)
        what = "disk full" if err_no == errno.ENOSPC else "disk quota exceeded"
        kept = "" if folder_only else f" while writing {path.name}; the previous {path.name}, if any, is unchanged"
        self.message = (
            f"no space left in {self.folder} ({what}){kept}: free some space there (or write elsewhere) and run again"
        )
        super().__init__(err_no, self.message, str(path))

    def __str__(self) -> str:
        return self.message


class RefusedPathError(OSError):
    """A path the suite will not read or write (a symlink, a device, a FIFO, a folder...); one line."""

    def __init__(self, message: str, path: str | os.PathLike, kind: str | None = None) -> None:
        self.message = message
        self.kind = kind
        super().__init__(errno.EPERM, message, os.fspath(path))

    def __str__(self) -> str:
        return self.message


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words: ``"a folder"``, ``"a FIFO"``, ``"a character device"``..."""
    for test, words in ((stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return words
    return "a special file"


def max_load_bytes() -> int:
    """The most bytes one load may allocate: ``$LIGHTNING_CLIPPRUNE_MAX_LOAD_BYTES``, else 8 GiB.

    Raises:
        ValueError: the variable is set to something other than a positive whole number of bytes.

    Example::

        >>> max_load_bytes() >= 1
        True
    """
    raw = os.environ.get(MAX_LOAD_BYTES_ENV, "").strip().replace("_", "")
    if not raw:
        return DEFAULT_MAX_LOAD_BYTES
    if not raw.isascii() or not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{MAX_LOAD_BYTES_ENV}={raw!r}: must be a positive whole number of bytes, e.g. 17179869184 for 16 GiB")
    return int(raw)


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for reading, refusing anything but a regular file, without blocking on a FIFO.

    A symlink to a regular file is followed (``last.ckpt`` may be one); the check is made on the opened
    descriptor, so what is read is what was checked.

    Raises:
        FileNotFoundError: no such file.
        RefusedPathError: (an ``OSError``) a folder, FIFO, device or socket; the message names the path and kind.
        OSError: the file cannot be opened.

    Example::

        >>> open_regular("/dev/zero")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_clipprune._io.RefusedPathError: /dev/zero is a character device, not a regular file: ...
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | _NONBLOCK | _CLOEXEC | _NOCTTY)
    except OSError as err:
        if err.errno == errno.ENXIO:  # a socket, or a FIFO with no writer on some systems
            raise RefusedPathError(
                f"{path} is a socket or a special file, not a regular file: refusing to read it", path, "a special file"
            ) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise RefusedPathError(
                f"{path} is {file_kind(mode)}, not a regular file: refusing to read it (give the path of a file)",
                path, file_kind(mode),
            )
        if _NONBLOCK:
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, *, limit: int | None = None) -> bytes:
    """The whole content of a regular file, refused before reading when it is larger than ``limit``.

    Args:
        path: the file.
        limit: the most bytes to read (:func:`max_load_bytes` when None).

    Raises:
        RefusedPathError: not a regular file (:func:`open_regular`), or larger than ``limit``.
        OSError: the file cannot be read.
    """
    limit = max_load_bytes() if limit is None else limit
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise RefusedPathError(
                f"{os.fspath(path)} is {size:,} bytes, over the {limit:,}-byte load limit "
                f"(raise it with {MAX_LOAD_BYTES_ENV}=<bytes> if you trust the file)", path
            )
        return f.read(size)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _check_destination(path: Path) -> None:
    """Refuse to replace a symlink or a non-regular file; a missing file or a regular one is fine."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise RefusedPathError(
            f"{path} is a symbolic link: refusing to write through it (remove the link or choose another name)", path
        )
    if not stat.S_ISREG(mode):
        raise RefusedPathError(
            f"{path} is {file_kind(mode)}, not a regular file: refusing to replace it (choose a file name)", path
        )


def check_destination(path: str | os.PathLike) -> None:
    """Refuse, before any work, a destination :func:`atomic_path` would refuse: a symbolic link or a non-regular
    file (a device, a folder, a pipe); a missing file or a regular one is fine.

    Raises:
        RefusedPathError: naming the path and what it is.
    """
    _check_destination(Path(path))


def _check_folder(folder: Path, within: str | os.PathLike | None) -> None:
    """The folder exists, is a folder, and (with ``within``) lies inside ``within`` through no symlink."""
    try:
        mode = os.stat(folder).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"folder {folder} does not exist (create it first)") from None
    if not stat.S_ISDIR(mode):
        raise RefusedPathError(f"{folder} is {file_kind(mode)}, not a folder: cannot write into it", folder)
    if within is None:
        return
    root = Path(within)
    try:
        rel = Path(os.path.abspath(folder)).relative_to(os.path.abspath(root))
    except ValueError:
        raise RefusedPathError(f"{folder} is outside {root}: refusing to write there", folder) from None
    current = Path(os.path.abspath(root))
    for part in rel.parts:
        current = current / part
        if part == ".." or os.path.islink(current):
            raise RefusedPathError(
                f"{current} is a symbolic link (or '..') inside {root}: refusing to write through it", current
            )


def _create_temporary(path: Path) -> Path:
    """A new empty file ``.NAME.<random>.tmp`` beside ``path``, created exclusively (never through a link)."""
    stem = path.name[:200]
    for _ in range(100):
        tmp = path.with_name(f".{stem}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, "could not create a temporary file", str(path.parent))


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC)
    except OSError:  # Windows cannot open a folder; nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno in _FULL_ERRNOS:
            raise
        # some filesystems (and all of Windows) cannot fsync a folder; the rename is still atomic
    finally:
        os.close(fd)


def _finish_temporary(tmp: Path, fsync: bool) -> None:
    """Flush the written temporary file and give it the usual permissions, through a descriptor (no link followed)."""
    fd = os.open(tmp, os.O_RDWR | _NOFOLLOW | _CLOEXEC)
    try:
        if fsync:
            os.fsync(fd)
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_umask())
        else:  # Windows
            os.chmod(tmp, 0o666 & ~_umask())
    finally:
        os.close(fd)


@contextmanager
def atomic_path(
    path: str | os.PathLike, *, fsync: bool = True, within: str | os.PathLike | None = None
) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it is renamed over ``path``, on error removed.

    The temporary file exists (empty) when the block starts; write it by name, with any library
    (``torch.save(obj, tmp)``, ``df.to_csv(tmp)``). The final file gets the usual permissions
    (``0o666`` less the umask), not the ``0o600`` of a fresh temporary file.

    Args:
        path: the file to write; its folder must exist.
        fsync: flush the file's data to disk before the rename and the folder after it, so that a power cut
            cannot leave an empty file under the final name.
        within: a run or sweep folder ``path`` must lie in: refused when the path leaves it or goes through a
            symlink (or ``..``) below it.

    Raises:
        RefusedPathError: (an ``OSError``) ``path`` is a symlink or not a regular file, or its folder leaves
            ``within``; checked before the block runs and again before the rename.
        StorageFullError: (an ``OSError``) disk full or quota exceeded, one line naming the folder; the old
            file is unchanged.
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
    _check_folder(path.parent, within)
    _check_destination(path)
    try:
        tmp = _create_temporary(path)
    except OSError as err:
        if err.errno in _FULL_ERRNOS:
            raise StorageFullError(path, err.errno) from None
        raise
    try:
        yield tmp
        _finish_temporary(tmp, fsync)
        _check_destination(path)  # again: a link planted while the file was written is not replaced either
        os.replace(tmp, path)
        if fsync:
            _fsync_folder(path.parent)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, StorageFullError) and err.errno in _FULL_ERRNOS:
            raise StorageFullError(path, err.errno) from None
        raise


@contextmanager
def atomic_file(
    path: str | os.PathLike, *, fsync: bool = True, within: str | os.PathLike | None = None
) -> Iterator[BinaryIO]:
    """:func:`atomic_path`, with the temporary file open for binary writing (closed before the rename).

    Raises:
        RefusedPathError, StorageFullError, OSError: as :func:`atomic_path`.

    Example::

        >>> import tempfile, os
        >>> target = os.path.join(tempfile.mkdtemp(), "out.bin")
        >>> with atomic_file(target) as f:
        ...     _ = f.write(b"done")
        >>> open(target, "rb").read()
        b'done'
    """
    with (
        atomic_path(path, fsync=fsync, within=within) as tmp,
        os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC | _NOFOLLOW | _CLOEXEC), "wb") as f,
    ):
        yield f


def atomic_write_bytes(
    path: str | os.PathLike, data: bytes, *, fsync: bool = True, within: str | os.PathLike | None = None
) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`).

    Raises:
        RefusedPathError, StorageFullError, OSError: as :func:`atomic_path`.
    """
    with atomic_file(path, fsync=fsync, within=within) as f:
        f.write(data)


def atomic_write_text(
    path: str | os.PathLike,
    text: str,
    *,
    encoding: str = "utf-8",
    fsync: bool = True,
    within: str | os.PathLike | None = None,
) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`), in ``encoding`` (UTF-8 by default).

    Raises:
        RefusedPathError, StorageFullError, OSError: as :func:`atomic_path`.

    Example::

        >>> import tempfile, os, json
        >>> target = os.path.join(tempfile.mkdtemp(), "results.json")
        >>> atomic_write_text(target, json.dumps({"val_acc": 0.9}))
        >>> json.load(open(target))["val_acc"]
        0.9
    """
    with atomic_file(path, fsync=fsync, within=within) as f:
        f.write(text.encode(encoding))
