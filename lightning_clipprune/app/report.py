"""Sweep summaries: one table across the jobs of a ``-m`` sweep, as csv, markdown, a plot and a console table.

::

    python -m lightning_clipprune.report multirun/2026-11-29/01-00-00

writes into the sweep folder ``summary.csv`` (a row per job: the overrides that vary across the jobs,
val/test accuracy, sparsity, parameters kept, compressed size when the run recorded it, wall time, status,
whether the job is on the accuracy/sparsity Pareto front), ``summary.md`` (the same table, and the Optuna
sweeper's Pareto front when there is one) and ``accuracy_vs_sparsity.png`` (one line per setting other than
sparsity, the dense runs marked). A job folder without ``results.json`` is reported ``failed``; it never
breaks the report. The jobs a basic sweeper planned but did not start (the sweep was stopped, or is still
running) are rows marked ``not run``, and ``summary.md`` gives the command that runs each
(:mod:`~lightning_clipprune.app.sweep_plan`). :class:`lightning_clipprune.app.hydra_callbacks.SweepReport` calls :func:`write_report` at the
end of every multirun.

The job folders are files from somewhere else: each file is read bounded, without following a symbolic link,
and checked (a number where a number belongs); a job whose ``results.json`` is refused is reported
``unreadable`` with one warning line naming the file and why, and the rest of the sweep still gets its report.
The report's files are written through a temporary file and a rename, never through a link.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import shlex
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_clipprune._io import atomic_path, atomic_write_text
from lightning_clipprune.app.sweep_plan import planned_sweep
from lightning_clipprune.app.untrusted import (
    UntrustedFileError,
    read_json_object,
    read_string_list,
    read_yaml,
)

__all__ = ["Job", "collect", "main", "pareto_front", "varying_keys", "write_report"]

#: override keys that set the sparsity: the x axis of the plot, not a setting of its own
SPARSITY_KEYS = ("prune.sparsity", "prune.threshold", "prune", "~prune")
METRICS = ("val_acc", "test_acc", "sparsity", "params_nonzero", "params_total", "compressed_bytes", "wall_time_s")
#: keys of results.json the report reads, and what each must hold: a fraction, a count or a non-negative number
_FRACTIONS = ("val_acc", "test_acc", "sparsity")
_COUNTS = ("params_nonzero", "params_total", "compressed_bytes", "compressed_size_bytes", "sparse_bytes")

Warn = Callable[[str], None]
log = logging.getLogger(__name__)


@dataclass
class Job:
    """One job folder of a sweep: its overrides, its ``results.json`` (``None``: failed)."""

    name: str
    path: Path
    overrides: dict[str, str]
    results: dict[str, Any] | None
    pareto: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    unreadable: bool = False  # its results.json was refused (see the warning)
    not_run: bool = False  # planned by the sweep, no folder yet (the sweep was stopped, or is still running)

    @property
    def status(self) -> str:
        """"ok", "interrupted" (stopped by Ctrl-C or SIGTERM: its numbers are of a shorter run), "failed",
        "unreadable" or "not run"."""
        if self.not_run:
            return "not run"
        if self.results is None:
            return "unreadable" if self.unreadable else "failed"
        return "interrupted" if self.results.get("status") == "interrupted" else "ok"

    def metric(self, key: str) -> Any:
        if self.results is None:
            return None
        if key == "compressed_bytes":
            for k in ("compressed_bytes", "compressed_size_bytes", "sparse_bytes"):
                if self.results.get(k) is not None:
                    return self.results[k]
            return None
        return self.results.get(key)

    @property
    def dense(self) -> bool:
        return self.results is not None and (self.results.get("sparsity") or 0.0) == 0.0


def _key(override: str) -> str:
    if override.startswith("~"):
        return override  # "~prune": a key of its own, value "deleted"
    return override.lstrip("+").split("=", 1)[0]


def _parse_overrides(lines: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for o in lines:
        o = str(o)
        if o.lstrip("+~").startswith("hydra.") or o.lstrip("+~").startswith("hydra/"):
            continue
        out[_key(o)] = "deleted" if o.startswith("~") else o.split("=", 1)[1] if "=" in o else ""
    return out


def _job_dirs(sweep_dir: Path, warn: Warn) -> list[Path]:
    dirs = []
    for p in sweep_dir.iterdir():
        if not (os.path.lexists(p / ".hydra") or os.path.lexists(p / "results.json")) or not p.is_dir():
            continue
        if p.is_symlink():  # its files are elsewhere: not part of this sweep folder
            warn(f"{p}: a symbolic link to a folder, not a job folder of the sweep; left out")
            continue
        dirs.append(p)

    def order(p: Path) -> tuple[int, Any]:
        return (0, int(p.name)) if p.name.isascii() and p.name.isdigit() else (1, p.name)

    return sorted(dirs, key=order)


def _check_results(results: dict[str, Any], path: Path) -> dict[str, Any]:
    """``results`` (read from ``path``) when every value the report uses has the right type and range."""
    for key in (*_FRACTIONS, *_COUNTS, "wall_time_s"):
        value = results.get(key)
        if value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not number or value < 0 or (key in _FRACTIONS and value > 1) or (key in _COUNTS and not isinstance(value, int)):
            kind = "a fraction in [0, 1]" if key in _FRACTIONS else "an integer >= 0" if key in _COUNTS else "a number >= 0"
            shown = repr(value) if len(repr(value)) <= 40 else f"a {type(value).__name__}"
            raise UntrustedFileError(path, f"{key}={shown}, not {kind}")
    read_string_list(results.get("overrides"), path)
    return results


def _read_job(d: Path, warn: Warn) -> Job:
    """One job folder: its overrides and results, each file read bounded and checked; problems warned about."""
    overrides: list[str] = []
    results, unreadable = None, False
    hydra_file, results_file = d / ".hydra" / "overrides.yaml", d / "results.json"
    if os.path.lexists(hydra_file):
        try:
            overrides = read_string_list(read_yaml(hydra_file), hydra_file)
        except UntrustedFileError as err:
            warn(f"job {d.name}: its settings are not shown: {err}")
    if os.path.lexists(results_file):
        try:
            results = _check_results(read_json_object(results_file), results_file)
        except UntrustedFileError as err:
            warn(f"job {d.name} reported as unreadable: {err}")
            unreadable = True
        if results is not None and not overrides:
            overrides = read_string_list(results.get("overrides"), results_file)
    return Job(d.name, d, _without_own_resume(_parse_overrides(overrides), d), results, unreadable=unreadable)


def _without_own_resume(overrides: dict[str, str], d: Path) -> dict[str, str]:
    """``overrides`` less a ``ckpt_path`` into the job's own folder: the job was resumed there (its setting is
    the sweep's, and the resumed run rewrote ``.hydra/overrides.yaml``)."""
    ckpt = overrides.get("ckpt_path")
    if ckpt is not None and os.path.abspath(ckpt).startswith(os.path.abspath(d) + os.sep):
        return {k: v for k, v in overrides.items() if k != "ckpt_path"}
    return overrides


def _not_run(root: Path, jobs: Sequence[Job]) -> list[Job]:
    """The jobs the sweep's ``multirun.yaml`` planned that no job folder holds (matched by their overrides)."""
    planned, config = planned_sweep(root)
    if planned is None:
        return []
    have = Counter(frozenset(j.overrides.items()) for j in jobs)
    missing = []
    for num, overrides in enumerate(planned):
        parsed = _parse_overrides(overrides)
        key = frozenset(parsed.items())
        if have[key]:
            have[key] -= 1
            continue
        missing.append(Job(str(num), root / str(num), parsed, None, not_run=True,
                           extra={"command": _run_command(overrides, root / str(num), config)}))
    return missing


def _run_command(overrides: Sequence[str], folder: Path, config: Sequence[str] = ()) -> str:
    """The command that runs one planned job on its own, into the folder the sweep would have given it
    (``config``: the sweep's ``--config-dir`` / ``--config-name``)."""
    args = [*config, *overrides, f"hydra.run.dir={folder}"]
    return "python -m lightning_clipprune.run " + " ".join(shlex.quote(a) for a in args)


def collect(sweep_dir: str | os.PathLike, *, warn: Warn | None = None) -> list[Job]:
    """Every job folder below ``sweep_dir`` (a folder holding ``.hydra/`` or ``results.json``), in job order.

    Args:
        sweep_dir: the sweep folder.
        warn: called with one line for each file refused (default: a logging warning).

    Raises:
        FileNotFoundError: ``sweep_dir`` is not a folder.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep folder not found: {root}")
    warn = warn or log.warning
    jobs = [_read_job(d, warn) for d in _job_dirs(root, warn)]
    jobs += _not_run(root, jobs)
    # only completed jobs compete: an interrupted one's accuracy is of a shorter run
    points = [(j.metric("val_acc"), j.metric("sparsity")) if j.status == "ok" else (None, None) for j in jobs]
    for j, on in zip(jobs, pareto_front(points), strict=True):
        j.pareto = on
    return jobs


def varying_keys(jobs: Sequence[Job]) -> list[str]:
    """The override keys whose value is not the same in every job (a key missing from a job counts as a value)."""
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    return [k for k in keys if len({j.overrides.get(k, "(default)") for j in jobs}) > 1]


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[bool]:
    """Which ``(accuracy, sparsity)`` points no other point beats in both (higher is better in both)."""
    valid = [(a, s) if a is not None and s is not None else None for a, s in points]
    out = []
    for p in valid:
        if p is None:
            out.append(False)
            continue
        dominated = any(q is not None and q[0] >= p[0] and q[1] >= p[1] and q != p for q in valid)
        out.append(not dominated)
    return out


def rows(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """The table: a dict per job with ``job``, the varying overrides, the metrics, ``status`` and ``pareto``."""
    keys = varying_keys(jobs)
    out = []
    for j in jobs:
        row: dict[str, Any] = {"job": j.name}
        row.update({k: j.overrides.get(k, "(default)") for k in keys})
        row.update({m: j.metric(m) for m in METRICS})
        row["status"] = j.status
        row["pareto"] = j.pareto
        out.append(row)
    return out


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in ("val_acc", "test_acc", "sparsity") and isinstance(value, int | float):
        return f"{100 * value:.2f}"
    if key == "wall_time_s" and isinstance(value, int | float):
        return f"{value:.1f}"
    if key == "pareto":
        return "*" if value else ""
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _cell(text: str, limit: int = 200) -> str:
    """A markdown table cell: one line, ``|`` escaped, at most ``limit`` characters (the file may be crafted)."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


_HEADERS = {
    "val_acc": "val acc %", "test_acc": "test acc %", "sparsity": "sparsity %", "params_nonzero": "params kept",
    "params_total": "params", "compressed_bytes": "compressed B", "wall_time_s": "time s", "pareto": "front",
}


def to_markdown(jobs: Sequence[Job], title: str = "Sweep summary", front: Sequence[dict[str, Any]] | None = None) -> str:
    """The table as GitHub markdown (and the Optuna Pareto front, when given)."""
    table = rows(jobs)
    if not table:
        return f"# {title}\n\nNo job folders found.\n"
    cols = list(table[0])
    lines = [f"# {title}", "", "| " + " | ".join(_HEADERS.get(c, c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(c, r[c]).replace("|", "\\|") for c in cols) + " |" for r in table]
    lines += ["", f"{_counts(jobs)}. front: on the val accuracy / sparsity Pareto front (completed jobs only)."]
    waiting = [j for j in jobs if j.not_run]
    if waiting:
        lines += ["", "Jobs not run (the sweep was stopped before them, or is still running); each on its own, "
                  "into the folder the sweep would have given it (this report is refreshed when it ends):", ""]
        lines += [f"    {_cell(j.extra['command'], 2000)}" for j in waiting]
    if front:
        lines += ["", "## Optuna Pareto front", "", "| params | values |", "|---|---|"]
        lines += [f"| {_cell(json.dumps(s.get('params')))} | {_cell(str(s.get('values')))} |" for s in front]
    return "\n".join(lines) + "\n"


def _counts(jobs: Sequence[Job]) -> str:
    """``"5 jobs, 1 failed, 1 interrupted, 2 not run"`` (the last two only when there are some)."""
    failed = sum(j.status in ("failed", "unreadable") for j in jobs)
    stopped = sum(j.status == "interrupted" for j in jobs)
    waiting = sum(j.not_run for j in jobs)
    return (f"{len(jobs)} jobs, {failed} failed" + (f", {stopped} interrupted" if stopped else "")
            + (f", {waiting} not run" if waiting else ""))


def to_table(jobs: Sequence[Job], title: str = "Sweep summary") -> Any:
    """The table as a ``rich.table.Table``; failed jobs in red, jobs not run dimmed."""
    from rich.table import Table  # lazy: rich costs start-up time that only printing needs

    table_rows = rows(jobs)
    table = Table(title=title, title_justify="left")
    if not table_rows:
        return table
    for c in table_rows[0]:
        table.add_column(_HEADERS.get(c, c), justify="right" if c in METRICS else "left")
    for r in table_rows:
        style = None if r["status"] == "ok" else "dim" if r["status"] == "not run" else "red"
        table.add_row(*(_fmt(c, v) for c, v in r.items()), style=style)
    if any(j.not_run for j in jobs):
        table.caption, table.caption_justify = f"{_counts(jobs)}: summary.md has the command for each", "left"
    return table


def plot(jobs: Sequence[Job], path: str | os.PathLike | None = None, ax: Any = None) -> Any:
    """Validation accuracy against sparsity, one line per setting of the other varying overrides; dense runs starred."""
    if ax is None:
        from matplotlib.figure import Figure  # lazy: matplotlib is slow to import; only drawing needs it

        ax = Figure(figsize=(7, 4.5)).subplots()
    keys = [k for k in varying_keys(jobs) if k not in SPARSITY_KEYS]
    groups: dict[str, list[Job]] = {}
    for j in jobs:
        if j.results is None or j.metric("val_acc") is None:
            continue
        label = ", ".join(f"{k}={j.overrides.get(k, '(default)')}" for k in keys) or "all jobs"
        groups.setdefault(label, []).append(j)
    for label, js in groups.items():
        js = sorted(js, key=lambda j: j.metric("sparsity") or 0.0)
        xs = [100 * (j.metric("sparsity") or 0.0) for j in js]
        ys = [100 * j.metric("val_acc") for j in js]
        (line,) = ax.plot(xs, ys, "o-", ms=4, label=label)
        dense = [(x, y) for x, y, j in zip(xs, ys, js, strict=True) if j.dense]
        if dense:
            ax.plot(*zip(*dense, strict=True), "*", ms=14, color=line.get_color())
    front = sorted((100 * j.metric("sparsity"), 100 * j.metric("val_acc")) for j in jobs if j.pareto)
    if len(front) > 1:
        ax.plot(*zip(*front, strict=True), ":", color="black", lw=1, label="Pareto front")
    if any(j.dense for j in jobs):
        ax.plot([], [], "*", color="grey", ms=10, label="dense run")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Accuracy vs sparsity")
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(loc="lower left", fontsize="small")
    if path is not None:
        path = Path(path)
        ax.figure.tight_layout()
        # a fresh temporary name per write (jobs of a parallel launcher may write the report at the same time)
        with atomic_path(path) as tmp:
            ax.figure.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    return ax


def _optuna_front(sweep_dir: Path, warn: Warn) -> list[dict[str, Any]] | None:
    f = sweep_dir / "optimization_results.yaml"
    if not os.path.lexists(f):
        return None
    try:
        data = read_yaml(f)
        if not isinstance(data, dict):
            raise UntrustedFileError(f, f"holds a {type(data).__name__}, not a mapping with `solutions`")
        solutions = data.get("solutions")
        if not isinstance(solutions, list | None) or not all(isinstance(s, dict) for s in solutions or []):
            raise UntrustedFileError(f, "`solutions` must be a list of mappings")
    except UntrustedFileError as err:
        warn(f"the Optuna Pareto front is not shown: {err}")
        return None
    return list(solutions or []) or None


def write_report(
    sweep_dir: str | os.PathLike, *, console: bool = True, warn: Warn | None = None, jobs: list[Job] | None = None
) -> list[Job]:
    """Write ``summary.csv``, ``summary.md`` and ``accuracy_vs_sparsity.png`` into ``sweep_dir``; return the jobs.

    Args:
        sweep_dir: the sweep folder.
        console: also print the table.
        warn: called with one line for each file of the sweep that is refused (default: a logging warning).
        jobs: the sweep's jobs when :func:`collect` read them already.

    Raises:
        FileNotFoundError: ``sweep_dir`` is not a folder.
        OSError: a summary file cannot be written (no temporary file is left behind).
    """
    root = Path(sweep_dir)
    warn = warn or log.warning
    jobs = collect(root, warn=warn) if jobs is None else jobs
    table = rows(jobs)
    buf = io.StringIO()
    if table:
        writer = csv.DictWriter(buf, fieldnames=list(table[0]))
        writer.writeheader()
        for r in table:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    atomic_write_text(root / "summary.csv", buf.getvalue())
    atomic_write_text(root / "summary.md", to_markdown(jobs, f"Sweep summary: {root}", _optuna_front(root, warn)))
    plot(jobs, root / "accuracy_vs_sparsity.png")
    if console:
        from rich.console import Console  # lazy: as in to_table

        Console(width=None if sys.stdout.isatty() else 140).print(to_table(jobs, f"Sweep summary: {root}"))
    return jobs


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_clipprune.report SWEEP_DIR``: rebuild the sweep's summary files; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m lightning_clipprune.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder (its job folders hold results.json)")
    parser.add_argument("--quiet", action="store_true", help="write the files, print nothing")
    args = parser.parse_args(argv)
    warnings: list[str] = []  # printed once it is known whether the report is usable at all
    try:
        jobs = collect(args.sweep_dir, warn=warnings.append)
        if jobs and any(j.results is not None for j in jobs):  # else: one line below, and nothing written
            write_report(args.sweep_dir, console=not args.quiet, warn=warnings.append, jobs=jobs)
    except (OSError, ValueError) as err:
        text = " ".join(str(err).split())
        if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
            text = f"{err.filename}: {text}"
        print(f"error: {text}", file=sys.stderr)
        return 1
    if not jobs or all(j.results is None for j in jobs):
        what = f"{len(jobs)} failed or unreadable" if jobs else "no job folders holding .hydra/ or results.json"
        first = f"; {warnings[0]}" if warnings else ""
        print(f"error: no job of {args.sweep_dir} has a usable results.json ({what}){first}", file=sys.stderr)
        return 1
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    if not args.quiet:
        print(f"{len(jobs)} jobs: {args.sweep_dir / 'summary.csv'}, summary.md, accuracy_vs_sparsity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
