"""2:4 semi-structured sparsity for CUDA inference: ``torch.sparse.to_sparse_semi_structured`` on pruned ``Linear`` s.

This is the one module that reads torch private internals (the backend's minimum block shapes, in
:func:`_semi_structured_constraints`); when they move, only it changes, and it falls back to the published
CUTLASS minimums.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["is_n_m_sparse", "to_semi_structured"]




def is_n_m_sparse(tensor: Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every group of ``m`` consecutive elements along the last dimension has at most ``n`` non-zeros.

    That is the layout ``torch.sparse.to_sparse_semi_structured`` needs for ``n=2, m=4`` (along the
    input dimension of a ``Linear`` weight). A last dimension that is not a multiple of ``m`` is not.

    Example::

        >>> is_n_m_sparse(torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]]))
        True
        >>> is_n_m_sparse(torch.tensor([[1.0, 1.0, 2.0, 0.0]]))
        False
    """
    if tensor.dim() == 0 or tensor.shape[-1] % m:
        return False
    groups = (tensor.detach() != 0).reshape(-1, m)
    return bool((groups.sum(dim=1) <= n).all())


def _semi_structured_constraints() -> dict[torch.dtype, tuple[int, int]]:
    """``{dtype: (min_rows, min_cols)}`` of the backend ``to_sparse_semi_structured`` will use."""
    try:
        from torch.sparse import semi_structured as ss

        cls = (
            ss.SparseSemiStructuredTensorCUTLASS
            if ss.SparseSemiStructuredTensor._FORCE_CUTLASS
            else ss.SparseSemiStructuredTensorCUSPARSELT
        )
        return {
            dt: (c.sparse_min_rows, c.sparse_min_cols)
            for dt, c in cls._DTYPE_SHAPE_CONSTRAINTS.items()
            if dt in (torch.float16, torch.bfloat16, torch.int8)
        }
    except (ImportError, AttributeError):  # a torch without these internals: the CUTLASS minimums
        return {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.int8: (32, 128)}


def _select_linears(module: nn.Module, names: Sequence[str] | None) -> tuple[dict[str, nn.Linear], list[str], list[str]]:
    """The ``Linear`` layers to convert: those named (each checked) or, by default, every 2:4-sparse one.

    Returns:
        ``(every Linear by name, the names to convert, one problem line per named layer that cannot be)``.

    Raises:
        ValueError: nothing is named and no ``Linear`` weight follows the 2:4 pattern.
    """
    linears = {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    value_problems: list[str] = []
    if names is None:
        candidates = [n for n, m in linears.items() if is_n_m_sparse(m.weight)]
        if not candidates:
            raise ValueError(
                f"no Linear weight in {type(module).__name__} follows the 2:4 pattern (at most 2 non-zeros in "
                "every 4 along the input dimension); prune with MagnitudePruneCallback(pattern='2:4') first"
            )
    else:
        candidates = []
        all_modules = dict(module.named_modules())
        for raw in names:
            name = raw.removesuffix(".weight")
            if name not in all_modules:
                value_problems.append(f"{raw!r}: no such submodule")
            elif name not in linears:
                value_problems.append(f"{raw!r}: a {type(all_modules[name]).__name__}, not a Linear")
            elif not is_n_m_sparse(linears[name].weight):
                value_problems.append(f"{raw!r}: the weight does not follow the 2:4 pattern")
            else:
                candidates.append(name)
    return linears, candidates, value_problems


def to_semi_structured(module: nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """Convert 2:4-sparse ``Linear`` weights to ``torch.sparse.to_sparse_semi_structured``, in place, for inference.

    Sparse tensor cores need a CUDA GPU of compute capability 8.0 or newer (Ampere, Hopper, ...), a
    half-precision weight (float16 or bfloat16; int8 works too) whose both dimensions are multiples of the
    backend's minimum block, and at most 2 non-zeros in every group of 4 along the input dimension
    (``MagnitudePruneCallback(pattern="2:4")``). Every problem is collected and reported in one message
    before anything is changed. The converted weights no longer train.

    Args:
        module: the network, already on the GPU and in its inference dtype (``model.half().cuda()``).
        names: the ``Linear`` submodules to convert, by module name (``"fc1"``; ``"fc1.weight"`` also
            accepted). ``None``: every ``Linear`` whose weight follows the 2:4 pattern (the others,
            such as layers kept dense, are left alone).

    Returns:
        The names of the converted modules.

    Raises:
        ValueError: a named module is not a ``Linear`` or not 2:4 sparse, no ``Linear`` is 2:4 sparse, or a
            dtype or shape is not supported (one line per problem).
        RuntimeError: CUDA is not available, a weight is not on a CUDA device, or the device's compute
            capability is below 8.0 (with any dtype or shape problems in the same message).

    Example::

        model = model.half().cuda().eval()
        converted = to_semi_structured(model)
    """
    linears, candidates, value_problems = _select_linears(module, names)
    constraints = _semi_structured_constraints()
    allowed = ", ".join(str(d).removeprefix("torch.") for d in constraints)
    device_problems: list[str] = []
    if not torch.cuda.is_available():
        device_problems.append(
            "CUDA is not available: 2:4 semi-structured sparsity needs a CUDA GPU of compute capability 8.0 or newer"
        )
    for name in candidates:
        weight = linears[name].weight
        if weight.dtype not in constraints:
            value_problems.append(
                f"{name!r}: dtype {str(weight.dtype).removeprefix('torch.')} is not supported (supported: {allowed}); "
                "convert the model first, for example model.half()"
            )
        else:
            rows, cols = constraints[weight.dtype]
            out_f, in_f = weight.shape
            if out_f % rows or in_f % cols:
                value_problems.append(
                    f"{name!r}: shape {out_f}x{in_f} is not supported: out_features must be a multiple of {rows} "
                    f"and in_features a multiple of {cols} for {str(weight.dtype).removeprefix('torch.')}"
                )
        if torch.cuda.is_available():
            if weight.device.type != "cuda":
                device_problems.append(f"{name!r}: the weight is on {weight.device}; move the model to a CUDA device")
            else:
                major, minor = torch.cuda.get_device_capability(weight.device)
                if (major, minor) < (8, 0):
                    device_problems.append(
                        f"{name!r}: {torch.cuda.get_device_name(weight.device)} has compute capability "
                        f"{major}.{minor}; 2:4 semi-structured sparsity needs 8.0 or newer"
                    )
    problems = list(dict.fromkeys(device_problems + value_problems))
    if problems:
        message = "cannot convert to 2:4 semi-structured sparsity:\n  " + "\n  ".join(problems)
        raise (RuntimeError if device_problems else ValueError)(message)

    from torch.sparse import to_sparse_semi_structured

    for name in candidates:
        lin = linears[name]
        lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight.detach().contiguous()), requires_grad=False)
    return candidates
