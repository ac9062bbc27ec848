"""Calibration data and each layer's Hessian: inputs taken from a loader, seen through forward hooks.

A layer's inputs become the rows of a matrix ``X`` whose columns match its weight seen as a matrix:

- ``Linear``: ``X`` is the input with every leading dimension flattened, ``W`` is ``(out, in)``.
- Hugging Face ``Conv1D`` (GPT-2; recognised by :func:`~lightning_clipprune.pruning.wrappers.is_hf_conv1d`,
  without importing transformers): a ``Linear`` whose weight is stored ``(in, out)``; seen here as ``W^T``.
- ``Conv1d`` / ``Conv2d``: ``X`` is the unfolded (im2col) input, padded as the layer pads (``padding_mode``
  respected), one row per output position; one matrix per group (``groups``). Columns are ordered
  kernel-position-major (``k * C_in/groups + c``), so ``M`` consecutive columns are ``M`` consecutive input
  channels at one kernel position: the "N:M" groups of the rest of the suite.

The Hessian of the squared output error is ``H = 2 X^T X / n`` per group, accumulated in float32 over the
calibration batches (``n`` rows in all), never storing ``X``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_clipprune._hooks import forward_pre_hooks
from lightning_clipprune.pruning.wrappers import is_hf_conv1d

__all__ = [
    "SUPPORTED_TYPES",
    "batch_input",
    "collect_calibration",
    "hessian_shape",
    "layer_hessian",
    "reconstructable",
    "weight_from_groups",
    "weight_to_groups",
]

#: Layer types whose weight the reconstruction handles (and Hugging Face ``Conv1D``, by duck type:
#: :func:`reconstructable`).
SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
# Unfolded elements processed at once (float32: 64 MiB), so a large convolution never unfolds a whole batch.
_CHUNK_ELEMENTS = 1 << 24


def batch_input(batch: Any) -> Tensor:
    """The model input of a batch: the batch itself if a tensor, else the first element of a tuple or list.

    Raises:
        ValueError: for anything else (pass ``forward=`` to ``reconstruct_prune`` for other batch shapes).

    Example::

        >>> batch_input((torch.zeros(2, 3), torch.tensor([0, 1]))).shape
        torch.Size([2, 3])
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    what, get = type(batch).__name__, "b"
    if isinstance(batch, (tuple, list)) and batch:
        what, get = f"a {what} whose first element is a {type(batch[0]).__name__}", "b[0]"
    inner = batch if get == "b" else batch[0]
    if isinstance(inner, dict):  # the example names a real key of this batch, reached the way this batch nests it
        key = next(iter(inner), "x")
        example = (
            f"e.g. `lambda b: {get}[{key!r}]`) and `forward=` (model, that tensor -> output, e.g."
            f" `lambda m, x: m({{{key!r}: x}})`)"
        )
    else:
        example = (
            f"e.g. `lambda b: {get}.input`) and, if the model does not take that tensor alone, `forward=`"
            " (model, that tensor -> output)"
        )
    raise ValueError(
        f"a calibration batch must be a tensor or an (inputs, ...) tuple of tensors, got {what}: give"
        f" `reconstruct_prune` `inputs=` (batch -> the input tensor, {example}, or a loader of (tensor, label) pairs"
    )


def _check_finite(x: Tensor, where: str) -> None:
    """Refuse NaN or inf in calibration data (one host read): they would poison every Hessian after them.

    Raises:
        ValueError: naming ``where`` and the fix.
    """
    if x.dtype.is_floating_point and not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{where} holds NaN or inf values: clean the calibration data (drop those samples, or"
            " `torch.nan_to_num`), the layer-wise reconstruction needs finite inputs"
        )


def collect_calibration(
    loader: Iterable[Any], num_samples: int, seed: int = 0, inputs: Callable[[Any], Tensor] = batch_input
) -> list[Tensor]:
    """The first ``num_samples`` samples of ``loader``, in its order, as a list of input batches.

    The loader is iterated once, under ``torch.manual_seed(seed)`` in a forked random state (a shuffling
    loader gives the same batches for the same seed; the caller's random state is left as it was). The
    last batch is cut to reach ``num_samples`` exactly.

    Raises:
        ValueError: when the loader yields no sample, or a sample holds NaN or inf (which batch).

    Example::

        >>> batches = collect_calibration([torch.ones(4, 2), torch.ones(4, 2)], num_samples=6)
        >>> [b.shape[0] for b in batches]
        [4, 2]
    """
    out: list[Tensor] = []
    taken = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for batch in loader:
            x = inputs(batch).detach()
            take = min(x.shape[0], num_samples - taken)
            _check_finite(x[:take], f"calibration batch {len(out)} (samples {taken} .. {taken + take - 1})")
            out.append(x[:take])
            taken += take
            if taken >= num_samples:
                break
    if taken == 0:
        raise ValueError(
            "the calibration loader yielded no sample: give a loader over (part of) the training split."
        )
    if taken < num_samples:
        warnings.warn(
            f"the calibration loader gave {taken} samples, fewer than num_samples={num_samples}: using {taken}",
            stacklevel=2,
        )
    return out


def reconstructable(module: Any) -> bool:
    """Whether the reconstruction handles ``module``'s weight: :data:`SUPPORTED_TYPES` or a Hugging Face ``Conv1D``."""
    return isinstance(module, SUPPORTED_TYPES) or (isinstance(module, nn.Module) and is_hf_conv1d(module))


def _matrix_like(module: nn.Module) -> bool:
    """A layer whose input is a matrix product's (``Linear``, ``Conv1D``): no unfolding."""
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def hessian_shape(module: nn.Module) -> tuple[int, int]:
    """``(groups, columns per group)`` of the layer's Hessians: ``groups * cols^2 * 4`` bytes in float32.

    Example::

        >>> hessian_shape(nn.Conv2d(8, 16, 3, groups=2))
        (2, 36)
    """
    weight = module.weight
    if is_hf_conv1d(module):  # (in, out)
        return 1, weight.shape[0]
    groups = getattr(module, "groups", 1)
    return groups, math.prod(weight.shape[1:])


def weight_to_groups(module: nn.Module, weight: Tensor) -> Tensor:
    """The weight as ``(groups, out / groups, columns)`` float32, columns kernel-position-major (a copy).

    Example::

        >>> conv = nn.Conv2d(4, 6, 3, groups=2)
        >>> weight_to_groups(conv, conv.weight).shape
        torch.Size([2, 3, 18])
    """
    if is_hf_conv1d(module):  # stored (in, out): the (out, in) matrix is its transpose
        return weight.detach().float().t().unsqueeze(0).clone()
    g = getattr(module, "groups", 1)
    out, c = weight.shape[:2]
    k = math.prod(weight.shape[2:])
    w = weight.detach().float().reshape(g, out // g, c, k).transpose(2, 3)
    return w.reshape(g, out // g, k * c).clone()


def weight_from_groups(module: nn.Module, grouped: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`weight_to_groups`: the ``(groups, out / groups, columns)`` matrix back in ``shape``."""
    if is_hf_conv1d(module):
        return grouped.reshape(shape[1], shape[0]).t()
    out, c = shape[:2]
    k = math.prod(shape[2:])
    return grouped.reshape(out, k, c).transpose(1, 2).reshape(shape)


def _conv_columns(module: nn.Module, x: Tensor) -> Tensor:
    """The unfolded input of a ``Conv1d``/``Conv2d`` as ``(groups, rows, columns)``, kernel-position-major."""
    spatial = 1 if isinstance(module, nn.Conv1d) else 2
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if spatial == 1:
        x, kernel, dilation, stride = x.unsqueeze(2), (1, *kernel), (1, *dilation), (1, *stride)
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (B, C * K, L), channel-major
    b, _, positions = cols.shape
    g, c, k = module.groups, module.in_channels // module.groups, math.prod(kernel)
    cols = cols.reshape(b, g, c, k, positions).permute(1, 0, 4, 3, 2)  # (g, B, L, K, C/g)
    return cols.reshape(g, b * positions, k * c)


def _columns(module: nn.Module, x: Tensor, bias: bool) -> Tensor:
    cols = x.reshape(1, -1, x.shape[-1]) if _matrix_like(module) else _conv_columns(module, x)
    if bias:  # the bias is the weight of a constant input 1: one more column, never pruned
        cols = torch.cat([cols, cols.new_ones(*cols.shape[:2], 1)], dim=2)
    return cols


def _chunks(module: nn.Module, x: Tensor) -> tuple[Tensor, ...]:
    """``x`` (batched or not) cut along its batch so one chunk unfolds to about ``_CHUNK_ELEMENTS`` values."""
    x = x.detach().float()
    unbatched = 1 if _matrix_like(module) else (2 if isinstance(module, nn.Conv1d) else 3)
    if x.dim() == unbatched:
        x = x.unsqueeze(0)
    per_sample = x[0].numel() * math.prod(getattr(module, "kernel_size", (1,)))
    return x.split(max(1, _CHUNK_ELEMENTS // max(1, per_sample)))


class _Statistics:
    """Running ``X^T X`` (and ``X_ref^T X`` against a reference model's inputs) of one layer, from hooks."""

    def __init__(self, module: nn.Module, bias: bool, cross: bool) -> None:
        groups, cols = hessian_shape(module)
        cols += int(bias)
        device = module.weight.device
        self.module, self.bias, self.rows = module, bias, 0
        self.hessian = torch.zeros(groups, cols, cols, dtype=torch.float32, device=device)
        self.cross = torch.zeros_like(self.hessian) if cross else None
        self.reference: list[Tensor] = []

    def record(self, _mod: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook on the reference model's layer: keep its input for the next :meth:`add`."""
        self.reference.append(args[0].detach())

    def add(self, _mod: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook on the layer: fold its input (paired with the reference one) into the sums."""
        ref = _chunks(self.module, self.reference.pop(0)) if self.cross is not None else None
        for i, chunk in enumerate(_chunks(self.module, args[0])):
            cols = _columns(self.module, chunk, self.bias)
            self.hessian.baddbmm_(cols.transpose(1, 2), cols)
            if ref is not None:
                self.cross.baddbmm_(_columns(self.module, ref[i], self.bias).transpose(1, 2), cols)
            self.rows += cols.shape[1]


def layer_hessian(
    model: nn.Module,
    module: nn.Module,
    batches: list[Tensor],
    forward: Callable[[nn.Module, Tensor], Any],
    name: str = "the layer",
    *,
    bias: bool = False,
    reference: tuple[nn.Module, nn.Module] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``H = 2 X^T X / n`` (``(groups, c, c)``, float32) of ``module``'s inputs over a forward pass of ``batches``.

    The whole model runs (eval mode is the caller's), so the inputs come through the layers before it as
    they are now (already pruned ones included). A layer called several times per forward counts every call.

    Args:
        bias: append a constant column 1 (the layer's bias as one more, last, input).
        reference: ``(reference model, its copy of the layer)``, e.g. the dense model: also return
            ``G = 2 X_ref^T X / n``, the reference inputs against these ones (None: ``G`` is None).

    Raises:
        ValueError: when the layer received no input (it is not on the forward path), or its inputs hold NaN
            or inf (made by the layers before it: the calibration data was checked when collected).
    """
    stats = _Statistics(module, bias, reference is not None)
    device = module.weight.device
    hooks = [(module, stats.add)] + ([] if reference is None else [(reference[1], stats.record)])
    with forward_pre_hooks(hooks), torch.no_grad():
        for x in batches:
            if reference is not None:
                forward(reference[0], x.to(device))
            forward(model, x.to(device))
    if stats.rows == 0:
        raise ValueError(
            f"`{name}` received no input on the calibration batches: leave it dense with `exclude=[{name!r}]`."
        )
    if not bool(torch.isfinite(stats.hessian).all()):  # one host read per layer
        raise ValueError(
            f"the inputs of `{name}` on the calibration batches hold NaN or inf (made by the layers before it, or"
            " overflowing float32; `reconstruct_prune` checked the data itself): check those layers' weights and"
            f" outputs, or leave `{name}` dense with `exclude=[{name!r}]`"
        )
    scale = 2.0 / stats.rows
    return stats.hessian.mul_(scale), None if stats.cross is None else stats.cross.mul_(scale)
