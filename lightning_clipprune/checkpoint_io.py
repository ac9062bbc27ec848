"""A Lightning ``CheckpointIO`` plugin whose checkpoints are never half-written and are read with bounds.

Lightning's own :class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` goes through fsspec, which writes a
temporary file in the system temp folder and then copies it over the checkpoint: with the run folder on
another filesystem (a tmpfs, an NFS or Lustre scratch), a SIGKILL during that copy leaves ``last.ckpt``
truncated or empty, and the temporary file stays behind. :class:`AtomicCheckpointIO` writes the checkpoint
to a temporary file in the checkpoint's OWN folder, flushes it to disk, renames it over the old one and
flushes the folder (:func:`lightning_clipprune._io.atomic_file`): a reader, a resume or a crash sees the old
checkpoint or the new one, whole. A full disk is one line naming the folder
(:class:`~lightning_clipprune._io.StorageFullError`) and the previous checkpoint is kept.

Loading with ``weights_only`` (Lightning's default with torch >= 2.6) goes through
:func:`lightning_clipprune.checkpoint.load_checkpoint`: no code runs from the file and the read is bounded.

Example::

    import lightning as L
    from lightning_clipprune.checkpoint_io import AtomicCheckpointIO

    trainer = L.Trainer(plugins=[AtomicCheckpointIO()])
"""

from __future__ import annotations

import os
import re
import stat
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from lightning_clipprune._io import atomic_file
from lightning_clipprune.checkpoint import load_checkpoint

__all__ = ["AtomicCheckpointIO"]


def _is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def _remove_stale_temporaries(path: Path, before_ns: int) -> None:
    """Temporary files of ``path`` a killed writer left (last written before ``before``): regular files only."""
    pattern = re.compile(rf"\.{re.escape(path.name[:200])}\.[0-9a-f]{{8}}\.tmp")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if not pattern.fullmatch(name):
            continue
        try:
            info = os.lstat(path.parent / name)
            if stat.S_ISREG(info.st_mode) and info.st_mtime_ns < before_ns:
                os.unlink(path.parent / name)
        except OSError:  # gone already, or not ours to remove
            continue


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the checkpoint, then fsync, rename and fsync of the folder.

    A remote path (``s3://...``) is left to Lightning's own plugin. Refuses to write through a symlink or over
    a non-regular file (:class:`~lightning_clipprune._io.RefusedPathError`). After a successful save, the
    temporary files of the same checkpoint that a killed process left (``.last.ckpt.<random>.tmp``, last
    written before this save began) are removed.

    Raises:
        StorageFullError: (an ``OSError``) no space left or quota exceeded, naming the folder; the previous
            checkpoint is unchanged.
        TypeError: ``storage_options`` given (as Lightning's plugin).

    Example::

        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "a.ckpt")
        >>> io = AtomicCheckpointIO()
        >>> io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
        >>> io.load_checkpoint(path)["state_dict"]["w"]
        tensor([1., 1.])
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if _is_remote(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(
                f"`Trainer.save_checkpoint(..., storage_options=...)` is not supported by {type(self).__name__}"
            )
        path = Path(str(path).removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        started = time.time_ns()
        with atomic_file(path) as f:
            torch.save(checkpoint, f)
        _remove_stale_temporaries(path, started)

    @override
    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False or _is_remote(path):  # a trusted file (the caller said so), or not ours to read
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return load_checkpoint(str(path).removeprefix("file://"), map_location=map_location or "cpu")
