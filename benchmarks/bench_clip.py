"""Per-step cost of GradientClipCallback against no clipping and against `Trainer(gradient_clip_val=...)`.

Two measurements, in one process, repetitions interleaved in a shuffled order (the machine is noisy):

1. isolated: the clipping work alone on one MLP's fresh gradients, timed around
   - Lightning's built-in path (`precision_plugin._clip_gradients`, which is what the Trainer calls
     after `on_before_optimizer_step` when `gradient_clip_val` is set: `configure_gradient_clipping`
     -> `clip_gradients` -> `torch.nn.utils.clip_grad_norm_`), and
   - the callback's whole `on_before_optimizer_step` (mask-gradient scan, parameter filter, clipping,
     device accumulators, the non-finite check, the logging cadence test).
2. end to end: `Trainer.fit` on the same MLP, the wall time of each training batch (forward, backward,
   clipping, optimizer step) for no clipping, the built-in clipping and each callback algorithm, one
   variant per batch in shuffled rounds inside a single run (see `Interleaved`).

Reported: medians, the overhead over no clipping, and ratios to the built-in clipping.

Usage::

    python benchmarks/bench_clip.py                 # the numbers in benchmarks/bench_clip.md
    python benchmarks/bench_clip.py --quick         # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import statistics
import time
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import nn
from torch.utils.data import DataLoader

from lightning_clipprune import GradientClipCallback
from lightning_clipprune.clipping import total_norm


class MLP(L.LightningModule):
    """A 2-hidden-layer MLP: ``in_features -> widths[0] -> widths[1] -> classes`` (LeNet-300-100: 784, (300, 100))."""

    def __init__(self, in_features: int, widths: tuple[int, int], classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, widths[0]),
            nn.ReLU(),
            nn.Linear(widths[0], widths[1]),
            nn.ReLU(),
            nn.Linear(widths[1], classes),
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def make_trainer(callbacks: list[Callback], steps: int, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )


def batches(n: int, batch: int, in_features: int, seed: int = 0) -> DataLoader:
    """Pre-built batches (batch_size=None: no per-sample collation on the timed path)."""
    g = torch.Generator().manual_seed(seed)
    data = [
        (torch.randn(batch, in_features, generator=g), torch.randint(0, 10, (batch,), generator=g))
        for _ in range(n)
    ]
    return DataLoader(data, batch_size=None)


def isolated(args: argparse.Namespace) -> dict[str, list[float]]:
    """Time the clipping work alone, on the gradients of one backward pass, restored before each call."""
    torch.manual_seed(0)
    module = MLP(args.in_features, args.widths)
    cb = GradientClipCallback(1.0, "norm", log_every_n_steps=10**9)
    trainer = make_trainer([cb], steps=1)
    trainer.fit(
        module, batches(1, args.batch, args.in_features)
    )  # attaches module, optimizer, precision plugin
    optimizer = trainer.optimizers[0]
    x, y = next(iter(batches(1, args.batch, args.in_features, seed=1)))
    module.zero_grad()
    nn.functional.cross_entropy(module.net(x), y).backward()
    saved = [p.grad.clone() for p in module.parameters()]
    params = list(module.parameters())

    def restore() -> None:
        for p, g in zip(params, saved, strict=True):
            p.grad.copy_(g)

    others = {f"callback {k}": c for k, c in make_clip_callbacks().items() if k != "norm"}
    for c in others.values():
        c.on_fit_start(trainer, module)
    variants = {
        "lightning built-in (gradient_clip_val)": lambda: trainer.precision_plugin._clip_gradients(
            module, optimizer, 1.0, GradClipAlgorithmType.NORM
        ),
        "callback norm (on_before_optimizer_step)": lambda: cb.on_before_optimizer_step(
            trainer, module, optimizer
        ),
        "torch.nn.utils.clip_grad_norm_ alone": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
    }
    for name, c in others.items():
        variants[name] = lambda c=c: c.on_before_optimizer_step(trainer, module, optimizer)
    # the part of "callback norm" that decides nonfinite="skip" without a GradScaler (a host read on a GPU)
    norm = total_norm([p.grad for p in params])
    variants["non-finite check alone (host read)"] = lambda: math.isfinite(norm.item())
    times: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    for _ in range(args.isolated_reps):
        random.shuffle(order)
        for name in order:
            restore()
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
    return times


class Interleaved(Callback):
    """Runs one variant per training batch, in shuffled rounds, and times each batch.

    Variants: no clipping, the Trainer's built-in clipping (``trainer.gradient_clip_val`` is set for that
    batch only; Lightning reads it at every step) and each GradientClipCallback, whose hooks this callback
    forwards for its batches. Interleaving per batch inside one run cancels the slow drifts of a shared
    machine that separate runs would pick up.
    """

    def __init__(self, clip_callbacks: dict[str, GradientClipCallback], rounds: int, warmup: int) -> None:
        self.clip_callbacks = clip_callbacks
        self.variants = [NONE, BUILTIN, *clip_callbacks]
        self.schedule: list[str] = []
        for _ in range(warmup + rounds):
            order = list(self.variants)
            random.shuffle(order)
            self.schedule.extend(order)
        self.skip = warmup * len(self.variants)
        self.times: dict[str, list[float]] = {k: [] for k in self.variants}
        self.active = NONE
        self._t0 = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for cb in self.clip_callbacks.values():
            cb.on_fit_start(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.active = self.schedule[batch_idx]
        trainer.gradient_clip_val = 1.0 if self.active == BUILTIN else None
        self._t0 = time.perf_counter()

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        cb = self.clip_callbacks.get(self.active)
        if cb is not None:
            cb.on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        dt = time.perf_counter() - self._t0
        if batch_idx >= self.skip:
            self.times[self.active].append(dt)


NONE, BUILTIN = "no clipping", "lightning built-in norm (gradient_clip_val=1.0)"


def make_clip_callbacks() -> dict[str, GradientClipCallback]:
    """One callback per algorithm, with the settings a user would pick for this MLP."""
    return {
        "norm": GradientClipCallback(1.0, "norm"),
        "value": GradientClipCallback(0.01, "value"),
        "agc": GradientClipCallback(0.01, "agc", exclude=["net.4.*"]),  # not the classifier, as in the paper
        "autoclip": GradientClipCallback(None, "autoclip"),
        "zclip": GradientClipCallback(None, "zclip"),
    }


def end_to_end(args: argparse.Namespace) -> dict[str, list[float]]:
    clip_callbacks = {f"callback {k}": c for k, c in make_clip_callbacks().items()}
    switch = Interleaved(clip_callbacks, args.rounds, args.warmup)
    data = batches(len(switch.schedule), args.batch, args.in_features)
    torch.manual_seed(0)
    module = MLP(args.in_features, args.widths)
    make_trainer([switch], steps=len(switch.schedule)).fit(module, data)
    return switch.times


FIT_STEPS = 469  # one Fashion-MNIST epoch at batch 128


def whole_fits(args: argparse.Namespace) -> dict[str, list[float]]:
    """Wall time of whole `trainer.fit` calls (one epoch of random data), the arms interleaved per round."""
    steps = 20 if args.quick else FIT_STEPS
    data = batches(steps, args.batch, args.in_features)
    arms: dict[str, Any] = {
        NONE: lambda: ([], {}),
        BUILTIN: lambda: ([], {"gradient_clip_val": 1.0}),
        "GradientClipCallback(1.0)": lambda: ([GradientClipCallback(1.0)], {}),
    }
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(args.fit_rounds):
        order = list(arms)
        random.shuffle(order)
        for name in order:
            callbacks, kwargs = arms[name]()
            torch.manual_seed(0)
            module = MLP(args.in_features, args.widths)
            trainer = make_trainer(callbacks, steps=steps, **kwargs)
            t0 = time.perf_counter()
            trainer.fit(module, data)
            times[name].append(time.perf_counter() - t0)
    return times


def fit_table(times: dict[str, list[float]]) -> str:
    base = statistics.median(times[NONE])
    lines = ["| arm | median fit s | min-max s | vs no clipping |", "|---|---:|---:|---:|"]
    for k, v in times.items():
        m = statistics.median(v)
        lines.append(f"| {k} | {m:.3f} | {min(v):.3f}-{max(v):.3f} | {m / base:.3f}x |")
    return "\n".join(lines)


def table(times: dict[str, list[float]], baseline: str | None, reference: str) -> str:
    """Medians; with a baseline, also the median over rounds of the paired difference to it."""
    med = {k: statistics.median(v) for k, v in times.items()}
    if baseline is None:
        lines = ["| variant | median ms | / built-in |", "|---|---:|---:|"]
        lines += [f"| {k} | {m * 1e3:.3f} | {m / med[reference]:.2f} |" for k, m in med.items()]
        return "\n".join(lines)
    # times[k][r] is variant k's batch in round r: differences within a round cancel slow drifts
    over = {
        k: statistics.median(a - b for a, b in zip(v, times[baseline], strict=True)) for k, v in times.items()
    }
    lines = [
        "| variant | median batch ms | median paired overhead ms | overhead / built-in overhead |",
        "|---|---:|---:|---:|",
    ]
    for k, m in med.items():
        ratio = "" if k == baseline else f"{over[k] / over[reference]:.2f}" if over[reference] > 0 else "n/a"
        lines.append(f"| {k} | {m * 1e3:.2f} | {over[k] * 1e3:+.2f} | {ratio} |")
    return "\n".join(lines)


def resnet_clip(reps: int) -> str:
    """``NormClip(1.0).clip`` against ``torch.nn.utils.clip_grad_norm_`` (what ``gradient_clip_val`` calls through
    Lightning's precision plugin) on ResNet-20's 59 gradient tensors, with the gradients under and over the bound;
    interleaved, median us per call. Over the bound the gradients are reset before every call."""
    from lightning_clipprune.app.models import resnet20
    from lightning_clipprune.clipping import NormClip

    params = list(resnet20().parameters())
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(p.shape, generator=g) for p in params]
    clipper = NormClip(max_norm=1.0)
    arms = {"GradientClipCallback's NormClip.clip": lambda: clipper.clip(params),
            "torch.nn.utils.clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)}
    lines = ["| gradients | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms)]
    for label, scale in (("under the bound (norm 0.05)", 1e-4), ("over the bound (norm 52)", 1e-1)):
        times: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(reps):
            for name, clip in arms.items():
                for p, b in zip(params, base, strict=True):
                    p.grad = b * scale
                t0 = time.perf_counter()
                clip()
                times[name].append(time.perf_counter() - t0)
        lines.append(f"| {label} | " + " | ".join(f"{statistics.median(v) * 1e6:.0f} us" for v in times.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=2048, help="hidden width of both hidden layers of the MLP")
    parser.add_argument("--in-features", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16, help="small, so clipping is a visible share")
    parser.add_argument(
        "--lenet",
        action="store_true",
        help="LeNet-300-100 on Fashion-MNIST-shaped random data (784-300-100-10, batch 128), and whole 1-epoch"
        " fits (469 steps) of no clipping, Trainer(gradient_clip_val=1.0) and GradientClipCallback(1.0)",
    )
    parser.add_argument("--fit-rounds", type=int, default=5, help="--lenet: rounds of whole fits, arms interleaved")
    parser.add_argument("--rounds", type=int, default=100, help="end-to-end batches timed per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--isolated-reps", type=int, default=300)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; 1 by default: on a shared 2-core machine a parallel region stalls for a"
        " whole scheduler slice whenever one of its threads is preempted, which swamps the differences measured",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--resnet", action="store_true",
                        help="only the norm clip against clip_grad_norm_ on ResNet-20's gradients (59 tensors)")
    args = parser.parse_args()
    if args.resnet:
        torch.set_num_threads(args.threads)
        print(resnet_clip(20 if args.quick else args.isolated_reps))
        return
    args.widths = (args.width, args.width)
    if args.lenet:
        args.widths, args.in_features, args.batch = (300, 100), 784, 128
    if args.quick:
        args.widths, args.in_features, args.rounds, args.warmup, args.isolated_reps = (256, 256), 128, 4, 1, 20
        args.fit_rounds = 1
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    random.seed(0)
    n_params = sum(p.numel() for p in MLP(args.in_features, args.widths).parameters())
    print(f"torch {torch.__version__}, lightning {L.__version__}, {torch.get_num_threads()} threads, CPU")
    print(
        f"MLP {args.in_features}-{args.widths[0]}-{args.widths[1]}-10: {n_params / 1e6:.2f} M parameters,"
        f" batch {args.batch}\n"
    )

    iso = isolated(args)
    print(f"Isolated clipping cost, {args.isolated_reps} interleaved repetitions each:\n")
    print(table(iso, None, "lightning built-in (gradient_clip_val)") + "\n")

    e2e = end_to_end(args)
    print(f"End-to-end training batch time, one run, {args.rounds} batches per variant interleaved:\n")
    print(table(e2e, NONE, BUILTIN))

    if args.lenet or args.quick:
        fits = whole_fits(args)
        print(f"\nWhole 1-epoch fits ({FIT_STEPS if not args.quick else 20} steps), {args.fit_rounds} rounds, arms interleaved:\n")
        print(fit_table(fits))


if __name__ == "__main__":
    main()
