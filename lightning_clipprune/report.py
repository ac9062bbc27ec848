"""Sweep summaries: one table across the jobs of a ``-m`` sweep, as csv, markdown, a plot and a console table.

::

    python -m lightning_clipprune.report multirun/2026-11-29/01-00-00

writes into the sweep folder ``summary.csv`` (a row per job: the overrides that vary across the jobs,
val/test accuracy, sparsity, parameters kept, compressed size when the run recorded it, wall time, status,
whether the job is on the accuracy/sparsity Pareto front), ``summary.md`` (the same table, and the Optuna
sweeper's Pareto front when there is one) and ``accuracy_vs_sparsity.png`` (one line per setting other than
sparsity, the dense runs marked). A job folder without ``results.json`` is reported ``failed``; it never
breaks the report. :class:`lightning_clipprune.hydra_callbacks.SweepReport` calls :func:`write_report` at the
end of every multirun.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Job", "collect", "main", "pareto_front", "varying_keys", "write_report"]

#: override keys that set the sparsity: the x axis of the plot, not a setting of its own
SPARSITY_KEYS = ("prune.sparsity", "prune.threshold", "prune", "~prune")
METRICS = ("val_acc", "test_acc", "sparsity", "params_nonzero", "params_total", "compressed_bytes", "wall_time_s")


@dataclass
class Job:
    """One job folder of a sweep: its overrides, its ``results.json`` (``None``: failed)."""

    name: str
    path: Path
    overrides: dict[str, str]
    results: dict[str, Any] | None
    pareto: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "ok" if self.results is not None else "failed"

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


def _job_dirs(sweep_dir: Path) -> list[Path]:
    dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and ((p / ".hydra").is_dir() or (p / "results.json").is_file())]

    def order(p: Path) -> tuple[int, Any]:
        return (0, int(p.name)) if p.name.isdigit() else (1, p.name)

    return sorted(dirs, key=order)


def collect(sweep_dir: str | os.PathLike) -> list[Job]:
    """Every job folder below ``sweep_dir`` (a folder holding ``.hydra/`` or ``results.json``), in job order.

    Raises:
        FileNotFoundError: ``sweep_dir`` is not a folder.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep folder not found: {root}")
    jobs = []
    for d in _job_dirs(root):
        overrides: list[str] = []
        results = None
        if (d / ".hydra" / "overrides.yaml").is_file():
            from omegaconf import OmegaConf

            try:
                overrides = [str(o) for o in (OmegaConf.to_container(OmegaConf.load(d / ".hydra" / "overrides.yaml")) or [])]
            except Exception:  # a half-written file: the job still gets a row
                overrides = []
        if (d / "results.json").is_file():
            try:
                results = json.loads((d / "results.json").read_text())
            except (OSError, ValueError):
                results = None
            if results is not None and not overrides:
                overrides = [str(o) for o in results.get("overrides") or []]
        jobs.append(Job(d.name, d, _parse_overrides(overrides), results))
    for j, on in zip(jobs, pareto_front([(j.metric("val_acc"), j.metric("sparsity")) for j in jobs]), strict=True):
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
    failed = sum(j.status == "failed" for j in jobs)
    lines += ["", f"{len(jobs)} jobs, {failed} failed. front: on the val accuracy / sparsity Pareto front."]
    if front:
        lines += ["", "## Optuna Pareto front", "", "| params | values |", "|---|---|"]
        lines += [f"| {json.dumps(s.get('params'))} | {s.get('values')} |" for s in front]
    return "\n".join(lines) + "\n"


def to_table(jobs: Sequence[Job], title: str = "Sweep summary"):
    """The table as a ``rich.table.Table``; failed jobs in red."""
    from rich.table import Table

    table_rows = rows(jobs)
    table = Table(title=title, title_justify="left")
    if not table_rows:
        return table
    for c in table_rows[0]:
        table.add_column(_HEADERS.get(c, c), justify="right" if c in METRICS else "left")
    for r in table_rows:
        table.add_row(*(_fmt(c, v) for c, v in r.items()), style="red" if r["status"] == "failed" else None)
    return table


def plot(jobs: Sequence[Job], path: str | os.PathLike | None = None, ax: Any = None) -> Any:
    """Validation accuracy against sparsity, one line per setting of the other varying overrides; dense runs starred."""
    if ax is None:
        from matplotlib.figure import Figure

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
        tmp = _tmp(path)
        ax.figure.tight_layout()
        ax.figure.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    return ax


def _tmp(path: Path) -> Path:
    # per process: jobs of a parallel launcher may write the report at the same time
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def _write_text(path: Path, text: str) -> None:
    tmp = _tmp(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def _optuna_front(sweep_dir: Path) -> list[dict[str, Any]] | None:
    f = sweep_dir / "optimization_results.yaml"
    if not f.is_file():
        return None
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(f)) or {}
    return list(data.get("solutions") or []) or None


def write_report(sweep_dir: str | os.PathLike, *, console: bool = True) -> list[Job]:
    """Write ``summary.csv``, ``summary.md`` and ``accuracy_vs_sparsity.png`` into ``sweep_dir``; return the jobs.

    Raises:
        FileNotFoundError: ``sweep_dir`` is not a folder.
    """
    import csv
    import io

    root = Path(sweep_dir)
    jobs = collect(root)
    table = rows(jobs)
    buf = io.StringIO()
    if table:
        writer = csv.DictWriter(buf, fieldnames=list(table[0]))
        writer.writeheader()
        for r in table:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    _write_text(root / "summary.csv", buf.getvalue())
    _write_text(root / "summary.md", to_markdown(jobs, f"Sweep summary: {root}", _optuna_front(root)))
    plot(jobs, root / "accuracy_vs_sparsity.png")
    if console:
        from rich.console import Console

        Console(width=None if sys.stdout.isatty() else 140).print(to_table(jobs, f"Sweep summary: {root}"))
    return jobs


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_clipprune.report SWEEP_DIR``: rebuild the sweep's summary files; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m lightning_clipprune.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder (its job folders hold results.json)")
    parser.add_argument("--quiet", action="store_true", help="write the files, print nothing")
    args = parser.parse_args(argv)
    try:
        jobs = write_report(args.sweep_dir, console=not args.quiet)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"{len(jobs)} jobs: {args.sweep_dir / 'summary.csv'}, summary.md, accuracy_vs_sparsity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
