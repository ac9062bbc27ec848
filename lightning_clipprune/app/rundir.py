"""One output folder per run: a unique default name, and a lock so two runs never share a folder.

Two runs started in the same second (scripts, job arrays) would get the same ``outputs/<date>/<time>``;
the ``${run_id:}`` resolver in ``conf/config.yaml`` adds a token unique to the process. Two runs given
the same ``hydra.run.dir`` are refused: :func:`claim_output_dir` takes the folder with an exclusive lock
file and refuses a folder that already holds a run, unless the run resumes from a checkpoint in it.

Hydra writes ``.hydra/overrides.yaml`` before the run starts, so a second run refused in the same folder
still rewrites it. The run's own record of its overrides, ``run_config.json``, is written only once the run
holds the folder (:func:`write_run_record`), and the search reads that one first (:func:`read_run_overrides`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from lightning_clipprune._io import atomic_path, atomic_write_text, read_regular
from lightning_clipprune.app.checks import ConfigError
from lightning_clipprune.app.targets import check_overrides
from lightning_clipprune.app.untrusted import (
    UntrustedFileError,
    read_json_object,
    read_limited,
    read_string_list,
    read_yaml,
)

__all__ = ["LOCK_NAME", "RUN_RECORD", "check_output_dir", "check_sweep_dir", "claim_output_dir", "launching_process", "read_run_overrides",
           "release_output_dir", "run_id", "write_run_record"]

LOCK_NAME = ".clipprune.lock"
#: The run's own record of its command-line overrides, written once the run holds its folder.
RUN_RECORD = "run_config.json"
_RUN_ID = secrets.token_hex(3)
_RUN_FILES = ("results.json", "checkpoints", "csv", "tensorboard")
#: The most entries of a sweep folder :func:`check_sweep_dir` looks at (a folder from elsewhere is read bounded).
_MAX_SWEEP_ENTRIES = 10_000


def run_id() -> str:
    """A short token that names this process's runs apart (six hex digits, fixed for the process)."""
    return _RUN_ID


def launching_process() -> bool:
    """Whether this process is the launching one (DDP re-launches the command for ranks > 0)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: a number no process id can be
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
            pid = _lock_pid(lock)
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
        raise ConfigError(_holds_a_run(output_dir, used))
    return lock


def _holds_a_run(output_dir: Path, used: list[str]) -> str:
    """The refusal of a folder holding a run: resume it where it has a checkpoint, else another folder; for a sweep's
    job, the sweep folder the user chose (``hydra.sweep.dir``) and what to do with it."""
    sweep_dir = _sweep_dir_of_job()
    if sweep_dir is not None:
        return _sweep_refusal(sweep_dir, [output_dir.name])
    last = output_dir / "checkpoints" / "last.ckpt"
    then = f"resume that run with ckpt_path={last}" if last.is_file() else "remove it (it holds no checkpoint to resume)"
    return f"hydra.run.dir={str(output_dir)!r} already holds a run ({', '.join(used)}); choose another folder, or {then}"


def _sweep_dir_of_job() -> Path | None:
    """The sweep folder when this process runs a job of a ``-m`` sweep (None: a single run, or not under Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        return Path(str(hydra_cfg.sweep.dir)) if hydra_cfg.mode == RunMode.MULTIRUN else None
    except Exception:  # not under Hydra's runtime (a test calling train() directly), or no sweep folder set
        return None


def _sweep_refusal(sweep_dir: Path, jobs: list[str]) -> str:
    shown = ", ".join(jobs[:3]) + (", ..." if len(jobs) > 3 else "")
    return (
        f"hydra.sweep.dir={str(sweep_dir)!r} already holds the runs of an earlier sweep (job folders {shown}); give "
        f"this sweep a new folder (another hydra.sweep.dir, or leave it out for a fresh one), or delete {sweep_dir} first"
    )


def check_sweep_dir(sweep_dir: Path) -> None:
    """Refuse a sweep folder that holds an earlier sweep's runs, before the sweep's first job starts.

    Each job's folder is ``<hydra.sweep.dir>/<job number>``: every job of a second sweep into the same folder
    would be refused by :func:`claim_output_dir`, one by one, in words about ``hydra.run.dir``. A sub-folder
    holding a run's files (``results.json``, ``checkpoints/``, ``csv/``, ``tensorboard/``) is a run; links inside
    are not followed and at most ``_MAX_SWEEP_ENTRIES`` entries are read. A folder that does not exist, or holds no
    run (a sweep stopped before its first job), is fine. Nothing is created.

    Raises:
        ConfigError: one line naming ``hydra.sweep.dir``, the job folders found and what to do.
    """
    if not sweep_dir.is_dir():
        return
    jobs: list[str] = []
    try:
        with os.scandir(sweep_dir) as entries:
            for i, entry in enumerate(entries):
                if i >= _MAX_SWEEP_ENTRIES:
                    break
                folder = Path(entry.path)
                if entry.is_dir(follow_symlinks=False) and any(os.path.lexists(folder / n) for n in _RUN_FILES):
                    jobs.append(entry.name)
    except OSError:  # unreadable: each job's own check says so
        return
    if jobs:
        raise ConfigError(_sweep_refusal(sweep_dir, sorted(jobs, key=lambda n: (len(n), n))))


def check_output_dir(output_dir: Path, resume_from: Path | None = None, log_name: str = "run.log") -> None:
    """Refuse a run folder before anything is written into it (Hydra writes ``.hydra/`` and its log first).

    What :func:`claim_output_dir` refuses (a live run's lock, a finished run not resumed here), and planted
    links: ``.hydra`` or its files, or the job's log, as a symbolic link or something other than a file
    would have Hydra write elsewhere. A folder that does not exist yet is fine. Nothing is created.

    Args:
        output_dir: the run's folder (``hydra.run.dir``).
        resume_from: the checkpoint the run resumes from (``ckpt_path``).
        log_name: the name of the job's log file in the folder (``<hydra.job.name>.log``).

    Raises:
        ConfigError: one line naming the folder or file and what to do.
    """
    if not os.path.lexists(output_dir) or not output_dir.is_dir():
        return
    hydra_dir = output_dir / ".hydra"
    planted = [hydra_dir] if hydra_dir.is_symlink() or (os.path.lexists(hydra_dir) and not hydra_dir.is_dir()) else []
    for path in [*(hydra_dir / n for n in ("config.yaml", "hydra.yaml", "overrides.yaml")), output_dir / log_name]:
        if not planted and os.path.lexists(path) and (path.is_symlink() or not path.is_file()):
            planted.append(path)
    if planted:
        raise ConfigError(
            f"hydra.run.dir={str(output_dir)!r}: {planted[0]} is a symbolic link or not a regular file; Hydra would "
            "write through it. Remove it, or leave hydra.run.dir out for a fresh folder"
        )
    lock = output_dir / LOCK_NAME
    pid = _lock_pid(lock) if os.path.lexists(lock) else 0
    if pid and pid != os.getpid() and _alive(pid):
        raise ConfigError(
            f"hydra.run.dir={str(output_dir)!r} is in use by another run (process {pid}); give each run its "
            "own folder (leave hydra.run.dir out for a fresh one)"
        )
    resuming_here = resume_from is not None and output_dir.resolve() in resume_from.resolve().parents
    used = [name for name in _RUN_FILES if os.path.lexists(output_dir / name)]
    if used and not resuming_here:
        raise ConfigError(_holds_a_run(output_dir, used))


def release_output_dir(output_dir: Path) -> None:
    """Remove this process's lock file from ``output_dir`` (a lock of another process is left alone)."""
    lock = output_dir / LOCK_NAME
    try:
        if _lock_pid(lock) == os.getpid():
            lock.unlink()
    except (OSError, ConfigError):
        pass


def _lock_pid(lock: Path) -> int:
    """The process id in a lock file (0: unreadable or empty); a planted link, pipe or device is refused."""
    try:
        text = read_limited(lock, 64).decode("ascii", "replace").strip()
    except UntrustedFileError as err:
        if os.path.lexists(lock) and (lock.is_symlink() or not lock.is_file()):
            raise ConfigError(f"{err}: not a lock file of the suite; remove it") from None
        return 0  # over 64 bytes, or gone meanwhile: not a live run's lock
    return int(text) if text.isascii() and text.isdigit() else 0


def write_run_record(output_dir: Path, overrides: Sequence[str]) -> Path:
    """Write ``run_config.json`` (the run's overrides) into ``output_dir``; call it after :func:`claim_output_dir`.

    A run refused by :func:`claim_output_dir` never reaches this, so the record stays the one of the run
    that holds the folder (Hydra's ``.hydra/overrides.yaml`` is rewritten even by a refused run).

    Returns:
        The record's path.
    """
    path = output_dir / RUN_RECORD
    atomic_write_text(path, json.dumps({"format": 1, "overrides": [str(o) for o in overrides]}, indent=2) + "\n")
    return path


def _is_hydra_override(text: str) -> bool:
    key = text.lstrip("+~")
    return key.startswith(("hydra.", "hydra/", "hydra=")) or key == "hydra"


def read_run_overrides(run_dir: Path) -> tuple[list[str], Path | None]:
    """The overrides a run was made with, and the file they were read from (``None``: no record, no overrides).

    Read from the run's own ``run_config.json``; for folders written before it existed,
    ``.hydra/overrides.yaml``, else ``results.json``'s ``overrides``. Every file is read bounded and
    checked (:mod:`lightning_clipprune.app.untrusted`, :func:`~lightning_clipprune.app.targets.check_overrides`);
    Hydra's own settings (``hydra.*``, ``hydra/...``) are dropped.

    Raises:
        UntrustedFileError: a record that cannot be read or is not a list of strings (one line naming it).
        UntrustedConfigError: an override that would build something other than the suite's own classes.
    """
    record, hydra_file, results = run_dir / RUN_RECORD, run_dir / ".hydra" / "overrides.yaml", run_dir / "results.json"
    if os.path.lexists(record):
        source, overrides = record, read_string_list(read_json_object(record).get("overrides"), record)
    elif os.path.lexists(hydra_file):
        source, overrides = hydra_file, read_string_list(read_yaml(hydra_file), hydra_file)
    elif os.path.lexists(results):
        source, overrides = results, read_string_list(read_json_object(results).get("overrides"), results)
    else:
        return [], None
    kept = [o for o in overrides if not _is_hydra_override(o)]
    return check_overrides(kept, source=str(source)), source


def run_status(run_dir: Path) -> str | None:
    """``results.json``'s ``status`` ("ok", "interrupted", ...), read bounded; None without one (or unreadable)."""
    results = run_dir / "results.json"
    if not os.path.lexists(results):
        return None
    try:
        status = read_json_object(results).get("status")
    except (OSError, ValueError):  # the overrides' reader names a bad results.json; the status is advice only
        return None
    return status if isinstance(status, str) else None


_ASIDE = "metrics.before-resume.csv"


def set_aside_metrics(output_dir: Path) -> Path | None:
    """Before a run resumes in its own folder: move ``csv/metrics.csv`` aside (Lightning's CSV logger would
    delete it) so :func:`merge_metrics` can put the earlier rows back in front of the new ones."""
    current = output_dir / "csv" / "metrics.csv"
    if current.parent.is_symlink() or current.is_symlink() or not current.is_file():  # a planted link is not this run's history
        return None
    aside = current.with_name(_ASIDE)
    os.replace(current, aside)
    return aside


def _csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file the run wrote: a regular file only, within the load limit."""
    return list(csv.DictReader(io.StringIO(read_regular(path).decode("utf-8", "replace"), newline="")))


def merge_metrics(output_dir: Path, aside: Path | None) -> None:
    """One ``csv/metrics.csv`` for a resumed run: the earlier rows (before the resumed step), then the new ones."""
    if aside is None or not aside.is_file():
        return
    current = output_dir / "csv" / "metrics.csv"
    old = _csv_rows(aside)
    new = _csv_rows(current) if current.is_file() else []
    steps = [int(r["step"]) for r in new if r.get("step", "").isdigit()]
    if steps:  # rows the resumed run logged again (after the checkpoint, before the interruption) are dropped
        first = min(steps)

        def keys(row: dict[str, str]) -> frozenset[str]:
            return frozenset(k for k, v in row.items() if v)

        # at the resumed run's first step, the old rows end with those it logs again (its first batch); the
        # rows before them were logged at that step before the checkpoint (the epoch end it closed): kept
        at = [r for r in old if r.get("step") == str(first)]
        again = [keys(r) for r in new if r.get("step") == str(first)]
        n = next(k for k in range(len(at), -1, -1) if [keys(r) for r in at[len(at) - k :]] == again[:k])
        old = [r for r in old if r.get("step", "").isdigit() and int(r["step"]) < first] + at[: len(at) - n]
    keys = sorted({k for row in old + new for k in row})
    with atomic_path(current) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(old + new)
    aside.unlink()
