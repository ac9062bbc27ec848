"""End-to-end CPU inference latency: a pruned model against the same model's ``to_inference`` result (issue #24).

Rows: LeNet-300-100 at 90/95/98 % unstructured, the seed CNN (``+experiment=seed``) at 90 %, ResNet-20 with
50 % channel pruning (compacted; the paper's option-A shortcut, and the projection shortcut "B" with each
layer's channels pruned on their own and with coupled channels, ``channel_groups``; and "B" pruned coupled
during a 40-step fit by ``MagnitudePruneCallback(couple_channels=True)``, BatchNorm trained), and a Transformer
block (``lightning.pytorch.demos.Transformer``) at 90 %;
each at batch 1 and 256, with 1 and 2 threads. Per row, the inference model is built for that batch size and
thread count (``to_inference`` times each layer there), then the dense and the inference model are timed
interleaved, ``--rounds`` times each, and the medians compared. Memory: the model's tensors (CSR values and
indices included) and the peak of what one forward allocates (torch profiler), dense against inference.

Weights are random (seeded), then pruned by the library's own masks (``compute_masks``: global magnitude with
its default ranking for "unstructured", local per-layer L2 rows for "channel", or per coupled channel group,
``channel_groups`` traced by Torch-Pruning, what ``MagnitudePruneCallback(couple_channels=True)`` prunes): latency does not depend on
accuracy. BatchNorm keeps its initial statistics, so a zeroed channel carries no constant and compacts (except
in the "trained" row).

    python benchmarks/bench_inference.py --out benchmarks/results/bench_inference.json
    python benchmarks/bench_inference.py --smoke            # seconds: one small row, for the tests
    python benchmarks/bench_inference.py --only ResNet --threads 1 2   # the rows whose model name holds "ResNet"

``--smoke`` runs one thread and 3 rounds unless ``--threads``/``--rounds`` are given; an ``--only`` that
matches no model is refused with the names it accepts (``--smoke`` has only the LeNet-300-100 row).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_clipprune._io import atomic_write_text  # noqa: E402
from lightning_clipprune.app.models.networks import LeNet300100, SeedCNN, resnet20  # noqa: E402
from lightning_clipprune.export import (  # noqa: E402
    compare_latency,
    inference_report,
    sparse_linear,
    to_inference,
)
from lightning_clipprune.pruning import channel_groups, compute_masks  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


class TransformerBlock(nn.Module):
    """Lightning's demo Transformer (one encoder and one decoder layer), fed the same tokens as source and target."""

    def __init__(self) -> None:
        super().__init__()
        from lightning.pytorch.demos import Transformer

        self.t = Transformer(vocab_size=1000, ninp=256, nhead=4, nhid=1024, nlayers=1, dropout=0.0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.t(tokens, tokens)


def prune(model: nn.Module, sparsity: float, pattern: str, coupled_on: torch.Tensor | None = None) -> nn.Module:
    """Zero the model's Linear/Conv weights with the library's masks (global unstructured or local channels).

    ``coupled_on``: an example input; "channel" then prunes the coupled channel groups traced on it together."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}  # GPT-2's head shares one
    weights = {n: p for n, p in model.named_parameters() if p.dim() > 1 and "embedding" not in n and id(p) not in tables}
    scope = "local" if pattern == "channel" else "global"
    groups = None if coupled_on is None else channel_groups(model, coupled_on, weights)[0]
    masks = compute_masks(
        {n: p.detach() for n, p in weights.items()}, sparsity=sparsity, scope=scope, pattern=pattern, channel_groups=groups
    )
    with torch.no_grad():
        for name, p in weights.items():
            p.mul_(masks[name])
    return model.eval()


def trained(net: nn.Module, steps: int = 40, **prune: object) -> nn.Module:
    """``net`` after a fit of ``steps`` SGD steps (batch 32, random CIFAR-shaped data) with
    ``MagnitudePruneCallback(sparsity=0.5, pattern="channel", scope="local", exclude=["net.fc.*"], **prune)``
    (the classifier's outputs left whole): trained BatchNorm statistics and biases, as a user's network has
    them when it reaches ``to_inference``."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_clipprune import MagnitudePruneCallback

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32 * steps, 3, 32, 32, generator=g), torch.randint(0, 10, (32 * steps,), generator=g))
    exclude = ["net.fc.*", *prune.pop("exclude", [])]  # type: ignore[misc]
    cb = MagnitudePruneCallback(sparsity=0.5, pattern="channel", scope="local", exclude=exclude, **prune)
    L.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(Classifier(), DataLoader(data, batch_size=32))
    return net.eval()


def tensor_bytes(model: nn.Module) -> int:
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.layout == torch.sparse_csr:
            parts = (t.values(), t.crow_indices(), t.col_indices())
            total += sum(p.numel() * p.element_size() for p in parts)
        else:
            total += t.numel() * t.element_size()
    return total


def _torch_transposed_copy(x2d: torch.Tensor) -> torch.Tensor:
    return x2d.t().contiguous()


def forward_peak_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """The most one forward holds allocated at once (the profiler's allocation and free events, in order)."""
    cpu = [torch.profiler.ProfilerActivity.CPU]
    # The CSR layers' layout copy is made by numpy in eager mode, which the profiler does not see: measured
    # here with torch's copy of the same size.
    host_copy, sparse_linear._transposed_copy = sparse_linear._transposed_copy, _torch_transposed_copy
    try:
        with torch.profiler.profile(activities=cpu, profile_memory=True) as prof, torch.inference_mode():
            model(x)
    finally:
        sparse_linear._transposed_copy = host_copy
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def cases(smoke: bool) -> list[tuple[str, Callable[[], nn.Module], Callable[[int], torch.Tensor]]]:
    torch.manual_seed(0)
    img = lambda c, s: (lambda b: torch.randn(b, c, s, s))  # noqa: E731
    if smoke:
        return [("LeNet-300-100 95 %", lambda: prune(LeNet300100(), 0.95, "unstructured"), img(1, 28))]
    out = [
        (f"LeNet-300-100 {int(s * 100)} %", (lambda s=s: prune(LeNet300100(), s, "unstructured")), img(1, 28))
        for s in (0.9, 0.95, 0.98)
    ]
    out.append(("Seed CNN 90 %", lambda: prune(SeedCNN(), 0.9, "unstructured"), img(1, 28)))
    out.append(("ResNet-20 channels 50 % (compacted)", lambda: prune(resnet20(), 0.5, "channel"), img(3, 32)))
    # shortcut "B" (1x1 projection): Torch-Pruning maps its residual streams; option A's channel padding it cannot
    out.append(("ResNet-20-B channels 50 % (compacted)", lambda: prune(resnet20(shortcut="B"), 0.5, "channel"),
                img(3, 32)))
    out.append(("ResNet-20-B channels 50 % coupled (compacted)",
                lambda: prune(resnet20(shortcut="B"), 0.5, "channel", coupled_on=torch.zeros(1, 3, 32, 32)), img(3, 32)))
    # pruned during a fit, as users do: the BatchNorm has trained, its parameters follow their channels
    out.append(("ResNet-20-B channels 50 % coupled, trained (compacted)",
                lambda: trained(resnet20(shortcut="B"), couple_channels=True), img(3, 32)))
    out.append(("Transformer block 90 %", lambda: prune(TransformerBlock(), 0.9, "unstructured"),
                lambda b: torch.randint(0, 1000, (b, 16))))
    if importlib.util.find_spec("transformers") is not None:  # Hugging Face GPT-2: Conv1D layers, a ModelOutput
        out += [(f"GPT-2 (HF, 2 x 256) {int(s * 100)} %", (lambda s=s: prune(gpt2(), s, "unstructured")),
                 lambda b: torch.randint(0, 1000, (b, 16))) for s in (0.9, 0.95)]
    return out


def gpt2(layers: int = 2, width: int = 256, vocab: int = 1000, positions: int = 64) -> nn.Module:
    """A Hugging Face GPT-2 (default: 2 blocks, width 256, 1000 tokens), randomly initialised, in eval mode."""
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=width // 64, vocab_size=vocab,
                                     n_positions=positions)
    return transformers.GPT2LMHeadModel(config).eval()


def wide_gpt2_cases() -> list[tuple[str, Callable[[], nn.Module], Callable[[int], torch.Tensor]]]:
    """``--gpt2-wide``: 4 blocks of width 768, 8000 tokens, sequences of 128 tokens (run at batch 4)."""
    torch.manual_seed(0)
    return [(f"GPT-2 (HF, 4 x 768) {int(s * 100)} %",
             (lambda s=s: prune(gpt2(layers=4, width=768, vocab=8000, positions=128), s, "unstructured")),
             lambda b: torch.randint(0, 8000, (b, 128))) for s in (0.9, 0.95)]


def run_row(name: str, dense: nn.Module, make_x: Callable[[int], torch.Tensor], batch: int, threads: int,
            rounds: int) -> dict:
    torch.set_num_threads(threads)
    x = make_x(batch)
    start = time.perf_counter()
    fast = to_inference(dense, example_input=x, rounds=max(3, rounds // 3))
    convert_s = time.perf_counter() - start
    dense_s, fast_s = compare_latency(dense, fast, x, rounds=rounds)
    report = inference_report(fast)
    with torch.inference_mode():
        got, ref = fast(x), dense(x)
        got, ref = (getattr(o, "logits", o) for o in (got, ref))  # a Hugging Face ModelOutput: its logits
        max_diff = float((got.float() - ref.float()).abs().max())
    return {
        "model": name, "batch": batch, "threads": threads,
        "dense_ms": 1e3 * dense_s, "inference_ms": 1e3 * fast_s, "speedup": dense_s / fast_s,
        "csr_layers": report.sparse_names(), "compacted": {k: list(v) for k, v in report.compacted.items()},
        "kernels": {c.name: c.kernel for c in report.layers if c.format == "csr"},
        "convert_s": convert_s, "max_abs_diff": max_diff,
        "model_bytes_dense": tensor_bytes(dense), "model_bytes_inference": tensor_bytes(fast),
        "forward_peak_bytes_dense": forward_peak_bytes(dense, x),
        "forward_peak_bytes_inference": forward_peak_bytes(fast, x),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | batch | threads | dense ms | inference ms | speedup | CSR / compacted layers | model MiB dense -> inf."
        " | forward peak KiB dense -> inf. |",
        "|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    mib = 2.0**20
    for r in rows:
        bags = sum(k == "embedding_bag" for k in r.get("kernels", {}).values())
        layers = f"{len(r['csr_layers'])} CSR" + (f" ({bags} embedding_bag)" if bags else "")
        layers += f", {len(r['compacted'])} compacted" if r["compacted"] else ""
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['threads']} | {r['dense_ms']:.3f} | {r['inference_ms']:.3f} | "
            f"**{r['speedup']:.2f}x** | {layers} | {r['model_bytes_dense'] / mib:.2f} -> "
            f"{r['model_bytes_inference'] / mib:.2f} | {r['forward_peak_bytes_dense'] / 1024:.0f} -> "
            f"{r['forward_peak_bytes_inference'] / 1024:.0f} |"
        )
    return "\n".join(lines)


Case = tuple[str, Callable[[], nn.Module], Callable[[int], torch.Tensor]]


def select(all_cases: list[Case], only: str, mode: str = "") -> list[Case]:
    """The cases whose name contains ``only`` (all for ""); ``ValueError`` (one line, the names) when none does.

    ``mode`` names the flag that chose ``all_cases`` (``--smoke``, ``--gpt2-wide``) in the message.
    """
    chosen = [c for c in all_cases if only in c[0]]
    if not chosen:
        names = ", ".join(repr(c[0]) for c in all_cases)
        where = f" under {mode}" if mode else ""
        raise ValueError(f"--only {only!r} matches no model name{where} (case-sensitive); give part of one of: {names}")
    return chosen


def plan(args: argparse.Namespace) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """(rounds, batch sizes, thread counts) of a run; ``--smoke`` keeps the ``--threads`` and ``--rounds`` given
    (its defaults: 1 thread, 3 rounds)."""
    if args.threads is not None and any(t < 1 for t in args.threads):
        raise ValueError(f"--threads must be positive integers, got {' '.join(map(str, args.threads))}")
    if args.rounds is not None and args.rounds < 1:
        raise ValueError(f"--rounds must be a positive integer, got {args.rounds}")
    rounds = args.rounds if args.rounds is not None else 3 if args.smoke else 15
    batches = (1, 32) if args.smoke else (1, 256)
    if args.gpt2_wide:
        batches = (4,)
    thread_counts = tuple(args.threads) if args.threads is not None else ((1,) if args.smoke else (1, 2))
    return rounds, batches, thread_counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the rows and the machine as JSON here")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved end-to-end rounds per row (medians; default 15, with --smoke 3)")
    parser.add_argument("--smoke", action="store_true",
                        help="one small row (LeNet-300-100 95 %%), batches 1 and 32 (for the tests)")
    parser.add_argument("--only", default="",
                        help="run only the models whose name contains this text (case-sensitive; none: an error)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch.set_num_threads values (default: 1 2; with --smoke: 1)")
    parser.add_argument("--gpt2-wide", action="store_true",
                        help="only GPT-2 of 4 blocks of width 768 at 4 sequences of 128 tokens (minutes)")
    parser.add_argument("--torch-layout-copy", action="store_true",
                        help="CSR layers lay their input out with torch's copy, not numpy's (the library before it)")
    args = parser.parse_args(argv)
    try:  # every refusal before the first row
        rounds, batches, thread_counts = plan(args)
        mode = "--gpt2-wide" if args.gpt2_wide else "--smoke" if args.smoke else ""
        chosen = select(wide_gpt2_cases() if args.gpt2_wide else cases(args.smoke), args.only, mode)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.torch_layout_copy:
        sparse_linear._transposed_copy = _torch_transposed_copy
    rows = []
    for name, build, make_x in chosen:
        dense = build()
        for threads in thread_counts:
            for batch in batches:
                rows.append(run_row(name, dense, make_x, batch, threads, rounds))
                r = rows[-1]
                print(f"{name:38s} batch {batch:3d} threads {threads}: dense {r['dense_ms']:.3f} ms, inference "
                      f"{r['inference_ms']:.3f} ms, {r['speedup']:.2f}x", flush=True)
    print(markdown(rows))
    if args.out:
        meta = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                "cpus": torch.get_num_threads(), "rounds": rounds,
                "median_speedup": statistics.median(r["speedup"] for r in rows) if rows else None}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
