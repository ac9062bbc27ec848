"""Which Lightning strategies the callbacks support, and one clear refusal for the others.

The callbacks read whole parameters and gradients on each rank. That is right where every rank holds a full
replica (one device, DDP and its ``spawn``/``fork``/``notebook`` launchers, XLA's data parallelism) and wrong
where each rank holds a shard that the callbacks cannot see as one (FSDP1's flat parameters, DeepSpeed ZeRO):
a clip norm of the local shard is too small and differs between ranks, a "global" magnitude ranking ranks one
shard, a count counts one shard. Those strategies are refused in ``setup()`` before any step runs, never
trained with wrong numbers.

``ModelParallelStrategy`` (FSDP2: ``fully_shard`` in ``configure_model``, parameters as DTensors sharded on dim
0) is supported for the roles in :data:`_MODEL_PARALLEL_SUPPORTED`: each rank computes on its DTensor shards
and norms and counts are all-reduced (:mod:`lightning_clipprune._sharded`), never gathered. With tensor
parallelism (``tensor_parallel_size > 1``; the default ``"auto"`` is every device of a node) only the roles in
:data:`_TENSOR_PARALLEL_SUPPORTED` run: clip (each ``Shard``/``Replicate`` piece counted once; AGC refuses
weights sharded off dim 0 at the first step, one line) and log.

========================  =========  =========  =========
strategy                  clip       prune      log
========================  =========  =========  =========
SingleDevice(XLA)         yes        yes        yes
DDP (spawn/fork/notebook) yes        yes        yes
XLA (data parallel)       yes        yes        yes
DeepSpeed ZeRO 1/2        refused    refused    yes
DeepSpeed ZeRO 3          refused    refused    refused
FSDP (FSDP1)              refused    refused    refused
ModelParallel, TP size 1  yes        yes (**)   yes
ModelParallel, TP size >1 yes (*)    refused    yes
any other strategy        refused    refused    refused
========================  =========  =========  =========

(*) AGC raises at the first step on a weight sharded off dim 0 (``RowwiseParallel``'s ``Shard(1)``).
(**) magnitude or threshold pruning by a distributed k-th selection; criteria "taylor" and "obs", ``regrow``,
ranking "layer_normalized" and "channel" with "global" scope are refused at setup, in one line
(:mod:`lightning_clipprune.callbacks._prune_sharded`).

Each callback calls :func:`check_strategy` first thing in ``setup()``. Strategy classes are imported lazily
and defensively: a Lightning build without one of them (or without DeepSpeed or torch_xla installed) still
imports this module, and an instance of a class that cannot be imported cannot exist.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Literal

from lightning.pytorch.utilities.exceptions import MisconfigurationException

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["ROLES", "Role", "check_model_sharded", "check_strategy", "strategy_refusal"]

Role = Literal["clip", "prune", "log"]
#: The callback roles :func:`check_strategy` knows: GradientClipCallback, MagnitudePruneCallback, SparsityLogger.
ROLES: tuple[str, ...] = ("clip", "prune", "log")

_DDP_LIKE = "strategy='ddp' (or 'ddp_spawn') or a single device"
_FSDP2 = (
    "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with `fully_shard` in "
    "`configure_model` (FSDP2, supported)"
)

#: The roles supported under ``ModelParallelStrategy`` with ``tensor_parallel_size=1`` (FSDP2, DTensor
#: parameters sharded on dim 0). A role enabled for it is added here, nowhere else.
_MODEL_PARALLEL_SUPPORTED: set[str] = {"clip", "log", "prune"}
#: The roles supported there with tensor parallelism too (``tensor_parallel_size > 1``: Shard(1) and Replicate
#: placements); a role in _MODEL_PARALLEL_SUPPORTED only is refused under tensor parallelism.
_TENSOR_PARALLEL_SUPPORTED: set[str] = {"clip", "log"}


def _strategy_class(name: str) -> type | None:
    try:
        return getattr(importlib.import_module("lightning.pytorch.strategies"), name)
    except (ImportError, AttributeError):
        return None


def _is(strategy: Any, name: str) -> bool:
    cls = _strategy_class(name)
    return cls is not None and isinstance(strategy, cls)


def _deepspeed_stage(strategy: Any) -> int | None:
    config = getattr(strategy, "config", None)
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    stage = zero.get("stage") if isinstance(zero, dict) else None
    return int(stage) if stage is not None else None


_FSDP = {
    "clip": (
        "each rank holds a shard of every gradient, so the norm computed here would be the local shard's: too "
        "small and different on every rank",
        "clip through FSDP: by norm, call `self.trainer.model.clip_grad_norm_(max_norm)` in "
        f"`LightningModule.configure_gradient_clipping`; or train with {_DDP_LIKE}",
    ),
    "prune": (
        "each rank holds a shard of every weight, so a global magnitude ranking here would rank the local "
        "shard only: masks differ between ranks and the sparsity misses the target",
        f"prune with {_DDP_LIKE} (pruned weights are plain zeros under unchanged state-dict keys, so the "
        "pruned model loads into an FSDP run afterwards)",
    ),
    "log": (
        "each rank holds a shard of every weight, so the counts here would be the local shard's",
        f"count the consolidated checkpoint after training, or train with {_DDP_LIKE}",
    ),
}

# Roles not (yet) in _MODEL_PARALLEL_SUPPORTED.
_MODEL_PARALLEL = {
    "clip": (
        "parameters and gradients are DTensors sharded over the device mesh (FSDP2 / tensor parallelism), so "
        "the norm computed here would not be the full gradient's",
        f"train with {_DDP_LIKE}",
    ),
    "prune": (
        "parameters are DTensors sharded over the device mesh, so a magnitude ranking here would rank local "
        "shards and the masks would not be global",
        f"prune with {_DDP_LIKE}",
    ),
    "log": (
        "parameters are DTensors sharded over the device mesh, so the counts here would be the local shard's",
        f"count the consolidated checkpoint after training, or train with {_DDP_LIKE}",
    ),
}

_TENSOR_PARALLEL = (
    "tensor parallelism shards weights off dim 0 (Shard(1) placements), which this callback does not handle; "
    "the default tensor_parallel_size='auto' is every device of a node",
    "use ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) (FSDP2 with `fully_shard` in "
    f"`configure_model`), or train with {_DDP_LIKE}",
)

_DEEPSPEED = {
    "clip": (
        "DeepSpeed clips inside its engine, on gradients that ZeRO keeps in partitioned flat buffers, so the "
        "parameters' gradients seen here are empty or partial",
        "use `Trainer(gradient_clip_val=...)` (norm clipping, passed to DeepSpeed's `gradient_clipping`); or "
        f"train with {_DDP_LIKE}",
    ),
    "prune": (
        "DeepSpeed's optimizer keeps its own (partitioned, fp32) master copy of the weights and its own "
        "optimizer state, so a weight zeroed here comes back at the next step",
        f"prune with {_DDP_LIKE}",
    ),
    "log": (
        "ZeRO stage 3 partitions every parameter across ranks, so the counts here would be the local "
        "partition's",
        f"use ZeRO stage 1 or 2, count the consolidated checkpoint after training, or train with {_DDP_LIKE}",
    ),
}


def _or_fsdp2(role: str, instead: str) -> str:
    """A refused sharded strategy's advice, led by FSDP2 (``ModelParallelStrategy``) where the role supports it."""
    return f"train with {_FSDP2}; or {instead}" if role in _MODEL_PARALLEL_SUPPORTED else instead


def _tensor_parallel_size(strategy: Any) -> int | str:
    """The strategy's tensor-parallel size; ``"auto"`` resolved as Lightning does (every process of a node)."""
    size = getattr(strategy, "_tensor_parallel_size", "auto")
    if size == "auto":
        try:
            n = strategy.num_processes
        except Exception:  # parallel devices not known yet
            return size
        return int(n) if n else size
    return int(size)


def strategy_refusal(strategy: Any, callback_name: str, role: Role) -> str | None:
    """Why ``callback_name`` (in ``role``) cannot run under ``strategy``, or ``None`` when it can.

    Args:
        strategy: the Trainer's strategy object (``trainer.strategy``).
        callback_name: the callback's class name, used in the message.
        role: ``"clip"`` (GradientClipCallback), ``"prune"`` (MagnitudePruneCallback) or ``"log"``
            (SparsityLogger).

    Returns:
        The one-line message naming the strategy, why it is refused and what to use instead; ``None`` if
        the strategy is supported.

    Raises:
        ValueError: if ``role`` is not one of ``"clip"``, ``"prune"``, ``"log"``.

    Example::

        >>> from lightning.pytorch.strategies import DDPStrategy
        >>> strategy_refusal(DDPStrategy(), "GradientClipCallback", "clip") is None
        True
    """
    if role not in ROLES:
        raise ValueError(f"`role` must be one of {ROLES}, got {role!r}")
    name = type(strategy).__name__
    # order matters: DeepSpeedStrategy and XLAStrategy subclass DDPStrategy, SingleDeviceXLAStrategy
    # subclasses SingleDeviceStrategy
    if _is(strategy, "DeepSpeedStrategy"):
        stage = _deepspeed_stage(strategy)
        if role == "log" and (stage is None or stage < 3):
            return None
        why, instead = _DEEPSPEED[role]
        name = f"{name} (ZeRO stage {stage})" if stage is not None else name
        instead = _or_fsdp2(role, instead)
    elif _is(strategy, "XLAStrategy") or _is(strategy, "DDPStrategy") or _is(strategy, "SingleDeviceStrategy"):
        # every rank holds the whole model; gradients are all-reduced before on_before_optimizer_step
        # (DDP in backward, XLA in its closure), so norms, rankings and counts equal a single device's
        return None
    elif _is(strategy, "FSDPStrategy"):
        why, instead = _FSDP[role]
        instead = _or_fsdp2(role, instead)
    elif _is(strategy, "ModelParallelStrategy"):
        if role not in _MODEL_PARALLEL_SUPPORTED:
            why, instead = _MODEL_PARALLEL[role]
        else:
            tp = _tensor_parallel_size(strategy)
            # the callbacks reduce norms and counts over the DTensor shards, each piece counted once
            if tp == 1 or role in _TENSOR_PARALLEL_SUPPORTED:
                return None
            why, instead = _TENSOR_PARALLEL
            name = f"{name} (tensor_parallel_size={tp})"
    else:
        why = "it is not a strategy the callbacks know, so they cannot tell whether parameters are sharded"
        instead = f"train with {_DDP_LIKE} (DDPStrategy and SingleDeviceStrategy subclasses are supported)"
    return f"{callback_name} does not support {name}: {why}. Instead, {instead}."


def check_strategy(trainer: pl.Trainer, callback_name: str, role: Role) -> None:
    """Raise if ``trainer``'s strategy would make ``callback_name`` compute wrong numbers (sharded strategies).

    Call it first thing in the callback's ``setup()``, before anything reads parameters or gradients.

    Args:
        trainer: the Trainer (its ``strategy`` is read).
        callback_name: the callback's class name, used in the message.
        role: ``"clip"`` (GradientClipCallback), ``"prune"`` (MagnitudePruneCallback) or ``"log"``
            (SparsityLogger).

    Raises:
        MisconfigurationException: under a refused strategy (FSDP1, DeepSpeed, ModelParallelStrategy with
            tensor parallelism or for a role it does not support, an unknown strategy; see the module
            docstring's table), naming the strategy, why, and what to use instead.
        ValueError: if ``role`` is not one of ``"clip"``, ``"prune"``, ``"log"``.

    Example::

        >>> import lightning as L
        >>> check_strategy(L.Trainer(accelerator="cpu", logger=False), "SparsityLogger", "log")  # passes
    """
    strategy = getattr(trainer, "strategy", None)
    if strategy is None:  # a callback set up by hand, without a Trainer
        return
    message = strategy_refusal(strategy, callback_name, role)
    if message is not None:
        raise MisconfigurationException(message)


def check_model_sharded(trainer: pl.Trainer, pl_module: pl.LightningModule, callback_name: str) -> None:
    """Raise when ``ModelParallelStrategy`` runs several processes on a model none of whose parameters is sharded.

    Under that strategy nothing but ``fully_shard`` (or a tensor-parallel plan) in ``configure_model`` ties the
    ranks together: without it every rank trains its own copy, so masks, norms and counts would differ between
    ranks. Call it in ``on_fit_start``, once the strategy has run ``configure_model``.

    Raises:
        MisconfigurationException: naming the strategy and the fix.
    """
    from lightning_clipprune._sharded import any_sharded

    if trainer.world_size <= 1 or not _is(getattr(trainer, "strategy", None), "ModelParallelStrategy"):
        return
    if not any_sharded(pl_module.parameters()):
        raise MisconfigurationException(
            f"{callback_name}: ModelParallelStrategy runs {trainer.world_size} processes but no parameter of the"
            " model is sharded (a DTensor), so nothing synchronises them: each trains its own copy, and masks,"
            " norms and counts would differ between ranks. Shard the model in `configure_model` (FSDP2:"
            " `fully_shard(layer)` for each block, then `fully_shard(self)`), or train with strategy='ddp'."
        )
