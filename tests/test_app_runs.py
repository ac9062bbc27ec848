"""The app as a user runs it: its own folder per run, Ctrl-C/SIGTERM, resume in one place, a quiet console."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from lightning_clipprune.app.rundir import claim_output_dir, release_output_dir
from lightning_clipprune.run import ConfigError

pytestmark = pytest.mark.usefixtures("offline")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("DATA_DIR", None)
    return env


def _start(tmp_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lightning_clipprune.run", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=_env(tmp_path),
    )


def test_two_runs_started_together_get_their_own_folders(tmp_path: Path) -> None:
    args = ("debug=smoke", "trainer.max_epochs=2", "trainer.max_steps=-1")
    procs = [_start(tmp_path, *args) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    folders = sorted(p.parent for p in (tmp_path / "outputs").glob("*/*/results.json"))
    assert len(folders) == 2 and folders[0] != folders[1]
    for folder in folders:
        results = json.loads((folder / "results.json").read_text())
        assert results["status"] == "completed" and Path(results["output_dir"]).resolve() == folder.resolve()
        assert results["steps"] == 4
        assert (folder / "checkpoints" / "last.ckpt").is_file() and (folder / "csv" / "metrics.csv").is_file()
        rows = list(csv.DictReader((folder / "csv" / "metrics.csv").open()))
        assert len([r for r in rows if r.get("val/acc")]) == 2  # its own 2 validations, nothing of the other run


def test_a_folder_is_never_shared(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    claim_output_dir(folder)
    (folder / ".clipprune.lock").write_text("1\n")  # pid 1 is alive: another run holds the folder
    with pytest.raises(ConfigError, match=r"hydra.run.dir=.*run.* in use by another run \(process 1\)"):
        claim_output_dir(folder)
    (folder / ".clipprune.lock").write_text("999999999\n")  # a run that died: its lock is taken over
    claim_output_dir(folder)
    release_output_dir(folder)
    assert not (folder / ".clipprune.lock").exists()
    (folder / "results.json").write_text("{}")
    # no checkpoint in it (a run interrupted before its first): nothing to resume, so no ckpt_path is offered
    with pytest.raises(ConfigError, match=r"already holds a run \(results.json\); choose another folder, or remove it"):
        claim_output_dir(folder)
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"already holds a run \(results.json, checkpoints\).*ckpt_path=.*last.ckpt"):
        claim_output_dir(folder)
    claim_output_dir(folder, resume_from=folder / "checkpoints" / "last.ckpt")  # resuming in place is fine


def test_the_cli_refuses_a_folder_that_holds_a_run(tmp_path: Path) -> None:
    first = subprocess.run([sys.executable, "-m", "lightning_clipprune.run", "debug=smoke", f"hydra.run.dir={tmp_path / 'r'}"],
                           capture_output=True, text=True, cwd=tmp_path, env=_env(tmp_path), timeout=300)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([sys.executable, "-m", "lightning_clipprune.run", "debug=smoke", f"hydra.run.dir={tmp_path / 'r'}"],
                           capture_output=True, text=True, cwd=tmp_path, env=_env(tmp_path), timeout=300)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [
        f"error: hydra.run.dir={str(tmp_path / 'r')!r} already holds a run (results.json, checkpoints, csv); choose "
        f"another folder, or resume that run with ckpt_path={tmp_path / 'r' / 'checkpoints' / 'last.ckpt'}"
    ]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_ends_the_run_with_results_and_a_resume_command(tmp_path: Path, sig: signal.Signals) -> None:
    run_dir = tmp_path / "r"
    proc = _start(tmp_path, "trainer.max_epochs=500", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}")
    _wait_for(run_dir / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + int(sig), err
    assert "Traceback" not in err
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "interrupted" and results["signal"] == sig.name
    assert 0 < results["steps"] < 500 * 21
    assert results["clip"]["steps"] == results["steps"]  # stopped between two steps, never inside one
    command = results["resume_command"]
    assert f"resume with: {command}" in err and f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}" in command
    assert "(interrupted by" in out
    # the printed command works: finish the run (fewer epochs, to keep the test short) in the same folder
    args = [a for a in command.split()[3:] if not a.startswith("trainer.max_epochs=")]
    done = subprocess.run([sys.executable, "-m", "lightning_clipprune.run", *args, "trainer.max_epochs=" + str(results["epochs"] + 1)],
                          capture_output=True, text=True, cwd=tmp_path, env=_env(tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr
    final = json.loads((run_dir / "results.json").read_text())
    assert final["status"] == "completed" and final["steps"] > results["steps"]
    assert final["clip"]["steps"] == final["steps"]  # no step counted twice across the interrupt
    assert final["resumed_from"] == str(run_dir)
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    steps = sorted({int(r["step"]) for r in rows})
    assert steps[0] < 21 and steps[-1] >= final["steps"] - 1  # the metrics of both parts, in one file


def test_the_console_shows_only_the_tables_and_the_summary(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lightning_clipprune.run", "trainer.max_epochs=2", f"hydra.run.dir={tmp_path / 'r'}"],
                          capture_output=True, text=True, cwd=tmp_path, env=_env(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr  # no tips, no info lines, no deprecation warnings
    assert "FLOPs" not in proc.stdout and "val accuracy" in proc.stdout
    log = (tmp_path / "r" / "run.log").read_text()
    assert "GPU available" in log and "results:" in log  # the detail is in the run's log file
    loud = subprocess.run([sys.executable, "-m", "lightning_clipprune.run", "debug=smoke", "verbose=true", f"hydra.run.dir={tmp_path / 'v'}"],
                          capture_output=True, text=True, cwd=tmp_path, env=_env(tmp_path), timeout=300)
    assert loud.returncode == 0 and "GPU available" in loud.stderr


def test_the_searchs_commands_train_in_a_folder_of_their_own() -> None:
    from lightning_clipprune.app.search_cli import _commands

    result = types.SimpleNamespace(overrides=lambda: ["prune=threshold prune.threshold=0.1"])
    overrides = ["output_dir=/runs/a", "hydra.run.dir=/runs/a", "debug=smoke", "prune=cubic", "ckpt_path=x.ckpt"]
    assert _commands(overrides, result) == ["python -m lightning_clipprune.run debug=smoke prune=threshold prune.threshold=0.1"]
