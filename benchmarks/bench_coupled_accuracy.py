"""Accuracy of coupled channel pruning with and without the BatchNorm and biases following their channels.

``MagnitudePruneCallback(pattern="channel", couple_channels=True)`` prunes the BatchNorm ``weight``/``bias``
and the layer biases of a pruned channel with it ("followers"), so the channel is exactly zero after
training and compaction removes it. This measures what that costs in accuracy against the previous
behaviour (the same callback with the BatchNorm and biases excluded, so a pruned channel keeps its trained
constant), and what each compacts to: ResNet-20 with projection shortcuts (``resnet20(shortcut="B")``) on
Fashion-MNIST (padded to 32x32, three equal channels), 50 % of the channels, the classifier left dense.

    python benchmarks/bench_coupled_accuracy.py --seeds 0 1 --epochs 3 --train 20000 \\
        --out benchmarks/results/bench_coupled_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_clipprune import MagnitudePruneCallback  # noqa: E402
from lightning_clipprune._io import atomic_write_text  # noqa: E402
from lightning_clipprune.app.data.idx import read_idx  # noqa: E402
from lightning_clipprune.app.models.networks import resnet20  # noqa: E402
from lightning_clipprune.export.compact import compact_channels  # noqa: E402

DATA = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
#: The arms: keyword arguments of the callback on top of the shared ones.
ARMS: dict[str, dict[str, Any] | None] = {
    "dense": None,  # no pruning: the reference
    "followers": {"exclude": ["net.fc.*"]},  # the default: BatchNorm and biases follow their channels
    "no_followers": {"exclude": ["net.fc.*", "*bn*", "*.bias", "*shortcut.1.*"]},  # as before: they keep training
}


def images(split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as ``(N, 3, 32, 32)`` normalised floats (zero-padded by 2) and int64 labels."""
    prefix = "train" if split == "train" else "t10k"
    x = torch.from_numpy(read_idx(DATA / f"{prefix}-images-idx3-ubyte.gz").copy())[:limit].float() / 255.0
    y = torch.from_numpy(read_idx(DATA / f"{prefix}-labels-idx1-ubyte.gz").copy())[:limit].long()
    x = nn.functional.pad((x - 0.2860) / 0.3530, (2, 2, 2, 2))
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous(), y


class Classifier(L.LightningModule):
    def __init__(self, steps: int) -> None:
        super().__init__()
        self.net, self.steps = resnet20(shortcut="B"), steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=self.steps, pct_start=0.15)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    with torch.inference_mode():
        hits = sum(int((net(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum()) for i in range(0, len(y), 1000))
    return 100.0 * hits / len(y)


def run(arm: str, seed: int, epochs: int, train: tuple[torch.Tensor, torch.Tensor],
        test: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    loader = DataLoader(TensorDataset(*train), batch_size=128, shuffle=True)
    model = Classifier(epochs * len(loader))
    prune = ARMS[arm]
    callbacks = [] if prune is None else [
        MagnitudePruneCallback(sparsity=0.5, pattern="channel", scope="local", couple_channels=True, **prune)
    ]
    start = time.perf_counter()
    L.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(model, loader)
    fit_s = time.perf_counter() - start
    net = model.net.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = compact_channels(net, test[0][:16])[0] if prune is not None else net
    return {
        "arm": arm, "seed": seed, "epochs": epochs, "test_acc": accuracy(net, *test),
        "compacted_test_acc": accuracy(small, *test),
        "params": sum(p.numel() for p in net.parameters()), "compacted_params": sum(p.numel() for p in small.parameters()),
        "constant_channel_warning": any("carry a constant" in str(w.message) for w in caught), "fit_s": fit_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train", type=int, default=20000, help="training images (the first N)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train, test = images("train", args.train), images("test", None)
    rows = []
    for seed in args.seeds:
        for arm in args.arms:
            rows.append(run(arm, seed, args.epochs, train, test))
            r = rows[-1]
            print(f"{arm:13s} seed {seed}: test {r['test_acc']:.2f} % (compacted {r['compacted_test_acc']:.2f} %), "
                  f"{r['params']} -> {r['compacted_params']} parameters, {r['fit_s']:.0f} s", flush=True)
    for arm in args.arms:
        accs = [r["test_acc"] for r in rows if r["arm"] == arm]
        sizes = [r["compacted_params"] for r in rows if r["arm"] == arm]
        print(f"{arm}: test {statistics.mean(accs):.2f} % (per seed {accs}), compacted {statistics.mean(sizes):.0f} parameters")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
