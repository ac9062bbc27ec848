"""Issue 21 in the app: checkpoints that do not fit (5c), weights that are not finite (6), SIGTERM at any point (7).

The signal tests run the app as a user does (a subprocess) and send SIGTERM from inside the run at an
exact moment: a test-only callback (``tests/signal_hooks.py``) added on the command line, or, for the
moments outside Lightning (start-up, writing the results), the entry point run with one stage wrapped.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from lightning_clipprune.app.guards import NonFiniteWeightsError, first_nonfinite_parameter
from lightning_clipprune.checkpoint import load_checkpoint
from lightning_clipprune.run import ConfigError, config_dir, train

pytestmark = pytest.mark.usefixtures("offline")

REPO = Path(__file__).resolve().parent.parent
TWO_EPOCHS = ("debug=smoke", "trainer.max_epochs=2", "trainer.max_steps=-1")
KILL = "+callbacks.kill._target_=tests.signal_hooks.SignalAt"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DATA_DIR", raising=False)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def run(out: Path, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={out}", "debug=smoke", *overrides])
    return train(cfg, list(overrides))


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    for key in ("DATA_DIR", "HYDRA_FULL_ERROR", "PL_GLOBAL_SEED"):
        env.pop(key, None)
    return env


def _cli(tmp_path: Path, *args: str, wrap: str | None = None) -> subprocess.CompletedProcess:
    """The app on the command line; ``wrap``: a stage ("module:function") that sends SIGTERM, then runs."""
    if wrap is None:
        command = [sys.executable, "-m", "lightning_clipprune.run", *args]
    else:
        module, function = wrap.split(":")
        code = (
            "import importlib, os, signal, sys\n"
            f"m = importlib.import_module({module!r}); original = getattr(m, {function!r})\n"
            "def wrapped(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return original(*a, **k)\n"
            f"setattr(m, {function!r}, wrapped)\n"
            "from lightning_clipprune.run import main\n"
            "sys.argv = ['run', *sys.argv[1:]]\n"
            "main()\n"
        )
        command = [sys.executable, "-c", code, *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=_env(tmp_path), timeout=300)


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---- 5c: a checkpoint that cannot resume this run is one line naming the file and what does not fit


@pytest.fixture(scope="module")
def last_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    run(out)  # two steps of the default experiment: an MLP 64-256-256-10 with SGD
    return out / "checkpoints" / "last.ckpt"


def _craft(kind: str, source: Path, bad: Path) -> None:
    ckpt = torch.load(source, weights_only=True)
    state = dict(ckpt["state_dict"])
    if kind == "state dict only":
        torch.save(state, bad)
    elif kind == "weights only":
        torch.save({"state_dict": state}, bad)
    elif kind == "transposed":
        state["net.layers.1.weight"] = state["net.layers.1.weight"].t().contiguous()
        torch.save({**ckpt, "state_dict": state}, bad)
    else:  # "renamed"
        state["net.extra.weight"] = state.pop("net.layers.1.weight")
        torch.save({**ckpt, "state_dict": state}, bad)


@pytest.mark.parametrize(
    ("kind", "fragments"),
    [
        ("state dict only", ["bare state dict", "cannot resume"]),
        ("weights only", ["weights only", "optimizer_states", "loops"]),
        ("transposed", ["another model", "net.layers.1.weight [64, 256] in the file, [256, 64] in the model"]),
        ("renamed", ["another model", "missing net.layers.1.weight", "unexpected net.extra.weight"]),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_one_line(tmp_path: Path, last_ckpt: Path, kind: str, fragments: list[str]) -> None:
    bad = tmp_path / "bad.ckpt"
    _craft(kind, last_ckpt, bad)
    with pytest.raises(ConfigError) as info:
        run(tmp_path / "run", "trainer.max_epochs=3", "trainer.max_steps=-1", f"ckpt_path={bad}")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"ckpt_path='{bad}': "), message
    for fragment in fragments:
        assert fragment in message, message
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (("model.net.hidden=[128,128]",), "another model than this run's (MLP): shape of net.layers.1.weight [256, 64]"),
        (("model.optimizer._target_=torch.optim.Adam", "~model.optimizer.momentum", "~model.optimizer.nesterov"),
         "another optimizer than model.optimizer (torch.optim.Adam"),
        (("trainer.max_epochs=1",), "training is already over"),  # resuming it would skip the end of training
        # Lightning restores the optimizer's parameter groups: a new value never took effect (results.json said it did)
        (("model.optimizer.lr=0.01", "model.optimizer.momentum=0.5"),
         "model.optimizer.lr=0.01 (the checkpoint's: 0.1), model.optimizer.momentum=0.5 (the checkpoint's: 0.9)"),
    ],
)
def test_another_runs_checkpoint_is_one_line(tmp_path: Path, last_ckpt: Path, overrides: tuple[str, ...], fragment: str) -> None:
    lengths = () if "trainer.max_epochs=1" in overrides else ("trainer.max_epochs=3",)
    with pytest.raises(ConfigError, match="^ckpt_path=") as info:
        run(tmp_path / "run", "trainer.max_steps=-1", *lengths, *overrides, f"ckpt_path={last_ckpt}")
    assert "\n" not in str(info.value) and fragment in str(info.value), str(info.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_state_dict_checkpoint_on_the_command_line(tmp_path: Path, last_ckpt: Path) -> None:
    bad = tmp_path / "sd.ckpt"
    _craft("state dict only", last_ckpt, bad)
    proc = _cli(tmp_path, "debug=smoke", "trainer.max_epochs=3", "trainer.max_steps=-1", f"hydra.run.dir={tmp_path / 'r'}",
                f"ckpt_path={bad}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines() == [
        f"error: ckpt_path='{bad}': holds a bare state dict (parameter name -> tensor), not a Lightning checkpoint: it "
        "cannot resume training; resume from the run's checkpoints/last.ckpt"
    ]


# ---- 6: weights that are not finite end the run with one line, whatever its callbacks; no results.json


def test_first_nonfinite_parameter_names_it() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    assert first_nonfinite_parameter(net) is None
    with torch.no_grad():
        net[1].weight[1, 2] = float("inf")
    assert first_nonfinite_parameter(net) == "1.weight"
    with torch.no_grad():
        net[0].bias[0] = float("nan")
    assert first_nonfinite_parameter(net) == "0.bias"  # the first in named_parameters order


@pytest.mark.parametrize(
    "overrides",
    [
        ("~clip", "~prune", "model.optimizer.lr=1e30"),  # no callback watches the weights
        ("~clip", "model.optimizer.lr=1e30", "prune.end=0.1"),  # diverges after the last pruning event
        ("+callbacks.poison._target_=tests.signal_hooks.PoisonAt", "+callbacks.poison.hook=on_train_epoch_end"),
    ],
    ids=["no-callbacks", "after-last-prune-event", "poisoned-epoch-end"],
)
def test_nonfinite_weights_end_the_run(tmp_path: Path, overrides: tuple[str, ...]) -> None:
    with pytest.raises(FloatingPointError) as info:
        run(tmp_path, "trainer.max_steps=-1", "trainer.limit_train_batches=5", *overrides)
    message = str(info.value)
    assert "\n" not in message and "net.layers." in message and ("NaN" in message or "nan" in message), message
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "checkpoints" / "final.ckpt").exists()
    if (tmp_path / "checkpoints" / "last.ckpt").exists():  # the epoch's checkpoint was not written with NaN
        weights = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]
        assert all(torch.isfinite(w).all() for w in weights.values())


def test_weights_poisoned_at_the_end_of_training_are_caught(tmp_path: Path) -> None:
    # after the last epoch-end check (on_train_end: where post-training pruning runs)
    with pytest.raises(NonFiniteWeightsError, match=r"^the weights are not finite at the end of training: net\.layers\.1\.weight"):
        run(tmp_path, "+callbacks.poison._target_=tests.signal_hooks.PoisonAt", "+callbacks.poison.hook=on_train_end")
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "checkpoints" / "final.ckpt").exists()


def test_nonfinite_weights_on_the_command_line(tmp_path: Path) -> None:
    proc = _cli(tmp_path, "debug=smoke", "~clip", "~prune", "model.optimizer.lr=1e30", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the weights are not finite") and "net.layers.1.weight" in lines[0]
    assert not (tmp_path / "r" / "results.json").exists()


# ---- 7: SIGTERM at any point: one line, exit status 143; after the last step the run finishes first


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    proc = _cli(tmp, *TWO_EPOCHS, f"hydra.run.dir={tmp / 'r'}")
    assert proc.returncode == 0, proc.stderr
    return tmp / "r"


_SAME = ("status", "val_acc", "test_acc", "sparsity", "params_nonzero", "steps", "epochs")


@pytest.mark.parametrize(
    "hook",
    [
        ("on_train_epoch_end", "1"),  # just after the last epoch (its checkpoint is written)
        pytest.param(("on_test_start", None), marks=pytest.mark.slow),
        pytest.param(("on_validation_end", "1"), marks=pytest.mark.slow),
        pytest.param(("on_train_end", None), marks=pytest.mark.slow),
    ],
    ids=lambda h: "@".join(x for x in h if x),
)
def test_sigterm_after_the_last_step_finishes_the_run_first(tmp_path: Path, uninterrupted: Path, hook: tuple) -> None:
    name, epoch = hook
    args = [*TWO_EPOCHS, f"hydra.run.dir={tmp_path / 'r'}", KILL, f"+callbacks.kill.hook={name}"]
    proc = _cli(tmp_path, *args, *([f"+callbacks.kill.epoch={epoch}"] if epoch else []))
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "interrupted by SIGTERM after the training had ended; the run finished first: results.json is complete"
    ]
    got, want = _results(tmp_path / "r"), _results(uninterrupted)
    assert {k: got[k] for k in _SAME} == {k: want[k] for k in _SAME} and got["val_acc"] is not None
    assert len(_rows(tmp_path / "r")) == len(_rows(uninterrupted))
    assert (tmp_path / "r" / "checkpoints" / "final.ckpt").is_file()


@pytest.mark.slow
def test_a_first_ctrl_c_after_the_last_step_finishes_the_run_first(tmp_path: Path, uninterrupted: Path) -> None:
    args = [*TWO_EPOCHS, f"hydra.run.dir={tmp_path / 'r'}", KILL, "+callbacks.kill.hook=on_train_epoch_end",
            "+callbacks.kill.epoch=1", "+callbacks.kill.signum=SIGINT"]
    proc = _cli(tmp_path, *args)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "interrupted by SIGINT after the training had ended; the run finished first: results.json is complete"
    ]
    got, want = _results(tmp_path / "r"), _results(uninterrupted)
    assert {k: got[k] for k in _SAME} == {k: want[k] for k in _SAME}


@pytest.mark.parametrize(
    "when",
    [
        ("+callbacks.kill.hook=on_train_epoch_end", "+callbacks.kill.epoch=0"),  # the checkpoint's own epoch end
        pytest.param(("+callbacks.kill.hook=on_train_batch_end", "+callbacks.kill.step=3"), marks=pytest.mark.slow),
    ],
    ids=["epoch-end", "mid-epoch"],
)
def test_sigterm_during_training_resumes_to_the_same_results(tmp_path: Path, uninterrupted: Path, when: tuple) -> None:
    run_dir = tmp_path / "r"
    proc = _cli(tmp_path, *TWO_EPOCHS, f"hydra.run.dir={run_dir}", KILL, *when)
    assert proc.returncode == 143
    interrupted = _results(run_dir)
    assert interrupted["status"] == "interrupted" and 0 < interrupted["steps"] < 4
    assert proc.stderr.strip().splitlines() == [f"interrupted by SIGTERM; resume with: {interrupted['resume_command']}"]
    done = _cli(tmp_path, *(a for a in interrupted["resume_command"].split()[3:] if "callbacks.kill" not in a))
    assert done.returncode == 0, done.stderr
    got, want = _results(run_dir), _results(uninterrupted)
    assert {k: got[k] for k in _SAME} == {k: want[k] for k in _SAME}
    # one metrics.csv, row for row the uninterrupted run's (the epoch-end rows logged after the checkpoint kept)
    assert [(r["step"], sorted(k for k, v in r.items() if v)) for r in _rows(run_dir)] == [
        (r["step"], sorted(k for k, v in r.items() if v)) for r in _rows(uninterrupted)
    ]


def test_sigterm_during_start_up_is_one_line(tmp_path: Path) -> None:
    proc = _cli(tmp_path, "debug=smoke", f"hydra.run.dir={tmp_path / 'r'}", wrap="lightning_clipprune.app.build:build")
    assert proc.returncode == 143 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["interrupted by SIGTERM during start-up; nothing was trained, nothing to resume"]
    assert not (tmp_path / "r" / "results.json").exists()
    assert not (tmp_path / "r" / ".clipprune.lock").exists()  # the folder is free for the next try


def test_sigterm_before_lightning_took_over_is_one_line(tmp_path: Path) -> None:
    # Callback.setup runs inside trainer.fit before Lightning installs its own SIGTERM handler
    proc = _cli(tmp_path, "debug=smoke", f"hydra.run.dir={tmp_path / 'r'}", KILL, "+callbacks.kill.hook=setup")
    assert proc.returncode == 143 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "interrupted by SIGTERM before the first checkpoint (none before the first epoch ended); nothing to resume: "
        "run the command again (given a fixed hydra.run.dir or output_dir, remove that folder first)"
    ]
    results = _results(tmp_path / "r")
    assert results["status"] == "interrupted" and results["steps"] == 0 and results["resume_command"] is None


def test_sigterm_while_writing_the_results_finishes_them_first(tmp_path: Path) -> None:
    proc = _cli(tmp_path, "debug=smoke", f"hydra.run.dir={tmp_path / 'r'}", wrap="lightning_clipprune.app.summary:write_results")
    assert proc.returncode == 143 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1:] == [
        "interrupted by SIGTERM after the training had ended; the run finished first: results.json is complete"
    ]
    assert len(proc.stderr.strip().splitlines()) == 1
    assert _results(tmp_path / "r")["status"] == "completed"


@pytest.mark.slow
def test_a_mid_epoch_interrupt_resumes_bit_identical_on_a_longer_epoch(tmp_path: Path) -> None:
    """21 batches an epoch (debug=smoke has 2): SIGTERM after batch 10, resume, the final weights are the
    uninterrupted run's to the bit (the loader skips the batches the epoch trained on before the interrupt)."""
    import torch

    common = ("trainer.max_epochs=2", "callbacks.sparsity.inference_latency=false")
    assert _cli(tmp_path, *common, f"hydra.run.dir={tmp_path / 'u'}").returncode == 0
    proc = _cli(tmp_path, *common, f"hydra.run.dir={tmp_path / 'k'}", KILL, "+callbacks.kill.hook=on_train_batch_end",
                "+callbacks.kill.step=10")
    assert proc.returncode == 143, proc.stderr
    resume = [a for a in _results(tmp_path / "k")["resume_command"].split()[3:] if "callbacks.kill" not in a]
    done = _cli(tmp_path, *resume)
    assert done.returncode == 0, done.stderr
    assert "not resumable" not in done.stderr  # Lightning's warning no longer applies
    want, got = (torch.load(tmp_path / r / "checkpoints" / "final.ckpt", weights_only=False)["state_dict"] for r in "uk")
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.slow
def test_an_interrupt_inside_an_accumulation_window_resumes_bit_identical(tmp_path: Path) -> None:
    """accumulate_grad_batches=2: SIGTERM after batch 12, the first of optimizer step 7's two batches. The run
    stops after batch 13 (its gradient was in no checkpoint: the resumed step took one batch), and resumes to
    the uninterrupted run's weights and metrics rows."""
    import torch

    common = ("trainer.max_epochs=2", "trainer.accumulate_grad_batches=2", "callbacks.sparsity.inference_latency=false")
    assert _cli(tmp_path, *common, f"hydra.run.dir={tmp_path / 'u'}").returncode == 0
    proc = _cli(tmp_path, *common, f"hydra.run.dir={tmp_path / 'k'}", KILL, "+callbacks.kill.hook=on_train_batch_end",
                "+callbacks.kill.batch=12")
    assert proc.returncode == 143, proc.stderr
    assert _results(tmp_path / "k")["steps"] == 7
    resume = [a for a in _results(tmp_path / "k")["resume_command"].split()[3:] if "callbacks.kill" not in a]
    done = _cli(tmp_path, *resume)
    assert done.returncode == 0, done.stderr
    want, got = (torch.load(tmp_path / r / "checkpoints" / "final.ckpt", weights_only=False)["state_dict"] for r in "uk")
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert _rows(tmp_path / "u") == _rows(tmp_path / "k")
