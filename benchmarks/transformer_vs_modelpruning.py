"""Lightning's demo Transformer pruned to 80 %: ``MagnitudePruneCallback`` against Lightning's ``ModelPruning``.

Run by hand (CPU, a minute)::

    python benchmarks/transformer_vs_modelpruning.py [--steps 40]

Model: ``lightning.pytorch.demos.Transformer`` (torch's ``nn.Transformer`` with an embedding and a ``Linear``
decoder) at a tiny size (vocab 100, d_model 32, one encoder and one decoder layer), trained with Adam on
counting sequences (no download). Each row is one way of pruning it to 80 % with global L1 ranking; the
table says whether training finished, the loss, the sparsity of what was pruned and of the output layer.
Writes ``transformer_vs_modelpruning.md`` beside this file.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import traceback
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelPruning
from lightning.pytorch.demos import Transformer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clipprune import MagnitudePruneCallback
from lightning_clipprune._io import atomic_write_text

VOCAB, SEQ = 100, 12


class LM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = Transformer(vocab_size=VOCAB, ninp=32, nhead=2, nhid=64, nlayers=1, dropout=0.0)
        self.losses: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, target = batch
        loss = F.nll_loss(self.model(inputs, target), target.reshape(-1))
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    start, stride = torch.randint(VOCAB, (64, 1), generator=g), torch.randint(1, 4, (64, 1), generator=g)
    seq = (start + stride * torch.arange(SEQ + 1)) % VOCAB
    return DataLoader(TensorDataset(seq[:, :-1], seq[:, 1:]), batch_size=8)


def linear_weights(model: nn.Module, skip_out_proj: bool) -> list[tuple[nn.Module, str]]:
    return [
        (m, "weight")
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not (skip_out_proj and n.endswith("out_proj"))
    ]


def run(name: str, make_callback, steps: int) -> dict[str, str]:
    torch.manual_seed(0)
    model = LM()
    callback = make_callback(model)
    trainer = L.Trainer(
        max_steps=steps, max_epochs=None, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback], default_root_dir=tempfile.mkdtemp(),
    )
    row = {"setup": name}
    try:
        trainer.fit(model, loader())
        row["result"] = f"trained {trainer.global_step} steps"
    except Exception as err:  # what a user sees
        row["result"] = f"{type(err).__name__}: {str(err).splitlines()[0][:90]}"
        traceback.print_exc()
    sparsity = {}
    for n, m in model.model.named_modules():
        for p in ("weight", "in_proj_weight"):
            w = getattr(m, p, None)
            if isinstance(w, torch.Tensor) and w.dim() == 2 and not isinstance(m, (nn.Embedding, nn.LayerNorm)):
                sparsity[f"{n}.{p}"] = float((w == 0).float().mean())
    total = sum(m.weight.numel() for m, _ in linear_weights(model.model, False))
    zeros = sum(int((m.weight == 0).sum()) for m, _ in linear_weights(model.model, False))
    row["loss first/last 5"] = (
        f"{sum(model.losses[:5]) / 5:.2f} / {sum(model.losses[-5:]) / 5:.2f}" if len(model.losses) >= 10 else "-"
    )
    row["nn.Linear weights zero"] = f"{zeros / total:.3f}"
    row["in_proj_weight zero"] = f"{max(v for k, v in sparsity.items() if k.endswith('in_proj_weight')):.3f} (max)"
    row["decoder.weight zero"] = f"{sparsity['decoder.weight']:.3f}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    setups = {
        "MagnitudePruneCallback(sparsity=0.8)": lambda m: MagnitudePruneCallback(sparsity=0.8, end=0.5, verbose=False),
        "MagnitudePruneCallback(sparsity=0.8, ranking='raw')": lambda m: MagnitudePruneCallback(
            sparsity=0.8, end=0.5, ranking="raw", verbose=False
        ),
        "MagnitudePruneCallback(sparsity=0.8, ranking='raw', max_layer_sparsity=None)": lambda m: MagnitudePruneCallback(
            sparsity=0.8, end=0.5, ranking="raw", max_layer_sparsity=None, verbose=False
        ),
        "MagnitudePruneCallback(sparsity=0.8, ranking='layer_normalized')": lambda m: MagnitudePruneCallback(
            sparsity=0.8, end=0.5, ranking="layer_normalized", verbose=False
        ),
        "ModelPruning('l1_unstructured', amount=0.8), global, all Linear": lambda m: ModelPruning(
            "l1_unstructured", amount=0.8, use_global_unstructured=True,
            parameters_to_prune=linear_weights(m.model, skip_out_proj=False), apply_pruning=lambda epoch: epoch == 0,
        ),
        "ModelPruning, same, attention out_proj left out": lambda m: ModelPruning(
            "l1_unstructured", amount=0.8, use_global_unstructured=True,
            parameters_to_prune=linear_weights(m.model, skip_out_proj=True), apply_pruning=lambda epoch: epoch == 0,
        ),
    }
    rows = [run(name, make, args.steps) for name, make in setups.items()]
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(r.get(k, "-") for k in keys) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    out = Path(__file__).with_suffix(".md")
    atomic_write_text(out, f"Command: `python benchmarks/{Path(__file__).name} --steps {args.steps}`\n\n{table}\n")


if __name__ == "__main__":
    main()
