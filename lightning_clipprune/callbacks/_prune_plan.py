"""``MagnitudePruneCallback``'s plan: arguments that involve each other, which parameters, where events fall.

Each argument alone is checked by :mod:`lightning_clipprune._validation` in ``__init__``; what is here
needs two arguments together (``__init__``), the module (``setup``) or the Trainer (train start), plus the
helpers that turn a criterion's state into checkpoint data.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_clipprune._choices import DEFAULT_RANKING, check_threshold_ceiling
from lightning_clipprune._validation import bad_value, unmatched_patterns
from lightning_clipprune.pruning import (
    CEILING,
    Layout,
    check_prunable_kinds,
    most_under_ceiling,
    nonfinite_names,
    saturated_layers,
    select_prunable_parameters,
    uninitialized_names,
    weight_layouts,
)
from lightning_clipprune.pruning.wrappers import (
    keep_one_per_norm_slice_,
    parametrized_zeros_reason,
    weight_norm_dims,
)
from lightning_clipprune.schedules import resolve_position

if TYPE_CHECKING:
    import lightning.pytorch as pl

OWNER = "MagnitudePruneCallback"


def check_single(trainer: pl.Trainer, kind: type) -> None:
    """Raise when the Trainer has more than one callback of ``kind`` (``MagnitudePruneCallback``).

    Raises:
        MisconfigurationException: naming how many and how to merge them.
    """
    others = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, kind)]
    if len(others) > 1:
        raise MisconfigurationException(
            f"the Trainer has {len(others)} {kind.__name__}s, at most one is allowed: merge them into"
            " one (choose the parameters with `include`/`exclude`)."
        )


def check_combination(cb: Any, kind: str, n: int, m: int) -> None:
    """The checks that involve two arguments of ``cb`` (a ``MagnitudePruneCallback`` being built).

    Raises:
        ValueError: naming the arguments that clash and what would fit.
    """
    if (cb.sparsity is None) == (cb.threshold is None):
        raise ValueError(
            f"`{OWNER}` needs exactly one of `sparsity` and `threshold`, got sparsity={cb.sparsity!r},"
            f" threshold={cb.threshold!r}."
        )
    if cb.threshold is not None and kind != "unstructured":
        raise ValueError(f"`{OWNER}(threshold=...)` works with pattern 'unstructured' only, got pattern={cb.pattern!r}.")
    if kind == "nm" and not math.isclose(cb.sparsity, 1.0 - n / m, abs_tol=1e-9):
        raise ValueError(
            f"`{OWNER}(pattern={cb.pattern!r})` keeps {n} of every {m} weights, so `sparsity` must be {1.0 - n / m:.6g}"
            f" (or left out), got sparsity={cb.sparsity!r}."
        )
    if cb.threshold is not None:
        check_threshold_mode(cb)
    if cb.schedule != "oneshot" and type(cb.start) is type(cb.end) and cb.start > cb.end:
        raise ValueError(f"`{OWNER}`: `start` must be <= `end`, got start={cb.start!r}, end={cb.end!r}.")
    ceiling = cb.effective_max_layer_sparsity
    if ceiling is not None and cb.scope == "global" and (cb.sparsity or 0.0) > ceiling:
        raise bad_value(OWNER, "max_layer_sparsity", f">= sparsity={cb.sparsity} or None", ceiling)
    if cb.layer_sparsity and (cb.scope != "local" or cb.sparsity is None or kind == "nm"):
        allowed = "None unless scope='local' with a `sparsity` (not N:M)"
        raise bad_value(OWNER, "layer_sparsity", allowed, cb.layer_sparsity)


def check_threshold_mode(cb: Any) -> None:
    """Refuse a ceiling with ``threshold`` (never applied: a threshold prunes every ``|w| <= threshold``) and warn
    about the ramp's arguments, which shape a sparsity target that threshold mode does not have.

    Raises:
        ValueError: for a ``max_layer_sparsity`` other than "auto" or None (:func:`~lightning_clipprune._choices.check_threshold_ceiling`).
    """
    check_threshold_ceiling(OWNER, cb.threshold, cb.max_layer_sparsity)
    defaults = (("power", cb.power, 3.0), ("scope", cb.scope, "global"), ("ranking", cb.ranking, DEFAULT_RANKING))
    unused = [f"schedule={cb.schedule!r}"] if cb.schedule == "linear" else []  # "cubic" is the default; "oneshot" prunes once
    unused += [f"{k}={v!r}" for k, v, default in defaults if v != default]
    if unused:
        rank_zero_warn(
            f"{OWNER}: with `threshold`, {', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect: every"
            " event prunes |w| <= threshold in every layer (there is no target to ramp or to share out)."
            " schedule='oneshot' prunes once, at `start`."
        )


def step_clock(trainer: pl.Trainer) -> int:
    """The step the pruning schedule reads: ``trainer.global_step`` (optimizer steps) under automatic optimization.

    Under manual optimization one batch may step several optimizers, or none (accumulation by hand), so
    ``global_step`` has no length known in advance; there the clock is the training batches done, which is what
    ``trainer.estimated_stepping_batches`` counts, so a fraction such as ``end=0.5`` is half of the run. The
    count is part of the loop's state that a checkpoint restores.
    """
    module = trainer.lightning_module
    if module is None or module.automatic_optimization:
        return trainer.global_step
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def check_manual_clock(cb: Any, trainer: pl.Trainer) -> None:
    """Warn once per fit when, under manual optimization, ``max_steps`` bounds the run and a batch stepped other
    than one optimizer: ``max_steps`` counts optimizer steps, the schedule's clock batches (:func:`step_clock`),
    so the fractions of the run (``start``, ``end``, the regrowth's, ``lr_rewind``'s last step) were placed as if
    every batch stepped once. Called after each training batch until the first batch that tells."""
    if cb._clock_checked or cb.unit != "step":
        return
    module, batches = trainer.lightning_module, step_clock(trainer) + 1  # (the loop counts this batch after the hook)
    if module is None or module.automatic_optimization or trainer.global_step == batches:
        cb._clock_checked = module is None or module.automatic_optimization
        return
    cb._clock_checked = True
    regrow = cb._regrow.config if cb._regrow is not None else None
    given = [("start", cb.start), ("end", cb.end), ("regrow start", getattr(regrow, "start", None)), ("regrow end", getattr(regrow, "end", None))]
    fractions = [f"{k}={v!r}" for k, v in given if isinstance(v, float) and v > 0.0]  # (0.0 is batch 0 in any run)
    fractions += ["lr_rewind (to the last step)"] if cb.lr_rewind is not None else []
    bound = trainer.max_steps not in (None, -1) and float(trainer.estimated_stepping_batches) == trainer.max_steps
    if fractions and bound:
        # at this rate the run ends near batch max_steps * batches / global_step; a ramp ending after it falls short
        last = trainer.max_steps * batches // trainer.global_step if trainer.global_step else None
        short = (
            f" At this rate the run ends near batch {last}, before the ramp's end (batch {cb._positions[1]}): the target"
            " will not be reached."
            if last is not None and cb.sparsity is not None and cb._positions[1] > last else ""
        )
        rank_zero_warn(
            f"{OWNER}: under manual optimization the schedule counts training batches, but max_steps={trainer.max_steps}"
            f" counts optimizer steps ({trainer.global_step} in the first {batches} batch(es)): {', '.join(fractions)}"
            f" {'was' if len(fractions) == 1 else 'were'} placed as if the run had {trainer.max_steps} batches, so they"
            f" fall elsewhere in this run.{short} Give them as batch numbers (ints), or bound the run with max_epochs"
            " instead of max_steps."
        )


def steps_per_epoch(trainer: pl.Trainer) -> int | None:
    """How far :func:`step_clock` moves in one epoch: the optimizer steps of an epoch (accumulation counted), or
    its training batches under manual optimization; None when the training dataloader has no length."""
    batches = float(trainer.num_training_batches)
    if not math.isfinite(batches):
        return None
    module = trainer.lightning_module
    if module is not None and not module.automatic_optimization:
        return int(batches)
    return math.ceil(batches / max(1, trainer.accumulate_grad_batches))


def check_reachable(cb: Any, params: dict[str, Tensor], layouts: dict[str, Layout]) -> None:
    """Refuse, before training, a global unstructured target that the per-layer ceiling makes impossible.

    Each layer keeps at least ``1 - ceiling`` of its weights and one weight of every output row
    (:func:`~lightning_clipprune.pruning.layer_cap`); on a small network that can be less than the target.

    Raises:
        ValueError: naming the target, the most that can be pruned and the ways out.
    """
    ceiling = cb.effective_max_layer_sparsity
    if ceiling is None or cb.sparsity is None or cb.scope != "global" or cb.pattern != "unstructured":
        return
    total = sum(p.numel() for p in params.values())
    most = most_under_ceiling(params, ceiling, layouts)
    if total and round(cb.sparsity * total) > most:
        raise ValueError(
            f"{OWNER}: sparsity={cb.sparsity} cannot be reached on these {total} weights with"
            f" max_layer_sparsity={ceiling} and one weight kept in every output row: at most {most / total:.4f}."
            " Lower `sparsity`, raise `max_layer_sparsity` or pass max_layer_sparsity=None (no ceiling)."
        )


def run_length(unit: str, trainer: pl.Trainer) -> float | None:
    """The whole training in ``unit``s ("step" or "epoch"), None when unknown or infinite."""
    if unit == "step":
        total = float(trainer.estimated_stepping_batches)
    else:
        total = float(trainer.max_epochs) if trainer.max_epochs not in (None, -1) else math.inf
    return total if math.isfinite(total) and total >= 0 else None


#: The position of an event after training in a run of unknown length (``schedule="oneshot"``, ``start=1.0``).
AT_END = 2**62


def position(cb: Any, trainer: pl.Trainer) -> int:
    """Where the run is in ``cb.unit``: the step clock (:func:`step_clock`) or the epoch."""
    return step_clock(trainer) if cb.unit == "step" else trainer.current_epoch


def settle_at_end(positions: tuple[int, int, int], t: int) -> tuple[int, int, int]:
    """``positions``, with a post-training event of a run whose length was not known (:data:`AT_END`) placed at
    ``t``, the run's end, now that it is known."""
    return (t, t, 1) if positions[1] == AT_END else positions


def _why_unknown(unit: str, trainer: pl.Trainer) -> str:
    if unit == "epoch" or trainer.max_epochs in (None, -1):
        return "max_epochs=-1 and no max_steps" if trainer.max_steps in (None, -1) else "max_epochs=-1"
    return "the training dataloader has no length, an IterableDataset for example"


def resolve_positions(cb: Any, trainer: pl.Trainer) -> tuple[int, int, int]:
    """``(start, end, frequency)`` of ``cb`` in ``cb.unit``s for this run.

    Raises:
        ValueError: when ``end < start`` once resolved, or the window lies past the end of a run of known length.
    """
    total = run_length(cb.unit, trainer)
    unit = f"{cb.unit}s"
    if total is None and cb.schedule == "oneshot" and isinstance(cb.start, float) and cb.start == 1.0:
        return AT_END, AT_END, 1  # after training, whenever it ends: on_train_end prunes
    fractions = [f"{k}={v!r}" for k, v in (("start", cb.start), ("end", cb.end)) if isinstance(v, float) and v != 0.0]
    if total is None and fractions and not (cb.schedule == "oneshot" and isinstance(cb.start, int)):
        limit = "max_steps" if cb.unit == "step" else "max_epochs"
        raise ValueError(
            f"{OWNER}: {' and '.join(fractions)} {'is a fraction' if len(fractions) == 1 else 'are fractions'} of"
            f" the whole training, whose length in {unit} is unknown here ({_why_unknown(cb.unit, trainer)}):"
            f" give {'it as an int' if len(fractions) == 1 else 'them as ints'} ({unit}), or set the Trainer's `{limit}`."
        )
    start = resolve_position(cb.start, total, "start")
    end = start if cb.schedule == "oneshot" else resolve_position(cb.end, total, "end")
    length = f"a run of {total:g} {unit}" if total is not None else f"a run of unknown length ({unit})"
    if end < start:
        raise ValueError(
            f"{OWNER}: `start` must be <= `end`, got start={cb.start!r} -> {unit[:-1]} {start},"
            f" end={cb.end!r} -> {unit[:-1]} {end}, in {length}."
        )
    if total is not None and end > total:
        which = f"start={cb.start!r}" if cb.schedule == "oneshot" else f"start={cb.start!r}, end={cb.end!r}"
        raise ValueError(
            f"{OWNER}: the prune window ({which}: {unit} {start} to {end}) is never reached"
            f" in {length}: lower them or train longer (a float such as 0.75 is a fraction of the run)."
        )
    frequency = cb.frequency
    if frequency is None:
        frequency = 1 if cb.unit == "epoch" else max(1, min(100, (end - start) // 10))
    catch_up(cb, end)
    return start, end, frequency


#: The arguments a checkpoint's masks and schedule position depend on beyond the target: checked on resume.
RESUME_FIELDS = ("unit", "scope", "ranking")


def resume_fields(cb: Any) -> dict[str, Any]:
    """``{field: value}`` of :data:`RESUME_FIELDS`, saved in the callback's state."""
    return {f: getattr(cb, f) for f in RESUME_FIELDS}


def check_resumable(cb: Any, state: dict[str, Any]) -> None:
    """Refuse a checkpoint state ``cb`` cannot continue: other parameters, another unit, scope or ranking.

    Raises:
        ValueError: one line naming what differs and the fix.
    """
    names = list(state.get("parameter_names", []))
    if cb._params and names and names != cb.parameter_names:
        raise ValueError(
            f"{OWNER}: the checkpoint pruned {names}, this callback selects {cb.parameter_names} (another model, or"
            " another `include`/`exclude`): resume with those of the run that wrote it, or start afresh without ckpt_path"
        )
    changed = [f"{f}={state[f]!r} there, {getattr(cb, f)!r} here" for f in RESUME_FIELDS if f in state and state[f] != getattr(cb, f)]
    if changed:
        raise ValueError(
            f"{OWNER}: the checkpoint's pruning ran with {'; '.join(changed)}: its masks and schedule position"
            " cannot carry over (masks only grow); resume with the same values, or start afresh without ckpt_path"
        )


def catch_up(cb: Any, end: int) -> None:
    """A restored run whose last event lies at or past this run's ``end`` (``end`` moved earlier, a shorter
    run) before its target was reached: one event at the next position reaches the target (with a warning)."""
    last, target, reached = cb._last_event, cb.sparsity, cb.current_target
    if last is None or last < end or end >= AT_END or target is None or reached is None or reached >= target - 1e-9:
        return
    cb._last_event = end - 1  # event_due: the next position is at or past `end`, so one event runs there
    rank_zero_warn(
        f"{OWNER}: the checkpoint's last pruning event ({cb.unit} {last}) lies at or past this run's end"
        f" ({cb.unit} {end}) with the target {target} not reached ({reached:.4f}): the next {cb.unit} prunes to it."
    )


def parameter_changes(old: dict[str, Any], new: dict[str, Any], old_names: list[str]) -> str | None:
    """What changed between the parameters a callback pruned and the module's now, in words; None if nothing.

    A parameter counts as changed when its name set, its shape or its identity (the ``Parameter`` object:
    a replaced layer) differs.
    """
    if not old_names:
        return None
    if old_names != list(new):
        return f"the prunable parameters are now {list(new)} instead of {old_names}"
    for name, p in new.items():
        before = old.get(name)
        if before is None:
            continue  # names from a checkpoint, before any module was seen: load_state_dict checks those
        if tuple(before.shape) != tuple(p.shape):
            return f"`{name}` changed shape from {tuple(before.shape)} to {tuple(p.shape)}"
        if before is not p:
            return f"`{name}` is a new tensor (its layer was replaced)"
    return None


def select_parameters(cb: Any, pl_module: pl.LightningModule, announce: bool) -> dict[str, torch.nn.Parameter]:
    """The parameters ``cb`` prunes in ``pl_module``; with ``announce``, one info line names the frozen ones left dense.

    Raises:
        ValueError: when there is none, or one is a lazy parameter not materialised yet (what to do, in one line).
    """
    how = dict(include=cb.include, exclude=cb.exclude, prune_bias=cb.prune_bias, include_tied=cb.include_tied)
    params = select_prunable_parameters(
        pl_module, **how, keep_first_and_last=cb.keep_first_and_last, include_frozen=cb.prune_frozen
    )
    normed = weight_norm_dims(pl_module, params) if cb.pattern == "channel" else {}
    transposed = {n for n, layout in weight_layouts(pl_module, normed).items() if layout.transposed}
    channels = [n for n, dim in normed.items() if dim == (1 if n in transposed else 0)]  # norm slices = channels
    if channels:
        name = channels[0]
        raise ValueError(
            f"{OWNER}: pattern='channel' cannot prune {name}: it is the `v` of a weight norm (w = g * v / ||v||), and"
            " a removed channel's slice of v is 0/0 = NaN in the layer's weight. Leave it dense"
            f" (exclude=[{name.rsplit('.parametrizations', 1)[0].removesuffix('.weight_v') + '.*'!r}]) or remove the"
            " weight norm (torch.nn.utils.parametrize.remove_parametrizations) before pruning."
        )
    if announce:
        warn_parametrized(pl_module, params)
        names = [n for n, _ in pl_module.named_parameters(remove_duplicate=False)]
        for key, patterns in (("include", cb.include or ()), ("exclude", cb.exclude)):
            for pattern in unmatched_patterns(patterns, names):
                hint = "" if pattern.startswith("*") else (
                    f"; a LightningModule's own attribute comes first, e.g. {'*' + pattern!r}")
                rank_zero_warn(
                    f"{OWNER}: {key} pattern {pattern!r} matches no parameter name (names look like {names[:3]}){hint}."
                )
    frozen = [] if cb.prune_frozen else [
        n for n, p in select_prunable_parameters(pl_module, **how, include_frozen=True).items() if not p.requires_grad
    ]
    if frozen and announce:
        rank_zero_info(
            f"{OWNER}: {len(frozen)} frozen parameter(s) (requires_grad=False) left dense: {', '.join(frozen)}"
            " (prune_frozen=True prunes them too)."
        )
    if not params:
        raise ValueError(
            f"{OWNER} found no prunable parameter in {type(pl_module).__name__} (include={cb.include},"
            f" exclude={cb.exclude}, frozen left out: {frozen}): it prunes the weights of Linear, Conv,"
            " ConvTranspose and attention (Q/K/V, output) layers; name other parameters with `include`"
        )
    check_prunable_kinds(pl_module, params, OWNER)
    lazy = uninitialized_names(params)
    if lazy:
        raise ValueError(
            f"{OWNER}: {', '.join(lazy)} not materialised yet (a lazy layer such as nn.LazyLinear gets its"
            " shape at its first forward pass): run one forward pass on an example batch before"
            " `trainer.fit`, or give the layer its input size."
        )
    return params


def keep_norm_slices(cb: Any, module: Any, new: dict[str, Tensor], grown: dict[str, Tensor] | None = None) -> None:
    """Weight-normed layers (``w = g * v / ||v||``): a slice of ``v`` the new masks empty would be ``0 / 0`` (NaN) in
    the weight the layer uses, so its largest entry is kept; one warning per layer, with how many it kept.

    ``grown``: the entries regrown at zero (a regrowth event): a slice holding only those is empty too.
    """
    warned = vars(cb).setdefault("_norm_warned", set())
    for name, dim in weight_norm_dims(module, new).items():
        alive = new[name] if grown is None else new[name] & ~grown[name].to(new[name].device)
        kept = keep_one_per_norm_slice_(alive, cb._params[name], dim)
        if grown is not None:
            new[name] |= alive
        if kept and name not in warned:
            warned.add(name)
            slices = "the tensor" if dim == -1 else f"{kept} slice(s) along dim {dim}"
            rank_zero_warn(
                f"{OWNER}: {name} is the `v` of a weight norm (w = g * v / ||v||): pruning would empty {slices}, which"
                " is 0/0 = NaN in the layer's weight, so one weight (the largest) stays in each; the layer ends"
                f" {kept} weight(s) short of its target. exclude it, or remove the weight norm, to prune it exactly."
            )


def warn_parametrized(module: torch.nn.Module, params: dict[str, Any]) -> None:
    """One warning for each selected ``original`` of a parametrisation whose zeros are not zeros of the tensor the
    layer uses (``include`` reaches them; the default selection leaves them dense): every report would call the
    layer sparse while the layer computes with a dense weight."""
    for name in params:
        owner, sep, rest = name.rpartition("parametrizations.")
        if not sep:
            continue
        try:
            reason = parametrized_zeros_reason(module.get_submodule(owner.removesuffix(".")), sep + rest)
        except AttributeError:
            continue
        if reason:
            rank_zero_warn(
                f"{OWNER}: {name} is pruned as `include` asks, but {reason}: the layer computes with a dense weight"
                " while the reports count the zeros of original. Remove the parametrisation before pruning"
                " (torch.nn.utils.parametrize.remove_parametrizations), or leave it out of `include`."
            )


def warn_saturated(cb: Any, new: dict[str, Tensor], layouts: dict[str, Any], named: set[str]) -> set[str]:
    """Warn once per layer (``named``: those already warned about) that global ranking pruned to its ceiling
    (or, with none, to 99 % / 100 %); returns the layers named now."""
    if cb.threshold is not None:
        return _warn_emptied(cb, new, named)
    if cb.scope != "global":
        return set()
    # under per-layer budgets the largest layer is the sparsest by design: only an emptied layer is named
    ceiling, budgets = cb.effective_max_layer_sparsity, cb._budgets
    saturated = saturated_layers(new, ceiling, layouts, level=1.0 if budgets else CEILING, channels=cb.pattern == "channel")
    if not set(saturated) - named:
        return set()
    limit = "its ceiling" if ceiling is not None else "100 %" if budgets else "99 % or more (no ceiling)"
    rank_zero_warn(
        f"{OWNER}: global ranking pruned {len(saturated)} layer(s) to {limit}: "
        + ", ".join(f"{n} ({s:.1%})" for n, s in saturated.items())
        + ". If accuracy suffers, try ranking='layer_normalized' or scope='local'."
    )
    return set(saturated)


def _warn_emptied(cb: Any, new: dict[str, Tensor], named: set[str]) -> set[str]:
    """Threshold mode: warn once per layer that the threshold pruned every one of its weights."""
    emptied = {n for n, m in new.items() if m.numel() and not bool(m.any())} - named
    if emptied:
        rank_zero_warn(
            f"{OWNER}: threshold {cb.threshold:g} pruned every weight of {len(emptied)} layer(s): "
            + ", ".join(sorted(emptied))
            + ". Their outputs no longer depend on their inputs: lower `threshold`, or prune by `sparsity=`."
        )
    return emptied


def cpu_copy(state: Any) -> Any:
    """``state`` with every tensor copied to the CPU (dicts and lists walked): a criterion's state for a checkpoint."""
    if isinstance(state, Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: cpu_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(cpu_copy(v) for v in state)
    return state


def state_tensors(state: Any, prefix: str = "") -> list[tuple[str, Tensor]]:
    """Every floating tensor in ``state`` (dicts and lists walked), named by its path."""
    if isinstance(state, Tensor):
        return [(prefix, state)] if state.is_floating_point() else []
    if isinstance(state, dict):
        return [x for k, v in state.items() for x in state_tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(state, (list, tuple)):
        return [x for i, v in enumerate(state) for x in state_tensors(v, f"{prefix}[{i}]")]
    return []


def check_finite(tensors: dict[str, Tensor], when: str, why: str = "", sharding: Any = None, trainer: Any = None) -> None:
    """Raise one line naming the tensors that hold NaN or inf (one host sync), the first one first.

    With a ``sharding`` (:class:`._prune_sharded.Sharding`) the tensors are DTensors: each rank checks its
    rows and one all-reduce makes every rank raise alike.

    Raises:
        FloatingPointError: ``"MagnitudePruneCallback: <when> `a`, `b` hold NaN or inf ..."`` with what to do.
    """
    if sharding is not None:
        from lightning_clipprune.callbacks._prune_sharded import nonfinite_sharded

        bad = nonfinite_sharded(tensors, sharding)
    else:
        bad = nonfinite_names(tensors)
    if bad:
        named = ", ".join(f"`{n}`" for n in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise FloatingPointError(f"{OWNER}: {when} {named} hold NaN or inf{why}. {_divergence_advice(trainer)}")


def _divergence_advice(trainer: Any) -> str:
    """What to try after weights went NaN or inf: a clip callback already skips non-finite gradients."""
    callbacks = getattr(trainer, "callbacks", None) or []
    if not any(type(c).__name__ == "GradientClipCallback" for c in callbacks):
        return "Training diverged: lower the learning rate, or add a GradientClipCallback, which skips non-finite steps."
    fp16 = " In float16, Adam's default eps (1e-8) is 0: set eps=1e-4, or train in bf16 or float32." if str(
        getattr(trainer, "precision", "")).startswith("16") else ""
    return (
        "Training diverged in steps whose gradients were finite (the GradientClipCallback skips the others):"
        f" lower the learning rate or the clip value.{fp16}"
    )


def event_layouts(cb: Any, module: torch.nn.Module) -> dict[str, Layout]:
    """``weight_layouts(module, cb.parameter_names)``, computed once for the same module and parameters.

    A pruning event needs the layouts; walking every module of a large network at each event is a
    measurable part of its cost (``benchmarks/overhead.md``). The cache is keyed on the module and the
    identities of the pruned parameters, so a replaced layer or another module computes them afresh.
    """
    key = (id(module), tuple(id(p) for p in cb._params.values()))
    cached = getattr(cb, "_layouts_cache", None)
    if cached is None or cached[0] != key:
        cached = (key, weight_layouts(module, cb.parameter_names))
        cb._layouts_cache = cached
    return cached[1]
