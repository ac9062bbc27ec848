"""A sweep's bad value is one line before its first job trains (issue #26: a bad command-line value answers
in about a second, sweeps included): every value of ``key=a,b,c`` and the bounds of ``range(...)``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig

from lightning_clipprune.app.checks import ConfigError
from lightning_clipprune.app.sweep_check import check_sweep_values
from lightning_clipprune.run import config_dir


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["-m", "prune.sparsity=0.9,1.5"], "got 1.5"),
        (["--multirun", "+experiment=cifar", "trainer.max_epochs=2,0"], "trainer.max_epochs=0"),
        (["-m", "seed=range(-3,2)"], "seed=-3"),
        (["-m", "prune.sparsity=0.5,0.9", "clip.norm_type=1,0"], "norm_type"),
    ],
)
def test_every_swept_value_is_checked_before_the_first_job(argv: list[str], text: str) -> None:
    with pytest.raises(ConfigError, match=text.replace(".", r"\.")):
        check_sweep_values(argv, config_dir())
    assert not HydraConfig.initialized()  # nothing of the check stays behind for the jobs


def test_a_bad_job_other_than_the_first_names_its_swept_value() -> None:
    with pytest.raises(ConfigError) as info:
        check_sweep_values(["-m", "prune.sparsity=0.5,0.9,1.5"], config_dir())
    assert str(info.value).startswith("in the sweep's job with prune.sparsity=1.5: prune: ")
    # a fixed value fails every job: the first job's line, blaming no swept value
    with pytest.raises(ConfigError) as info:
        check_sweep_values(["-m", "prune.sparsity=0.5,0.9", "model.optimizer.nesterov=maybe"], config_dir())
    assert str(info.value).startswith("model.optimizer.nesterov='maybe'")


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "prune.sparsity=0.5,0.9", "model=lenet300,mlp"],  # good values, a group swept too
        ["prune.sparsity=0.9,1.5"],  # not a sweep: Hydra's own error
        ["-m", "--config-name", "other", "prune.sparsity=0.9,1.5"],  # another config: left to the jobs
        ["-m", "prune.sparsity=0.9", "model=no_such_model,mlp"],  # Hydra reports the missing option itself
        ["-m", "seed=range(5,2)", "prune.sparsity=0.9,1.5"],  # an empty range: Hydra's own error first
        ["-m", "hydra.sweeper.params.prune.sparsity=choice(0.5,1.5)"],  # a sweeper's search space
        ["-m", "clip=glob(n*,a*)", "prune.sparsity=0.5,0.9"],  # a glob needs Hydra's config loader: left to Hydra
    ],
)
def test_nothing_else_is_refused_here(argv: list[str]) -> None:
    check_sweep_values(argv, config_dir())


def test_the_command_line_refuses_a_swept_value_before_any_job(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_clipprune.run", "-m", "debug=smoke", "prune.sparsity=0.5,1.5"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "got 1.5" in lines[0], proc.stderr
    assert "Launching" not in proc.stdout and not (tmp_path / "multirun").exists()  # no job started


def test_an_unseeded_sampler_under_ddp_is_refused_before_any_job() -> None:
    """Lightning relaunches the command, -m included, per extra DDP process: each would draw its own trials."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")  # the dev extra; not a project import
    argv = ["-m", "+search=pareto", "hydra.sweeper.sampler.seed=null", "trainer=ddp", "trainer.accelerator=cpu",
            "trainer.devices=2"]
    with pytest.raises(ConfigError, match=r"hydra.sweeper.sampler.seed=null with trainer.strategy='ddp'"):
        check_sweep_values(argv, config_dir())
    check_sweep_values([a for a in argv if "seed" not in a], config_dir())  # the preset's seed: fine
    check_sweep_values([*argv[:5], "trainer.devices=1"], config_dir())  # one process: fine
