"""The "obs" criterion: layer-wise reconstruction as a criterion that needs calibration data.

``MagnitudePruneCallback(sparsity=0.9, criterion="obs", schedule="oneshot", start=1.0)`` prunes after
training, without retraining: at the end of ``fit`` the callback hands this criterion the module and the
TRAINING loader (never validation or test), and :func:`~lightning_clipprune.posttrain.reconstruct_prune`
prunes the callback's parameters in place and updates their kept weights. The masks are the zeros it left.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from torch import Tensor, nn

from lightning_clipprune.posttrain.calibration import batch_input
from lightning_clipprune.posttrain.reconstruct import ReconstructionOptions, reconstruct_prune
from lightning_clipprune.pruning.criteria import Criterion, register_criterion

__all__ = ["Reconstruction"]


class Reconstruction(Criterion):
    """SparseGPT / OBS reconstruction (:func:`~lightning_clipprune.posttrain.reconstruct_prune`) as a criterion.

    Args:
        options: the settings (:class:`~lightning_clipprune.posttrain.ReconstructionOptions`; default: its
            defaults, the ones of :func:`~lightning_clipprune.posttrain.reconstruct_prune`).
        inputs: batch -> the model's input tensor, for batches other than a tensor or an ``(inputs, ...)``
            tuple (a dict: ``lambda b: b["x"]``), as in ``reconstruct_prune``.
        forward: (model, that tensor) -> output, when the model does not take the tensor alone
            (``lambda m, x: m({"x": x})``), as in ``reconstruct_prune``.
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

    def __init__(
        self,
        options: ReconstructionOptions | None = None,
        *,
        inputs: Callable[[Any], Tensor] = batch_input,
        forward: Callable[[nn.Module, Tensor], Any] | None = None,
        **overrides: Any,
    ) -> None:
        self.options = replace(options or ReconstructionOptions(), **overrides)
        self.inputs, self.forward = inputs, forward
        self.report: Any = None

    def check_batch(self, batch: Any) -> None:
        """Raise at the first training batch, not after the whole fit, when the calibration cannot read it.

        Raises:
            ValueError: naming the batch's type and ``Reconstruction(inputs=..., forward=...)``.
        """
        try:
            x = self.inputs(batch)
        except Exception as err:  # a user's `inputs` may raise anything: say which batch it could not read
            why = "" if self.inputs is batch_input else f" (`inputs` raised {type(err).__name__}: {err})"
            raise ValueError(
                f"criterion {self!r} calibrates at the end of training on the training loader's batches, and cannot"
                f" read this loader's {type(batch).__name__} batches{why}. Give the criterion"
                " `Reconstruction(inputs=..., forward=...)`: inputs maps a batch to the input tensor (a dict:"
                " `lambda b: b['x']`), forward runs the model on it (`lambda m, x: m({'x': x})`)."
            ) from None
        if not isinstance(x, Tensor):
            raise ValueError(f"criterion {self!r}: `inputs` must return the input tensor, got a {type(x).__name__}.")

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
            module, loader, sparsity, pattern=pattern, include=list(params), inputs=self.inputs, forward=self.forward,
            **self.options.as_kwargs(),
        )
        return {n: p.detach() != 0 for n, p in params.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(allocation={self.options.allocation!r}, num_samples={self.options.num_samples})"


register_criterion("obs", Reconstruction)
