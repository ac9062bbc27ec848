"""A sweep stopped before its last jobs: the report lists the jobs not run with the command for each, and a job
run or resumed on its own into the sweep's folder refreshes the report."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightning_clipprune.app.report import collect, to_table, write_report
from lightning_clipprune.app.sweep_plan import MAX_PLANNED, planned_jobs

REPO = Path(__file__).resolve().parents[1]
BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def multirun_yaml(root: Path, task: list[str], params: dict | None = None, target: str = BASIC,
                  config_dir: str | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    sources = [{"path": "hydra.conf", "schema": "pkg", "provider": "hydra"}]
    if config_dir is not None:
        sources.append({"path": config_dir, "schema": "file", "provider": "command-line"})
    cfg = {"hydra": {"sweeper": {"_target_": target, "max_batch_size": None, "params": params},
                     "overrides": {"task": task}, "runtime": {"config_sources": sources},
                     "job": {"config_name": "config"}}}
    (root / "multirun.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))


def job(root: Path, name: str, overrides: list[str], val: float | None = 0.9) -> None:
    (root / name / ".hydra").mkdir(parents=True)
    (root / name / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    if val is not None:
        (root / name / "results.json").write_text(json.dumps({"val_acc": val, "sparsity": 0.5, "overrides": overrides}))


def test_the_basic_sweepers_grid_is_read_back_in_job_order(tmp_path: Path) -> None:
    multirun_yaml(tmp_path, ["prune.sparsity=0.5,0.9", "seed=0,1", "trainer.max_epochs=2"], params={"clip.clip_val": "1,2"})
    plan = planned_jobs(tmp_path)
    assert len(plan) == 8
    # Hydra's order: the config's params first, then the command line's, the last key varying fastest
    assert plan[0] == ["clip.clip_val=1", "prune.sparsity=0.5", "seed=0", "trainer.max_epochs=2"]
    assert plan[1] == ["clip.clip_val=1", "prune.sparsity=0.5", "seed=1", "trainer.max_epochs=2"]
    assert plan[-1] == ["clip.clip_val=2", "prune.sparsity=0.9", "seed=1", "trainer.max_epochs=2"]


@pytest.mark.parametrize("case", ["optuna", "no file", "garbage", "huge", "interval", "not a list", "symlink", "shuffle", "glob"])
def test_no_plan_is_listed_when_it_cannot_be_known(tmp_path: Path, case: str) -> None:
    root = tmp_path / "sweep"
    if case == "optuna":
        multirun_yaml(root, ["a=1,2"], target="hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper")
    elif case == "garbage":
        root.mkdir()
        (root / "multirun.yaml").write_text("hydra: [1, 2\n")
    elif case == "huge":
        multirun_yaml(root, [f"a=range(0,{MAX_PLANNED + 1})"])
    elif case == "interval":
        multirun_yaml(root, ["a=interval(0,1)"])
    elif case == "shuffle":  # another order at each expansion: the folders' numbers are not the plan's
        multirun_yaml(root, ["a=shuffle(1,2,3,4,5,6)"])
    elif case == "glob":  # expanded against the config's group options, which the report does not have
        multirun_yaml(root, ["clip=glob(n*)"])
    elif case == "not a list":
        multirun_yaml(root, ["a=1,2"])
        (root / "multirun.yaml").write_text(f"hydra: {{sweeper: {{_target_: {BASIC}}}, overrides: {{task: 3}}}}\n")
    elif case == "symlink":
        multirun_yaml(tmp_path / "elsewhere", ["a=1,2"])
        root.mkdir()
        os.symlink(tmp_path / "elsewhere" / "multirun.yaml", root / "multirun.yaml")
    else:
        root.mkdir()
    job(root, "0", ["a=1"])
    assert planned_jobs(root) is None
    assert [j.status for j in collect(root)] == ["ok"]


def test_the_jobs_not_run_are_rows_with_the_command_for_each(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    multirun_yaml(root, ["prune.sparsity=0.5,0.8,0.9", "trainer.max_epochs=3"])
    job(root, "0", ["prune.sparsity=0.5", "trainer.max_epochs=3"])
    job(root, "1", ["prune.sparsity=0.8", "trainer.max_epochs=3"])
    jobs = collect(root)
    assert [(j.name, j.status, j.overrides.get("prune.sparsity")) for j in jobs] == [
        ("0", "ok", "0.5"), ("1", "ok", "0.8"), ("2", "not run", "0.9")]
    assert not jobs[2].pareto
    write_report(root, console=False)
    md = (root / "summary.md").read_text()
    assert "3 jobs, 0 failed, 1 not run." in md
    assert f"python -m lightning_clipprune.run prune.sparsity=0.9 trainer.max_epochs=3 hydra.run.dir={root / '2'}" in md
    with (root / "summary.csv").open() as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["ok", "ok", "not run"]
    assert "1 not run" in str(to_table(jobs).caption)


def test_a_job_resumed_in_its_folder_is_the_sweeps_job_not_a_new_setting(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    multirun_yaml(root, ["prune.sparsity=0.5,0.8"])
    job(root, "0", ["prune.sparsity=0.5"])
    # the resumed run rewrote .hydra/overrides.yaml with its own command line
    job(root, "1", ["prune.sparsity=0.8", f"ckpt_path={root / '1' / 'checkpoints' / 'last.ckpt'}"])
    jobs = collect(root)
    assert [(j.status, j.overrides) for j in jobs] == [("ok", {"prune.sparsity": "0.5"}), ("ok", {"prune.sparsity": "0.8"})]
    # a checkpoint from elsewhere is a setting of its own (fine-tuning another run's model)
    other = tmp_path / "other"
    multirun_yaml(other, [f"ckpt_path={tmp_path / 'a.ckpt'}"])
    job(other, "0", [f"ckpt_path={tmp_path / 'a.ckpt'}"])
    assert [j.status for j in collect(other)] == ["ok"]


def test_the_same_setting_twice_in_a_grid_is_two_jobs(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    multirun_yaml(root, ["seed=1,1,2"])
    job(root, "0", ["seed=1"])
    assert [(j.name, j.status) for j in collect(root)] == [("0", "ok"), ("1", "not run"), ("2", "not run")]


@pytest.mark.slow
def test_a_stopped_sweep_names_the_job_not_run_and_running_it_completes_the_report(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "multirun"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    args = ["trainer.max_epochs=1,2,3", f"hydra.sweep.dir={sweep_dir}", "callbacks.sparsity.inference_latency=false",
            "+callbacks.kill._target_=tests.signal_hooks.SignalAt", "+callbacks.kill.hook=on_train_batch_end",
            "+callbacks.kill.step=25", "+callbacks.kill.signum=SIGINT",  # in job 1 (21 steps/epoch): job 2 never starts
            f"+callbacks.kill.once={tmp_path / 'sent'}"]
    proc = subprocess.run([sys.executable, "-m", "lightning_clipprune.run", "-m", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 130, proc.stderr
    assert "the sweep has 1 of 3 jobs not run" in proc.stderr
    md = (sweep_dir / "summary.md").read_text()
    command = next(line.strip() for line in md.splitlines() if line.strip().startswith("python -m lightning_clipprune.run"))
    assert "trainer.max_epochs=3" in command and f"hydra.run.dir={sweep_dir / '2'}" in command
    run = subprocess.run([sys.executable, *command.split()[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr
    with (sweep_dir / "summary.csv").open() as f:
        assert [(r["job"], r["status"]) for r in csv.DictReader(f)] == [("0", "ok"), ("1", "interrupted"), ("2", "ok")]


def test_the_command_of_a_job_not_run_keeps_the_sweeps_config_dir(tmp_path: Path) -> None:
    """A sweep composed with `--config-dir MY/conf +experiment=mine`: without the option the printed command
    failed (`+experiment=mine: no such option`)."""
    root = tmp_path / "sweep"
    multirun_yaml(root, ["+experiment=mine", "seed=1,2"], config_dir=str(tmp_path / "conf"))
    job(root, "0", ["+experiment=mine", "seed=1"])
    (waiting,) = [j for j in collect(root) if j.not_run]
    assert waiting.extra["command"] == (f"python -m lightning_clipprune.run --config-dir {tmp_path / 'conf'} "
                                        f"+experiment=mine seed=2 hydra.run.dir={root / '1'}")


def test_the_resume_command_keeps_the_runs_config_options(tmp_path: Path) -> None:
    from lightning_clipprune.app.summary import resume_command

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").touch()
    command = resume_command(["+experiment=mine"], tmp_path, ["--config-dir", "/my/conf", "--config-name", "other"])
    assert command.split()[3:8] == ["--config-dir", "/my/conf", "--config-name", "other", "+experiment=mine"]
