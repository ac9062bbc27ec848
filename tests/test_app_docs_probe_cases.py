"""The app where a reader of its docs found it wrong: advice for a key of a group the command line removes (``~prune
+prune.sparsity=0.5`` crashed in Lightning), Lightning's own clipping reported "off", a second sweep into one
``hydra.sweep.dir`` refused job by job in words about ``hydra.run.dir``, ``--help | head -1`` ending in an error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from lightning_clipprune.app.build import Components, instantiate
from lightning_clipprune.app.checks import check_config
from lightning_clipprune.app.cli import check_overrides, hydra_error_line
from lightning_clipprune.app.rundir import check_sweep_dir, claim_output_dir, release_output_dir
from lightning_clipprune.app.summary import clip_record, print_summary
from lightning_clipprune.app.sweep_check import check_sweep_values
from lightning_clipprune.run import ConfigError, config_dir, train

pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DATA_DIR", raising=False)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # seed_everything sets it; do not leak it
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _compose(tmp_path: Path, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=[f"output_dir={tmp_path}", "debug=smoke", *overrides])


def _cli(cwd: Path, *args: str, **kwargs: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(cwd / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    options: dict = kwargs or {"capture_output": True}
    return subprocess.run([sys.executable, "-m", "lightning_clipprune.run", *args], cwd=cwd, env=env, text=True,
                          timeout=300, **options)


# ------------------------------------------------------------------ a key of a group removed by ~group


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["~prune", "prune.sparsity=0.5"], "prune.sparsity=0.5: prune was removed by ~prune: drop ~prune to set prune.*"),
        (["~prune", "+prune.sparsity=0.5"], "+prune.sparsity=0.5: prune was removed by ~prune: drop ~prune to set prune.*"),
        (["+clip.clip_val=0.5", "~clip"], "+clip.clip_val=0.5: clip was removed by ~clip: drop ~clip to set clip.*"),
        (["~logger", "+logger.save_dir=x"], "+logger.save_dir=x: logger was removed by ~logger: drop ~logger to set logger.*"),
        (["~callbacks.sparsity", "+callbacks.sparsity.per_layer=true"],
         "+callbacks.sparsity.per_layer=true: callbacks.sparsity was removed by ~callbacks.sparsity: drop "
         "~callbacks.sparsity to set callbacks.sparsity.*"),
    ],
)
def test_a_key_of_a_group_the_command_line_removes_is_one_line_that_never_advises_plus(argv: list[str], line: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_overrides(argv)
    assert str(info.value) == line
    # Hydra's own refusal of the key (when the app's check is not reached) says the same, not "write +prune..."
    hydra_line = hydra_error_line(Exception(f"Could not override '{line.split('=', 1)[0].lstrip('+')}'."), argv)
    assert "removed by ~" in hydra_line and "to add a new key" not in hydra_line


@pytest.mark.parametrize(
    "argv",
    [
        ["~prune", "+prune._target_=lightning_clipprune.MagnitudePruneCallback", "+prune.sparsity=0.5"],  # rebuilt
        ["~callbacks.sparsity", "+callbacks.sparsity._target_=lightning_clipprune.SparsityLogger",
         "+callbacks.sparsity.per_layer=true"],
        ["~prune", "clip.clip_val=0.5", "prune=linear"],  # another group's key; the group chosen again
        ["~prune.include", "prune.sparsity=0.5"],  # a key removed, not its group
    ],
)
def test_keys_beside_a_removal_that_do_not_set_the_removed_node_pass(argv: list[str]) -> None:
    check_overrides(argv)


@pytest.mark.parametrize(
    ("overrides", "start"),
    [
        (["+callbacks.extra.patience=3"], "callbacks.extra has no _target_ (it holds patience=3)"),
        (["+callbacks.extra=3"], "callbacks.extra=3: not a config node with a _target_"),
        (["~prune", "+prune.sparsity=0.5"], "prune has no _target_ (it holds sparsity=0.5)"),
        (["~logger", "+logger.save_dir=x"], "logger has no _target_ (it holds save_dir='x')"),
        (["~data"], "data is missing (~data removes it)"),
    ],
)
def test_a_node_the_app_builds_without_a_target_is_refused_before_anything_is_written(
    tmp_path: Path, overrides: list[str], start: str
) -> None:
    cfg = _compose(tmp_path, overrides)
    with pytest.raises(ConfigError) as info:
        check_config(cfg, optimizer=False)
    assert str(info.value).startswith(start) and "\n" not in str(info.value), info.value
    with pytest.raises(ConfigError):  # train() runs the check first: no Lightning traceback, no csv/ left behind
        train(cfg, overrides)
    assert not [p.name for p in tmp_path.iterdir() if p.name != "cache"]


def test_build_refuses_a_node_without_a_target_itself() -> None:
    with pytest.raises(ConfigError, match=r"^callbacks.extra has no _target_ \(it holds patience=3\)"):
        instantiate(OmegaConf.create({"patience": 3}), "callbacks.extra")


def test_the_removed_group_line_comes_before_hydra_writes_anything(tmp_path: Path) -> None:
    proc = _cli(tmp_path, "~prune", "+prune.sparsity=0.5", f"hydra.run.dir={tmp_path / 'b'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr == "error: +prune.sparsity=0.5: prune was removed by ~prune: drop ~prune to set prune.*\n"
    assert not (tmp_path / "b").exists()


def test_a_run_refused_for_a_node_without_a_target_leaves_its_folder_free(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="callbacks.extra has no _target_"):
        train(_compose(tmp_path, ["+callbacks.extra.patience=3"]))
    results = train(_compose(tmp_path, []))  # the corrected command, same folder
    assert results["status"] == "completed" and (tmp_path / "results.json").is_file()


# ------------------------------------------------------------------ Lightning's clipping is reported


def test_lightnings_gradient_clip_val_is_reported_in_results_and_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    overrides = ["~clip", "trainer.gradient_clip_val=0.01"]
    results = train(_compose(tmp_path, overrides), overrides)
    assert results["clip"] == {"by": "trainer", "algorithm": "norm", "clip_val": 0.01}
    assert json.loads((tmp_path / "results.json").read_text())["clip"] == results["clip"]
    row = next(line for line in capsys.readouterr().out.splitlines() if "gradient clipping" in line)
    assert "Lightning's gradient_clip_val=0.01 (norm)" in row and "off" not in row


def test_the_clip_record_names_who_clipped_and_how() -> None:
    import lightning as L

    from lightning_clipprune import GradientClipCallback

    def parts(trainer: object = None, clip: object = None) -> Components:
        return Components(datamodule=None, model=None, trainer=trainer, clip=clip)

    value = L.Trainer(gradient_clip_val=0.5, gradient_clip_algorithm="value", logger=False, enable_checkpointing=False)
    assert clip_record(parts(value)) == {"by": "trainer", "algorithm": "value", "clip_val": 0.5}
    assert clip_record(parts(L.Trainer(logger=False, enable_checkpointing=False))) is None  # nothing clips
    record = clip_record(parts(clip=GradientClipCallback(clip_val=0.5)))
    assert record is not None and (record["by"], record["algorithm"], record["clip_val"], record["steps"]) == (
        "callback", "norm", 0.5, 0.0)


def test_the_summary_row_of_the_callbacks_clipping_and_of_none(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    base = {"experiment": "x", "val_acc": 0.5, "sparsity": 0.0, "params_total": 1, "params_nonzero": 1, "epochs": 1,
            "steps": 2, "wall_time_s": 1.0}
    stats = {"by": "callback", "algorithm": "norm", "clip_val": 1.0, "steps": 2.0, "clipped_fraction": 0.5,
             "clipped_steps": 1.0, "mean_norm": 1.5, "max_norm": 2.0, "nonfinite_skipped": 0.0}
    for clip, shown in ((stats, "50.00 % of 2 steps"), (None, "off")):
        print_summary({**base, "clip": clip})
        row = next(line for line in capsys.readouterr().out.splitlines() if "gradient clipping" in line)
        assert shown in row


# ------------------------------------------------------------------ a second sweep into one hydra.sweep.dir


def _earlier_sweep(root: Path) -> Path:
    for job in ("0", "1"):
        (root / job / "csv").mkdir(parents=True)
        (root / job / "results.json").write_text("{}")
    (root / "multirun.yaml").write_text("{}")
    return root


def test_a_sweep_folder_holding_an_earlier_sweeps_runs_is_one_line_naming_hydra_sweep_dir(tmp_path: Path) -> None:
    old = _earlier_sweep(tmp_path / "sweep")
    for argv in (["-m", "prune.sparsity=0.5,0.9", f"hydra.sweep.dir={old}"], ["--multirun", f"hydra.sweep.dir={old}"]):
        with pytest.raises(ConfigError) as info:
            check_sweep_values(argv, config_dir())
        assert str(info.value).startswith(f"hydra.sweep.dir={str(old)!r} already holds the runs of an earlier sweep "
                                          "(job folders 0, 1); give this sweep a new folder")
        assert "hydra.run.dir" not in str(info.value) and "ckpt_path" not in str(info.value)


def test_a_new_empty_or_never_run_sweep_folder_passes(tmp_path: Path) -> None:
    check_sweep_dir(tmp_path / "absent")
    (tmp_path / "stopped" / "0").mkdir(parents=True)  # a sweep stopped before its first job wrote anything
    (tmp_path / "stopped" / "multirun.yaml").write_text("{}")
    check_sweep_dir(tmp_path / "stopped")
    check_sweep_values(["-m", "prune.sparsity=0.5,0.9", f"hydra.sweep.dir={tmp_path / 'stopped'}"], config_dir())


def test_a_sweep_job_refused_in_an_earlier_sweeps_folder_names_hydra_sweep_dir(tmp_path: Path) -> None:
    from hydra.core.hydra_config import HydraConfig

    old = _earlier_sweep(tmp_path / "sweep")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra.sweep.dir={old}"], return_hydra_config=True)
    cfg.hydra.mode = "MULTIRUN"
    HydraConfig.instance().set_config(cfg)
    try:
        with pytest.raises(ConfigError, match=r"^hydra.sweep.dir=.* already holds the runs of an earlier sweep \(job "
                                              r"folders 0\); give this sweep a new folder"):
            claim_output_dir(old / "0")
    finally:
        HydraConfig.instance().cfg = None
        release_output_dir(old / "0")
    with pytest.raises(ConfigError, match=r"^hydra.run.dir=.* already holds a run"):  # a single run: as before
        claim_output_dir(old / "1")


def test_a_second_sweep_into_one_folder_stops_before_its_first_job(tmp_path: Path) -> None:
    old = _earlier_sweep(tmp_path / "sweep")
    proc = _cli(tmp_path, "-m", "prune.sparsity=0.5,0.9", "debug=smoke", f"hydra.sweep.dir={old}")
    assert proc.returncode == 1 and "Error executing job" not in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: hydra.sweep.dir={str(old)!r} already holds the runs of an earlier sweep")
    assert proc.stderr.count("\n") == 1 and (old / "multirun.yaml").read_text() == "{}"  # Hydra never started


# ------------------------------------------------------------------ --help into a closed pipe


@pytest.mark.parametrize("flags", [["--help"], ["--cfg", "job"], ["--info"]])
def test_print_only_options_end_quietly_when_the_reader_has_gone(tmp_path: Path, flags: list[str]) -> None:
    read, write = os.pipe()
    os.close(read)  # the reader of `| head -1` or `| true`, gone before the text is written
    try:
        proc = _cli(tmp_path, *flags, stdout=write, stderr=subprocess.PIPE)
    finally:
        os.close(write)
    assert proc.returncode in (0, 141) and proc.stderr == "", (proc.returncode, proc.stderr)


def test_help_into_an_open_pipe_is_unchanged(tmp_path: Path) -> None:
    proc = _cli(tmp_path, "--help")
    assert proc.returncode == 0 and proc.stderr == "" and "== Configuration groups ==" in proc.stdout


def test_the_search_clips_as_the_run_did_with_lightnings_own_clipping(monkeypatch) -> None:
    """A run made with `~clip trainer.gradient_clip_val=0.5`: the search's Taylor gradients and its fine-tune clip
    at 0.5 too (they read only the clip group before, and ran unclipped)."""
    import torch
    from omegaconf import OmegaConf

    from lightning_clipprune import GradientClipCallback
    from lightning_clipprune.app import search_cli

    cfg = OmegaConf.create({"trainer": {"gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"},
                            "model": {"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 2}})
    assert search_cli._clip_settings(cfg) == (0.5, "value")
    assert search_cli._clip_settings(OmegaConf.create({"trainer": {}})) == (None, "norm")
    seen = []
    monkeypatch.setattr(search_cli, "_fit_and_score", lambda model, tuned, dm, callbacks, epochs: seen.extend(callbacks) or {})
    search_cli.finetune(cfg, torch.nn.Linear(2, 2), None, 0.5, 1, None)
    clip = next(c for c in seen if isinstance(c, GradientClipCallback))
    assert (clip.clip_val, clip.algorithm) == (0.5, "value")
