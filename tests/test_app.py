"""The Hydra app: every experiment composes and runs a few steps; overrides, results.json, resume, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lightning_clipprune.checkpoint import load_checkpoint
from lightning_clipprune.data import DataNotFoundError
from lightning_clipprune.run import ConfigError, config_dir, train

pytestmark = pytest.mark.usefixtures("offline")

EXPERIMENTS = ["digits", "fashion_mnist", "fashion_cnn", "cifar", "cifar_resnet56"]
FASHION = Path("/usr/share/datasets/fashion-mnist")

# a few steps, quietly: what `debug=smoke` sets (the CLI tests pick from it)
SMOKE = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "callbacks.sparsity.print_table=false",
]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DATA_DIR", raising=False)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # seed_everything sets it; do not leak it
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def compose_cfg(tmp_path: Path, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=[f"output_dir={tmp_path}", *overrides])


def run(tmp_path: Path, *overrides: str, smoke: bool = True) -> dict:
    overrides_ = [*(["debug=smoke"] if smoke else []), *overrides]
    return train(compose_cfg(tmp_path, overrides_), overrides_)


def test_config_dir_holds_every_group() -> None:
    root = config_dir()
    assert (root / "config.yaml").is_file()
    for group in ("model", "data", "clip", "prune", "trainer", "logger", "experiment", "debug"):
        assert list((root / group).glob("*.yaml")), group
    assert sorted(p.stem for p in (root / "experiment").glob("*.yaml")) == sorted([*EXPERIMENTS, "seed"])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_a_few_steps(tmp_path: Path, experiment: str, cifar_root: Path) -> None:
    extra = []
    if experiment.startswith("cifar"):
        extra = [f"data.root={cifar_root}", "data.batch_size=16", "data.eval_batch_size=32"]
    elif experiment.startswith("fashion"):
        if not FASHION.is_dir():
            pytest.skip("dataset-fashion-mnist not installed")
        extra = ["data.batch_size=32"]
    results = run(tmp_path, f"+experiment={experiment}", *extra)
    assert results["experiment"] == experiment
    assert results["steps"] == 2
    assert 0.0 <= results["val_acc"] <= 1.0 and 0.0 <= results["test_acc"] <= 1.0
    assert results["sparsity"] == pytest.approx(0.9, abs=0.01)  # the cubic schedule ends within the run
    assert results["params_nonzero"] < results["params_total"]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["val_acc"] == results["val_acc"] and on_disk["overrides"][-len(extra) - 1] == f"+experiment={experiment}"
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "checkpoints" / "final.ckpt").is_file()
    assert (tmp_path / "csv" / "metrics.csv").is_file()


def test_experiments_set_what_the_issue_asks(tmp_path: Path) -> None:
    fm = compose_cfg(tmp_path, ["+experiment=fashion_mnist"])
    assert fm.model.net._target_.endswith("LeNet300100")
    assert (fm.model.optimizer.lr, fm.model.optimizer.momentum, fm.model.optimizer.weight_decay) == (0.1, 0.9, 5e-4)
    assert fm.model.lr_schedule == "cosine" and fm.data.batch_size == 128 and fm.trainer.max_epochs == 10
    assert (list(fm.data.mean), list(fm.data.std)) == ([0.2860], [0.3530])
    assert (fm.prune.end, fm.prune.lr_rewind, fm.prune.schedule) == (0.6, 1.0, "cubic")  # prune=rewind (issue 28)
    assert compose_cfg(tmp_path, ["+experiment=fashion_mnist", "prune=cubic"]).prune.lr_rewind is None
    assert compose_cfg(tmp_path, ["+experiment=fashion_mnist", "~prune"]).get("prune") is None
    cifar = compose_cfg(tmp_path, ["+experiment=cifar"])
    assert cifar.model.net.depth == 20 and cifar.data.augment and cifar.model.optimizer._target_ == "torch.optim.SGD"
    assert compose_cfg(tmp_path, ["+experiment=cifar_resnet56"]).model.net.depth == 56
    assert compose_cfg(tmp_path, ["+experiment=fashion_cnn"]).model.net._target_.endswith("LeNet5")
    default = compose_cfg(tmp_path, [])
    assert default.data._target_.endswith("DigitsDataModule") and default.model.net._target_.endswith(".MLP")
    assert compose_cfg(tmp_path, ["+experiment=digits"]).trainer.max_epochs == default.trainer.max_epochs


@pytest.mark.parametrize("choice", ["norm", "value", "agc", "autoclip", "zclip"])
def test_every_clip_choice_builds_the_callback(tmp_path: Path, choice: str) -> None:
    from hydra.utils import instantiate

    from lightning_clipprune import GradientClipCallback

    cb = instantiate(compose_cfg(tmp_path, [f"clip={choice}"]).clip, _convert_="all")
    assert isinstance(cb, GradientClipCallback) and cb.algorithm == choice


@pytest.mark.parametrize("choice", ["cubic", "linear", "oneshot", "threshold", "threshold_after", "nm24", "channel"])
def test_every_prune_choice_builds_the_callback(tmp_path: Path, choice: str) -> None:
    from hydra.utils import instantiate

    from lightning_clipprune import MagnitudePruneCallback

    cb = instantiate(compose_cfg(tmp_path, [f"prune={choice}"]).prune, _convert_="all")
    assert isinstance(cb, MagnitudePruneCallback)


def test_overrides_reach_the_callbacks_and_turn_them_off(tmp_path: Path) -> None:
    results = run(tmp_path / "a", "prune.sparsity=0.5", "clip.clip_val=0.01", "prune=linear")
    assert results["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert results["clip"]["clipped_fraction"] == 1.0  # every step's norm is above 0.01
    dense = run(tmp_path / "b", "~prune", "~clip")
    assert dense["sparsity"] == 0.0 and dense["clip"] is None
    assert dense["params_nonzero"] == dense["params_total"]


def test_threshold_rule_is_a_config_choice(tmp_path: Path) -> None:
    results = run(tmp_path / "a", "prune=threshold", "prune.threshold=0.05")
    assert 0.0 < results["sparsity"] < 0.9  # threshold, not a sparsity target
    # prune.threshold on the default (sparsity) config: one line that says how to get the threshold rule
    with pytest.raises(ConfigError, match=r"prune.sparsity=0.9 and prune.threshold=0.05 .*prune=threshold"):
        run(tmp_path / "b", "prune.threshold=0.05")
    assert not (tmp_path / "b" / "checkpoints").exists()
    assert run(tmp_path / "c", "prune.threshold=0.05", "prune.sparsity=null")["sparsity"] > 0.0


def test_oneshot_after_training_reports_accuracy_before_and_after(tmp_path: Path) -> None:
    results = run(tmp_path, "prune=oneshot", "prune.sparsity=0.95", "trainer.limit_train_batches=10", "trainer.max_steps=-1", "trainer.limit_val_batches=null")
    assert results["sparsity"] == pytest.approx(0.95, abs=0.01)
    assert results["val_acc_before_prune"] > results["val_acc"]  # pruning 95 % without retraining costs accuracy


def test_seed_makes_a_cpu_run_reproducible(tmp_path: Path) -> None:
    torch.use_deterministic_algorithms(False)
    a = run(tmp_path / "a", "seed=3", "trainer.limit_train_batches=5", "trainer.max_steps=-1")
    b = run(tmp_path / "b", "seed=3", "trainer.limit_train_batches=5", "trainer.max_steps=-1")
    run(tmp_path / "c", "seed=4", "trainer.limit_train_batches=5", "trainer.max_steps=-1")
    wa, wb, wc = (
        load_checkpoint(tmp_path / d / "checkpoints" / "final.ckpt")["state_dict"] for d in "abc"
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and a["val_acc"] == b["val_acc"]
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert not torch.are_deterministic_algorithms_enabled()  # train() restored the process settings


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_ckpt_path_resumes_the_run(tmp_path: Path) -> None:
    first = run(tmp_path / "a")
    assert first["steps"] == 2
    resumed = run(tmp_path / "b", "trainer.max_epochs=2", "trainer.max_steps=-1", f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}")
    assert resumed["steps"] == 4 and resumed["epochs"] == 2  # continued from step 2, not from scratch
    with pytest.raises(ConfigError, match="ckpt_path=.*nope.ckpt"):
        run(tmp_path / "c", f"ckpt_path={tmp_path / 'nope.ckpt'}")


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_resuming_an_epoch_end_checkpoint_under_max_steps_warns(tmp_path: Path) -> None:
    run(tmp_path / "a")  # stops at the end of its first epoch
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with pytest.warns(UserWarning, match=r"end of an epoch, and trainer.max_steps=4 .*replaying"):
        run(tmp_path / "b", "trainer.max_epochs=3", "trainer.max_steps=4", f"ckpt_path={last}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="(?!ckpt_path)")  # only this warning is asserted absent
        run(tmp_path / "c", "trainer.max_epochs=2", "trainer.max_steps=-1", f"ckpt_path={last}")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["payload", "random", "truncated"])
def test_a_hostile_or_broken_ckpt_path_is_one_line_and_runs_nothing(tmp_path: Path, kind: str) -> None:
    bad = tmp_path / "bad.ckpt"
    marker = tmp_path / "pwned"
    if kind == "payload":
        torch.save({"state_dict": {}, "x": _Payload(marker)}, bad)
    elif kind == "random":
        bad.write_bytes(os.urandom(4096))
    else:
        run(tmp_path / "a")
        bad.write_bytes((tmp_path / "a" / "checkpoints" / "last.ckpt").read_bytes()[:2000])
    with pytest.raises(ConfigError, match=r"ckpt_path=.*bad.ckpt") as info:
        run(tmp_path / "b", f"ckpt_path={bad}")
    assert "\n" not in str(info.value) and not marker.exists()
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_tensorboard_logger_writes_into_the_output_folder(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    run(tmp_path, "logger=tensorboard")
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("prune.sparsity=1.5", r"prune: .*sparsity.*1\.5"),
        ("clip.clip_val=-0.5", r"clip: .*clip_val.*-0\.5"),
        ("prune.schedule=exponential", r"prune: .*schedule.*must be one of .*exponential"),
        ("model.lr_schedule=exponential", r"model: .*lr_schedule.*exponential"),
        ("data.batch_size=0", r"data.*batch_size.*0"),
    ],
)
def test_bad_values_fail_before_training_naming_the_value(tmp_path: Path, override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        run(tmp_path, override)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "checkpoints").exists()  # nothing trained


def test_missing_data_folder_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="data.root='/nonexistent/fashion' is not a folder"):
        run(tmp_path, "+experiment=fashion_mnist", "data.root=/nonexistent/fashion")


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("DATA_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "lightning_clipprune.run", f"hydra.run.dir={tmp_path / 'run'}", *args],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )


def test_cli_bad_value_is_one_line_on_stderr_and_exit_status_1(tmp_path: Path) -> None:
    proc = _cli(tmp_path, "prune.sparsity=1.5")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "sparsity" in lines[0] and "1.5" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_runs_and_writes_results_into_the_hydra_folder(tmp_path: Path) -> None:
    proc = _cli(tmp_path, *SMOKE[:5], "clip.clip_val=0.5")  # with the progress bar and the tables
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {"val_acc", "test_acc", "sparsity", "params_total", "params_nonzero", "wall_time_s", "overrides"} <= set(results)
    assert "clip.clip_val=0.5" in results["overrides"]
    assert "val accuracy" in proc.stdout and "sparsity" in proc.stdout  # the summary table
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_full_run_reaches_published_accuracy(tmp_path: Path) -> None:
    # the whole experiment: 10 epochs of LeNet-300-100, pruned to 90 % (~2 min on 2 CPU cores)
    results = run(tmp_path, "+experiment=fashion_mnist", "trainer.enable_progress_bar=false", smoke=False)
    assert results["steps"] == 4220 and results["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert results["test_acc"] > 0.87 and results["val_acc"] > 0.87  # dense LeNet-300-100: ~89 %


@pytest.mark.slow
def test_ddp_on_cpu_with_two_gloo_processes(tmp_path: Path) -> None:
    proc = _cli(tmp_path, *SMOKE[:5], "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.limit_train_batches=4")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 4 and results["sparsity"] == pytest.approx(0.9, abs=0.01)
