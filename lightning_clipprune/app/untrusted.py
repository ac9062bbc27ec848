"""Bounded reads of the small text files of a run or sweep folder (JSON and YAML), which may be crafted.

Each file is opened without following a symbolic link and without blocking on a pipe, must be a regular
file no larger than a limit, and must parse into the shape the caller expects. Every refusal is an
:class:`UntrustedFileError`: one line naming the file and what is wrong with it.

Example::

    from lightning_clipprune.app.untrusted import read_json_object

    results = read_json_object(run_dir / "results.json")  # a dict, or UntrustedFileError
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import yaml

__all__ = ["MAX_FILE_BYTES", "UntrustedFileError", "make_output_dir", "read_json_object", "read_limited", "read_string_list",
           "read_yaml"]

#: The largest run-folder text file read (``results.json``, ``.hydra/overrides.yaml``): the suite's own are
#: a few kB.
MAX_FILE_BYTES = 4 * 1024 * 1024
#: The most override strings a file may hold, and the longest one.
MAX_OVERRIDES, MAX_OVERRIDE_CHARS = 1000, 10_000


class UntrustedFileError(ValueError):
    """A file of a run or sweep folder that cannot be read safely or does not hold what it should (one line).

    Attributes:
        path: the file.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {reason}")


def read_limited(path: str | os.PathLike, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, opened without following a symbolic link.

    Raises:
        UntrustedFileError: no such file, a symbolic link, a folder, a device or pipe, or over ``limit`` bytes.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise UntrustedFileError(path, "no such file") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UntrustedFileError(path, "is a symbolic link; files of a run folder are read only as they are") from None
        raise UntrustedFileError(path, f"cannot be read: {err.strerror or err}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a device, pipe or socket"
            raise UntrustedFileError(path, f"is {kind}, not a regular file")
        if info.st_size > limit:
            raise UntrustedFileError(path, f"{info.st_size:,} bytes, over the limit of {limit:,} for this file")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:  # it grew while being read
            raise UntrustedFileError(path, f"over the limit of {limit:,} bytes for this file")
        return b"".join(chunks)
    except OSError as err:
        raise UntrustedFileError(path, f"cannot be read: {err.strerror or err}") from None
    finally:
        os.close(fd)


def _text(path: str | os.PathLike, limit: int) -> str:
    try:
        return read_limited(path, limit).decode("utf-8")
    except UnicodeDecodeError as err:
        raise UntrustedFileError(path, f"not UTF-8 text (byte {err.start})") from None


def _finite(value: str) -> float:
    raise ValueError(f"{value} is not a finite number")


def read_json_object(path: str | os.PathLike, limit: int = MAX_FILE_BYTES) -> dict[str, Any]:
    """A JSON object (``{...}``) from a bounded read; ``NaN``/``Infinity`` are refused.

    Raises:
        UntrustedFileError: the read is refused, the JSON is invalid or too deeply nested, or not an object.
    """
    text = _text(path, limit)
    try:
        data = json.loads(text, parse_constant=_finite)
    except RecursionError:
        raise UntrustedFileError(path, "nested too deeply to be a file of the suite") from None
    except ValueError as err:
        raise UntrustedFileError(path, f"not valid JSON: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise UntrustedFileError(path, f"holds a JSON {type(data).__name__}, not an object {{...}}")
    return data


def read_yaml(path: str | os.PathLike, limit: int = MAX_FILE_BYTES) -> Any:
    """A YAML document from a bounded read, parsed with PyYAML's safe loader (plain values only).

    Raises:
        UntrustedFileError: the read is refused, or the YAML is invalid or too deeply nested.
    """
    text = _text(path, limit)
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise UntrustedFileError(path, "nested too deeply to be a file of the suite") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise UntrustedFileError(path, f"not valid YAML: {problem}{where}") from None


def read_string_list(value: Any, path: str | os.PathLike, what: str = "overrides") -> list[str]:
    """``value`` (read from ``path``) as a list of override strings: scalars become strings.

    Raises:
        UntrustedFileError: not a list, too long, an entry that is not a scalar, too long or holds a control
            character.
    """
    if value is None:
        return []
    if not isinstance(value, list):
        raise UntrustedFileError(path, f"{what} must be a list of strings, got a {type(value).__name__}")
    if len(value) > MAX_OVERRIDES:
        raise UntrustedFileError(path, f"{what}: {len(value):,} entries, over the limit of {MAX_OVERRIDES:,}")
    out = []
    for i, entry in enumerate(value):
        if isinstance(entry, float) and not math.isfinite(entry) or not isinstance(entry, str | int | float | bool):
            raise UntrustedFileError(path, f"{what}[{i}] must be a string, got a {type(entry).__name__}")
        text = str(entry)
        if len(text) > MAX_OVERRIDE_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise UntrustedFileError(path, f"{what}[{i}] is over {MAX_OVERRIDE_CHARS:,} characters or holds a control character")
        out.append(text)
    return out


def make_output_dir(path: str | os.PathLike) -> Path:
    """Create the output folder ``path`` (and its parents) where none is, or use the real folder that is there.

    Outputs never go through a symbolic link: a planted link (``RUN/search -> /elsewhere``) would send
    them, and their temporary files, out of the run folder.

    Raises:
        UntrustedFileError: ``path`` is a symbolic link, or something other than a folder.
    """
    path = Path(path)
    if path.is_symlink():
        raise UntrustedFileError(path, "is a symbolic link; outputs are written only into a real folder (remove the link)")
    if os.path.lexists(path) and not path.is_dir():
        raise UntrustedFileError(path, "exists and is not a folder; outputs need a folder there (move it away)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UntrustedFileError(path, f"cannot create the output folder: {err.strerror or err}") from None
    if path.is_symlink() or not path.is_dir():  # replaced between the check and here
        raise UntrustedFileError(path, "changed while being created; not a real folder")
    return path
