"""``MagnitudePruneCallback`` under ``ModelParallelStrategy`` (FSDP2): parameters are DTensors sharded along dim 0.

What changes there, all in one place:

- the masks are DTensors with the sharding of their parameters (each rank holds the mask of its rows);
- an event computes them with :func:`~lightning_clipprune.pruning.distributed.compute_masks_sharded`
  (a distributed k-th selection: no parameter is gathered), equal to the masks of one process;
- the per-step passes work on the local shards (the hot path, :class:`._prune_masking.MaskHotPath`);
- checkpoints: the state-dict keys never change (a consolidated checkpoint loads into a plain module), so the
  masks are not written at all: pruned weights are exactly zero in the checkpoint, and the callback state
  (written by rank zero) holds each tensor's pruned count; on resume the masks are read from the zeros of
  the restored shards and checked against those counts (:func:`masks_from_zeros`).

Refused with one line (:func:`refusal`, :func:`sharding_of`): criteria that need gradients or calibration data, regrowth, coupled channels,
ranking "layer_normalized", "channel" with "global" scope, transposed layouts with N:M / channel / a ceiling,
a mesh of more than one dimension, placements other than ``Shard(0)``, and a mix of sharded and plain parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_clipprune._sharded import is_sharded as is_dtensor
from lightning_clipprune._sharded import local
from lightning_clipprune.callbacks._prune_plan import OWNER
from lightning_clipprune.pruning import nonfinite_names
from lightning_clipprune.pruning.distributed import Shard, compute_masks_sharded, sharded_refusal

try:  # torch built without distributed support has no DTensor: nothing can be sharded then
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import Shard as ShardPlacement
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]


def is_model_parallel(trainer: Any) -> bool:
    """Whether the Trainer runs ``ModelParallelStrategy`` (FSDP2 / tensor parallelism over DTensors)."""
    try:
        from lightning.pytorch.strategies import ModelParallelStrategy
    except ImportError:  # pragma: no cover
        return False
    return isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy)


class Sharding:
    """The 1-D device mesh the pruned parameters are sharded over, and its collectives."""

    def __init__(self, mesh: Any) -> None:
        self.mesh = mesh
        self.group = mesh.get_group()
        self.rank = mesh.get_local_rank()
        self.world = mesh.size()

    def all_reduce(self, t: Tensor) -> None:
        torch.distributed.all_reduce(t, group=self.group)

    def shards(self, params: Mapping[str, Tensor]) -> dict[str, Shard]:
        """``{name: Shard(local rows, global shape, flat offset)}`` of the sharded parameters."""
        out = {}
        for name, p in params.items():
            _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            row = math.prod(p.shape[1:]) if p.dim() > 1 else 1
            out[name] = Shard(local(p.detach()), p.shape, int(offset[0]) * row if p.dim() else 0)
        return out

    def as_dtensor(self, mask: Tensor, like: Tensor) -> Tensor:
        """The local ``mask`` as a DTensor sharded like the parameter ``like``."""
        return DTensor.from_local(mask, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride())


def local_rows(whole: Tensor, shard: Shard) -> Tensor:
    """The rows of the whole tensor ``whole`` that ``shard`` holds (a copy, shaped like ``shard.local``)."""
    return whole.reshape(-1)[shard.offset : shard.offset + shard.local.numel()].view(shard.local.shape).clone()


def sharding_of(params: Mapping[str, Tensor]) -> Sharding | None:
    """The sharding of ``params``: None when none is a DTensor.

    Raises:
        ValueError: one line, when they mix DTensors and plain tensors, or a DTensor is not ``Shard(0)`` on a
            1-D mesh, or they lie on different meshes.
    """
    sharded = [n for n, p in params.items() if is_dtensor(p)]
    if not sharded:
        return None
    plain = [n for n in params if n not in sharded]
    bad = [n for n in sharded if params[n].device_mesh.ndim != 1 or tuple(params[n].placements) != (ShardPlacement(0),)]
    meshes = {id(params[n].device_mesh) for n in sharded}
    if plain or bad or len(meshes) > 1:
        what = (
            f"{', '.join(plain)} are not sharded while others are" if plain
            else f"{', '.join(bad)} are not sharded Shard(0) over a 1-D mesh" if bad
            else "the pruned parameters lie on different device meshes"
        )
        raise ValueError(
            f"MagnitudePruneCallback under ModelParallelStrategy prunes parameters sharded along dim 0 over one 1-D"
            f" mesh (FSDP2 `fully_shard` on the data-parallel mesh), but {what}: shard every pruned layer with"
            " `fully_shard(layer, mesh=self.device_mesh['data_parallel'])`, or leave the others out with `exclude`."
        )
    return Sharding(params[sharded[0]].device_mesh)


def refusal(cb: Any, layouts: Mapping[str, Any]) -> str | None:
    """Why ``cb`` cannot prune sharded parameters, in one line; None when it can."""
    criterion = cb._criterion
    if criterion.needs == "gradients":
        return (
            f"criterion {cb.criterion!r} ranks by a running average of the gradient, which is not yet kept per shard"
            " here: use criterion='magnitude'"
        )
    if criterion.needs == "calibration":
        return f"criterion {cb.criterion!r} (post-training reconstruction) runs on one process only: prune after `fit`"
    if cb._regrow is not None:
        return "regrowth (`regrow`) is not supported on sharded parameters yet: leave it None"
    if getattr(cb, "_couple", False):
        return "coupled channels (`couple_channels`) are traced on the whole module, not per shard: leave it False"
    return sharded_refusal(
        scope=cb.scope, pattern=cb.pattern, ranking=cb.ranking, threshold=cb.threshold, ceiling=cb._ceiling, layouts=layouts
    )


def check_supported(cb: Any, layouts: Mapping[str, Any]) -> None:
    """Raise the one-line :func:`refusal` of ``cb`` under ``ModelParallelStrategy``, if it has one.

    Raises:
        ValueError: ``"MagnitudePruneCallback under ModelParallelStrategy: <why>."``
    """
    why = refusal(cb, layouts)
    if why is not None:
        raise ValueError(f"{OWNER} under ModelParallelStrategy: {why}.")


def local_mask(sharding: Sharding, name: str, mask: Tensor, like: Tensor) -> Tensor:
    """``mask`` sharded like the parameter ``like``: a whole mask (a checkpoint of an unsharded run) cut to this
    rank's rows; a DTensor mask as it is."""
    if is_dtensor(mask):
        return mask
    return sharding.as_dtensor(local_rows(mask.to(like.device), sharding.shards({name: like})[name]), like)


def sharded_event_masks(
    cb: Any, sharding: Sharding, criterion: Any, target: float | None, layer_sparsity: Any, layouts: Mapping[str, Any]
) -> dict[str, Tensor]:
    """The new masks of an event, as DTensors sharded like their parameters (every rank calls it)."""
    params = cb._params
    masks = {n: local(m) for n, m in cb.masks.items()} if cb._active else None
    new = compute_masks_sharded(
        sharding.shards(params),
        sparsity=target,
        threshold=cb.threshold,
        scope=cb.scope,
        pattern=cb.pattern,
        criterion=criterion,
        masks=masks,
        ceiling=cb._ceiling,
        ranking=cb.ranking,
        layer_sparsity=layer_sparsity,
        layouts=layouts,
        all_reduce=sharding.all_reduce,
        rank=sharding.rank,
        world=sharding.world,
    )
    return {n: sharding.as_dtensor(m, params[n]) for n, m in new.items()}


def nonfinite_sharded(tensors: Mapping[str, Tensor], sharding: Sharding) -> list[str]:
    """The names of the (sharded) tensors holding NaN or inf on any rank; the same list on every rank."""
    names = list(tensors)
    bad = set(nonfinite_names({n: local(t) for n, t in tensors.items() if local(t).numel()}))
    flags = torch.tensor([n in bad for n in names], dtype=torch.int64)
    sharding.all_reduce(flags)
    return [n for n, f in zip(names, flags.tolist(), strict=True) if f]


def pruned_counts(cb: Any, sharding: Sharding | None) -> dict[str, int]:
    """How many entries each mask of ``cb`` prunes, over all ranks (one all-reduce when sharded)."""
    names = list(cb.masks)
    local_counts = [local(cb.masks[n]).numel() - int(local(cb.masks[n]).count_nonzero()) for n in names]
    if sharding is None:
        return dict(zip(names, local_counts, strict=True))
    counts = torch.tensor(local_counts, dtype=torch.int64)
    sharding.all_reduce(counts)
    return dict(zip(names, counts.tolist(), strict=True))


def masks_from_zeros(cb: Any, saved: Mapping[str, int], sharding: Sharding | None) -> dict[str, Tensor]:
    """The masks of a resumed sharded run: True where the restored weight is not exactly zero.

    Pruned weights are exactly ``+0.0`` in every checkpoint (they are re-zeroed at every step), so the zeros
    hold the masks: when each tensor has as many zeros as the checkpoint's pruned count (``saved``, written by
    :meth:`state_dict`), the zeros are exactly the pruned entries. Where a kept weight happens to be exactly
    zero there are more zeros than pruned entries: they are treated as pruned, with one warning (the resumed
    run may then differ from an uninterrupted one).
    """
    masks: dict[str, Tensor] = {}
    for name, p in cb._params.items():
        keep = local(p.detach()) != 0
        masks[name] = sharding.as_dtensor(keep, p) if sharding is not None else keep
    before, cb.masks = cb.masks, masks
    try:
        now = pruned_counts(cb, sharding)
    finally:
        cb.masks = before
    differ = [f"`{n}` ({now[n]} zeros, {saved.get(n)} pruned)" for n in masks if now[n] != saved.get(n)]
    if differ:
        rank_zero_warn(
            "MagnitudePruneCallback: the restored masks are read from the zeros of the sharded weights, and"
            f" {', '.join(differ)} do not match the checkpoint's pruned counts: kept weights that are exactly zero"
            " are now pruned too, so this run may differ from an uninterrupted one."
        )
    return masks
