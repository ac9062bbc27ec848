"""Per-step cost of the pruning hot path, in one process: arms interleaved, median and spread of ratios.

Quick, in-process measurement for tuning ``MagnitudePruneCallback``'s hot path (the official overhead
benchmark, Lightning's pair included, is ``benchmarks/bench_overhead.py``). Run by hand (CPU)::

    python benchmarks/bench_prune_step.py --model lenet --rounds 9          # Fashion-MNIST, 1 epoch per fit
    python benchmarks/bench_prune_step.py --model resnet20 --rounds 5 --steps 60
    python benchmarks/bench_prune_step.py --micro                           # the masking kernels alone
    python benchmarks/bench_prune_step.py --micro --out /tmp/micro.json     # a trial: the recorded file untouched

Arms (callback defaults, as a new user writes them):

- ``none``: no callback;
- ``prune``: ``MagnitudePruneCallback(sparsity=0.9)`` (cubic, start 0.0, end 0.75, global);
- ``clip+prune``: with ``GradientClipCallback(clip_val=1.0)``;
- ``all3``: the same + ``SparsityLogger()`` (a Trainer logger that discards what it gets).

Per round the arms run in a rotating order; each fit trains a fresh seeded model for one epoch
(``lenet``: Fashion-MNIST, LeNet-300-100, batch 128, SGD momentum 0.9 weight decay 5e-4, 469 steps;
``resnet20``: CIFAR-shaped random data, ``--steps`` steps of batch 32). Reported: the median over rounds
of each arm's ``trainer.fit`` wall time (and process CPU time, steadier on a shared machine) divided by
the ``none`` arm's of the same round, min-max of that ratio, and the bytes the prune callback holds at the end of training (bool masks + float gradient masks)
against the pruned weights' bytes (Lightning's ``ModelPruning`` holds ``weight_orig`` + ``weight_mask``:
+200 %). Results are written to ``benchmarks/results/bench_prune_step_<model>.json`` (``_micro`` with
``--micro``, ``_<tag>`` appended with ``--tag``): the recorded, tracked results; ``--out PATH`` writes elsewhere.
"""

from __future__ import annotations

import os

# Spinning OpenMP waiters starve the working threads on a shared CPU; must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger

from lightning_clipprune import GradientClipCallback, MagnitudePruneCallback, SparsityLogger
from lightning_clipprune._io import RefusedPathError, atomic_write_text, check_destination
from lightning_clipprune.app.models import Classifier, LeNet300100, resnet20

RESULTS = Path(__file__).parent / "results"
ARMS = ("none", "prune", "clip+prune", "all3")


class NullLogger(Logger):
    """A Trainer logger that keeps nothing (Lightning still does its logging work)."""

    name, version = "null", 0

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass


class Memory(Callback):
    """Bytes the prune callback holds at the end of training (before teardown drops the float masks)."""

    def __init__(self) -> None:
        self.report: dict[str, int] = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for cb in trainer.callbacks:
            if isinstance(cb, MagnitudePruneCallback):
                params = dict(pl_module.named_parameters())
                self.report = {
                    "pruned_weight_bytes": sum(params[n].nbytes for n in cb.parameter_names),
                    "bool_mask_bytes": sum(m.nbytes for m in cb.masks.values()),
                    # private on purpose: the cache is what this benchmark measures
                    "float_mask_bytes": sum(f.nbytes for f in getattr(cb, "_factors", [])),
                }


def callbacks(arm: str) -> list[Callback]:
    out: list[Callback] = []
    if arm in ("clip+prune", "all3"):
        out.append(GradientClipCallback(clip_val=1.0))
    if arm != "none":
        out.append(MagnitudePruneCallback(sparsity=0.9))
    if arm == "all3":
        out.append(SparsityLogger(print_table=False))
    return out


def lenet_setup() -> tuple[Any, Any]:
    from lightning_clipprune.app.data import FashionMNISTDataModule

    dm = FashionMNISTDataModule(root="/usr/share/datasets/fashion-mnist", download=False, batch_size=128)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()

    def model() -> Classifier:
        return Classifier(LeNet300100(), 10, lr_schedule="constant")

    return model, loader


def resnet_setup(steps: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps * 32, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (steps * 32,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)

    def model() -> Classifier:
        return Classifier(resnet20(), 10, lr_schedule="constant")

    return model, loader


def fit_once(
    arm: str, make_model: Any, loader: Any, root: str, memory: Memory | None = None, limit: int | None = None
) -> tuple[float, float]:
    L.seed_everything(0, verbose=False)
    model = make_model()
    extra = [memory] if memory is not None else []
    trainer = L.Trainer(
        default_root_dir=root, accelerator="cpu", devices=1, max_epochs=1, logger=NullLogger(),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[*callbacks(arm), *extra], num_sanity_val_steps=0, limit_val_batches=0,
        limit_train_batches=limit,
    )
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, train_dataloaders=loader)
    return time.perf_counter() - start, time.process_time() - cpu


def macro(args: argparse.Namespace) -> dict[str, Any]:
    make_model, loader = lenet_setup() if args.model == "lenet" else resnet_setup(args.steps)
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    cpu: dict[str, list[float]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as root:
        fit_once("none", make_model, loader, root, limit=args.limit)  # warm-up: imports, allocator, data
        memory = Memory()
        fit_once("prune", make_model, loader, root, memory, limit=args.limit)
        for r in range(args.rounds):
            order = ARMS[r % len(ARMS):] + ARMS[: r % len(ARMS)]
            for arm in order:
                wall, used = fit_once(arm, make_model, loader, root, limit=args.limit)
                times[arm].append(wall)
                cpu[arm].append(used)
            print(f"round {r + 1}: " + ", ".join(f"{a} {times[a][-1]:.2f}s ({cpu[a][-1]:.2f}s cpu)" for a in ARMS),
                  flush=True)
    summary = {"wall": _summary(times), "cpu": _summary(cpu)}
    rep = memory.report
    rep["added_fraction_of_pruned_weights"] = (
        (rep["bool_mask_bytes"] + rep["float_mask_bytes"]) / rep["pruned_weight_bytes"] if rep else None
    )
    return {"model": args.model, "rounds": args.rounds, "limit": args.limit, "threads": torch.get_num_threads(),
            "arms": summary, "memory": rep, "times": times, "cpu_times": cpu}


def _summary(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per arm: median seconds, and the median, min and max over rounds of the ratio to ``none``."""
    ratios = {arm: [t / n for t, n in zip(times[arm], times["none"], strict=True)] for arm in ARMS}
    return {
        arm: {
            "median_s": statistics.median(times[arm]),
            "ratio_median": statistics.median(ratios[arm]),
            "ratio_min": min(ratios[arm]),
            "ratio_max": max(ratios[arm]),
        }
        for arm in ARMS
    }


def micro() -> dict[str, float]:
    """Microseconds of one masking pass over LeNet-300-100's three weights (90 % pruned), per mask kind."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(s, generator=g) for s in ((300, 784), (100, 300), (10, 100))]
    keep = [torch.rand(w.shape, generator=g) > 0.9 for w in ws]
    kinds = {
        "bool foreach_mul_": keep,
        "uint8 foreach_mul_": [m.to(torch.uint8) for m in keep],
        "float32 foreach_mul_": [m.float() for m in keep],
    }
    out = {}
    with torch.no_grad():
        for name, masks in kinds.items():
            out[name] = _time(lambda masks=masks: torch._foreach_mul_(ws, masks))
        pruned = [~m for m in keep]
        out["masked_fill_ (per tensor)"] = _time(lambda: [w.masked_fill_(p, 0.0) for w, p in zip(ws, pruned, strict=True)])
        idx = [p.flatten().nonzero().squeeze(1) for p in pruned]
        out["index_fill_ (pruned indices)"] = _time(
            lambda: [w.view(-1).index_fill_(0, i, 0.0) for w, i in zip(ws, idx, strict=True)]
        )
    return out


def _time(fn: Any, n: int = 1000, repeats: int = 5) -> float:
    for _ in range(50):
        fn()
    best = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(best)


def output_path(args: argparse.Namespace) -> Path:
    """Where the results go: ``--out``, else the recorded file ``results/bench_prune_step_<model|micro>[_<tag>].json``."""
    if args.out is not None:
        if args.tag:
            raise SystemExit(f"error: --tag {args.tag!r} only names the default results file; drop it or put it in "
                             f"--out {str(args.out)!r}")
        if args.out.is_dir():
            raise SystemExit(f"error: --out {str(args.out)!r} is a folder; give a file, e.g. {args.out / 'micro.json'}")
        try:
            check_destination(args.out)
        except RefusedPathError as err:
            raise SystemExit(f"error: --out: {err}") from None
        return args.out
    return RESULTS / f"bench_prune_step_{'micro' if args.micro else args.model}{'_' + args.tag if args.tag else ''}.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("lenet", "resnet20"), default="lenet")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=60, help="resnet20: optimizer steps per fit")
    parser.add_argument("--limit", type=int, default=None, help="optimizer steps per fit (default: the epoch)")
    parser.add_argument("--micro", action="store_true", help="only time the masking kernels")
    parser.add_argument("--tag", default="", help="suffix of the default results file (e.g. 'before')")
    parser.add_argument(
        "--out", "--json", type=Path, default=None, metavar="PATH",
        help="write the results JSON here (default: the recorded, tracked results file "
        "benchmarks/results/bench_prune_step_<model|micro>[_<tag>].json, which a run overwrites)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    path = output_path(args)  # checked before the minutes of timing
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.micro:
        result: dict[str, Any] = {"micro_us": micro(), "threads": torch.get_num_threads()}
    else:
        result = macro(args)
    atomic_write_text(path, json.dumps(result, indent=2))  # never through a link, never over a device
    shown = {k: v for k, v in result.items() if k not in ("times", "cpu_times")}
    print(json.dumps(shown, indent=2))


if __name__ == "__main__":
    main()
