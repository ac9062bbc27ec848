"""Global magnitude masks on a 26M-parameter model: ours vs ``torch.nn.utils.prune.global_unstructured``.

Run by hand (CPU, same process, alternating repetitions, each on a fresh copy of the model)::

    python benchmarks/bench_prune.py [--reps 5] [--sparsity 0.9]

Reported per method (median over repetitions):

- ``time``: wall time of one pruning event that leaves the model pruned and usable: ours is
  ``compute_masks`` + ``apply_masks_`` (masks applied in place); torch's is ``global_unstructured`` with
  ``L1Unstructured`` (mask computation + re-parametrisation: ``weight_orig``, ``weight_mask``, ``weight``).
- ``peak``: peak process RSS above the RSS before the call (psutil, sampled every 0.5 ms in a thread):
  the temporaries of the computation. tracemalloc cannot see torch's allocations, and torch has no CPU
  allocator statistics; large tensors are mmap-ed by glibc, so RSS falls back after they are freed.
- ``kept``: bytes of tensors the model (parameters, buffers, tensor attributes) and the masks hold after
  pruning, minus the dense model's parameter bytes; counted exactly from tensor storages.

Also a second event on the pruned model (0.5 -> 0.9; torch's ``amount`` is then relative to what is left).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import threading
import time

import psutil
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from lightning_clipprune.pruning import apply_masks_, compute_masks, select_prunable_parameters


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(256, 512, 3),  # 1.18M
        nn.Flatten(),
        nn.Linear(4096, 4096),  # 16.8M
        nn.ReLU(),
        nn.Linear(4096, 2048),  # 8.4M
        nn.ReLU(),
        nn.Linear(2048, 10),
    )


class PeakRSS:
    """Peak RSS above the starting RSS while the block runs (sampling thread)."""

    def __init__(self, interval: float = 5e-4) -> None:
        self.proc, self.interval, self.peak = psutil.Process(), interval, 0

    def __enter__(self) -> PeakRSS:
        self.base = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._max = self.base
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._max = max(self._max, self.proc.memory_info().rss)
        self._stop.set()
        self._t.join()
        self.peak = self._max - self.base


def held_bytes(model: nn.Module, extra: dict[str, torch.Tensor] | None = None) -> int:
    """Bytes of all distinct tensor storages the model (and ``extra``) hold."""
    storages: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()

    for m in model.modules():
        for t in [*m._parameters.values(), *m._buffers.values(), *(v for v in vars(m).values() if torch.is_tensor(v))]:
            if t is not None:
                add(t)
    for t in (extra or {}).values():
        add(t)
    return sum(storages.values())


def ours(model: nn.Module, sparsity: float, masks=None):
    params = select_prunable_parameters(model)
    weights = {n: p.detach() for n, p in params.items()}
    new = compute_masks(weights, sparsity=sparsity, masks=masks, ranking="raw", max_layer_sparsity=None)  # torch's rule
    apply_masks_(list(params.values()), [new[n] for n in params])
    return new


def theirs(model: nn.Module, amount: float) -> None:
    layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    torch_prune.global_unstructured(layers, pruning_method=torch_prune.L1Unstructured, amount=amount)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sparsity", type=float, default=0.9)
    args = ap.parse_args()
    torch.manual_seed(0)
    base = make_model()
    n_params = sum(p.numel() for p in select_prunable_parameters(base).values())
    dense_bytes = held_bytes(base)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, prunable params {n_params / 1e6:.1f}M, "
          f"dense model {dense_bytes / 2**20:.0f} MiB, sparsity {args.sparsity}")

    res: dict[str, list[tuple[float, int, int]]] = {k: [] for k in ("ours", "torch", "ours2", "torch2")}
    check_done = False
    for _ in range(args.reps):
        for name in ("torch", "ours"):  # alternate, fresh copies; copying is outside the measured block
            m = copy.deepcopy(base)
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                masks = ours(m, args.sparsity) if name == "ours" else theirs(m, args.sparsity)
                dt = time.perf_counter() - t0
            kept = held_bytes(m, masks if name == "ours" else None) - dense_bytes
            res[name].append((dt, mem.peak, kept))
            if name == "ours" and not check_done:  # same masks as torch on the same weights
                ref = copy.deepcopy(base)
                theirs(ref, args.sparsity)
                mods = [mm for mm in ref.modules() if isinstance(mm, (nn.Linear, nn.Conv2d))]
                # identical up to ties at the cut (26M float32 values hold duplicates; torch's topk order
                # among equal values is unspecified, ours is by flat index): same count, same cut value
                diff = [(mk != mm.weight_mask.bool(), mm.weight_orig.detach().abs()) for mk, mm in
                        zip(masks.values(), mods, strict=True)]
                cut = torch.cat([a[d] for d, a in diff]).unique()
                n_diff = sum(int(d.sum()) for d, _ in diff)
                assert cut.numel() <= 1 and sum(int((mm.weight_mask == 0).sum()) for mm in mods) == sum(
                    int((~mk).sum()) for mk in masks.values())
                print(f"masks equal to torch's except {n_diff} entries, all tied at |w| = {cut.tolist()}")
                check_done = True
            del m, masks
            # second event: from 0.5 to the target on an already pruned model
            m = copy.deepcopy(base)
            if name == "ours":
                first = ours(m, 0.5)
                with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    masks = ours(m, args.sparsity, first)
                    dt = time.perf_counter() - t0
                kept = held_bytes(m, masks) - dense_bytes
            else:
                theirs(m, 0.5)
                with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    theirs(m, 1 - (1 - args.sparsity) / 0.5)
                    dt = time.perf_counter() - t0
                kept = held_bytes(m) - dense_bytes
            res[name + "2"].append((dt, mem.peak, kept))
            del m

    def med(key: str, i: int) -> float:
        return statistics.median(r[i] for r in res[key])

    mib = 2**20
    print("\n| event | method | time (s, median) | peak RSS above start (MiB) | kept after pruning (MiB) |")
    print("|---|---|---|---|---|")
    for ev, (a, b) in (("first (0 -> s)", ("ours", "torch")), ("second (0.5 -> s)", ("ours2", "torch2"))):
        for k in (a, b):
            label = "ours (exact selection, in place)" if k.startswith("ours") else "torch global_unstructured L1"
            print(f"| {ev} | {label} | {med(k, 0):.3f} | {med(k, 1) / mib:.0f} | {med(k, 2) / mib:.0f} |")
    for ev, (a, b) in (("first", ("ours", "torch")), ("second", ("ours2", "torch2"))):
        print(f"{ev} event: speed-up {med(b, 0) / med(a, 0):.1f}x, peak ratio torch/ours {med(b, 1) / max(med(a, 1), 1):.1f}, "
              f"kept ours {med(a, 2) / mib:.0f} MiB vs torch {med(b, 2) / mib:.0f} MiB "
              f"(dense weights {dense_bytes / mib:.0f} MiB)")
    print("all times:", {k: [round(r[0], 3) for r in v] for k, v in res.items()})


if __name__ == "__main__":
    main()
