"""File size (and save/load time) of the sparse export against torch.save(state_dict) and torch's pruning utilities.

Run by hand::

    python benchmarks/bench_export.py            # prints the markdown tables of benchmarks/bench_export.md

Sizes are exact and deterministic; times are medians of a few repeats, given as ratios to torch.save /
torch.load measured in the same process (the machine is shared and noisy). ``save_sparse`` writes to a
temporary file, fsyncs it and renames it (a crash never leaves a half file); ``torch.save`` here does not.

The last table is the cost of reading a checkpoint safely: ``load_checkpoint`` (zip checksums verified, the
pickle's globals read without unpickling, then ``torch.load(weights_only=True)``) against a bare
``torch.load(weights_only=True)`` of the same file.

The model is an MLP 784-1024-1024-1024-10 (2.9 M parameters). Each weight matrix is pruned to the
sparsity by magnitude (the same count in every layer, so torch.nn.utils.prune.l1_unstructured gives the
same zeros); biases stay dense. Two ways to zero a weight are measured, because they differ in bits:
``masked_fill`` writes +0.0, while multiplying by a 0/1 mask (what an in-place ``mul_`` or
``torch._foreach_mul_`` does) writes -0.0 for negative weights, and keeping those signs bit-exact costs the
format one bit per zero (``keep_zero_signs=False`` stores them as +0.0).
"""

from __future__ import annotations

import io
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
import torch.nn.utils.prune as tprune
from torch import nn

from lightning_clipprune.checkpoint import load_checkpoint
from lightning_clipprune.export import load_sparse, save_sparse

SPARSITIES = (0.5, 0.9, 0.98)
REPEATS = 5


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
        nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10),
    )


def prune_(model: nn.Module, sparsity: float, multiply: bool) -> None:
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                w = mod.weight
                k = round(sparsity * w.numel())
                keep = torch.ones(w.numel(), dtype=torch.bool)
                keep[w.abs().flatten().argsort()[:k]] = False
                keep = keep.view_as(w)
                if multiply:
                    w.mul_(keep.to(w.dtype))
                else:
                    w.masked_fill_(~keep, 0.0)


def torch_save_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def sparse_file_size(state, tmp: Path, **kw) -> int:
    return save_sparse(state, tmp / "m.lcps", **kw)


def torch_prune_size(dtype: torch.dtype, sparsity: float) -> int:
    model = make_model().to(dtype)
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            tprune.l1_unstructured(mod, "weight", amount=sparsity)
    return len(torch_save_bytes(model.state_dict()))


def median_time(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    tmp = Path(tempfile.mkdtemp())
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}\n")
    print("| dtype | sparsity | torch.save (dense) | compact, +0.0 zeros | compact, -0.0 zeros kept | "
          "compact, -0.0 dropped | torch.nn.utils.prune | gzip(torch.save) |")
    print("|---|---|---|---|---|---|---|---|")
    timing_rows = []
    for dtype in (torch.float32, torch.float16):
        for s in SPARSITIES:
            model = make_model().to(dtype)
            prune_(model, s, multiply=False)
            state = model.state_dict()
            dense_bytes = torch_save_bytes(state)
            dense = len(dense_bytes)
            plus = sparse_file_size(state, tmp)
            mul_model = make_model().to(dtype)
            prune_(mul_model, s, multiply=True)
            mul_state = mul_model.state_dict()
            kept = sparse_file_size(mul_state, tmp)
            dropped = sparse_file_size(mul_state, tmp, keep_zero_signs=False)
            tp = torch_prune_size(dtype, s)
            gz = len(zlib.compress(dense_bytes, 6))

            def cell(n: int, dense: int = dense) -> str:
                return f"{n / 1e6:.2f} MB ({n / dense:.3f}x)"

            print(f"| {str(dtype).removeprefix('torch.')} | {s:.0%} | {dense / 1e6:.2f} MB (1x) | {cell(plus)} | "
                  f"{cell(kept)} | {cell(dropped)} | {cell(tp)} | {cell(gz)} |")
            if dtype == torch.float32:
                t_save_dense = median_time(lambda state=state: torch.save(state, tmp / "d.pt"))
                t_save = median_time(lambda state=state: save_sparse(state, tmp / "t.lcps"))
                t_load_dense = median_time(lambda: torch.load(tmp / "d.pt", weights_only=True))
                t_load = median_time(lambda: load_sparse(tmp / "t.lcps"))
                back = load_sparse(tmp / "t.lcps")
                assert all(torch.equal(back[k], v) for k, v in state.items())
                timing_rows.append((s, t_save_dense, t_save, t_load_dense, t_load))
            del model, mul_model
    print("\n| sparsity (fp32) | torch.save | save_sparse | torch.load | load_sparse |")
    print("|---|---|---|---|---|")
    for s, tsd, ts, tld, tl in timing_rows:
        print(f"| {s:.0%} | {tsd * 1e3:.1f} ms | {ts * 1e3:.1f} ms ({ts / tsd:.1f}x) | {tld * 1e3:.1f} ms | "
              f"{tl * 1e3:.1f} ms ({tl / tld:.1f}x) |")
    print("\n| checkpoint (fp32, 90 %) | size | torch.load(weights_only=True) | load_checkpoint |")
    print("|---|---|---|---|")
    model = make_model()
    prune_(model, 0.9, multiply=False)
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": {"lr": 0.1, "depth": 4}, "epoch": 3}
    torch.save(ckpt, tmp / "c.ckpt")
    t_plain = median_time(lambda: torch.load(tmp / "c.ckpt", map_location="cpu", weights_only=True))
    t_safe = median_time(lambda: load_checkpoint(tmp / "c.ckpt"))
    size = (tmp / "c.ckpt").stat().st_size
    print(f"| MLP 2.9 M | {size / 1e6:.2f} MB | {t_plain * 1e3:.1f} ms | {t_safe * 1e3:.1f} ms ({t_safe / t_plain:.1f}x) |")
    return 0


if __name__ == "__main__":
    import argparse

    # no options: the parser answers --help (it used to run the whole benchmark) and refuses unknown arguments
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python benchmarks/bench_export.py").parse_args()
    sys.exit(main())
