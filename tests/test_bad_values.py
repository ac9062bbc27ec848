"""Every wrong value a user can type is one clear line naming it, before any training (issue: hardening).

The app composes the config, checks its own values (``app.checks``), builds every component (their
constructors check their arguments through ``_validation``), and refuses at ``setup`` what only the
Trainer can tell (a prune window the run never reaches). Each case must end in a one-line
:class:`ConfigError` that names the value, and nothing may have been trained.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from lightning_clipprune.run import ConfigError, config_dir, train

pytestmark = pytest.mark.usefixtures("offline")

# (overrides, text the message must contain: the value as the user wrote it or as Python prints it)
CASES: list[tuple[tuple[str, ...], str]] = [
    (("trainer.max_epochs=0",), "0"),
    (("trainer.max_epochs=-1",), "-1"),
    (("trainer.max_epochs=abc",), "abc"),
    (("trainer.max_epochs=2.5",), "2.5"),
    (("seed=abc",), "abc"),
    (("seed=-1",), "-1"),
    (("cpu_threads=0",), "0"),
    (("cpu_threads=-1",), "-1"),
    (("test=maybe",), "maybe"),
    (("model.optimizer.lr=-1",), "-1"),
    (("model.optimizer.momentum=-0.5",), "-0.5"),
    (("model.optimizer.weight_decay=-1",), "-1"),
    (("model.lr_schedule=exponential",), "exponential"),
    (("model.warmup_fraction=2",), "2"),
    (("model.label_smoothing=2",), "2"),
    (("data.batch_size=0",), "0"),
    (("data.val_fraction=1.5",), "1.5"),
    (("trainer.precision=17",), "17"),
    (("trainer.gradient_clip_val=1.0",), "1.0"),
    (("prune.sparsity=1.5",), "1.5"),
    (("prune.sparsity=-0.1",), "-0.1"),
    (("prune.sparsity=abc",), "abc"),
    (("prune.threshold=0.05",), "0.05"),
    (("prune=threshold", "prune.threshold=-1"), "-1"),
    (("prune=threshold", "prune.threshold=inf"), "inf"),
    (("prune.power=inf",), "inf"),
    (("prune.power=0",), "0"),
    (("prune.schedule=exponential",), "exponential"),
    (("prune.scope=everywhere",), "everywhere"),
    (("prune.max_layer_sparsity=off",), "off"),
    (("prune.ranking=snip",), "snip"),
    (("prune.pattern=3:2",), "3:2"),
    (("prune.criterion=random",), "random"),
    (("prune.unit=hour",), "hour"),
    (("prune.frequency=0",), "0"),
    (("prune.initial_sparsity=0.95",), "0.95"),
    (("prune.taylor_beta=1.0",), "1.0"),
    (("prune.start=0.5", "prune.end=3"), "3"),
    (("prune.end=1000000",), "1000000"),
    (("prune=oneshot", "prune.start=500"), "500"),
    (("clip.clip_val=-0.5",), "-0.5"),
    (("clip.clip_val=inf",), "inf"),
    (("clip.algorithm=median",), "median"),
    (("clip.norm_type=0",), "0"),
    (("clip.nonfinite=ignore",), "ignore"),
    (("clip.exclude=null",), "None"),
    (("callbacks.sparsity.log_every_n_steps=-1",), "-1"),
    (("callbacks.sparsity.per_layer=maybe",), "maybe"),
    # issue 21, point 5: values Lightning divides by, accepts silently, or that passed every `x < low` check
    (("trainer.max_steps=0",), "trainer.max_steps=0"),
    (("trainer.accumulate_grad_batches=0",), "trainer.accumulate_grad_batches=0"),
    (("trainer.check_val_every_n_epoch=0",), "trainer.check_val_every_n_epoch=0"),
    (("data.batch_size=1.5",), "data.batch_size=1.5"),
    (("data.batch_size=true",), "data.batch_size=true"),  # a bool is not an int: it trained at batch size 1
    (("data.eval_batch_size=0",), "eval_batch_size"),
    (("seed=4294967296",), "seed=4294967296"),  # 2**32: beyond numpy's seeds
    (("model.num_classes=5",), "model.num_classes=5"),  # digits has 10 classes
    (("trainer.limit_train_batches=0",), "trainer.limit_train_batches=0"),  # "completed" after 0 steps
    (("trainer.limit_train_batches=0.0",), "trainer.limit_train_batches=0.0"),
    (("trainer.limit_train_batches=true",), "trainer.limit_train_batches=true"),
    (("trainer.log_every_n_steps=-1",), "trainer.log_every_n_steps=-1"),
    (("prune.exclude=[nomatch*]",), "prune.exclude='nomatch*'"),  # a pattern matching nothing is a typo
    (("prune.include=[nomatch*]",), "prune.include='nomatch*'"),
    (("clip.exclude=nomatch*",), "clip.exclude='nomatch*'"),
    (("prune.frequency=1e20",), "1e+20"),
    (("model.optimizer.lr=nan",), "model.optimizer.lr=nan"),
    (("model.optimizer.lr=inf",), "model.optimizer.lr=inf"),
    (("prune.sparsity=nan",), "prune.sparsity=nan"),
]

# Refused by Hydra (or before it): the app turns them into one line on stderr, exit status 1, before any
# training; each is a subprocess that ends before torch is imported (about a second each).
# (arguments, texts the line must contain)
CLI_CASES: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("foo=1",), ("foo=1", "+foo=1")),
    (("logger=foo",), ("logger=foo", "csv, tensorboard")),
    (("model=unknown",), ("model=unknown", "mlp", "resnet20")),
    (("data=unknown",), ("data=unknown", "digits", "fashion_mnist")),
    (("+experiment=nope",), ("+experiment=nope", "cifar", "fashion_mnist", "seed")),
    (("prune.sparsity=\uff10.\uff15",), ("prune.sparsity=0.5",)),  # full-width digits
    (("seed=\uff14",), ("seed=4",)),
    (("prune.sparsity=0,5",), ("prune.sparsity=0,5", "prune.sparsity=0.5", "-m")),
    (("prune.sparsity=[0.5",), ("prune.sparsity=[0.5",)),
    (("hydra.job.name=../../../x",), ("hydra.job.name='../../../x'",)),
    (("hydra.job.name=a/b",), ("hydra.job.name='a/b'",)),
]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DATA_DIR", raising=False)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_the_table_is_large() -> None:
    assert len(CASES) >= 60 and len(CLI_CASES) >= 10


@pytest.mark.parametrize(("overrides", "value"), CASES, ids=[" ".join(o) for o, _ in CASES])
def test_a_wrong_value_is_one_line_naming_it(tmp_path: Path, overrides: tuple[str, ...], value: str) -> None:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={tmp_path}", "debug=smoke", "trainer.max_epochs=2", *overrides])
    with pytest.raises(ConfigError) as info:
        train(cfg, list(overrides))
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert value in message, message
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "checkpoints").exists()  # nothing trained


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_the_gpu_preset_without_a_gpu_says_what_to_use(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={tmp_path}", "debug=smoke", "trainer=gpu"])
    with pytest.raises(ConfigError, match=r"torch sees no GPU on this machine; use trainer=cpu"):
        train(cfg, ["trainer=gpu"])


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("DATA_DIR", None)
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "lightning_clipprune.run", f"hydra.run.dir={tmp_path / 'a' / 'b' / 'run'}", "debug=smoke", *args],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize(("args", "texts"), CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_the_command_line_refuses_in_one_line(tmp_path: Path, args: tuple[str, ...], texts: tuple[str, ...]) -> None:
    line = _one_error_line(_cli(tmp_path, *args))
    for text in texts:
        assert text in line, line
    assert not (tmp_path / "a" / "b" / "run" / "results.json").exists()
    # hydra.job.name names <run dir>/<name>.log: nothing is written above the run's folder
    assert not (tmp_path / "x.log").exists() and not list(tmp_path.glob("**/*.log"))


def test_a_value_the_app_refuses_is_one_line_on_the_command_line_too(tmp_path: Path) -> None:
    line = _one_error_line(_cli(tmp_path, "data.batch_size=true"))
    assert "data.batch_size=true" in line
    assert not (tmp_path / "a" / "b" / "run" / "checkpoints").exists()


def test_help_and_cfg_still_work(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    for args, text in ((["--help"], "Configuration groups"), (["--cfg", "job", "+experiment=cifar"], "depth: 20")):
        proc = subprocess.run([sys.executable, "-m", "lightning_clipprune.run", *args], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=120)
        assert proc.returncode == 0 and text in proc.stdout, proc.stderr
