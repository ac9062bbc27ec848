"""Pure pruning core: which parameters, importance criteria, rankings and budgets, masks, applying them.

No Lightning import here: everything is tested on hand-built tensors and modules. One module per job:

- :mod:`~lightning_clipprune.pruning.selection`: which parameters are prunable and how each weight stores
  its channels (layouts, a registry: :func:`register_layout`).
- :mod:`~lightning_clipprune.pruning.wrappers`: layer types known by shape (Hugging Face ``Conv1D``) and
  the wrappers seen through (weight norm, LoRA) or left dense with a reason (other parametrisations).
- :mod:`~lightning_clipprune.pruning.coverage`: what is left dense and why (:func:`dense_modules`).
- :mod:`~lightning_clipprune.pruning.criteria`: importance criteria as objects (:class:`Magnitude`,
  :class:`Taylor`, your own: :func:`register_criterion`).
- :mod:`~lightning_clipprune.pruning.ranking`: scores, rankings, per-layer budgets, the ceiling, and the
  defaults shared by every entry point (:data:`DEFAULT_RANKING`, ``max_layer_sparsity="auto"``).
- :mod:`~lightning_clipprune.pruning.masks`: keep-masks per pattern (:func:`compute_masks`).
- :mod:`~lightning_clipprune.pruning.coupling`: output channels that residual additions couple across
  layers (:func:`channel_groups`, traced by the optional Torch-Pruning), pruned together by "channel".
- :mod:`~lightning_clipprune.pruning.apply`: applying masks in place (exact ``+0.0``) and keeping
  optimizer state clean.

Every name that ``lightning_clipprune.pruning`` offered as one module is importable from here.
"""

from lightning_clipprune.pruning.apply import (
    ZERO_KEEPING_OPTIMIZERS,
    apply_masks_,
    keeps_pruned_weights_zero,
    mask_factors,
    mask_optimizer_state_,
    nonfinite_names,
)
from lightning_clipprune.pruning.coupling import (
    COUPLE_INSTALL,
    ChannelGroup,
    TraceError,
    all_groups,
    channel_groups,
    check_channel_groups,
    torch_pruning_available,
)
from lightning_clipprune.pruning.coverage import LOW_SHARE, DenseModule, dense_modules, prunable_share
from lightning_clipprune.pruning.criteria import (
    CRITERIA,
    NEEDS,
    Criterion,
    CriterionProtocol,
    Magnitude,
    Taylor,
    criterion_names,
    importance,
    make_criterion,
    register_criterion,
)
from lightning_clipprune.pruning.masks import (
    PATTERNS,
    SCOPES,
    check_layer_sparsity,
    check_pattern_fits,
    compute_masks,
    nm_candidates,
    parse_pattern,
    resolve_layer_sparsity,
)
from lightning_clipprune.pruning.ranking import (
    BUDGET_RANKINGS,
    CEILING,
    DEFAULT_MAX_LAYER_SPARSITY,
    DEFAULT_RANKING,
    RANKINGS,
    erk_counts,
    keep_mask_by_count,
    kth_smallest,
    layer_cap,
    most_under_ceiling,
    resolve_max_layer_sparsity,
    uses_budgets,
)
from lightning_clipprune.pruning.saturation import saturated_layers
from lightning_clipprune.pruning.selection import (
    ATTENTION_WEIGHTS,
    PRUNABLE_TYPES,
    STANDARD_LAYOUT,
    TRANSPOSED_TYPES,
    Layout,
    check_not_torch_pruned,
    check_prunable_kinds,
    frozen_names,
    layout_of,
    matrix_shape,
    output_rows,
    register_layout,
    rows_to_mask,
    select_prunable_parameters,
    tied_names,
    uninitialized_names,
    weight_layouts,
)
from lightning_clipprune.pruning.wrappers import is_hf_conv1d

__all__ = [
    "ATTENTION_WEIGHTS",
    "BUDGET_RANKINGS",
    "CEILING",
    "COUPLE_INSTALL",
    "CRITERIA",
    "DEFAULT_MAX_LAYER_SPARSITY",
    "DEFAULT_RANKING",
    "LOW_SHARE",
    "NEEDS",
    "PATTERNS",
    "PRUNABLE_TYPES",
    "RANKINGS",
    "SCOPES",
    "STANDARD_LAYOUT",
    "TraceError",
    "TRANSPOSED_TYPES",
    "ZERO_KEEPING_OPTIMIZERS",
    "ChannelGroup",
    "Criterion",
    "CriterionProtocol",
    "DenseModule",
    "Layout",
    "Magnitude",
    "Taylor",
    "apply_masks_",
    "all_groups",
    "channel_groups",
    "check_channel_groups",
    "check_layer_sparsity",
    "check_not_torch_pruned",
    "check_prunable_kinds",
    "check_pattern_fits",
    "compute_masks",
    "criterion_names",
    "dense_modules",
    "erk_counts",
    "frozen_names",
    "importance",
    "is_hf_conv1d",
    "keep_mask_by_count",
    "keeps_pruned_weights_zero",
    "kth_smallest",
    "layer_cap",
    "most_under_ceiling",
    "layout_of",
    "make_criterion",
    "mask_factors",
    "mask_optimizer_state_",
    "matrix_shape",
    "nm_candidates",
    "nonfinite_names",
    "output_rows",
    "parse_pattern",
    "prunable_share",
    "register_criterion",
    "register_layout",
    "resolve_layer_sparsity",
    "resolve_max_layer_sparsity",
    "rows_to_mask",
    "saturated_layers",
    "select_prunable_parameters",
    "tied_names",
    "torch_pruning_available",
    "uninitialized_names",
    "uses_budgets",
    "weight_layouts",
]
