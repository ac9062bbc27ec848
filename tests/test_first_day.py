"""First-day frictions of issue 25, one test each: oneshot defaults to post-training, post-training
before/after is visible, ZClip that clips most steps says so, the sweep report's compressed size is recorded."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clipprune import GradientClipCallback, MagnitudePruneCallback


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x) * 100, y)  # large gradients: norms above 1.0

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)


def _trainer(*callbacks, steps: int = 8) -> L.Trainer:
    return L.Trainer(max_steps=steps, callbacks=list(callbacks), logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


def test_oneshot_without_start_prunes_after_training_not_at_initialisation() -> None:
    prune = MagnitudePruneCallback(threshold=0.01, schedule="oneshot")
    assert prune.start == 1.0
    model = Net()
    trainer = _trainer(prune)
    trainer.fit(model, _loader())
    assert prune._last_event == trainer.global_step == 8  # the only event ran after the last step
    assert MagnitudePruneCallback(sparsity=0.5).start == 0.0  # the gradual schedules still start at 0


def test_post_training_pruning_prints_before_and_after(capsys, caplog) -> None:
    import logging

    prune = MagnitudePruneCallback(sparsity=0.9, schedule="oneshot")
    model = Net()
    trainer = _trainer(prune)
    with caplog.at_level(logging.INFO):
        trainer.fit(model, _loader(), _loader())
        assert "val_acc_before_pruning" in trainer.callback_metrics
        assert "Metrics before pruning: val_acc=" in caplog.text
        trainer.validate(model, _loader(), verbose=False)
    assert "after post-training pruning: val_acc " in caplog.text and " -> " in caplog.text


def test_zclip_that_clips_most_steps_says_so_and_counts_them() -> None:
    clip = GradientClipCallback(1.0, algorithm="zclip")
    with pytest.warns(UserWarning, match=r"'zclip' clipped \d+% of 24 steps, not only spikes"):
        _trainer(clip, steps=24).fit(Net(), _loader())
    summary = clip.summary()
    assert summary["clipped_steps"] == summary["clipped_fraction"] * summary["steps"] > 12


def test_results_record_the_compressed_size_for_the_sweep_report(tmp_path) -> None:
    from hydra import compose, initialize_config_dir

    from lightning_clipprune.run import config_dir, train

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={tmp_path}", "debug=smoke"])
    results = train(cfg, [])
    assert 0 < results["compressed_bytes"] <= 4 * results["params_total"]


@pytest.mark.slow  # three app runs in subprocesses
def test_ctrl_c_in_the_first_epoch_saves_a_checkpoint_that_resumes_where_it_stopped(tmp_path) -> None:
    from tests.test_trust_app import _SAME, KILL, TWO_EPOCHS, _cli, _results

    straight = _cli(tmp_path, *TWO_EPOCHS, f"hydra.run.dir={tmp_path / 'u'}")
    assert straight.returncode == 0, straight.stderr
    run_dir = tmp_path / "r"
    proc = _cli(tmp_path, *TWO_EPOCHS, f"hydra.run.dir={run_dir}", KILL, "+callbacks.kill.hook=on_train_batch_end",
                "+callbacks.kill.step=1", "+callbacks.kill.signum=SIGINT")
    assert proc.returncode == 130, proc.stderr
    interrupted = _results(run_dir)
    assert interrupted["status"] == "interrupted" and interrupted["steps"] == 1 and interrupted["epochs"] == 0
    command = interrupted["resume_command"]
    assert command is not None and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert proc.stderr.strip().splitlines()[-1] == f"interrupted by SIGINT; resume with: {command}"
    done = _cli(tmp_path, *(a for a in command.split()[3:] if "callbacks.kill" not in a))
    assert done.returncode == 0, done.stderr
    got, want = _results(run_dir), _results(tmp_path / "u")
    assert {k: got[k] for k in _SAME} == {k: want[k] for k in _SAME}
