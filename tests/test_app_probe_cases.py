"""The app as users met it: a run folder moved before its resume, a model and data chosen without an
experiment, the channel preset's compaction, a search of an interrupted run. Real command lines, digits data.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_clipprune.app.rundir import run_status

pytestmark = pytest.mark.usefixtures("offline")

_QUICK = ("debug=smoke", "trainer.max_steps=-1", "trainer.limit_train_batches=2")


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(cwd / "cache")}
    return subprocess.run(
        [sys.executable, "-m", "lightning_clipprune.run", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_a_moved_run_folder_resumes_into_its_last_checkpoint_and_names_its_choices(tmp_path: Path) -> None:
    first = tmp_path / "a"
    done = _run(tmp_path, f"hydra.run.dir={first}", "model=lenet300", "model.net.in_features=64", *_QUICK)
    assert done.returncode == 0, done.stderr
    assert json.loads((first / "results.json").read_text())["experiment"] == "lenet300 on digits"
    moved = tmp_path / "b"
    shutil.move(first, moved)
    (moved / "results.json").unlink()  # a folder that holds a run is resumed in place, as the resume command does
    resumed = _run(tmp_path, f"hydra.run.dir={moved}", "model=lenet300", "model.net.in_features=64", *_QUICK,
                   "trainer.max_epochs=2", f"ckpt_path={moved / 'checkpoints' / 'last.ckpt'}")
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(p.name for p in (moved / "checkpoints").glob("last*.ckpt")) == ["last.ckpt"]
    assert torch.load(moved / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1


def test_the_channel_preset_couples_channels_when_torch_pruning_is_there(tmp_path: Path) -> None:
    pytest.importorskip("torch_pruning")
    from hydra import compose, initialize_config_dir

    from lightning_clipprune.run import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        assert compose("config", overrides=["prune=channel"]).prune.couple_channels == "auto"
        assert compose("config", overrides=["prune.couple_channels=true"]).prune.couple_channels is True


def test_the_run_status_says_interrupted(tmp_path: Path) -> None:
    assert run_status(tmp_path) is None
    (tmp_path / "results.json").write_text(json.dumps({"status": "interrupted"}))
    assert run_status(tmp_path) == "interrupted"
    (tmp_path / "results.json").write_text("not json")
    assert run_status(tmp_path) is None


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_stops_every_ddp_process_at_the_same_batch(tmp_path: Path, sig: signal.Signals) -> None:
    run_dir = tmp_path / "r"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightning_clipprune.run", f"hydra.run.dir={run_dir}", "trainer=ddp", "trainer.accelerator=cpu",
         "trainer.devices=2", "trainer.max_epochs=500", "trainer.enable_progress_bar=false"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints" / "last.ckpt").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    os.killpg(proc.pid, sig)  # what Ctrl-C in a terminal (or a scheduler) does: every process gets it
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the DDP run did not stop within 120 s of {sig.name}")
    assert proc.returncode == 128 + int(sig), err
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "interrupted" and results["signal"] == sig.name
    assert results["clip"]["steps"] == results["steps"] > 0


def test_the_search_prunes_the_weights_the_run_prunes(tmp_path: Path) -> None:
    from lightning_clipprune.app.build import instantiate
    from lightning_clipprune.app.search_cli import compose_run_config, run_prunable

    cfg = compose_run_config(["prune=channel", "model.net.hidden=[16,16]"], tmp_path)  # keep_first_and_last
    model = instantiate(cfg.model, "model")
    weights = [n for n, p in model.named_parameters() if n.endswith("weight")]
    assert run_prunable(cfg, model) == weights[1:-1]  # the first and last layers stay dense, as in the run
    assert run_prunable(compose_run_config([f"prune.exclude=[{weights[0]}]"], tmp_path), model) == weights[1:]
    assert run_prunable(compose_run_config(["~prune"], tmp_path), model) is None  # a dense run: every weight


def test_the_searchs_commands_keep_the_runs_prunable_set(tmp_path: Path) -> None:
    import types

    from lightning_clipprune.app.search_cli import _commands, compose_run_config

    result = types.SimpleNamespace(overrides=lambda: ["prune.sparsity=0.9 prune.threshold=null"])
    overrides = ["prune=channel", "prune.exclude=[net.layers.5.*]"]
    cfg = compose_run_config(overrides, tmp_path)
    command = _commands(overrides, result, cfg.prune)[0]
    assert command == (
        """python -m lightning_clipprune.run prune.keep_first_and_last=true 'prune.exclude=["net.layers.5.*"]'"""
        " prune.sparsity=0.9 prune.threshold=null"
    )
    # the command composes: the same selection, the found sparsity, the default (unstructured) prune group
    pasted = compose_run_config(["prune.keep_first_and_last=true", 'prune.exclude=["net.layers.5.*"]', "prune.sparsity=0.9"], tmp_path)
    assert pasted.prune.exclude == ["net.layers.5.*"] and pasted.prune.keep_first_and_last is True
