"""Post-training pruning on a calibration set: layer-wise reconstruction (SparseGPT / OBS), no retraining.

- :func:`reconstruct_prune`: prune a trained model in place, each layer's kept weights updated to
  preserve its outputs on calibration batches (:mod:`~lightning_clipprune.posttrain.reconstruct`).
- :mod:`~lightning_clipprune.posttrain.obs`: the algorithm on one weight matrix (pure tensor code).
- :mod:`~lightning_clipprune.posttrain.calibration`: calibration batches, unfolded inputs, Hessians.
- :mod:`~lightning_clipprune.posttrain.allocation`: the per-layer sparsities.
- :mod:`~lightning_clipprune.posttrain.fallback`: weights it cannot reconstruct (attention projections,
  ``Conv3d``, ``ConvTranspose``, ...): pruned by magnitude to their share, with one warning.
- :class:`ReconstructionOptions`: the settings and their defaults, written once.

Example::

    from lightning_clipprune.posttrain import reconstruct_prune

    model, report = reconstruct_prune(model, train_loader, 0.9)  # calibration from the TRAINING split
    print(report.table())
"""

from lightning_clipprune.posttrain.allocation import ALLOCATIONS, layer_counts
from lightning_clipprune.posttrain.calibration import SUPPORTED_TYPES, collect_calibration
from lightning_clipprune.posttrain.obs import reconstruct_matrix_
from lightning_clipprune.posttrain.reconstruct import (
    DEFAULT_MAX_HESSIAN_BYTES,
    DEFAULT_NUM_SAMPLES,
    LayerReport,
    PostTrainReport,
    ReconstructionOptions,
    reconstruct_prune,
)

__all__ = [
    "ALLOCATIONS",
    "DEFAULT_MAX_HESSIAN_BYTES",
    "DEFAULT_NUM_SAMPLES",
    "SUPPORTED_TYPES",
    "LayerReport",
    "PostTrainReport",
    "ReconstructionOptions",
    "collect_calibration",
    "layer_counts",
    "reconstruct_matrix_",
    "reconstruct_prune",
]
