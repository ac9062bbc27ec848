"""One output folder per run: a unique default name, and a lock so two runs never share a folder.

Two runs started in the same second (scripts, job arrays) would get the same ``outputs/<date>/<time>``;
the ``${run_id:}`` resolver in ``conf/config.yaml`` adds a token unique to the process. Two runs given
the same ``hydra.run.dir`` are refused: :func:`claim_output_dir` takes the folder with an exclusive lock
file and refuses a folder that already holds a run, unless the run resumes from a checkpoint in it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from lightning_clipprune.app.checks import ConfigError

__all__ = ["LOCK_NAME", "claim_output_dir", "release_output_dir", "run_id"]

LOCK_NAME = ".clipprune.lock"
_RUN_ID = secrets.token_hex(3)
_RUN_FILES = ("results.json", "checkpoints", "csv", "tensorboard")


def run_id() -> str:
    """A short token that names this process's runs apart (six hex digits, fixed for the process)."""
    return _RUN_ID


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_output_dir(output_dir: Path, resume_from: Path | None = None) -> Path:
    """Take ``output_dir`` for this run, or raise :class:`ConfigError` when another run has it.

    Args:
        output_dir: the run's folder (``hydra.run.dir``).
        resume_from: the checkpoint the run resumes from; a folder holding it may hold a run already.

    Returns:
        The lock file's path (pass ``output_dir`` to :func:`release_output_dir` at the end).

    Raises:
        ConfigError: the folder is in use by a live run, or holds a finished run this run does not resume.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = output_dir / LOCK_NAME
    resuming_here = resume_from is not None and output_dir.resolve() in resume_from.resolve().parents
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise ConfigError(
                    f"hydra.run.dir={str(output_dir)!r} is in use by another run (process {pid}); give each run its "
                    "own folder (leave hydra.run.dir out for a fresh one)"
                ) from None
            lock.unlink(missing_ok=True)  # left by a run that died
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        break
    else:
        raise ConfigError(f"hydra.run.dir={str(output_dir)!r}: could not take the folder's lock file {lock}")
    used = [name for name in _RUN_FILES if (output_dir / name).exists()]
    if used and not resuming_here:
        lock.unlink(missing_ok=True)
        raise ConfigError(
            f"hydra.run.dir={str(output_dir)!r} already holds a run ({', '.join(used)}); choose another folder, or "
            f"resume that run with ckpt_path={output_dir / 'checkpoints' / 'last.ckpt'}"
        )
    return lock


def release_output_dir(output_dir: Path) -> None:
    """Remove this process's lock file from ``output_dir`` (a lock of another process is left alone)."""
    lock = output_dir / LOCK_NAME
    try:
        if int(lock.read_text().strip() or "0") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass


_ASIDE = "metrics.before-resume.csv"


def set_aside_metrics(output_dir: Path) -> Path | None:
    """Before a run resumes in its own folder: move ``csv/metrics.csv`` aside (Lightning's CSV logger would
    delete it) so :func:`merge_metrics` can put the earlier rows back in front of the new ones."""
    current = output_dir / "csv" / "metrics.csv"
    if not current.is_file():
        return None
    aside = current.with_name(_ASIDE)
    os.replace(current, aside)
    return aside


def merge_metrics(output_dir: Path, aside: Path | None) -> None:
    """One ``csv/metrics.csv`` for a resumed run: the earlier rows (before the resumed step), then the new ones."""
    import csv

    from lightning_clipprune._io import atomic_path

    if aside is None or not aside.is_file():
        return
    current = output_dir / "csv" / "metrics.csv"
    with open(aside, newline="") as f:
        old = list(csv.DictReader(f))
    new: list[dict[str, str]] = []
    if current.is_file():
        with open(current, newline="") as f:
            new = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in new if r.get("step", "").isdigit()]
    if steps:  # rows the resumed run logged again (after the checkpoint, before the interruption) are dropped
        old = [r for r in old if r.get("step", "").isdigit() and int(r["step"]) < min(steps)]
    keys = sorted({k for row in old + new for k in row})
    with atomic_path(current) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(old + new)
    aside.unlink()
