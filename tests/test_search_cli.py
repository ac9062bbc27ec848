"""``python -m lightning_clipprune.search``: the reconstruction method and the frictions of issue #25.

One small app run (digits, one epoch) is made once; each test searches on a copy of its folder.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from lightning_clipprune.app.data import DigitsDataModule

GRID = ["--grid", "0.5,0.9", "--resolution", "0.1"]


@pytest.fixture(scope="module")
def app_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hydra import compose, initialize_config_dir

    from lightning_clipprune.run import config_dir, train

    run_dir = tmp_path_factory.mktemp("app") / "run"
    overrides = ["~prune", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                 "trainer.enable_model_summary=false", "callbacks.sparsity.print_table=false", "logger=csv"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={run_dir}", *overrides])
    train(cfg, overrides)
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o!r}\n" for o in overrides))
    return run_dir


@pytest.fixture
def run(app_run: Path, tmp_path: Path) -> Path:
    """A fresh copy of the app run, so every test starts without a ``search`` folder."""
    return Path(shutil.copytree(app_run, tmp_path / "run"))


def _search(run: Path, *args: str) -> int:
    from lightning_clipprune.search import main

    return main([str(run), *GRID, *args])


def test_method_sparsegpt_calibrates_on_train_only_and_prints_the_obs_command(
    run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    reads: list[str] = []
    for split in ("train", "val", "test"):
        original = getattr(DigitsDataModule, f"{split}_dataloader")
        monkeypatch.setattr(DigitsDataModule, f"{split}_dataloader",
                            lambda self, s=split, o=original: reads.append(s) or o(self))
    assert _search(run, "--method", "sparsegpt", "--calibration-samples", "256", "--seed", "3") == 0
    summary = json.loads((run / "search" / "search.json").read_text())
    assert summary["method"] == "sparsegpt" and summary["calibration_samples"] == 256
    assert summary["threshold"] is None and 0.0 < summary["sparsity"] < 1.0
    assert summary["dense_val_acc"] - summary["val_acc"] <= 0.005 + 1e-9
    command = summary["commands"][0]
    assert "prune=oneshot prune.start=1.0" in command and "prune.criterion=obs" in command
    assert f"prune.sparsity={summary['sparsity']:.4f}" in command
    # the calibration drew one training loader; the validation loader is the search's, the test one is read once
    assert reads.count("train") == 1 and reads.count("test") == 1
    printed = capsys.readouterr().out
    assert "prune.criterion=obs" in printed and "calibrates on 2048 training samples; this search used 256" in printed
    assert {"search.csv", "search.png", "pruned.ckpt", "pruned.lcps"} <= {p.name for p in (run / "search").iterdir()}


def test_method_obs_is_an_alias_of_sparsegpt(run: Path) -> None:
    assert _search(run, "--method", "obs", "--calibration-samples", "128", "--no-test") == 0
    assert json.loads((run / "search" / "search.json").read_text())["method"] == "sparsegpt"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--method", "wanda"], "--method 'wanda' is not one of magnitude, sparsegpt, obs"),
        (["--method", "sparsegpt", "--criterion", "taylor"], "drop it with --method sparsegpt"),
        (["--method", "sparsegpt", "--calibration-samples", "0"], "--calibration-samples must be >= 1"),
    ],
)
def test_bad_method_options_are_one_line_exit_1(run: Path, capsys: pytest.CaptureFixture, args, fragment) -> None:
    assert _search(run, *args) == 1
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (run / "search").exists()  # refused before anything was written


def test_a_hessian_over_the_memory_allowed_is_refused_in_one_line(run: Path, capsys: pytest.CaptureFixture) -> None:
    assert _search(run, "--method", "sparsegpt", "--max-hessian-mib", "0.01", "--calibration-samples", "64") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "float32 Hessian" in err and "--max-hessian-mib" in err and "exclude=" in err
    assert not (run / "search" / "search.json").exists()


def test_an_earlier_search_is_refused_unless_overwrite_which_removes_stale_files(
    run: Path, capsys: pytest.CaptureFixture
) -> None:
    assert _search(run, "--sensitivity", "--layer-grid", "0.5,0.9", "--no-test") == 0
    out = run / "search"
    assert (out / "sensitivity.csv").is_file()
    first = (out / "search.json").read_text()
    capsys.readouterr()
    assert _search(run, "--no-test") == 1
    err = capsys.readouterr().err
    assert "already holds a search" in err and "--overwrite" in err and err.count("\n") == 1
    assert (out / "search.json").read_text() == first  # nothing touched
    (out / "notes.txt").write_text("mine")
    assert _search(run, "--no-test", "--overwrite") == 0
    names = {p.name for p in out.iterdir()}
    assert "sensitivity.csv" not in names and "sensitivity.png" not in names  # no stale file of the earlier search
    assert "notes.txt" in names  # the user's own file stays
    assert "allocation" not in json.loads((out / "search.json").read_text())


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_written_line_names_every_output_and_the_finetune_is_quiet(run: Path, capsys: pytest.CaptureFixture) -> None:
    records = _Records()  # Lightning's logger does not propagate (and writes to the stream of import time)
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(records)
    try:
        assert _search(run, "--sensitivity", "--layer-grid", "0.5,0.9", "--finetune-epochs", "1") == 0
    finally:
        lightning_logger.removeHandler(records)
    printed = capsys.readouterr()
    text = printed.out + printed.err
    written = next(line for line in printed.out.splitlines() if line.startswith("written in "))
    for name in ("search.csv", "search.png", "search.json", "pruned.ckpt", "pruned.lcps", "sensitivity.csv",
                 "sensitivity.png", "finetuned/"):
        assert name in written
    assert (run / "search" / "finetuned" / "pruned.ckpt").is_file()
    # the fine-tune keeps the search's mask entry for entry: no pruned weight revived, no kept one zeroed
    searched, tuned = (torch.load(run / "search" / sub / "pruned.ckpt", weights_only=False)["state_dict"]
                       for sub in (".", "finetuned"))
    for key, weight in searched.items():
        if key.endswith("weight") and weight.dim() > 1:
            assert torch.equal(weight == 0, tuned[key] == 0), key
    # Lightning's info lines are silenced during the fine-tune
    text += "\n".join(records.messages)
    for line in ("GPU available", "TPU available", "`Trainer.fit` stopped"):
        assert line not in text
    # the test accuracy at the chosen point is printed once (the table's caption); the fine-tuned one apart
    search_part = printed.out.split("fine-tuned 1 epoch(s)")[0]
    assert search_part.lower().count("test acc") == 1
