"""Why ``criterion="taylor"`` loses to magnitude on LeNet-300-100: how much signal its gradient average holds.

The first-order Taylor score of a weight is ``|w * g|`` with ``g`` a running average (EMA) of its gradient.
Once training settles, the mean gradient of a weight is small next to its step-to-step noise, so the EMA is
mostly noise and the ranking it gives is close to ``|w|`` times a random factor. This script trains the
``fashion_mnist`` recipe (clip 1.0, no pruning) for ``--epochs`` epochs and, at the end, compares over all
``Linear`` weights:

- the signal-to-noise ratio of the gradient, ``|mean| / std`` over the last steps (median over weights);
- which weights a 98 % global cut would remove by ``|w|``, by ``|w * EMA(g)|`` (beta 0.9 and 0.99) and by the
  squared form ``w^2 * EMA(g^2)``: the overlap of each with the magnitude cut.

Run by hand (CPU, about a minute)::

    python benchmarks/taylor_signal.py --epochs 2
"""

from __future__ import annotations

import argparse
from typing import Any

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from torch import Tensor

from lightning_clipprune import GradientClipCallback
from lightning_clipprune.run import config_dir


class GradientMoments(L.Callback):
    """EMAs of the (clipped) gradient and of its square for every ``Linear`` weight, after each step."""

    def __init__(self, betas: tuple[float, ...] = (0.9, 0.99)) -> None:
        self.betas = betas
        self.mean: dict[float, dict[str, Tensor]] = {b: {} for b in betas}
        self.square: dict[str, Tensor] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        for name, p in pl_module.named_parameters():
            if p.dim() != 2 or p.grad is None:
                continue
            g = p.grad.detach()
            for b in self.betas:
                m = self.mean[b].setdefault(name, torch.zeros_like(g))
                m.mul_(b).add_(g, alpha=1 - b)
            s = self.square.setdefault(name, torch.zeros_like(g))
            s.mul_(0.99).addcmul_(g, g, value=0.01)


def cut(scores: Tensor, sparsity: float) -> Tensor:
    """Bool mask of the ``sparsity`` fraction of lowest scores."""
    k = int(round(sparsity * scores.numel()))
    idx = torch.topk(scores, k, largest=False).indices
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[idx] = True
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sparsity", type=float, default=0.98)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=fashion_mnist", f"seed={args.seed}"])
    L.seed_everything(args.seed, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    moments = GradientMoments()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[GradientClipCallback(clip_val=1.0), moments],
    )
    trainer.fit(model, datamodule=datamodule)

    names = list(moments.square)
    params = dict(model.named_parameters())
    w = torch.cat([params[n].detach().flatten() for n in names])
    mean = {b: torch.cat([moments.mean[b][n].flatten() for n in names]) for b in moments.betas}
    square = torch.cat([moments.square[n].flatten() for n in names])
    # the slow EMA (beta 0.99, ~100 steps) estimates the mean and second moment of the recent gradients
    std = (square - mean[0.99] ** 2).clamp_min(1e-30).sqrt()
    snr = (mean[0.99].abs() / std).median().item()
    magnitude = cut(w.abs(), args.sparsity)
    rows = {
        "taylor: abs(w * EMA(g)), beta 0.9": (w * mean[0.9]).abs(),
        "taylor: abs(w * EMA(g)), beta 0.99": (w * mean[0.99]).abs(),
        "squared: w^2 * EMA(g^2), beta 0.99": w**2 * square,
        "control: abs(w) * uniform noise": w.abs() * torch.rand(w.shape, generator=torch.Generator().manual_seed(0)),
    }
    print(f"LeNet-300-100, Fashion-MNIST, {args.epochs} epochs (seed {args.seed}), {w.numel()} Linear weights")
    print(f"median |mean gradient| / std over the last ~100 steps: {snr:.3f}")
    print(f"\n| score | weights also in the {args.sparsity:.0%} magnitude cut | kept weights shared with magnitude |")
    print("|---|---|---|")
    for label, scores in rows.items():
        c = cut(scores, args.sparsity)
        both = (c & magnitude).sum().item() / magnitude.sum().item()
        kept = (~c & ~magnitude).sum().item() / (~magnitude).sum().item()
        print(f"| {label} | {both:.3f} | {kept:.3f} |")


if __name__ == "__main__":
    main()
