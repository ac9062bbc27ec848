"""Headline benchmark: our callbacks against Lightning's own ``ModelPruning`` + ``gradient_clip_val``.

Fashion-MNIST, LeNet-300-100, the ``fashion_mnist`` experiment's recipe (SGD lr 0.1, momentum 0.9, weight
decay 5e-4, cosine per step, batch 128, 10 epochs), model and data instantiated from the project's Hydra
config (``+experiment=fashion_mnist seed=N``). Run by hand (CPU, one process, arms interleaved)::

    python benchmarks/bench_vs_lightning.py                  # 2 seeds x {0.9, 0.95, 0.98} x 2 arms + dense
    python benchmarks/bench_vs_lightning.py --quick          # 1 epoch, 1 seed, sparsity 0.9: smoke run

Arms, each on the same seeded model, data order, optimizer and Trainer settings:

- ``ours``: ``GradientClipCallback(clip_val=1.0, algorithm="norm")`` + ``MagnitudePruneCallback(sparsity=s,
  schedule="cubic")`` (defaults: start 0.0, end 0.75 of training, an event every 100 steps, global).
- ``lightning``: ``Trainer(gradient_clip_val=1.0)`` + ``ModelPruning("l1_unstructured",
  use_global_unstructured=True, amount=<per-epoch fraction of the remaining weights>)``, the amounts chosen
  so the cumulative sparsity after epoch ``e`` is the same cubic curve at the same point of training
  (``s * (1 - (1 - min(1, (e + 1) / (0.75 E)))^3)``), weights only, no lottery-ticket rewinding,
  ``make_pruning_permanent=True``.
- ``dense``: no clipping, no pruning (once per seed).

Reported per run: test and validation accuracy of the final model (``trainer.validate``/``test`` after
``fit``), the sparsity actually reached (zeros counted in the ``Linear`` weights), the wall time of
``trainer.fit``, and the bytes the model (parameters, buffers, tensor attributes) plus our masks hold at the
end of training, before ModelPruning makes its pruning permanent.
"""

from __future__ import annotations

import os

# Spinning OpenMP waiters starve the working threads on a shared CPU; must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import hydra  # noqa: E402
import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelPruning  # noqa: E402
from torch import nn  # noqa: E402

from lightning_clipprune import GradientClipCallback, MagnitudePruneCallback  # noqa: E402
from lightning_clipprune.run import config_dir  # noqa: E402

# ---------------------------------------------------------------- what a user writes, arm by arm
# The bodies between the markers are what each arm needs on the user's side; their lines are counted.


def ours_callbacks(sparsity: float) -> list[Callback]:
    # user-code-start
    callbacks = [
        GradientClipCallback(clip_val=1.0, algorithm="norm"),
        MagnitudePruneCallback(sparsity=sparsity, schedule="cubic"),
    ]
    # user-code-end
    return callbacks


def lightning_callbacks(sparsity: float, max_epochs: int) -> list[Callback]:
    # user-code-start
    def cumulative(epoch: int) -> float:  # cubic sparsity after `epoch`, target at 75 % of training
        t = min(1.0, (epoch + 1) / (0.75 * max_epochs))
        return sparsity * (1.0 - (1.0 - t) ** 3)

    def amount(epoch: int) -> float:  # ModelPruning prunes this fraction of the *remaining* weights
        return 1.0 - (1.0 - cumulative(epoch)) / (1.0 - (cumulative(epoch - 1) if epoch > 0 else 0.0))

    callbacks = [
        ModelPruning(
            "l1_unstructured",
            amount=amount,
            parameter_names=["weight"],
            use_global_unstructured=True,
            use_lottery_ticket_hypothesis=False,
            make_pruning_permanent=True,
        )
    ]
    # + Trainer(gradient_clip_val=1.0)
    # user-code-end
    return callbacks


def lightning_defaults_callbacks(sparsity: float, max_epochs: int) -> list[Callback]:
    """The same schedule, ModelPruning's other arguments left at their defaults (``--arms lightning_defaults``).

    Its defaults also prune the biases and rewind the surviving weights to their initial values after
    every pruning event (``use_lottery_ticket_hypothesis=True``).
    """

    def cumulative(epoch: int) -> float:
        t = min(1.0, (epoch + 1) / (0.75 * max_epochs))
        return sparsity * (1.0 - (1.0 - t) ** 3)

    def amount(epoch: int) -> float:
        return 1.0 - (1.0 - cumulative(epoch)) / (1.0 - (cumulative(epoch - 1) if epoch > 0 else 0.0))

    return [ModelPruning("l1_unstructured", amount=amount)]


def user_lines(fn: Callable[..., Any]) -> int:
    """Non-blank, non-comment source lines between the markers (a ``# + Trainer(...)`` note counts as one)."""
    src = inspect.getsource(fn).splitlines()
    start = next(i for i, line in enumerate(src) if "user-code-start" in line)
    end = next(i for i, line in enumerate(src) if "user-code-end" in line)
    body = [line.strip() for line in src[start + 1 : end]]
    return sum(1 for line in body if line and (not line.startswith("#") or line.startswith("# +")))


# ---------------------------------------------------------------- measurement helpers


def held_bytes(model: nn.Module, extra: list[torch.Tensor] = ()) -> int:
    """Bytes of the distinct tensor storages held by the model (parameters, buffers, tensor attributes)."""
    storages: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()

    for m in model.modules():
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None:
                add(t)
        for v in vars(m).values():
            if isinstance(v, torch.Tensor):  # the computed `weight` of torch.nn.utils.prune
                add(v)
    for t in extra:
        add(t)
    return sum(storages.values())


class MemoryProbe(Callback):
    """Records the model's held bytes at ``on_train_end``, before ModelPruning removes its re-parametrisation.

    Listed first, so it runs before the pruning callbacks' ``on_train_end``.
    """

    def __init__(self) -> None:
        self.bytes = 0
        self.names: list[str] = []
        self.ours: MagnitudePruneCallback | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        extra = list(self.ours.masks.values()) if self.ours is not None else []
        self.bytes = held_bytes(pl_module, extra)
        self.names = [n for n, _ in pl_module.named_parameters()] + [n for n, _ in pl_module.named_buffers()]


def linear_sparsity(model: nn.Module) -> tuple[float, int, int]:
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / total, zeros, total


def build(seed: int, overrides: list[str]) -> tuple[Any, L.LightningModule, Any]:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=fashion_mnist", f"seed={seed}", *overrides])
    L.seed_everything(seed, workers=True, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    return cfg, model, datamodule


def run_arm(arm: str, seed: int, sparsity: float | None, args: argparse.Namespace) -> dict[str, Any]:
    cfg, model, datamodule = build(seed, args.override)
    max_epochs = args.epochs or int(cfg.trainer.max_epochs)
    probe = MemoryProbe()
    trainer_kwargs: dict[str, Any] = {}
    if arm == "ours":
        callbacks = ours_callbacks(sparsity)
        callbacks[1].verbose = False  # no line per pruning event in the benchmark log
        probe.ours = callbacks[1]
    elif arm == "lightning":
        callbacks = lightning_callbacks(sparsity, max_epochs)
        trainer_kwargs["gradient_clip_val"] = 1.0
    elif arm == "lightning_defaults":
        callbacks = lightning_defaults_callbacks(sparsity, max_epochs)
        trainer_kwargs["gradient_clip_val"] = 1.0
    else:
        callbacks = []
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            precision="32-true",
            max_epochs=max_epochs,
            deterministic=True,  # as run.py for a seeded CPU run
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=root,
            callbacks=[probe, *callbacks],
            limit_train_batches=args.limit_train_batches,
            **trainer_kwargs,
        )
        t0 = time.perf_counter()
        trainer.fit(model, datamodule=datamodule)
        fit_s = time.perf_counter() - t0
        val = trainer.validate(model, datamodule=datamodule, verbose=False)[0]["val/acc"]
        test = trainer.test(model, datamodule=datamodule, verbose=False)[0]["test/acc"]
    sp, zeros, total = linear_sparsity(model)
    leftover = [n for n, _ in model.named_buffers() if n.endswith("_mask")] + [
        n for n, _ in model.named_parameters() if n.endswith("_orig")
    ]
    return {
        "arm": arm,
        "seed": seed,
        "target": sparsity,
        "epochs": max_epochs,
        "steps": trainer.global_step,
        "val_acc": float(val),
        "test_acc": float(test),
        "sparsity": sp,
        "zeros": zeros,
        "linear_weights": total,
        "fit_s": fit_s,
        "train_bytes": probe.bytes,
        "train_tensors": probe.names,
        "leftover_after_fit": leftover,
    }


def mean(rs: list[dict[str, Any]], key: str) -> float:
    return statistics.mean(r[key] for r in rs)


def fmt(rs: list[dict[str, Any]], key: str, scale: float, spec: str) -> str:
    return ", ".join(format(scale * r[key], spec) for r in rs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    parser.add_argument("--epochs", type=int, default=None, help="default: the experiment's max_epochs (10)")
    parser.add_argument("--quick", action="store_true", help="1 epoch, seed 0, sparsity 0.9: a smoke run")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    parser.add_argument(
        "--arms", nargs="+", default=["ours", "lightning"], choices=["ours", "lightning", "lightning_defaults"],
        help="pruned arms; lightning_defaults: ModelPruning with its other arguments at their defaults",
    )
    parser.add_argument("--json", default=None, help="also write all runs to this JSON file")
    parser.add_argument("override", nargs="*", help="extra Hydra overrides, e.g. data.batch_size=256")
    args = parser.parse_args()
    args.limit_train_batches = None
    if args.quick:
        args.seeds, args.sparsities, args.epochs = [0], [0.9], 1
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*`ModelPruning`.*")

    print(f"torch {torch.__version__}, lightning {L.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"user lines: ours {user_lines(ours_callbacks)}, lightning {user_lines(lightning_callbacks)}")
    runs: list[dict[str, Any]] = []
    k = 0
    for seed in args.seeds:
        if not args.no_dense:
            runs.append(run_arm("dense", seed, None, args))
            print(json.dumps({key: v for key, v in runs[-1].items() if key != "train_tensors"}), flush=True)
        for s in args.sparsities:
            order = args.arms if k % 2 == 0 else args.arms[::-1]  # alternate who goes first
            k += 1
            for arm in order:
                runs.append(run_arm(arm, seed, s, args))
                print(json.dumps({key: v for key, v in runs[-1].items() if key != "train_tensors"}), flush=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=2)

    print("\n| arm | target | seeds | test acc (mean) | val acc (mean) | sparsity reached | fit s (mean) "
          "| held at end of training (KiB) |")
    print("|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["target"] or 0.0, r["arm"]) for r in runs})
    for target, arm in keys:
        rs = [r for r in runs if r["arm"] == arm and (r["target"] or 0.0) == target]
        print(f"| {arm} | {target or '-'} | {len(rs)} | {100 * mean(rs, 'test_acc'):.2f} % "
              f"({fmt(rs, 'test_acc', 100, '.2f')}) | {100 * mean(rs, 'val_acc'):.2f} % | "
              f"{fmt(rs, 'sparsity', 1, '.4f')} | {mean(rs, 'fit_s'):.1f} ({fmt(rs, 'fit_s', 1, '.1f')}) | "
              f"{mean(rs, 'train_bytes') / 1024:.0f} |")
    for target in args.sparsities:  # paired by seed: same init, data order and batches
        diffs = [
            100 * (o["test_acc"] - li["test_acc"])
            for o in runs
            for li in runs
            if o["arm"] == "ours" and li["arm"] == "lightning" and o["seed"] == li["seed"] and o["target"] == target
            and li["target"] == target
        ]
        if diffs:
            spread = f" +- {statistics.stdev(diffs):.2f}" if len(diffs) > 1 else ""
            print(f"sparsity {target}: test acc ours - lightning = {statistics.mean(diffs):+.2f}{spread} pp "
                  f"(per seed: {', '.join(f'{d:+.2f}' for d in diffs)})")
    for arm in args.arms:
        r = next((r for r in runs if r["arm"] == arm), None)
        if r is not None:
            print(f"{arm}: tensors held during training: {r['train_tensors']}; after fit: "
                  f"{r['leftover_after_fit'] or 'no _orig/_mask left'}")


if __name__ == "__main__":
    main()
