"""Export of pruned models, one module per job.

* :mod:`~lightning_clipprune.export.format`: the compact sparse file format (``.lcps``), pure torch + numpy,
  no pickle: :func:`save_sparse`, :func:`load_sparse`, :func:`load_sparse_into`, :func:`read_sparse_metadata`.
* :mod:`~lightning_clipprune.export.semi_structured`: 2:4 semi-structured conversion for CUDA inference
  (:func:`to_semi_structured`), the only place that reads torch private internals.
* :mod:`~lightning_clipprune.export.inference`: the fastest inference model for a device in one call
  (:func:`to_inference`): CSR layers where timing says they pay (:mod:`~lightning_clipprune.export.sparse_linear`),
  pruned channels removed physically (:mod:`~lightning_clipprune.export.compact`, Torch-Pruning optional), 2:4 on
  CUDA; stored and replayed with :func:`save_inference` / :func:`load_inference`.
* :mod:`~lightning_clipprune.export.__main__`: the command line, ``python -m lightning_clipprune.export CKPT OUT``
  (:func:`main`).

Every name is importable from here: ``from lightning_clipprune.export import save_sparse, main``; each is
looked up on first use, so importing the package (and ``--help`` of its command line) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_clipprune.export.__main__ import main
    from lightning_clipprune.export.compact import compact_channels
    from lightning_clipprune.export.format import (
        FORMAT_VERSION,
        SparseFormatError,
        load_sparse,
        load_sparse_into,
        read_sparse_metadata,
        record_overhead_bytes,
        save_sparse,
    )
    from lightning_clipprune.export.inference import (
        InferenceReport,
        LayerChoice,
        compare_latency,
        inference_report,
        to_inference,
    )
    from lightning_clipprune.export.recipes import load_inference, save_inference
    from lightning_clipprune.export.semi_structured import is_n_m_sparse, to_semi_structured
    from lightning_clipprune.export.sparse_linear import (
        FeatureMajorLinear,
        SparseConv1d,
        SparseConv2d,
        SparseLinear,
    )

__all__ = [
    "FORMAT_VERSION",
    "FeatureMajorLinear",
    "InferenceReport",
    "LayerChoice",
    "SparseConv1d",
    "SparseConv2d",
    "SparseFormatError",
    "SparseLinear",
    "compact_channels",
    "compare_latency",
    "inference_report",
    "is_n_m_sparse",
    "load_inference",
    "load_sparse",
    "load_sparse_into",
    "main",
    "read_sparse_metadata",
    "record_overhead_bytes",
    "save_inference",
    "save_sparse",
    "to_inference",
    "to_semi_structured",
]


# Every name is looked up on first use: `python -m lightning_clipprune.export --help` imports this package
# first and answers before torch loads. ``main`` in particular: importing ``__main__`` here would make
# ``python -m`` warn that the module was already imported before it ran.
_LAZY = {
    "compact_channels": "lightning_clipprune.export.compact",
    **dict.fromkeys(("FORMAT_VERSION", "SparseFormatError", "load_sparse", "load_sparse_into", "read_sparse_metadata",
                     "record_overhead_bytes", "save_sparse"), "lightning_clipprune.export.format"),
    **dict.fromkeys(("InferenceReport", "LayerChoice", "compare_latency", "inference_report", "to_inference"),
                    "lightning_clipprune.export.inference"),
    **dict.fromkeys(("load_inference", "save_inference"), "lightning_clipprune.export.recipes"),
    **dict.fromkeys(("is_n_m_sparse", "to_semi_structured"), "lightning_clipprune.export.semi_structured"),
    **dict.fromkeys(("FeatureMajorLinear", "SparseConv1d", "SparseConv2d", "SparseLinear"),
                    "lightning_clipprune.export.sparse_linear"),
    "main": "lightning_clipprune.export.__main__",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
