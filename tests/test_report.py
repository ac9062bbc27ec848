"""Sweep reports: the table from job folders, the Hydra callbacks, the sweeper/launcher presets, real multiruns."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lightning_clipprune.app.hydra_callbacks import ResultsObjective, SweepReport
from lightning_clipprune.app.report import collect, main, pareto_front, varying_keys, write_report
from lightning_clipprune.run import config_dir

REPO = Path(__file__).resolve().parents[1]
# a few steps, quietly (conf/debug/smoke.yaml)
SMOKE = ["debug=smoke"]


def make_job(root: Path, name: str, overrides: list[str], results: dict | None) -> Path:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    if results is not None:
        (job / "results.json").write_text(json.dumps({"overrides": overrides, **results}))
    return job


def result(val: float, sparsity: float) -> dict:
    return {"val_acc": val, "test_acc": val - 0.01, "sparsity": sparsity, "params_total": 1000,
            "params_nonzero": round(1000 * (1 - sparsity)), "wall_time_s": 1.5}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    make_job(root, "0", ["~prune", "clip.clip_val=1.0", "seed=0"], result(0.97, 0.0))
    make_job(root, "1", ["prune.sparsity=0.5", "clip.clip_val=1.0", "seed=0"], result(0.96, 0.5))
    make_job(root, "2", ["prune.sparsity=0.9", "clip.clip_val=1.0", "seed=0"], result(0.90, 0.9))
    make_job(root, "3", ["prune.sparsity=0.5", "clip.clip_val=0.1", "seed=0"], result(0.95, 0.5))
    make_job(root, "10", ["prune.sparsity=0.9", "clip.clip_val=0.1", "seed=0"], None)  # failed
    return root


def test_collect_reads_every_job_in_order_and_marks_the_failed_one(sweep: Path) -> None:
    jobs = collect(sweep)
    assert [j.name for j in jobs] == ["0", "1", "2", "3", "10"]
    assert [j.status for j in jobs] == ["ok", "ok", "ok", "ok", "failed"]
    assert varying_keys(jobs) == ["~prune", "clip.clip_val", "prune.sparsity"]  # seed=0 everywhere: not varying
    assert [j.pareto for j in jobs] == [True, True, True, False, False]
    assert jobs[0].dense and not jobs[1].dense and not jobs[4].dense


def test_write_report_writes_the_three_files(sweep: Path) -> None:
    write_report(sweep, console=False)
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and [r["status"] for r in rows] == ["ok"] * 4 + ["failed"]
    assert rows[2]["prune.sparsity"] == "0.9" and rows[0]["prune.sparsity"] == "(default)"
    assert float(rows[1]["val_acc"]) == 0.96 and rows[4]["val_acc"] == ""
    md = (sweep / "summary.md").read_text()
    assert md.count("\n| ") == 6 and "| failed |" in md and "5 jobs, 1 failed" in md
    assert (sweep / "accuracy_vs_sparsity.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in sweep.iterdir() if "tmp" in p.name]


def test_report_cli_rebuilds_and_names_a_missing_folder(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "failed" in out and "5 jobs" in out
    assert (sweep / "summary.md").is_file()
    assert main([str(tmp_path / "missing")]) == 1
    assert "sweep folder not found" in capsys.readouterr().err


def test_pareto_front() -> None:
    assert pareto_front([(0.9, 0.5), (0.8, 0.5), (0.95, 0.1), (None, 0.9), (0.5, 0.99)]) == [True, False, True, False, True]


def test_report_shows_the_optuna_front(sweep: Path) -> None:
    (sweep / "optimization_results.yaml").write_text(
        "name: optuna\nsolutions:\n- params: {prune.sparsity: 0.9}\n  values: [0.9, 0.9]\n"
    )
    write_report(sweep, console=False)
    md = (sweep / "summary.md").read_text()
    assert "## Optuna Pareto front" in md and '{"prune.sparsity": 0.9}' in md


def test_sweep_report_callback_writes_and_never_raises(sweep: Path, tmp_path: Path) -> None:
    callback = SweepReport(console=False)
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert (sweep / "summary.csv").is_file()
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "gone")}}}))  # logged only


def test_results_objective_returns_metrics_of_results_json(tmp_path: Path) -> None:
    from hydra.core.utils import JobReturn, JobStatus

    (tmp_path / "results.json").write_text(json.dumps(result(0.9, 0.8)))
    config = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(tmp_path)}}})
    ret = JobReturn(status=JobStatus.COMPLETED, _return_value=None)
    ResultsObjective().on_job_end(config, ret)
    assert ret.return_value == [0.9, 0.8]
    ResultsObjective(["val_acc"]).on_job_end(config, ret)
    assert ret.return_value == 0.9
    with pytest.raises(ValueError, match="`metrics`"):
        ResultsObjective([])


def compose_hydra(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=["output_dir=/tmp/unused", *overrides], return_hydra_config=True)


def test_sweep_report_preset_composes() -> None:
    cfg = compose_hydra(["hydra/callbacks=sweep_report"])
    assert cfg.hydra.callbacks.sweep_report._target_ == "lightning_clipprune.app.hydra_callbacks.SweepReport"


@pytest.mark.parametrize(
    ("launcher", "target"),
    [
        ("local_parallel", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
        ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
    ],
)
def test_launcher_presets_compose(launcher: str, target: str) -> None:
    pytest.importorskip(target.rsplit(".", 2)[0])  # the plugin (dev extra), not a project import
    cfg = compose_hydra([f"hydra/launcher={launcher}"])
    assert cfg.hydra.launcher._target_ == target
    if launcher == "local_parallel":
        assert cfg.hydra.launcher.n_jobs == 2
    else:
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.timeout_min == 120


def test_the_sweep_folder_resolves_the_same_in_a_job_process() -> None:
    """The joblib launcher resolves ``hydra.sweep.dir`` again in each job's process, from the pickled sweep
    config: ``${now:}`` and ``${run_id:}`` must come from its cache, not from the job process's own clock and
    token, or every job lands in a folder of its own and the sweep report finds none."""
    import pickle

    from hydra.core.utils import setup_globals  # registers `now`, as every launcher does

    setup_globals()
    cfg = compose_hydra([])
    first = str(cfg.hydra.sweep.dir)  # resolved in the launching process: cached
    code = (
        "import pickle, sys; from hydra.core.utils import setup_globals; setup_globals();"
        " import lightning_clipprune.run; from lightning_clipprune.app import rundir;"
        " cfg = pickle.loads(sys.stdin.buffer.read()); print(rundir.run_id(), cfg.hydra.sweep.dir)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(cfg), capture_output=True, env=env,
                          timeout=300, check=True)
    token, resolved = proc.stdout.decode().split()
    assert token not in first  # the job process has a token of its own ...
    assert resolved == first  # ... and still resolves the sweep's folder


def test_pareto_search_preset_composes() -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")  # the plugin (dev extra), not a project import
    cfg = compose_hydra(["+search=pareto"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and list(sweeper.direction) == ["maximize", "maximize"]
    assert sweeper.sampler._target_ == "optuna.samplers.NSGAIISampler"
    assert set(sweeper.params) == {"clip.clip_val", "prune.sparsity"}
    assert set(cfg.hydra.callbacks) == {"sweep_report", "objectives"}
    assert list(cfg.hydra.callbacks.objectives.metrics) == ["val_acc", "sparsity"]


def run_app(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lightning_clipprune.run", "-m", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_two_job_multirun_with_a_failing_job_writes_the_report(tmp_path: Path) -> None:
    """Job 1 fails at its first step (5 classes, labels up to 9): its row says failed, the report is complete."""
    sweep_dir = tmp_path / "multirun"
    proc = run_app([*SMOKE, "model.num_classes=10,5", "hydra/callbacks=sweep_report", f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert proc.returncode != 0  # Hydra's basic sweeper reports the failed job
    assert {"summary.csv", "summary.md", "accuracy_vs_sparsity.png"} <= {p.name for p in sweep_dir.iterdir()}
    with (sweep_dir / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["model.num_classes"], r["status"]) for r in rows] == [("0", "10", "ok"), ("1", "5", "failed")]
    assert 0.0 <= float(rows[0]["val_acc"]) <= 1.0 and float(rows[0]["sparsity"]) == pytest.approx(0.9, abs=0.01)


@pytest.mark.slow
def test_optuna_pareto_preset_runs_two_trials_on_digits(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")  # the dev extra; not a project import
    sweep_dir = tmp_path / "multirun"
    proc = run_app([*SMOKE, "+search=pareto", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = collect(sweep_dir)
    assert len(jobs) == 2 and all(j.status == "ok" for j in jobs)
    assert all(0.5 <= j.metric("sparsity") <= 0.98 for j in jobs)
    front = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert front.name == "optuna" and 1 <= len(front.solutions) <= 2
    assert all(len(s["values"]) == 2 for s in front.solutions)
    assert "## Optuna Pareto front" in (sweep_dir / "summary.md").read_text()


def test_an_interrupted_job_is_marked_so_and_kept_off_the_front(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    make_job(root, "0", ["trainer.max_epochs=2"], result(0.90, 0.8))
    make_job(root, "1", ["trainer.max_epochs=300"], {**result(0.95, 0.81), "status": "interrupted"})
    jobs = collect(root)
    assert [(j.status, j.pareto) for j in jobs] == [("ok", True), ("interrupted", False)]
    write_report(root, console=False)
    assert "2 jobs, 0 failed, 1 interrupted" in (root / "summary.md").read_text()


def test_the_report_command_writes_nothing_when_no_job_is_usable(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "sweep"
    make_job(root, "0", ["prune.sparsity=0.5"], None)  # failed
    assert main([str(root)]) == 1
    assert "no job of" in capsys.readouterr().err
    assert not any((root / name).exists() for name in ("summary.csv", "summary.md", "accuracy_vs_sparsity.png"))


@pytest.mark.slow
def test_a_sweep_stopped_by_ctrl_c_lists_the_interrupted_job(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "multirun"
    proc = run_app(["trainer.max_epochs=1,2", f"hydra.sweep.dir={sweep_dir}", "callbacks.sparsity.inference_latency=false",
                    "+callbacks.kill._target_=tests.signal_hooks.SignalAt", "+callbacks.kill.hook=on_train_batch_end",
                    "+callbacks.kill.step=25", "+callbacks.kill.signum=SIGINT"], tmp_path)  # in job 1 (21 steps/epoch)
    assert proc.returncode == 130, proc.stderr
    with (sweep_dir / "summary.csv").open() as f:
        assert [(r["job"], r["status"]) for r in csv.DictReader(f)] == [("0", "ok"), ("1", "interrupted")]
