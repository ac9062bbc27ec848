"""Per-step cost of the callbacks: time per epoch against no callbacks, side by side in one process.

What a new user pays for each callback with its defaults, and for Lightning's built-in pair, on CPU:

- **Fashion-MNIST, LeNet-300-100** (the ``fashion_mnist`` recipe: batch 128, SGD lr 0.1, momentum 0.9,
  weight decay 5e-4, cosine per step), one epoch per fit, real IDX files.
- **ResNet-20 on CIFAR-shaped random data** (a compute-heavier step), ``--resnet-steps`` steps per fit.

Arms (each on the same seeded initial weights, the same batches in the same order, the same Trainer):

- ``none``: no callbacks.
- ``lightning_pair``: ``Trainer(gradient_clip_val=1.0)`` + ``ModelPruning("l1_unstructured", global)`` on
  the ``Linear``/``Conv`` weights, the schedule converted as ``benchmarks/bench_vs_lightning.py`` does (the
  cumulative cubic sparsity ``s (1 - (1 - min(1, (e + 1) / (0.75 E)))^3)`` after epoch ``e``). ModelPruning
  prunes at epoch ends only, so in a one-epoch fit it prunes once, at the end of the timed epoch: its
  re-parametrisation (``weight = weight_orig * weight_mask`` in every forward) is not in the timed steps.
  The extra arm ``lightning_pair_pruned`` prunes at the start of the epoch instead, which is what every
  epoch after the first costs in a longer run.
- ``clip``: ``GradientClipCallback(clip_val=1.0)``.
- ``prune``: ``MagnitudePruneCallback(sparsity=0.9)`` (cubic, start 0.0, end 0.75 of training: about ten
  pruning events inside the timed epoch).
- ``logger``: ``SparsityLogger()``.
- ``ours_three``: the three together, with their defaults. The extra arm ``ours_three_pruned`` uses
  ``schedule="oneshot"`` at step 0 instead, the steady state after the last event.

``SparsityLogger()`` with its defaults everywhere: the table and the inference-latency line are printed in
``on_fit_end`` (outside the timed epoch, inside the whole fits: a user pays them), into a buffer, since they
would flood the output. ``--logger-table off`` builds ``SparsityLogger(print_table=False)`` instead (the arm
of runs 1-17). Every arm has the same in-memory logger (so ``SparsityLogger`` and the
clip metrics are really logged, every 50 steps as Lightning's default), no checkpointing, no validation, no
progress bar. The time of an epoch runs from ``on_train_epoch_start`` to the end of ``on_train_epoch_end``
(the pruning event of ModelPruning included); ``fit_s`` is the whole ``trainer.fit``.

Rounds run every arm once, in an order rotated each round (so no arm always runs first or last); each
arm's time is divided by the ``none`` time of the same round, and the table shows the median of those
ratios with their min-max and interquartile range. On a shared, busy machine a single wall-time ratio
swings by +-15 % (far more under heavy load): trust medians over 9 rounds or more, compare arms measured
in the same run, and read the ratio of the process's CPU time (``time.process_time``, all threads; OpenMP
waiters sleep, see ``OMP_WAIT_POLICY`` below), which other jobs on the machine sway much less.

Memory: at ``on_train_end`` (before ModelPruning makes its pruning permanent) the bytes of the tensor
storages held by the callback objects (masks, caches; the model's parameters, gradients and optimizer
state excluded) plus the bytes the model holds beyond its own parameters and buffers at the start (for
ModelPruning: ``weight_orig``, ``weight_mask`` and the computed ``weight``), against the bytes of the
pruned weights.

Whole fits (``--whole-fit``): what a user feels, complete ``trainer.fit`` calls of 1 and 3 epochs
(set-up, pruning events, every hook, teardown; no logger, no checkpointing, no validation, no progress
bar), wall time and the process's CPU time of each fit divided by the ``none`` fit of the same round.
Arms: ``none``, ``lightning_clip`` (``gradient_clip_val=1.0``), ``lightning_pair``, ``clip``, ``prune``,
``ours_three`` (defaults, 90 %). ``--profile`` adds one cProfile of an ``ours_three`` fit (the callbacks'
hooks, the pruning events, set-up), summed per function of the project. ``--hook-costs`` runs the arms again
and counts the CPU time of each fit spent in each callback hook and in Lightning's clipping
(``Precision._clip_gradients``): what each arm adds, where it is spent, with far less noise than the ratios.

Run by hand (CPU)::

    python benchmarks/bench_overhead.py --whole-fit --rounds 9 --limit-train-batches 100 --profile
    python benchmarks/bench_overhead.py --whole-fit --rounds 9 --limit-train-batches 100 --hook-costs \\
        --arms none lightning_clip lightning_pair clip prune ours_three

    python benchmarks/bench_overhead.py                        # 9 rounds; writes benchmarks/results/bench_overhead.json
    python benchmarks/bench_overhead.py --rounds 15 --resnet-rounds 5 --resnet-steps 300
    python benchmarks/bench_overhead.py --arms none ours_three lightning_pair lightning_pair_pruned
    python benchmarks/bench_overhead.py --smoke --out /tmp/smoke.json   # tiny sizes, seconds (the tests)
"""

from __future__ import annotations

import os

# Spinning OpenMP waiters starve the working threads on a shared CPU; must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import io
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import Tensor, nn

from lightning_clipprune import GradientClipCallback, MagnitudePruneCallback, SparsityLogger
from lightning_clipprune._io import atomic_write_text
from lightning_clipprune.app.data import DataNotFoundError, FashionMNISTDataModule, TensorBatches
from lightning_clipprune.app.models import CifarResNet, Classifier, LeNet300100
from lightning_clipprune.loggers import MemoryLogger

ARMS = ("none", "lightning_pair", "clip", "prune", "logger", "ours_three")
#: Whether the arms' SparsityLogger prints its end-of-fit table and latency line (``--logger-table``).
LOGGER_TABLE = [True]
WHOLE_FIT_ARMS = ("none", "lightning_clip", "lightning_pair", "clip", "prune", "ours_three")
EXTRA_ARMS = ("lightning_pair_pruned", "ours_three_pruned")
RESNET_ARMS = ("none", "lightning_pair", "ours_three")
SPARSITY = 0.9
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_overhead.json"


# ---------------------------------------------------------------------------------------------- helpers


class EpochTimer(Callback):
    """Wall time of the training epoch; listed last, so other callbacks' ``on_train_epoch_end`` work counts."""

    def __init__(self) -> None:
        self.t0 = self.c0 = 0.0
        self.epoch_s = self.epoch_cpu_s = 0.0
        self.steps = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.steps = trainer.global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_s = time.perf_counter() - self.t0
        # CPU seconds of this process (all threads): less swayed than wall time by other jobs on a shared machine
        self.epoch_cpu_s = time.process_time() - self.c0
        self.steps = trainer.global_step - self.steps


def _storages(tensors: Sequence[Tensor]) -> dict[int, int]:
    out: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        out[s.data_ptr()] = s.nbytes()
    return out


def _tensors_in(obj: Any, seen: set[int], depth: int = 0) -> list[Tensor]:
    """Tensors reachable from ``obj`` through attributes, dicts, lists and tuples (not into modules or trainers)."""
    if isinstance(obj, Tensor):
        return [obj]
    if depth > 8 or id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return []
    seen.add(id(obj))
    if isinstance(obj, (nn.Module, L.Trainer, torch.optim.Optimizer)):
        return []  # the model, its trainer and its optimizer are counted elsewhere
    if isinstance(obj, dict):
        items: list[Any] = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    else:
        return []
    return [t for item in items for t in _tensors_in(item, seen, depth + 1)]


def model_tensors(model: nn.Module) -> list[Tensor]:
    """Parameters, buffers and tensor attributes (the computed ``weight`` of ``torch.nn.utils.prune``)."""
    out: list[Tensor] = []
    for m in model.modules():
        out += [t for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
        out += [v for v in vars(m).values() if isinstance(v, Tensor)]
    return out


class MemoryProbe(Callback):
    """Bytes the callbacks add during training, read at ``on_train_end``; listed first, before ModelPruning's."""

    def __init__(self, others: Sequence[Callback], base_bytes: int) -> None:
        self.others = list(others)
        self.base_bytes = base_bytes
        self.callback_bytes = 0
        self.model_extra_bytes = 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = model_tensors(pl_module)
        owned = _storages(model)
        owned.update(_storages([p.grad for p in pl_module.parameters() if p.grad is not None]))
        for opt in trainer.optimizers:
            owned.update(_storages([t for st in opt.state.values() for t in st.values() if isinstance(t, Tensor)]))
        held = _storages([t for cb in self.others for t in _tensors_in(cb, set())])
        self.callback_bytes = sum(n for ptr, n in held.items() if ptr not in owned)
        self.model_extra_bytes = max(0, sum(_storages(model).values()) - self.base_bytes)


def prunable_modules(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]


class _PruneAtStart(Callback):
    """Applies ModelPruning's amount at the start of training (arm ``lightning_pair_pruned``)."""

    def __init__(self, pruning: ModelPruning, amount: float) -> None:
        self.pruning, self.amount = pruning, amount

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.pruning.apply_pruning(self.amount)


def lightning_amount(sparsity: float, max_epochs: int) -> Callable[[int], float]:
    """ModelPruning's per-epoch amount (a fraction of the *remaining* weights) for the cubic schedule."""

    def cumulative(epoch: int) -> float:
        t = min(1.0, (epoch + 1) / (0.75 * max_epochs))
        return sparsity * (1.0 - (1.0 - t) ** 3)

    def amount(epoch: int) -> float:
        return 1.0 - (1.0 - cumulative(epoch)) / (1.0 - (cumulative(epoch - 1) if epoch > 0 else 0.0))

    return amount


def make_arm(arm: str, model: nn.Module, max_epochs: int = 1) -> tuple[list[Callback], dict[str, Any]]:
    """The callbacks and extra Trainer arguments of one arm."""
    def logger_cb() -> SparsityLogger:
        return SparsityLogger(print_table=LOGGER_TABLE[0])

    if arm == "none":
        return [], {}
    if arm in ("lightning_pair", "lightning_pair_pruned"):
        pruned_at_start = arm == "lightning_pair_pruned"
        pruning = ModelPruning(
            "l1_unstructured",
            parameters_to_prune=prunable_modules(model),
            amount=(lambda epoch: 0.0) if pruned_at_start else lightning_amount(SPARSITY, max_epochs),
            use_global_unstructured=True,
            use_lottery_ticket_hypothesis=False,
            make_pruning_permanent=True,
        )
        callbacks: list[Callback] = [pruning]
        if pruned_at_start:
            callbacks.append(_PruneAtStart(pruning, SPARSITY))
        return callbacks, {"gradient_clip_val": 1.0}
    if arm == "lightning_clip":
        return [], {"gradient_clip_val": 1.0}
    if arm == "clip":
        return [GradientClipCallback(clip_val=1.0)], {}
    if arm == "prune":
        return [MagnitudePruneCallback(sparsity=SPARSITY, verbose=False)], {}
    if arm == "logger":
        return [logger_cb()], {}
    if arm == "ours_three":
        return [
            GradientClipCallback(clip_val=1.0),
            MagnitudePruneCallback(sparsity=SPARSITY, verbose=False),
            logger_cb(),
        ], {}
    if arm == "ours_three_pruned":
        return [
            GradientClipCallback(clip_val=1.0),
            MagnitudePruneCallback(sparsity=SPARSITY, schedule="oneshot", start=0, verbose=False),
            logger_cb(),
        ], {}
    raise ValueError(f"`arm` must be one of {ARMS + EXTRA_ARMS}, got {arm!r}")


def _fit(trainer: L.Trainer, model: L.LightningModule, data: Any) -> None:
    """``trainer.fit`` on a datamodule or a loader; what the callbacks print (the sparsity table) goes to a buffer."""
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(data, L.LightningDataModule):
            trainer.fit(model, datamodule=data)
        else:
            trainer.fit(model, train_dataloaders=data)


def fit_once(
    arm: str,
    make_net: Callable[[], nn.Module],
    data: Any,
    limit_train_batches: int | float | None,
) -> dict[str, Any]:
    """One fit of one epoch for ``arm``: epoch time, fit time, steps, bytes added."""
    net = make_net()
    model = Classifier(net)
    callbacks, trainer_kwargs = make_arm(arm, net)
    base = sum(_storages(model_tensors(model)).values())
    probe, timer = MemoryProbe(callbacks, base), EpochTimer()
    pruned = [m.weight for m, _ in prunable_modules(net)]
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=1,
            logger=MemoryLogger(keep_rows=False),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            limit_train_batches=limit_train_batches,
            default_root_dir=root,
            callbacks=[probe, *callbacks, timer],
            **trainer_kwargs,
        )
        t0 = time.perf_counter()
        _fit(trainer, model, data)
        fit_s = time.perf_counter() - t0
    pruned_bytes = sum(w.numel() * w.element_size() for w in pruned)
    return {
        "arm": arm,
        "epoch_s": timer.epoch_s,
        "epoch_cpu_s": timer.epoch_cpu_s,
        "fit_s": fit_s,
        "steps": timer.steps,
        "callback_bytes": probe.callback_bytes,
        "model_extra_bytes": probe.model_extra_bytes,
        "added_bytes": probe.callback_bytes + probe.model_extra_bytes,
        "pruned_weight_bytes": pruned_bytes,
    }


def whole_fit_once(
    arm: str,
    make_net: Callable[[], nn.Module],
    data: Any,
    epochs: int,
    limit: int | None,
    hooks: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One complete ``trainer.fit`` of ``epochs`` epochs for ``arm``: wall and process CPU seconds, Trainer included.

    With ``hooks``, the CPU seconds spent in each of the arm's callback hooks are added to it (``_timed_hooks``).
    """
    w0, c0 = time.perf_counter(), time.process_time()
    net = make_net()
    model = Classifier(net)
    callbacks, trainer_kwargs = make_arm(arm, net, max_epochs=epochs)
    if hooks is not None:
        _timed_hooks(callbacks, hooks)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        limit_train_batches=limit, callbacks=callbacks, **trainer_kwargs,
    )
    _fit(trainer, model, data)
    return {"arm": arm, "fit_s": time.perf_counter() - w0, "fit_cpu_s": time.process_time() - c0,
            "steps": trainer.global_step}


def run_whole_fits(
    arms: Sequence[str], rounds: int, epochs: int, make_net: Callable[[], nn.Module], data: Any, limit: int | None
) -> dict[str, Any]:
    """``rounds`` rounds of every arm (order rotated each round), paired ratios to ``none`` of wall and CPU time."""
    runs: list[dict[str, Any]] = []
    for r in range(rounds):
        k = r % len(arms)
        for arm in [*arms[k:], *arms[:k]]:
            res = whole_fit_once(arm, make_net, data, epochs, limit)
            res["round"] = r
            runs.append(res)
            print(f"[whole fit, {epochs} epoch(s)] round {r} {arm}: {res['fit_s']:.2f} s wall, "
                  f"{res['fit_cpu_s']:.2f} s CPU", flush=True)
    base = {r["round"]: r for r in runs if r["arm"] == "none"}
    summary = {}
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        summary[arm] = {
            "fit_s": quantiles([r["fit_s"] for r in rs]),
            "ratio": quantiles([r["fit_s"] / base[r["round"]]["fit_s"] for r in rs]),
            "cpu_ratio": quantiles([r["fit_cpu_s"] / base[r["round"]]["fit_cpu_s"] for r in rs]),
            "steps": rs[0]["steps"],
        }
    return {"epochs": epochs, "rounds": rounds, "runs": runs, "summary": summary}


def whole_fit_markdown(title: str, summary: dict[str, dict[str, Any]]) -> str:
    lines = [f"**{title}**", "", "| arm | fit s (median) | x dense, wall (median, IQR) | x dense, CPU (median, IQR) |",
             "|---|---|---|---|"]
    for arm, s in summary.items():
        w, c = s["ratio"], s["cpu_ratio"]
        lines.append(f"| {arm} | {s['fit_s']['median']:.2f} | {w['median']:.3f}x ({w['q1']:.3f} - {w['q3']:.3f}) "
                     f"| {c['median']:.3f}x ({c['q1']:.3f} - {c['q3']:.3f}) |")
    return "\n".join(lines)


def profile_fit(make_net: Callable[[], nn.Module], data: Any, epochs: int, limit: int | None, top: int = 25) -> str:
    """cProfile (process CPU time) of one ``ours_three`` fit: the project's functions by cumulative time."""
    import cProfile
    import pstats

    prof = cProfile.Profile(time.process_time)
    prof.enable()
    whole_fit_once("ours_three", make_net, data, epochs, limit)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).sort_stats("cumulative")
    stats.print_stats(r"lightning_clipprune|trainer.py:\d+\(fit\)", top)
    return out.getvalue()


def _timed_hooks(callbacks: Sequence[Callback], spent: dict[str, float]) -> None:
    """Wrap every hook ``callbacks`` override (on the instances) to add its process CPU seconds to ``spent``."""
    for cb in callbacks:
        for name in dir(Callback):
            if name.startswith(("on_", "setup", "teardown")) and getattr(type(cb), name) is not getattr(Callback, name):
                hook, key = getattr(cb, name), f"{type(cb).__name__}.{name}"
                spent.setdefault(key, 0.0)

                def timed(*args: Any, _hook: Any = hook, _key: str = key, **kwargs: Any) -> Any:
                    t0 = time.process_time()
                    try:
                        return _hook(*args, **kwargs)
                    finally:
                        spent[_key] += time.process_time() - t0

                setattr(cb, name, timed)


def hook_costs(
    arms: Sequence[str], rounds: int, epochs: int, make_net: Callable[[], nn.Module], data: Any, limit: int | None
) -> dict[str, dict[str, float]]:
    """CPU milliseconds per whole fit spent in each callback hook of each arm, and in Lightning's own clipping
    (``Precision._clip_gradients``, which ``gradient_clip_val`` runs at every step), median over ``rounds``.

    What an arm adds to a fit, counted where it is spent: far less noisy than the whole-fit ratios, whose
    spread on a shared machine is wider than the differences between arms.
    """
    from lightning.pytorch.plugins.precision import Precision

    clip_path, key = Precision._clip_gradients, "Lightning gradient_clip_val (Precision._clip_gradients)"
    spent: dict[str, float] = {}  # the fit being timed

    def lightning_clip(*args: Any, **kwargs: Any) -> Any:
        t0 = time.process_time()
        try:
            return clip_path(*args, **kwargs)
        finally:
            spent[key] = spent.get(key, 0.0) + time.process_time() - t0

    per_arm: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
    Precision._clip_gradients = lightning_clip  # type: ignore[method-assign]
    try:
        for r in range(rounds):
            for arm in [*arms[r % len(arms):], *arms[: r % len(arms)]]:
                spent.clear()
                whole_fit_once(arm, make_net, data, epochs, limit, hooks=spent)
                per_arm[arm].append(dict(spent))
    finally:
        Precision._clip_gradients = clip_path  # type: ignore[method-assign]
    table: dict[str, dict[str, float]] = {}
    for arm, runs in per_arm.items():
        keys = sorted({k for run in runs for k in run})
        medians = {k: 1e3 * statistics.median(run.get(k, 0.0) for run in runs) for k in keys}
        table[arm] = {k: v for k, v in sorted(medians.items(), key=lambda kv: -kv[1]) if v >= 0.05}
        table[arm]["total"] = 1e3 * statistics.median(sum(run.values()) for run in runs)
    return table


def hook_costs_markdown(title: str, table: dict[str, dict[str, float]]) -> str:
    lines = [f"**{title}**", "", "| arm | hook | CPU ms per fit (median) |", "|---|---|---:|"]
    for arm, hooks in table.items():
        lines += [f"| {arm} | {hook} | {ms:.1f} |" for hook, ms in hooks.items()]
    return "\n".join(lines)


def whole_fit_main(args: argparse.Namespace, make_net: Callable[[], nn.Module], data: Any, result: dict[str, Any]) -> None:
    """The ``--whole-fit`` mode: 1- and 3-epoch fits (``--epochs``), tables printed, results in ``result``."""
    arms = [a for a in args.arms if a in WHOLE_FIT_ARMS] if args.arms != list(ARMS) else list(WHOLE_FIT_ARMS)
    arms = arms if "none" in arms else ["none", *arms]
    fits = {}
    for epochs in args.epochs:
        fits[str(epochs)] = run_whole_fits(arms, args.rounds, epochs, make_net, data, args.limit_train_batches)
    result["whole_fit"] = {"limit_train_batches": args.limit_train_batches, "fits": fits}
    if args.profile:
        result["whole_fit"]["profile"] = profile_fit(make_net, data, max(args.epochs), args.limit_train_batches)
        print(result["whole_fit"]["profile"])
    if args.hook_costs:
        costs = {
            str(epochs): hook_costs(arms, args.rounds, epochs, make_net, data, args.limit_train_batches)
            for epochs in args.epochs
        }
        result["whole_fit"]["hook_costs"] = costs
        for epochs, table in costs.items():
            print()
            print(hook_costs_markdown(f"Time in the hooks, CPU ms per {epochs}-epoch fit, {args.rounds} rounds", table))
    for epochs, fit in fits.items():
        print()
        print(whole_fit_markdown(
            f"Whole fits, LeNet-300-100, Fashion-MNIST, {epochs} epoch(s), {fit['rounds']} rounds", fit["summary"]))


def event_costs(model_name: str, events: int) -> list[float]:
    """Process CPU seconds of each pruning event of a default ``MagnitudePruneCallback(sparsity=0.9)`` over a
    ramp of ``events`` events (one per step), on a fake Trainer: the event alone, no training step."""
    import types

    torch.manual_seed(0)
    if model_name == "lenet":
        net: nn.Module = LeNet300100()
    else:  # 25.2 M prunable weights
        widths = [784, 4096, 4096, 1024, 1024, 10]
        net = nn.Sequential(nn.Flatten(), *[nn.Linear(a, b) for a, b in zip(widths, widths[1:], strict=False)])
    model = Classifier(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.randn_like(p)
    cb = MagnitudePruneCallback(sparsity=SPARSITY, frequency=1, end=events - 1)
    trainer = types.SimpleNamespace(lightning_module=model, world_size=1, optimizers=[opt], callbacks=[cb])
    cb.setup(trainer, model, "fit")
    cb._positions = (0, events - 1, 1)
    cb.masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in cb._params.items()}
    cb._criterion.prepare(cb._params)
    times = []
    for t in range(events):
        with torch.no_grad():  # the weights move a little between events, as in training
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=1e-3)
        c0 = time.process_time()
        cb._update(trainer, t)
        times.append(time.process_time() - c0)
    return times


def quantiles(values: Sequence[float]) -> dict[str, float]:
    vs = sorted(values)
    if len(vs) >= 2:
        q1, _, q3 = statistics.quantiles(vs, n=4, method="inclusive")
    else:
        q1 = q3 = vs[0]
    return {"median": statistics.median(vs), "min": vs[0], "max": vs[-1], "q1": q1, "q3": q3}


def summarise(runs: list[dict[str, Any]], arms: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per arm: epoch-time quantiles and the quantiles of the ratio to ``none`` in the same round.

    ``ratio`` is of wall time, ``cpu_ratio`` of the process's CPU time (both paired by round).
    """
    base = {r["round"]: r["epoch_s"] for r in runs if r["arm"] == "none"}
    base_cpu = {r["round"]: r.get("epoch_cpu_s") for r in runs if r["arm"] == "none"}
    out: dict[str, dict[str, Any]] = {}
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        if not rs:
            continue
        ratios = [r["epoch_s"] / base[r["round"]] for r in rs if base.get(r["round"])]
        cpu_ratios = [r["epoch_cpu_s"] / base_cpu[r["round"]] for r in rs if base_cpu.get(r["round"])]
        out[arm] = {
            "rounds": len(rs),
            "epoch_s": quantiles([r["epoch_s"] for r in rs]),
            "ratio": quantiles(ratios) if ratios else None,
            "cpu_ratio": quantiles(cpu_ratios) if cpu_ratios else None,
            "steps": rs[0]["steps"],
            "added_bytes": rs[-1]["added_bytes"],
            "callback_bytes": rs[-1]["callback_bytes"],
            "model_extra_bytes": rs[-1]["model_extra_bytes"],
            "pruned_weight_bytes": rs[-1]["pruned_weight_bytes"],
        }
    return out


def run_model(
    name: str,
    arms: Sequence[str],
    rounds: int,
    make_net: Callable[[], nn.Module],
    data: Any,
    limit_train_batches: int | float | None,
) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for r in range(rounds):
        k = r % len(arms)
        order = [*arms[k:], *arms[:k]]
        for arm in order:
            res = fit_once(arm, make_net, data, limit_train_batches)
            res["round"] = r
            runs.append(res)
            print(f"[{name}] round {r} {arm}: epoch {res['epoch_s']:.3f} s, {res['steps']} steps", flush=True)
    return {"arms": list(arms), "rounds": rounds, "runs": runs, "summary": summarise(runs, arms)}


def markdown(title: str, summary: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"**{title}**",
        "",
        "| arm | epoch s (median) | x no callbacks (median) | min - max | IQR | x no callbacks, CPU time "
        "(median, IQR) | bytes added in training | vs pruned weights |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, s in summary.items():
        ratio = s["ratio"]
        rtxt = f"{ratio['median']:.3f}x" if ratio else "-"
        mm = f"{ratio['min']:.3f} - {ratio['max']:.3f}" if ratio else "-"
        iqr = f"{ratio['q1']:.3f} - {ratio['q3']:.3f}" if ratio else "-"
        cpu = s.get("cpu_ratio")
        ctxt = f"{cpu['median']:.3f}x ({cpu['q1']:.3f} - {cpu['q3']:.3f})" if cpu else "-"
        added = s["added_bytes"]
        rel = f"+{100 * added / s['pruned_weight_bytes']:.1f} %" if s["pruned_weight_bytes"] else "-"
        lines.append(
            f"| {arm} | {s['epoch_s']['median']:.3f} | {rtxt} | {mm} | {iqr} | {ctxt} | {added / 1024:.1f} KiB "
            f"| {rel} |"
        )
    return "\n".join(lines)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")  # never through a link, never over a device


def fashion_data(root: str | None, batch_size: int, smoke: bool) -> tuple[Any, str]:
    """Fashion-MNIST from ``root`` (or the default places); with ``smoke`` and no files, random images."""
    dm = FashionMNISTDataModule(root=root, download=False, batch_size=batch_size, seed=0)
    try:
        dm.prepare_data()
        dm.setup("fit")
        return dm, f"Fashion-MNIST ({dm.locate()})"
    except DataNotFoundError:
        if not smoke:
            raise
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8 * batch_size, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (len(x),), generator=g)
    return TensorBatches(x, y, batch_size), "random Fashion-MNIST-shaped tensors (smoke, no files found)"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="rounds of the LeNet-300-100 arms (default 9)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=[*ARMS, *EXTRA_ARMS, "lightning_clip"])
    parser.add_argument("--resnet-steps", type=int, default=200, help="ResNet-20 steps per fit (0: skip ResNet)")
    parser.add_argument("--resnet-batch", type=int, default=32)
    parser.add_argument("--resnet-rounds", type=int, default=None, help="default: --rounds")
    parser.add_argument("--resnet-arms", nargs="+", default=list(RESNET_ARMS), choices=[*ARMS, *EXTRA_ARMS])
    parser.add_argument("--data-root", default=None, help="folder of the Fashion-MNIST IDX files (default: search)")
    parser.add_argument("--limit-train-batches", type=int, default=None, help="LeNet steps per epoch (default all)")
    parser.add_argument("--out", default=None, help=f"JSON output (default {DEFAULT_OUT}; none with --smoke)")
    parser.add_argument("--models", nargs="+", default=["lenet300", "resnet20"], choices=["lenet300", "resnet20"],
                        help="models to run; the others' sections of an existing --out JSON are kept")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 round: checks the script runs")
    parser.add_argument("--whole-fit", action="store_true", help="time complete fits (LeNet-300-100) instead")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3], help="whole-fit lengths (default 1 3)")
    parser.add_argument("--profile", action="store_true", help="with --whole-fit: cProfile one ours_three fit")
    parser.add_argument("--hook-costs", action="store_true",
                        help="with --whole-fit: also the CPU time per fit in each hook (and Lightning's clipping)")
    parser.add_argument("--logger-table", choices=["on", "off"], default="on",
                        help="SparsityLogger's end-of-fit table and latency line (default on: its defaults)")
    parser.add_argument("--events", nargs=2, metavar=("MODEL", "N"), default=None,
                        help="time N pruning events alone: MODEL lenet (266 k weights) or mlp25m (25.2 M)")
    args = parser.parse_args(argv)
    LOGGER_TABLE[0] = args.logger_table == "on"
    if args.events is not None:
        times = event_costs(args.events[0], int(args.events[1]))
        print(f"{args.events[0]}: ms per event (process CPU):", " ".join(f"{1e3 * t:.2f}" for t in times))
        print(f"median after the first: {1e3 * statistics.median(times[1:]):.2f} ms")
        return {"events": times}
    if "none" not in args.arms:
        args.arms = ["none", *args.arms]
    if "none" not in args.resnet_arms:
        args.resnet_arms = ["none", *args.resnet_arms]
    if args.smoke:
        args.rounds, args.resnet_rounds = 1, 1
        args.limit_train_batches = args.limit_train_batches or 4
        args.resnet_steps, args.resnet_batch = min(args.resnet_steps, 3), min(args.resnet_batch, 4)
    if args.smoke and args.whole_fit:
        args.epochs = [1]
    default_out = DEFAULT_OUT.with_name("bench_overhead_whole_fit.json") if args.whole_fit else DEFAULT_OUT
    out = Path(args.out) if args.out else (None if args.smoke else default_out)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*`ModelPruning`.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    for name in ("lightning.pytorch", "lightning.fabric"):  # "GPU available", tips: one line per fit
        logging.getLogger(name).setLevel(logging.WARNING)

    result: dict[str, Any] = {
        "benchmark": "bench_overhead",
        "command": "python benchmarks/bench_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "smoke": args.smoke,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "lightning": L.__version__},
        "sparsity": SPARSITY,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"torch {torch.__version__}, lightning {L.__version__}, {torch.get_num_threads()} threads", flush=True)

    if out is not None and out.is_file():  # keep the sections of the models not run now
        previous = json.loads(out.read_text())
        for name in ("lenet300", "resnet20"):
            if name not in args.models and name in previous:
                result[name] = previous[name]

    if "lenet300" in args.models:
        L.seed_everything(0, verbose=False)
        lenet_init = LeNet300100().state_dict()

        def make_lenet() -> nn.Module:
            net = LeNet300100()
            net.load_state_dict(lenet_init)
            return net

        data, source = fashion_data(args.data_root, 128, args.smoke)
        if args.whole_fit:
            result["data"] = source
            whole_fit_main(args, make_lenet, data, result)
            if out is not None:
                _write_json(out, result)
            return result
        result["lenet300"] = {
            "data": source,
            "batch_size": 128,
            "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            **run_model("lenet300", args.arms, args.rounds, make_lenet, data, args.limit_train_batches),
            "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        }
        if out is not None:
            _write_json(out, result)

    if args.resnet_steps > 0 and "resnet20" in args.models:
        L.seed_everything(0, verbose=False)
        resnet_init = CifarResNet(20).state_dict()

        def make_resnet() -> nn.Module:
            net = CifarResNet(20)
            net.load_state_dict(resnet_init)
            return net

        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.resnet_steps * args.resnet_batch, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (len(x),), generator=g)
        loader = TensorBatches(x, y, args.resnet_batch)
        result["resnet20"] = {
            "data": "CIFAR-shaped random tensors",
            "batch_size": args.resnet_batch,
            "steps_per_fit": args.resnet_steps,
            "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            **run_model("resnet20", args.resnet_arms, args.resnet_rounds or args.rounds, make_resnet, loader, None),
            "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        }
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if out is not None:
        _write_json(out, result)

    if "lenet300" in result:
        print()
        print(markdown(
            f"LeNet-300-100, Fashion-MNIST, batch 128, 1 epoch per fit, {result['lenet300']['rounds']} rounds",
            result["lenet300"]["summary"],
        ))
    if "resnet20" in result:
        r = result["resnet20"]
        print()
        print(markdown(
            f"ResNet-20, CIFAR-shaped random data, batch {r['batch_size']}, {r.get('steps_per_fit')} steps per fit, "
            f"{r['rounds']} rounds",
            r["summary"],
        ))
    if out is not None:
        print(f"\nwritten: {out}")
    return result


if __name__ == "__main__":
    main()
