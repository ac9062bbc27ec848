"""Finding data files on disk (``root``, ``$DATA_DIR``, system folders, a cache) or downloading them.

When nothing is found and the download fails, :class:`DataNotFoundError` says, in one line, which folders
were searched, why the download failed and how to provide the data.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from lightning_clipprune._io import atomic_path, open_regular
from lightning_clipprune.app.checks import DataNotFoundError
from lightning_clipprune.app.data.tensors import TensorDataModule

__all__ = [
    "DOWNLOAD_TIMEOUT_S",
    "ChecksumError",
    "DataNotFoundError",
    "FileDataModule",
    "cache_dir",
    "candidate_dirs",
    "check_root",
    "download",
    "download_error_text",
    "file_md5",
    "find_dir",
    "not_found",
]

#: Seconds to wait for a server before giving up on a download (offline machines fail fast).
DOWNLOAD_TIMEOUT_S = 10.0


class ChecksumError(OSError):
    """A downloaded file does not have the published checksum (corrupt, or not the official file)."""


def cache_dir(name: str) -> Path:
    """Where downloads go when neither ``root`` nor ``$DATA_DIR`` is set: ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning_clipprune" / name


def candidate_dirs(root: str | os.PathLike | None, name: str, subdirs: Sequence[str], system_dirs: Sequence[Path]) -> list[Path]:
    """Folders to search, in order: ``root``, ``$DATA_DIR``, each with ``subdirs``; ``system_dirs``; the cache.

    Args:
        root: the user's folder (``data.root``), or ``None``.
        name: the data set's name, for the cache folder.
        subdirs: sub-folders of ``root`` and ``$DATA_DIR`` that may hold the files.
        system_dirs: folders where system packages install the data set.
    """
    bases = [Path(root).expanduser()] if root else []
    if os.environ.get("DATA_DIR"):
        bases.append(Path(os.environ["DATA_DIR"]).expanduser())
    dirs: list[Path] = []
    for base in bases:
        dirs.append(base)
        dirs.extend(base / s for s in subdirs)
    dirs.extend(system_dirs)
    dirs.append(cache_dir(name))
    return list(dict.fromkeys(dirs))


def find_dir(dirs: Sequence[Path], required: Sequence[Sequence[str]]) -> Path | None:
    """The first folder in ``dirs`` that holds, for each entry of ``required``, one of its alternative names."""
    for d in dirs:
        if d.is_dir() and all(any((d / alt).is_file() for alt in alts) for alts in required):
            return d
    return None


def download(url: str, dest: Path, timeout: float = DOWNLOAD_TIMEOUT_S, md5: str | None = None) -> None:
    """Download ``url`` to ``dest`` (atomically: a partial or unverified file never has the final name).

    Args:
        url: what to download.
        dest: the file to write; its folder is created.
        timeout: seconds to wait for the server.
        md5: the published MD5 of the file (hex); a download that does not match is deleted and refused.

    Raises:
        ChecksumError: (an ``OSError``) the downloaded file's MD5 is not ``md5``.
        OSError: on any network or file error (``urllib.error.URLError`` is an ``OSError``).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    # a temporary file of our own beside dest (never through a planted link), renamed only once verified
    with atomic_path(dest) as tmp:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
        if md5 is not None:
            actual = file_md5(tmp)
            if actual != md5.lower():
                raise ChecksumError(
                    f"{dest.name}: MD5 {actual} is not the published {md5.lower()} (a corrupt download or not "
                    "the official file); it was deleted"
                )


def file_md5(path: Path, chunk: int = 1 << 20) -> str:
    """The MD5 of a file, hex (read in 1 MiB chunks)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open_regular(path) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_root(root: str | os.PathLike | None, what: str) -> None:
    """Fail early, naming the value, when the user gave a ``root`` folder that does not exist.

    Raises:
        DataNotFoundError: if ``root`` is given and is not a folder.
    """
    if root and not Path(root).expanduser().is_dir():
        raise DataNotFoundError(
            f"data.root={str(root)!r} is not a folder: create it and put the {what} files there, "
            f"or drop data.root to search $DATA_DIR and the default locations"
        )


def not_found(what: str, files: Sequence[str], dirs: Sequence[Path], download_error: str | None, hint: str) -> DataNotFoundError:
    """The one-line error for data that is neither on disk nor downloadable."""
    tried = ", ".join(str(d) for d in dirs)
    dl = f"; download failed ({download_error})" if download_error else "; download disabled (data.download=false)"
    return DataNotFoundError(
        f"{what} not found: looked for {', '.join(files)} in {tried}{dl}. "
        f"To provide it: {hint}, then pass data.root=FOLDER or set DATA_DIR=FOLDER"
    )


def download_error_text(err: BaseException) -> str:
    """A short reason for a failed download (``URLError`` wraps the interesting part in ``.reason``)."""
    if isinstance(err, urllib.error.URLError):
        return f"{err.reason}"
    if isinstance(err, ChecksumError):
        return str(err)
    return f"{type(err).__name__}: {err}"


class FileDataModule(TensorDataModule):
    """A :class:`~lightning_clipprune.app.data.tensors.TensorDataModule` whose files are found on disk or downloaded.

    Subclasses implement :meth:`_locate`; :meth:`locate` runs it once and remembers the folder, and
    ``prepare_data`` calls it, so a missing data set fails before anything trains.

    Args:
        root: folder holding the files (``None``: search the default locations).
        download: try to download the files when they are not found.
        **kwargs: the :class:`~lightning_clipprune.app.data.tensors.TensorDataModule` arguments.

    Raises:
        DataNotFoundError: if ``root`` is not a folder (at construction).
    """

    def __init__(self, root: str | None = None, download: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        check_root(root, self.display_name)
        self.root = root
        self.download = download
        self._found: Path | None = None

    def locate(self) -> Path:
        """The folder holding the data set's files, found (or downloaded) on the first call.

        Raises:
            DataNotFoundError: if they are neither found nor downloadable.
        """
        if self._found is None:
            self._found = self._locate()
        return self._found

    def _locate(self) -> Path:
        raise NotImplementedError

    def _download_dest(self, fallback: Path) -> Path:
        """Where downloads go: ``root``, else ``$DATA_DIR``, else ``fallback``."""
        if self.root:
            return Path(self.root)
        return Path(os.environ["DATA_DIR"]) if os.environ.get("DATA_DIR") else fallback

    def prepare_data(self) -> None:
        self.locate()
