"""The callbacks work from a LightningCLI YAML file, as the README shows (``class_path`` on the public names)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from tests.helpers import TinyClassifier, random_loader

CONFIG = """
trainer:
  max_epochs: 3
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  callbacks:
    - class_path: lightning_clipprune.GradientClipCallback
      init_args: {{clip_val: 0.5, algorithm: {algorithm}}}
    - class_path: lightning_clipprune.MagnitudePruneCallback
      init_args:
        sparsity: 0.75
        schedule: cubic
        end: 0.5
    - class_path: lightning_clipprune.SparsityLogger
      init_args:
        print_table: false
"""


class RandomData(L.LightningDataModule):
    """The tests' fixed classification problem as a data module (LightningCLI needs one)."""

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return random_loader()


@pytest.mark.parametrize("algorithm", ["norm", "zclip, algorithm_options: {z_thresh: 3.0}"])
def test_callbacks_from_lightning_cli_yaml(tmp_path: Path, algorithm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_clipprune import GradientClipCallback, MagnitudePruneCallback

    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(root=tmp_path, algorithm=algorithm))
    monkeypatch.setattr("sys.argv", ["train.py"])
    cli = LightningCLI(TinyClassifier, RandomData, args=["fit", "--config", str(config)], save_config_callback=None)

    clip = next(c for c in cli.trainer.callbacks if isinstance(c, GradientClipCallback))
    prune = next(c for c in cli.trainer.callbacks if isinstance(c, MagnitudePruneCallback))
    if "z_thresh" in algorithm:
        assert clip.clipper.z_thresh == 3.0
    assert clip.summary()["steps"] == cli.trainer.global_step > 0
    assert prune.sparsity == 0.75
    weights = [m.weight for m in cli.model.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    assert zeros == round(0.75 * total)
