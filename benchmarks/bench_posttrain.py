"""Post-training pruning without retraining: magnitude vs layer-wise reconstruction (SparseGPT / OBS).

Issue #23. LeNet-300-100 on Fashion-MNIST is trained dense with the recipe of
``conf/experiment/fashion_mnist.yaml`` (SGD lr 0.1, momentum 0.9, weight decay 5e-4, cosine per step,
batch 128, inputs normalised 0.2860 / 0.3530), on 90 % of the training split; the other 10 % is the
validation split. Then, without any gradient step, it is pruned at each sparsity by

- ``magnitude``: one global magnitude threshold (``compute_masks(ranking="raw")``, the suite's ceiling);
- ``obs/<allocation>``: ``reconstruct_prune`` with each allocation, calibrated on ``--num-samples`` samples
  of the training part (never the validation split);

and the validation and test accuracies are read. "max s" is the largest sparsity (over a 1 % grid from
50 % to 97 %) whose validation accuracy stays within 0.5 points of dense. The dense weights are cached in
``/tmp`` so re-runs only prune. One torch thread.

    python benchmarks/bench_posttrain.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lightning_clipprune._io import atomic_write_text
from lightning_clipprune.posttrain import reconstruct_prune
from lightning_clipprune.pruning import apply_masks_, compute_masks, select_prunable_parameters

DATA = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530
TABLE_SPARSITIES = (0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97)
FINE = tuple(round(0.5 + 0.01 * i, 2) for i in range(48))  # 0.50 .. 0.97
ALLOCATIONS = ("global_magnitude", "er", "uniform")
#: Allocations suggested by a layer sensitivity on the validation split (``suggest_layer_sparsity``):
#: "sensitivity" from the search's magnitude sensitivity (``layer_sensitivity``), "sensitivity_obs" from
#: the same measure with each layer alone pruned by reconstruction. Set per seed in ``run_seed``.
SENSITIVITY: dict[str, object] = {}
#: Variants of the reconstruction: "obs" is reconstruct_prune's defaults (dense reference, bias in the
#: update, exact refit of the kept weights); "sparsegpt" the plain algorithm (each layer's own outputs,
#: weights only, SparseGPT's updates); "obs4" the defaults in 4 rounds per layer (25/50/75/100 % of its count).
VARIANTS = {
    "obs": {},
    "sparsegpt": {"reference": "layer", "update_bias": False, "refit": False},
    "obs4": {"steps": 4},
}


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(split_seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    def tensors(images: str, labels: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(read_idx(DATA / images).copy()).float().div_(255).sub_(MEAN).div_(STD)
        return x.reshape(len(x), -1), torch.from_numpy(read_idx(DATA / labels).astype(np.int64))

    x, y = tensors("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    n_val = len(x) // 10
    val, train = order[:n_val], order[n_val:]
    return {
        "train": (x[train], y[train]),
        "val": (x[val], y[val]),
        "test": tensors("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }


def lenet300() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def train_dense(data: dict, seed: int, epochs: int, cache: Path) -> nn.Module:
    model = lenet300()
    if cache.is_file():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model
    torch.manual_seed(seed)
    model = lenet300()
    x, y = data["train"]
    steps_per_epoch = math.ceil(len(x) / 128)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(128):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    torch.save(model.state_dict(), cache)
    return model


@torch.no_grad()
def accuracy(model: nn.Module, split: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    x, y = split
    return 100.0 * float((model(x).argmax(1) == y).float().mean())


def calibration_batches(data: dict, seed: int, batch: int = 256) -> list[torch.Tensor]:
    x, _ = data["train"]  # the training part only
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 + seed))
    return [x[i] for i in order.split(batch)]


def prune(
    dense: nn.Module, method: str, sparsity: float, calib: list, num_samples: int, pattern: str
) -> tuple[nn.Module, float]:
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    if method == "magnitude":
        params = select_prunable_parameters(model)
        kw = {"ranking": "raw"} if pattern == "unstructured" else {"scope": "local"}
        masks = compute_masks(dict(params), sparsity=sparsity, pattern=pattern, **kw)
        with torch.no_grad():
            apply_masks_(list(params.values()), [masks[n] for n in params])
    else:
        variant, allocation = method.split("/", 1)
        s = None if pattern != "unstructured" else sparsity
        if allocation in SENSITIVITY and pattern == "unstructured":
            allocation = suggested(SENSITIVITY[allocation], sparsity)
        reconstruct_prune(
            model,
            calib,
            s,
            allocation=allocation,
            pattern=pattern,
            num_samples=num_samples,
            progress=False,
            **VARIANTS[variant],
        )
    return model, time.perf_counter() - start


def suggested(sens, sparsity: float) -> dict[str, float]:
    """``suggest_layer_sparsity`` for the target, the largest layer left out so it takes the exact remainder."""
    from lightning_clipprune.search import suggest_layer_sparsity

    alloc = suggest_layer_sparsity(sens, sparsity)
    largest = max(sens.numel, key=sens.numel.get)
    return {n: v for n, v in alloc.items() if n != largest}


def sensitivities(dense: nn.Module, data: dict, calib: list, num_samples: int) -> dict:
    """Per-layer validation accuracy with one layer pruned alone: by magnitude, and by reconstruction."""
    from lightning_clipprune.search import SensitivityResult, layer_sensitivity

    x, y = data["val"]
    val = list(zip(x.split(1000), y.split(1000), strict=True))
    by_magnitude = layer_sensitivity(copy.deepcopy(dense), val)
    accuracy_obs = {}
    for name in by_magnitude.accuracy:
        accs = []
        for s in by_magnitude.sparsities:
            model = copy.deepcopy(dense)
            reconstruct_prune(model, calib, s, include=[name], num_samples=num_samples, progress=False)
            accs.append(accuracy(model, data["val"]) / 100)
        accuracy_obs[name] = accs
    by_obs = SensitivityResult(by_magnitude.sparsities, by_magnitude.dense_val_acc, accuracy_obs, by_magnitude.numel)
    return {"sensitivity": by_magnitude, "sensitivity_obs": by_obs}


def sparsity_of(model: nn.Module) -> float:
    params = select_prunable_parameters(model)
    return sum(int((p == 0).sum()) for p in params.values()) / sum(p.numel() for p in params.values())


def run_seed(seed: int, args: argparse.Namespace, data: dict) -> dict:
    dense = train_dense(
        data, seed, args.epochs, Path(f"/tmp/bench_posttrain_lenet300_seed{seed}_e{args.epochs}.pt")
    )
    calib = calibration_batches(data, seed)
    if any(a.startswith("sensitivity") for a in args.allocations):
        SENSITIVITY.clear()
        SENSITIVITY.update(sensitivities(dense, data, calib, args.num_samples))
    out = {
        "seed": seed,
        "dense_val": accuracy(dense, data["val"]),
        "dense_test": accuracy(dense, data["test"]),
        "rows": [],
    }
    methods = method_names(args)
    grid = sorted(set(FINE) | set(TABLE_SPARSITIES)) if args.fine else TABLE_SPARSITIES
    def record(method: str, sparsity: float, label: float | str, pattern: str) -> None:
        model, seconds = prune(dense, method, sparsity, calib, args.num_samples, pattern)
        row = {
            "method": method,
            "sparsity": label,
            "reached": sparsity_of(model),
            "val": accuracy(model, data["val"]),
            "test": accuracy(model, data["test"]),
            "seconds": seconds,
        }
        out["rows"].append(row)
        print(json.dumps({"seed": seed, **row}), flush=True)

    for method in methods:
        for s in grid:
            record(method, s, s, "unstructured")
    for method in ("magnitude", "sparsegpt/global_magnitude", "obs/global_magnitude"):
        record(method, 0.5, "2:4", "2:4")
    return out


def method_names(args: argparse.Namespace) -> list[str]:
    return (
        ["magnitude", "sparsegpt/global_magnitude"]
        + [f"obs/{a}" for a in args.allocations]
        + [f"obs4/{a}" for a in args.steps_allocations]
    )


def max_within(rows: list[dict], method: str, dense_val: float, tol: float = 0.5) -> float:
    ok = [
        r["sparsity"]
        for r in rows
        if r["method"] == method and r["sparsity"] != "2:4" and r["val"] >= dense_val - tol
    ]
    return max(ok, default=0.0)


def markdown(results: list[dict], methods: list[str]) -> str:
    lines = [
        "| seed | method | "
        + " | ".join(f"{int(s * 100)} % val / test" for s in TABLE_SPARSITIES)
        + " | 2:4 val | max s (val within 0.5) | time per prune (s) |",
        "|---" * (len(TABLE_SPARSITIES) + 5) + "|",
    ]
    for res in results:
        lines.append(
            f"| {res['seed']} | dense | "
            + " | ".join(f"{res['dense_val']:.2f} / {res['dense_test']:.2f}" for _ in TABLE_SPARSITIES[:1])
            + " |" * len(TABLE_SPARSITIES)
            + " | | |"
        )
        for m in methods:
            rows = {r["sparsity"]: r for r in res["rows"] if r["method"] == m}
            cells = [f"{rows[s]['val']:.2f} / {rows[s]['test']:.2f}" for s in TABLE_SPARSITIES]
            nm = f"{rows['2:4']['val']:.2f}" if "2:4" in rows else ""
            secs = np.mean([r["seconds"] for s, r in rows.items() if s != "2:4"])
            lines.append(
                f"| {res['seed']} | {m} | "
                + " | ".join(cells)
                + f" | {nm} | {max_within(res['rows'], m, res['dense_val']) * 100:.0f} % | {secs:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=2048)
    parser.add_argument(
        "--allocations", nargs="+", default=list(ALLOCATIONS), help=f"of {ALLOCATIONS}, sensitivity, sensitivity_obs"
    )
    parser.add_argument(
        "--steps-allocations", nargs="*", default=["global_magnitude"], help="allocations also run as obs4"
    )
    parser.add_argument("--no-fine", dest="fine", action="store_false", help="only the table's sparsities")
    parser.add_argument("--json", type=Path, default=None, help="also write every row here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load()
    results = [run_seed(seed, args, data) for seed in args.seeds]
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=1))
    print(markdown(results, method_names(args)))


if __name__ == "__main__":
    main()
