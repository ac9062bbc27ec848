"""What pruning bought at inference, measured: :func:`measure_inference` (dense vs the inference model, same weights).

Used by :class:`~lightning_clipprune.SparsityLogger`'s end-of-fit table and the app's summary; cheap on
purpose (a few interleaved rounds at one batch size), since it runs at the end of every ``fit`` that prints
the table.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_clipprune.export._reparam import inference_copy
from lightning_clipprune.export._timing import Timer, compare_latencies
from lightning_clipprune.export.inference import compare_latency, inference_report, to_inference

__all__ = ["format_latency", "measure_inference"]


def measure_inference(
    model: nn.Module,
    example_input: Tensor,
    *,
    batch_size: int | None = None,
    rounds: int = 5,
    timer: Timer | None = None,
) -> dict[str, Any]:
    """Median latency of ``model`` as it is (dense compute, eval mode) and of :func:`to_inference`'s model.

    Both are copies: ``model`` keeps its mode, weights and buffers. Timed on the CPU, interleaved, with the
    current ``torch.get_num_threads()``. When nothing was compacted and ``to_inference``'s end-to-end check
    kept every CSR layer, that check's timing of the same two models is the answer (no second timing).

    Args:
        model: the pruned network (on the CPU).
        example_input: one real input batch; repeated or cut to ``batch_size``.
        batch_size: the batch size to measure at (``None``: that of ``example_input``).
        rounds: interleaved timing rounds (per layer at conversion, then end to end).
        timer: one timing sample (default: calls filling 2 ms; :func:`~lightning_clipprune.export._timing.call_timer`
            makes shorter, cheaper ones).

    Returns:
        ``{"batch_size", "threads", "dense_ms", "inference_ms", "speedup", "csr_layers", "compacted_layers",
        "compaction_skipped"}`` (the last: zero channels left in place because Torch-Pruning is not installed).

    Example::

        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> sorted(measure_inference(net, torch.randn(4, 8), rounds=1))[:3]
        ['batch_size', 'compacted_layers', 'compaction_skipped']
    """
    from lightning_clipprune.export.compact import has_zero_channels, torch_pruning_missing

    dense = inference_copy(model)
    # Without Torch-Pruning the line says so itself: no warning from deep inside to_inference at every fit end
    skipped = torch_pruning_missing() and has_zero_channels(dense)
    fast = to_inference(
        dense, example_input=example_input, batch_size=batch_size, rounds=rounds, timer=timer,
        compact=False if skipped else "auto",
    )
    report = inference_report(fast)
    x = example_input
    if report.batch_size != x.shape[0]:
        reps = -(-report.batch_size // x.shape[0])
        x = x.repeat(reps, *([1] * (x.dim() - 1)))[: report.batch_size]
    if report.end_to_end is not None and not report.compacted:  # `dense` is what the check timed: the same models
        dense_s, fast_s = report.end_to_end
    elif report.sparse_names() or report.compacted:
        dense_s, fast_s = compare_latency(dense, fast, x, rounds=rounds, timer=timer)
    else:  # nothing converted: the inference model computes as the dense one, and a second timing is only noise
        dense_s = fast_s = compare_latencies([dense], x, rounds=rounds, timer=timer)[0]
    return {
        "batch_size": report.batch_size,
        "threads": torch.get_num_threads(),
        "dense_ms": 1e3 * dense_s,
        "inference_ms": 1e3 * fast_s,
        "speedup": dense_s / fast_s if fast_s > 0 else float("inf"),
        "csr_layers": len(report.sparse_names()),
        "compacted_layers": len(report.compacted),
        "compaction_skipped": skipped,
    }


def format_latency(result: dict[str, Any]) -> str:
    """One line: ``batch 256, 2 threads: dense 1.23 ms -> 0.41 ms (3.00x; 2 CSR layers, 0 compacted)``.

    Example::

        >>> format_latency({"batch_size": 8, "threads": 1, "dense_ms": 2.0, "inference_ms": 1.0, "speedup": 2.0,
        ...                 "csr_layers": 1, "compacted_layers": 0})
        'batch 8, 1 thread(s): dense 2 ms -> 1 ms (2.00x; 1 CSR layer(s), 0 compacted)'

    Nothing converted (a dense or lightly pruned model, or a batch size where CSR loses) says so instead of
    a ratio.
    """
    head = f"batch {result['batch_size']}, {result['threads']} thread(s): dense {result['dense_ms']:.3g} ms"
    tail = (
        "; zero channels kept (pip install 'lightning-clipprune[compact]' to remove them)"
        if result.get("compaction_skipped") else ""
    )
    if not result["csr_layers"] and not result["compacted_layers"]:
        return f"{head}; no layer is faster sparse or compacted at this batch size, so inference stays dense{tail}"
    noise = "; within timing noise" if 0.95 <= result["speedup"] <= 1.05 else ""
    return (
        f"{head} -> "
        f"{result['inference_ms']:.3g} ms ({result['speedup']:.2f}x{noise}; {result['csr_layers']} CSR layer(s), "
        f"{result['compacted_layers']} compacted){tail}"
    )
