"""The "obs" criterion: layer-wise reconstruction as a criterion that needs calibration data.

``MagnitudePruneCallback(sparsity=0.9, criterion="obs", schedule="oneshot", start=1.0)`` prunes after
training, without retraining: at the end of ``fit`` the callback hands this criterion the module and the
TRAINING loader (never validation or test), and :func:`~lightning_clipprune.posttrain.reconstruct_prune`
prunes the callback's parameters in place and updates their kept weights. The masks are the zeros it left.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from torch import Tensor, nn

from lightning_clipprune.posttrain.reconstruct import ReconstructionOptions, reconstruct_prune
from lightning_clipprune.pruning.criteria import Criterion, register_criterion

__all__ = ["Reconstruction"]


class Reconstruction(Criterion):
    """SparseGPT / OBS reconstruction (:func:`~lightning_clipprune.posttrain.reconstruct_prune`) as a criterion.

    Args:
        options: the settings (:class:`~lightning_clipprune.posttrain.ReconstructionOptions`; default: its
            defaults, the ones of :func:`~lightning_clipprune.posttrain.reconstruct_prune`).
        **overrides: single fields of ``options`` by name (``num_samples=512``, ``progress=False``, ...).

    Raises:
        TypeError: an override that is not a field of :class:`ReconstructionOptions`.

    ``score`` is ``|w|``: after :meth:`calibrate` the pruned entries are exactly 0, so magnitude ranks them
    first. The last report is kept in :attr:`report`.

    Example::

        >>> import torch
        >>> net = nn.Sequential(nn.Linear(8, 8))
        >>> masks = Reconstruction(progress=False, num_samples=32).calibrate(
        ...     net, [torch.randn(32, 8)], {"0.weight": net[0].weight}, 0.5, "unstructured")
        >>> int((~masks["0.weight"]).sum())
        32
    """

    name = "obs"
    needs = "calibration"

    def __init__(self, options: ReconstructionOptions | None = None, **overrides: Any) -> None:
        self.options = replace(options or ReconstructionOptions(), **overrides)
        self.report: Any = None

    def score(self, name: str, weight: Tensor) -> Tensor:
        w = weight.detach()
        return w.float().abs() if w.dtype.is_floating_point and w.element_size() < 4 else w.abs()

    def calibrate(
        self,
        module: nn.Module,
        loader: Iterable[Any],
        params: Mapping[str, Tensor],
        sparsity: float | None,
        pattern: str,
    ) -> dict[str, Tensor]:
        """Prune ``params`` (``{name in module: parameter}``) in place on batches of ``loader``; return the keep-masks."""
        _, self.report = reconstruct_prune(
            module, loader, sparsity, pattern=pattern, include=list(params), **self.options.as_kwargs()
        )
        return {n: p.detach() != 0 for n, p in params.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(allocation={self.options.allocation!r}, num_samples={self.options.num_samples})"


register_criterion("obs", Reconstruction)
