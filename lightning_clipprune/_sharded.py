"""Sharded tensors (DTensor, as FSDP2's ``fully_shard`` and Lightning's ``ModelParallelStrategy`` make them):
each rank's local shard, and global norms and counts reduced from the shards without gathering a tensor.

DESIGN rule 14: norms and counts are global, nothing gathers a full parameter on one rank. Each rank computes
on its local shard (``DTensor.to_local()``, a view of the shard: in-place ops on it change the DTensor) and one
``all_reduce`` of a small vector, one entry per tensor, over the default process group combines the ranks.

A rank's shard counts toward a global sum once: on a mesh dimension where the tensor is ``Replicate`` every
rank along it holds the same values, so only coordinate 0 along it contributes (otherwise a tensor-parallel
bias would be counted once per tensor-parallel rank). A plain tensor among DTensors is taken as replicated
and counted by global rank 0. A ``Partial`` placement (a gradient not reduced yet) cannot be counted shard by
shard and raises. Every mesh must span all ranks of the default group (what ``ModelParallelStrategy``
builds), so that the one ``all_reduce`` sees every shard.

No Lightning import here. Without DTensors in the list every function is the plain single-tensor computation
and runs no collective; with them, every rank must call it with the same tensors in the same order (as the
hooks of a callback do), since each call is one collective.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "any_sharded",
    "counts_here",
    "global_counts",
    "global_norms",
    "is_rank_zero",
    "is_sharded",
    "local",
    "local_norms",
    "reduce_norm_parts",
]


@cache
def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support: no DTensor can exist
        return None
    return DTensor


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter or gradient under FSDP2 / ``ModelParallelStrategy``)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def any_sharded(tensors: Iterable[Any]) -> bool:
    """Whether any of ``tensors`` is a DTensor."""
    cls = _dtensor_class()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view: in-place ops change the DTensor); any other tensor as it is.

    Taken outside autograd, so that in-place masking of a parameter's shard is allowed.
    """
    if not is_sharded(tensor):
        return tensor
    with torch.no_grad():
        return tensor.to_local()


def _check_mesh(tensor: Any) -> None:
    import torch.distributed as dist

    mesh = tensor.device_mesh
    if mesh.size() != dist.get_world_size():
        raise ValueError(
            f"a DTensor of shape {tuple(tensor.shape)} lives on a device mesh of {mesh.size()} ranks out of "
            f"{dist.get_world_size()}: global norms and counts need every mesh to span all ranks (as "
            "ModelParallelStrategy's data- and tensor-parallel mesh does)"
        )


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 (True without an initialised process group)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def counts_here(tensor: Any) -> bool:
    """Whether this rank's shard of ``tensor`` is the one counted in a sum over all ranks (see the module doc).

    Raises:
        ValueError: the tensor has a ``Partial`` placement, or its mesh does not span every rank.
    """
    if not is_sharded(tensor):
        return is_rank_zero()
    _check_mesh(tensor)
    mesh = tensor.device_mesh
    for dim, placement in enumerate(tensor.placements):
        if placement.is_shard():
            continue
        if placement.is_partial():
            raise ValueError(
                f"a DTensor of shape {tuple(tensor.shape)} has the placement {tensor.placements}: a Partial "
                "(not yet reduced) tensor cannot be measured shard by shard"
            )
        if mesh.get_local_rank(dim) != 0:  # Replicate along this mesh dimension: counted by coordinate 0 only
            return False
    return True


def reduce_norm_parts(parts: Tensor, norm_type: float) -> Tensor:
    r"""Combine each rank's partial p-norms entry by entry: ``out[i] = ||(parts_r[i])_r||_p`` over the ranks ``r``.

    ``parts`` (1-d, one entry per slot) holds this rank's p-norm of its counted pieces of each slot (0 for a
    piece it does not count). For finite p the p-th powers are summed (in float64 where the device has it),
    for ``inf`` the maxima are taken; a NaN on any rank gives NaN on every rank (a flag travels with the
    maxima, since a MAX reduction does not order NaN), so a non-finite step is seen identically everywhere.
    One ``all_reduce`` over the default process group.

    Returns:
        The global norms, ``parts``' shape, dtype and device, identical on every rank.
    """
    import torch.distributed as dist

    p = float(norm_type)
    if math.isinf(p):
        nan = torch.isnan(parts)
        buf = torch.cat((torch.where(nan, torch.zeros_like(parts), parts), nan.to(parts.dtype)))
        dist.all_reduce(buf, op=dist.ReduceOp.MAX)
        values, flags = buf.split(parts.numel())
        return torch.where(flags > 0, torch.full_like(values, math.nan), values)
    wide = torch.float32 if parts.device.type == "mps" else torch.float64
    buf = parts.to(wide).pow(p)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.pow(1.0 / p).to(parts.dtype)


#: Devices where ``torch._foreach_norm`` and the other foreach kernels run.
FOREACH_DEVICE_TYPES = frozenset({"cpu", "cuda", "xpu"})


def local_norms(tensors: Sequence[Tensor], norm_type: float) -> Tensor:
    """The p-norm of each tensor (of each DTensor's local shard), stacked in the order given on the first
    tensor's device: one foreach kernel per (device, dtype) group. No collective."""
    shards = [local(t) for t in tensors]
    first = shards[0].device
    norms: list[Tensor] = list(shards)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(shards):
        groups.setdefault((t.device, t.dtype), []).append(i)
    for (device, _), index in groups.items():
        group = [shards[i] for i in index]
        if device.type in FOREACH_DEVICE_TYPES:
            group_norms = torch._foreach_norm(group, norm_type)
        else:
            group_norms = [torch.linalg.vector_norm(t, norm_type) for t in group]
        for i, n in zip(index, group_norms, strict=True):
            norms[i] = n.to(first)
    return torch.stack(norms)


def global_norms(tensors: Sequence[Tensor], norm_type: float) -> Tensor:
    """The p-norm of each whole tensor (all shards), one ``all_reduce`` for all of them.

    Args:
        tensors: DTensors (and plain tensors, taken as replicated), the same list on every rank.
        norm_type: p, > 0; ``float("inf")`` for the max-norm.

    Returns:
        A 1-d tensor, one norm per tensor, identical on every rank.
    """
    p = float(norm_type)
    norms = local_norms(tensors, p)
    counted = torch.tensor([counts_here(t) for t in tensors], device=norms.device)
    return reduce_norm_parts(torch.where(counted, norms, torch.zeros_like(norms)), p)


def global_counts(local_counts: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """Sum per-tensor counts over the ranks (``local_counts[i]`` counted on ``tensors[i]``'s local shard).

    Without a DTensor in ``tensors`` the counts are returned as they are (no collective).

    Returns:
        ``local_counts`` summed over the ranks (each shard counted once), identical on every rank.
    """
    if not any_sharded(tensors):
        return local_counts
    import torch.distributed as dist

    counted = torch.tensor([counts_here(t) for t in tensors], device=local_counts.device)
    buf = torch.where(counted, local_counts, torch.zeros_like(local_counts))
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf
