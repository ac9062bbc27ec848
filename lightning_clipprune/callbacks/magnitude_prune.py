r"""
Magnitude pruning
^^^^^^^^^^^^^^^^^

Removes the weights that matter least while a LightningModule trains, and keeps them removed: masks are
applied in place (the state-dict keys never change), pruned weights stay exactly zero after every
optimizer step, and a mask only ever grows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_clipprune import pruning
from lightning_clipprune._validation import (
    bad_value,
    check_bool,
    check_choice,
    check_int,
    check_patterns,
    check_position,
    check_real,
)
from lightning_clipprune.callbacks._strategy import check_strategy
from lightning_clipprune.pruning import (
    CRITERIA,
    SCOPES,
    apply_masks_,
    compute_masks,
    keeps_pruned_weights_zero,
    mask_factors,
    mask_optimizer_state_,
    nonfinite_names,
    parse_pattern,
    select_prunable_parameters,
)
from lightning_clipprune.schedules import SCHEDULES, event_due, resolve_position, sparsity_at

_UNITS = ("step", "epoch")
_OWNER = "MagnitudePruneCallback"
#: Per-event lines go here at INFO (the app writes this logger to ``run.log``); the console gets them
#: only with ``verbose=True``.
log = logging.getLogger("lightning_clipprune")


def _resolve_ceiling(value: Any, budgets: bool) -> float | None:
    """``max_layer_sparsity``: "auto" is off under per-layer budgets, else 0.99; a number or None as given."""
    if value == "auto":
        return None if budgets else pruning.DEFAULT_MAX_LAYER_SPARSITY
    try:
        return check_real(_OWNER, "max_layer_sparsity", value, low=0.0, high=1.0, low_open=True, allow_none=True)
    except ValueError:
        raise bad_value(_OWNER, "max_layer_sparsity", "'auto', a number in (0, 1] or None", value) from None


def _check_pattern(pattern: Any) -> tuple[str, int, int]:
    try:
        return parse_pattern(pattern)
    except ValueError:
        raise bad_value(
            _OWNER, "pattern", "'unstructured', 'channel' or 'N:M' with integers 0 < N < M (such as '2:4')", pattern
        ) from None


def _check_combination(cb: MagnitudePruneCallback, kind: str, n: int, m: int) -> None:
    """The checks that involve two arguments (each argument alone is checked by ``_validation``)."""
    if (cb.sparsity is None) == (cb.threshold is None):
        raise ValueError(
            f"`{_OWNER}` needs exactly one of `sparsity` and `threshold`, got sparsity={cb.sparsity!r},"
            f" threshold={cb.threshold!r}."
        )
    if cb.threshold is not None and kind != "unstructured":
        raise ValueError(f"`{_OWNER}(threshold=...)` works with pattern 'unstructured' only, got pattern={cb.pattern!r}.")
    if kind == "nm" and not math.isclose(cb.sparsity, 1.0 - n / m, abs_tol=1e-9):
        raise ValueError(
            f"`{_OWNER}(pattern={cb.pattern!r})` keeps {n} of every {m} weights, so `sparsity` must be {1.0 - n / m}"
            f" (or left out), got sparsity={cb.sparsity!r}."
        )
    if cb.schedule != "oneshot" and type(cb.start) is type(cb.end) and cb.start > cb.end:
        raise ValueError(f"`{_OWNER}`: `start` must be <= `end`, got start={cb.start!r}, end={cb.end!r}.")
    ceiling = cb.max_layer_sparsity
    if ceiling is not None and cb.scope == "global" and (cb.sparsity or 0.0) > ceiling:
        raise bad_value(_OWNER, "max_layer_sparsity", f">= sparsity={cb.sparsity} or None", ceiling)
    if cb.layer_sparsity and (cb.scope != "local" or cb.sparsity is None or kind == "nm"):
        allowed = "None unless scope='local' with a `sparsity` (not N:M)"
        raise bad_value(_OWNER, "layer_sparsity", allowed, cb.layer_sparsity)


class MagnitudePruneCallback(Callback):
    r"""Prune the weights of ``Linear`` and ``Conv*`` layers during training, on a schedule.

    Each pruning event computes keep-masks from the current weights, zeroes the pruned weights in place
    together with their optimizer state (momentum, Adam moments), and from then on:

    - gradients of pruned weights are zeroed in ``on_before_optimizer_step`` (:meth:`mask_gradients`, the
      :class:`~lightning_clipprune.callbacks.contract.GradientMasker` contract), before Lightning's own
      clipping; a ``GradientClipCallback`` calls :meth:`mask_gradients` too, so the clip norm never sees
      them whatever the callback order, and only the first call of a step does work;
    - pruned weights stay exactly zero after every optimizer step (automatic or manual optimization,
      gradient accumulation, AMP). For SGD, Adam, AdamW, NAdam, RAdam, RMSprop, Adagrad and
      Adadelta (exact classes, ``eps > 0``, not ``fused``: :func:`~lightning_clipprune.pruning.keeps_pruned_weights_zero`)
      that follows from the masked gradient and the zeroed state, so nothing else is done per step; any
      other optimizer gets its weights re-masked by an ``optimizer.register_step_post_hook`` after every step.

    The per-step cost is one foreach multiply of the gradients by float masks (4 bytes per pruned-layer
    weight, held during ``fit`` only, beside the 1-byte bool :attr:`masks`), over the layers that have
    pruned entries; no host synchronisation. A pruning event refuses to rank weights that are not finite
    (``FloatingPointError`` naming them and the step).

    Events happen at ``start``, every ``frequency`` steps (or epochs) after the previous one, and always at
    ``end``, where the target is reached. When ``end`` (or a one-shot ``start``) falls at or after the
    last step (``1.0``), the final event runs in ``on_train_end``: post-training pruning without
    retraining. Run ``trainer.validate`` afterwards to measure the accuracy after pruning; the metrics
    before are kept in :attr:`metrics_before_pruning`. (Checkpoints written during training, ``last.ckpt``
    included, predate that event: save the pruned model after ``fit``.)

    Masks only grow: an entry once pruned stays pruned (it ranks below every live entry at later events).
    Unstructured masks prune exactly ``round(s * n)`` entries (``n`` all prunable entries for "global",
    each tensor's for "local"), the count of ``torch.nn.utils.prune``'s ``amount``; ties at the cut are
    broken by flat index in ``named_parameters`` order, the lower index pruned first.

    Args:
        sparsity: target fraction of prunable weights that are zero at the end of the schedule, in
            [0, 1). For pattern "N:M" it may be left out (it is ``1 - N/M``).
        threshold: instead of a sparsity: at each event prune where ``|w| <= threshold`` (the score
            ``<= threshold`` for "taylor"). Pattern "unstructured" only.
        schedule: "oneshot" (everything at ``start``), "linear" or "cubic" (Zhu & Gupta 2017:
            :math:`s_t = s_f + (s_i - s_f)(1 - (t - t_0)/(t_1 - t_0))^{power}`).
        start: the first event. An ``int`` is a step (or an epoch with ``unit="epoch"``); a ``float`` in
            [0, 1] a fraction of the whole training, resolved from ``trainer.estimated_stepping_batches``
            (or ``max_epochs``). Note ``1`` is step 1 while ``1.0`` is the end of training.
        end: where the target is reached, as ``start``; default half-way, so the second half of training
            fine-tunes the sparse network (at 98-99 % sparsity on LeNet-300-100 this beat 0.75, see
            ``benchmarks/bench_vs_lightning.md``). Ignored by "oneshot".
        unit: "step" (optimizer steps, ``trainer.global_step``) or "epoch".
        frequency: steps (or epochs) between two events. None (default): 100 steps as in Zhu & Gupta,
            lowered to ``(end - start) // 10`` (at least 1) when the pruning window is shorter than 1,000
            steps, so even a run of a few hundred steps gets a gradual ramp; 1 with ``unit="epoch"``.
            The event at ``end`` always happens.
        power: the exponent of "cubic".
        initial_sparsity: :math:`s_i`, the sparsity at ``start``, in ``[0, sparsity]``.
        scope: "global" (one ranking over all prunable weights) or "local" (each tensor to the same
            sparsity).
        pattern: "unstructured", "N:M" such as "2:4" (in each group of M consecutive weights along the
            input dimension keep N) or "channel" (whole output rows by their L2 norm).
        criterion: "magnitude" (``|w|``) or "taylor" (``|w * g|``, ``g`` an EMA of the gradient as the
            optimizer sees it, i.e. after clipping and AMP unscaling; the first event falls back to
            magnitude when no gradient has been seen yet).
        include: ``fnmatch`` patterns of parameter names to prune (replaces the default selection).
        exclude: patterns of parameter names to keep dense.
        prune_bias: also prune the biases of the default layers.
        keep_first_and_last: keep the first and the last prunable layer dense.
        taylor_beta: EMA factor of the gradient for "taylor", in [0, 1).
        verbose: also print the line of each event on the console (``rank_zero_info``). The line always
            goes to the ``lightning_clipprune`` Python logger at INFO (the app writes it to ``run.log``).
        max_layer_sparsity: "global" scope never prunes one layer past this fraction, nor the last weight of
            any output row; what a capped layer would have lost is pruned from the others, so the global
            target is still met exactly. A one-line warning names the layers that reach it. "auto"
            (default): 0.99 (:data:`~lightning_clipprune.pruning.DEFAULT_MAX_LAYER_SPARSITY`) for
            ``ranking="raw"`` / ``"layer_normalized"``, N:M and "channel"; off where per-layer budgets
            ("er", "erk") decide: their largest layer is the sparsest by design (an emptied layer is still
            warned about). At
            99 % on LeNet-300-100 a 0.99 ceiling forces every layer to exactly 99 %: 84.6 % test accuracy
            against 88.0 % without.
            None turns the ceiling off (plain global ranking can then prune a small-scale layer to 100 %,
            warned from 99 %).
        ranking: how "global" scope shares an unstructured target between layers. "er" (default):
            Erdos-Renyi budgets, each layer's density proportional to ``(fan_in + fan_out) / (fan_in *
            fan_out)`` with a convolution's kernel counted in its fan-in (Mocanu et al. 2018), so small
            and narrow layers stay denser; within each layer the lowest scores go. "erk": Erdos-Renyi-Kernel
            (Evci et al. 2020), the kernel size counted apart, which prunes small convolutions about as hard
            as wide linear layers. "raw": one threshold on the scores of all layers (as
            ``torch.nn.utils.prune.global_unstructured``). "layer_normalized": each score divided by its
            layer's RMS, then one threshold. On LeNet-300-100 (where "er" and "erk" coincide) over 5 seeds,
            they led Lightning's ``ModelPruning`` by 0.41 / 1.03 points at 98 / 99 % sparsity, "raw" by 0.28
            / 0.74; on LeNet-5 "erk" trailed it (``benchmarks/bench_vs_lightning.md``). N:M, "channel",
            ``threshold`` and "local" scope do not use it.
        layer_sparsity: ``{parameter name or fnmatch pattern: final sparsity}`` with ``scope="local"``
            (for example the allocation suggested by ``lightning_clipprune.search``); each layer follows the
            schedule to its own value, layers not named to ``sparsity`` (pass ``sparsity=0.0`` to keep them
            dense). A key matching no prunable parameter raises at the first event.

    Raises:
        ValueError: for a bad argument (in ``__init__``); at ``setup()`` when the module has no prunable
            parameter, a shape does not fit the pattern or the Trainer has a second
            ``MagnitudePruneCallback``; at train start when the prune window lies past the end of the run.
        FloatingPointError: at a pruning event, when a prunable weight holds NaN or inf.

    Attributes:
        masks: ``{parameter name: bool tensor}``, True = kept.
        parameter_names: the pruned parameters, in ``named_parameters`` order.
        current_target: the scheduled sparsity at the last event (0.0 before ``start``); None in
            threshold mode.
        metrics_before_pruning: ``trainer.callback_metrics`` (scalars) just before a post-training event,
            else None.

    Under DDP the masks are identical on every rank: "magnitude" masks are computed from the weights,
    which DDP keeps identical; "taylor" masks are broadcast from rank 0 (gradient EMAs come from
    all-reduced gradients, the broadcast makes it hold under any strategy).

    Example::

        >>> from lightning_clipprune import MagnitudePruneCallback
        >>> prune = MagnitudePruneCallback(sparsity=0.9, schedule="cubic", start=0.1, end=0.7)
        >>> trainer = pl.Trainer(callbacks=[prune], max_epochs=10)  # doctest: +SKIP
    """

    def __init__(
        self,
        sparsity: float | None = None,
        threshold: float | None = None,
        schedule: str = "cubic",
        *,
        start: int | float = 0.0,
        end: int | float = 0.5,
        unit: str = "step",
        frequency: int | None = None,
        power: float = 3.0,
        initial_sparsity: float = 0.0,
        scope: str = "global",
        pattern: str = "unstructured",
        criterion: str = "magnitude",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        prune_bias: bool = False,
        keep_first_and_last: bool = False,
        taylor_beta: float = 0.9,
        verbose: bool = False,
        max_layer_sparsity: float | str | None = "auto",
        ranking: str = "er",
        layer_sparsity: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        kind, n, m = _check_pattern(pattern)
        if kind == "nm" and sparsity is None and threshold is None:
            sparsity = 1.0 - n / m
        self.sparsity = check_real(_OWNER, "sparsity", sparsity, low=0, high=1, high_open=True, allow_none=True)
        self.threshold = check_real(_OWNER, "threshold", threshold, low=0, allow_none=True)
        self.schedule = check_choice(_OWNER, "schedule", schedule, SCHEDULES)
        self.start = check_position(_OWNER, "start", start)
        self.end = check_position(_OWNER, "end", end)
        self.unit = check_choice(_OWNER, "unit", unit, _UNITS)
        self.frequency = check_int(_OWNER, "frequency", frequency, low=1, allow_none=True)
        self.power = check_real(_OWNER, "power", power, low=0, low_open=True)
        self.initial_sparsity = check_real(_OWNER, "initial_sparsity", initial_sparsity, low=0, high=self.sparsity or 0.0)
        self.scope = check_choice(_OWNER, "scope", scope, SCOPES)
        self.pattern = pattern
        self.criterion = check_choice(_OWNER, "criterion", criterion, CRITERIA)
        patterns = check_patterns(_OWNER, "include", include, allow_none=True)
        self.include = None if patterns is None else list(patterns)
        self.exclude = list(check_patterns(_OWNER, "exclude", exclude, allow_none=True) or ())
        self.prune_bias = check_bool(_OWNER, "prune_bias", prune_bias)
        self.keep_first_and_last = check_bool(_OWNER, "keep_first_and_last", keep_first_and_last)
        self.taylor_beta = check_real(_OWNER, "taylor_beta", taylor_beta, low=0, high=1, high_open=True)
        self.verbose = check_bool(_OWNER, "verbose", verbose)
        self.ranking = check_choice(_OWNER, "ranking", ranking, pruning.RANKINGS)
        # per-layer budgets ("erk", "er") decide the counts only for a global, unstructured sparsity target
        self._budgets = (
            self.ranking in pruning.BUDGET_RANKINGS and self.scope == "global" and kind == "unstructured"
            and threshold is None
        )
        self.max_layer_sparsity = _resolve_ceiling(max_layer_sparsity, self._budgets)
        self.layer_sparsity = pruning.check_layer_sparsity(_OWNER, layer_sparsity)
        _check_combination(self, kind, n, m)

        self.masks: dict[str, Tensor] = {}
        self.parameter_names: list[str] = []
        self.current_target: float | None = 0.0 if self.sparsity is not None else None
        #: ``trainer.callback_metrics`` at post-training pruning (None otherwise).
        self.metrics_before_pruning: dict[str, float] | None = None
        self._params: dict[str, torch.nn.Parameter] = {}
        self._grad_avg: dict[str, Tensor] = {}
        self._ema_steps = 0
        self._active = False  # True once an event has happened: before that there is nothing to mask
        self._last_event: int | None = None
        self._positions: tuple[int, int, int] | None = None  # resolved (start, end, frequency)
        self._handles: list[Any] = []
        # The hot path, rebuilt at each event: the parameters with pruned entries and their float masks.
        self._live: list[torch.nn.Parameter] | None = None  # None: not built
        self._factors: list[Tensor] = []
        self._factor_of: dict[str, Tensor] = {}
        self._grads_masked = False  # mask_gradients() did its work since the last backward / optimizer step

        self._saturated_layers: set[str] = set()  # already named in a warning

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            sparsity=self.sparsity, threshold=self.threshold, schedule=self.schedule, pattern=self.pattern
        )

    # ------------------------------------------------------------------ the contract (callbacks/contract.py)

    def mask_gradients(self) -> None:
        """Zero ``.grad`` of the pruned entries (:class:`~lightning_clipprune.callbacks.contract.GradientMasker`).

        One foreach multiply by float masks over the parameters that have pruned entries, no host sync.
        Idempotent: only the first call after a backward pass (or an optimizer step) does work, so this
        callback's own ``on_before_optimizer_step`` and a ``GradientClipCallback`` may both call it.
        """
        if self._grads_masked:
            return
        if self._live is None:  # outside fit (the cache is dropped at its end): rebuild it once
            if not self._active:
                return
            self._build_cache()
        if not self._live:
            return
        self._grads_masked = True
        grads = [p.grad for p in self._live]
        if any(g is None for g in grads):
            pairs = [(g, f) for g, f in zip(grads, self._factors, strict=True) if g is not None]
            apply_masks_([g for g, _ in pairs], [f for _, f in pairs])
        else:
            apply_masks_(grads, self._factors)

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__, "prune")  # sharded strategies are refused here
        others = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, MagnitudePruneCallback)]
        if len(others) > 1:
            raise ValueError(
                f"the Trainer has {len(others)} MagnitudePruneCallbacks, at most one is allowed: merge them into"
                " one (choose the parameters with `include`/`exclude`)."
            )
        params = select_prunable_parameters(
            pl_module, self.include, self.exclude, self.prune_bias, self.keep_first_and_last
        )
        if not params:
            raise ValueError(
                f"MagnitudePruneCallback found no prunable parameter in {type(pl_module).__name__} (include="
                f"{self.include}, exclude={self.exclude}): it prunes the weights of Linear, Conv, ConvTranspose and"
                " attention (Q/K/V, output) layers; name other parameters with `include`"
            )
        pruning.check_pattern_fits(params, self.pattern, pruning.weight_layouts(pl_module, params))
        if self.parameter_names and self.parameter_names != list(params):
            # this instance pruned another module before: start afresh (a checkpoint restored after setup
            # is checked against the new names in load_state_dict)
            rank_zero_warn("MagnitudePruneCallback: new set of prunable parameters, the previous masks are dropped")
            self.masks, self._grad_avg, self._ema_steps = {}, {}, 0
            self._active, self._last_event = False, None
            self.current_target = 0.0 if self.sparsity is not None else None
            self._drop_cache()
        self._params = params
        self.parameter_names = list(params)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Optimizers exist from here on; hooks on them see every step, whoever calls optimizer.step.
        self._remove_hooks()
        ids = {id(p): n for n, p in self._params.items()}
        for optimizer in trainer.optimizers:
            names = [ids[id(p)] for group in optimizer.param_groups for p in group["params"] if id(p) in ids]
            if not names:
                continue
            hook = self._make_post_hook(names, keeps_pruned_weights_zero(optimizer))
            self._handles.append(optimizer.register_step_post_hook(hook))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._positions = self._resolve(trainer, pl_module)
        for name, p in self._params.items():
            if name in self.masks:
                self.masks[name] = self.masks[name].to(p.device)
            else:
                self.masks[name] = torch.ones_like(p, dtype=torch.bool)
            if self.criterion == "taylor":
                avg = self._grad_avg.get(name)
                self._grad_avg[name] = torch.zeros_like(p) if avg is None else avg.to(p.device, p.dtype)
        if self._active:  # resumed: weights from the checkpoint are already masked; make sure of it
            self._build_cache()
            self._apply_weights()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # Before the forward pass, so the whole step trains the pruned network; once per position
        # (gradient accumulation calls this for each micro-batch).
        t = trainer.global_step if self.unit == "step" else trainer.current_epoch
        start, end, frequency = self._positions
        if event_due(t, self._last_event, start, end, frequency):
            self._update(trainer, t)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # New gradients: the next mask_gradients() call must work again (also when a step was skipped).
        self._grads_masked = False

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # Lightning calls this after backward (and AMP unscaling), before its own gradient clipping. A
        # GradientClipCallback calls mask_gradients() too: whichever runs first masks, the other returns.
        self.mask_gradients()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # An event scheduled at or after the last step (post-training pruning) runs here, without
        # retraining; an early-stopped run that has not reached `end` is left as it is.
        t = self._position(trainer)
        start, end, _ = self._positions
        if t >= end and (self._last_event is None or self._last_event < end):
            self.metrics_before_pruning = {
                k: float(v) for k, v in trainer.callback_metrics.items() if isinstance(v, Tensor) and v.numel() == 1
            }
            self._update(trainer, t)
            self._say(
                "MagnitudePruneCallback: pruned after training, without retraining; metrics before: "
                f"{self.metrics_before_pruning}. Run `trainer.validate` for the metrics after."
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        if stage == "fit":
            self._drop_cache()  # the float masks are a training-time cache

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {n: m.cpu() for n, m in self.masks.items()} if self._active else {},
            "parameter_names": list(self.parameter_names),
            "active": self._active,
            "last_event": self._last_event,
            "current_target": self.current_target,
            "grad_avg": {n: g.detach().to("cpu", copy=True) for n, g in self._grad_avg.items()},  # updated in place
            "ema_steps": self._ema_steps,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        names = list(state_dict.get("parameter_names", []))
        if self._params and names and names != self.parameter_names:
            raise ValueError(f"the checkpoint's pruned parameters {names} differ from this module's {self.parameter_names}")
        self.parameter_names = names or self.parameter_names
        self.masks = dict(state_dict["masks"])
        self._active = bool(state_dict["active"])
        self._last_event = state_dict["last_event"]
        self.current_target = state_dict["current_target"]
        self._grad_avg = dict(state_dict.get("grad_avg", {}))
        self._ema_steps = int(state_dict.get("ema_steps", 0))
        self._drop_cache()  # rebuilt from these masks at train start

    # ------------------------------------------------------------------ internals

    def _position(self, trainer: pl.Trainer) -> int:
        return trainer.global_step if self.unit == "step" else trainer.current_epoch

    def _resolve(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[int, int, int]:
        total = self._run_length(trainer, pl_module)
        unit = f"{self.unit}s"
        start = resolve_position(self.start, total, "start")
        end = start if self.schedule == "oneshot" else resolve_position(self.end, total, "end")
        length = f"a run of {total:g} {unit}" if total is not None else f"a run of unknown length ({unit})"
        if end < start:
            raise ValueError(
                f"MagnitudePruneCallback: `start` must be <= `end`, got start={self.start!r} -> {unit[:-1]} {start},"
                f" end={self.end!r} -> {unit[:-1]} {end}, in {length}."
            )
        # Only a known, fixed length can be checked (manual optimization may step several times a batch).
        if total is not None and pl_module.automatic_optimization and end > total:
            which = f"start={self.start!r}" if self.schedule == "oneshot" else f"start={self.start!r}, end={self.end!r}"
            raise ValueError(
                f"MagnitudePruneCallback: the prune window ({which}: {unit} {start} to {end}) is never reached"
                f" in {length}: lower them or train longer (a float such as 0.75 is a fraction of the run)."
            )
        frequency = self.frequency
        if frequency is None:
            frequency = 1 if self.unit == "epoch" else max(1, min(100, (end - start) // 10))
        return start, end, frequency

    def _run_length(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
        """The whole training in ``unit``s, None when unknown or infinite."""
        if self.unit == "step":
            total = float(trainer.estimated_stepping_batches)
        else:
            total = float(trainer.max_epochs) if trainer.max_epochs not in (None, -1) else math.inf
        return total if math.isfinite(total) and total >= 0 else None

    def _update(self, trainer: pl.Trainer, t: int) -> None:
        start, end, _ = self._positions
        self._check_finite(t)
        weights = {n: p.detach() for n, p in self._params.items()}
        criterion, grad_avgs = self.criterion, None
        if criterion == "taylor":
            if self._ema_steps == 0:
                rank_zero_warn("MagnitudePruneCallback: no gradient seen yet, this 'taylor' event uses magnitude")
                criterion = "magnitude"
            else:
                grad_avgs = self._grad_avg
        target = None
        if self.sparsity is not None:
            target = sparsity_at(self.schedule, t, start, end, self.sparsity, self.initial_sparsity, self.power)
        layouts = pruning.weight_layouts(trainer.lightning_module, self.parameter_names)
        new = compute_masks(
            weights,
            sparsity=target,
            threshold=self.threshold,
            scope=self.scope,
            pattern=self.pattern,
            criterion=criterion,
            grad_avgs=grad_avgs,
            masks=self.masks if self._active else None,
            max_layer_sparsity=self.max_layer_sparsity,
            ranking=self.ranking,
            layer_sparsity=None if self.layer_sparsity is None else {
                k: sparsity_at(self.schedule, t, start, end, v, min(self.initial_sparsity, v), self.power)
                for k, v in self.layer_sparsity.items()
            },
            layouts=layouts,
        )
        saturated = {}
        if self.scope == "global":
            # under per-layer budgets the largest layer is the sparsest by design: only an emptied layer is named
            level = 1.0 if self._budgets else pruning.DEFAULT_MAX_LAYER_SPARSITY
            saturated = pruning.saturated_layers(new, self.max_layer_sparsity, layouts, level=level)
        if set(saturated) - self._saturated_layers:
            self._saturated_layers.update(saturated)
            if self.max_layer_sparsity is not None:
                limit = "its ceiling"
            else:
                limit = "100 %" if self._budgets else "99 % or more (no ceiling)"
            rank_zero_warn(
                f"MagnitudePruneCallback: global ranking pruned {len(saturated)} layer(s) to {limit}: "
                + ", ".join(f"{n} ({s:.1%})" for n, s in saturated.items())
                + ". If accuracy suffers, try ranking='layer_normalized' or scope='local'."
            )
        if criterion == "taylor" and trainer.world_size > 1:
            # taylor scores depend on gradient history: take rank 0's masks so every rank agrees
            new = {n: m.to(self._params[n].device) for n, m in trainer.strategy.broadcast(new, src=0).items()}
        self.masks.update(new)
        self._after_event(trainer, t, target)

    def _check_finite(self, t: int) -> None:
        # A NaN ranks nowhere (every comparison is False): the event would prune everything and keep the NaNs.
        scored = {n: p.detach() for n, p in self._params.items()}
        if self.criterion == "taylor" and self._ema_steps:
            scored.update({f"{n} (gradient average)": g for n, g in self._grad_avg.items()})
        bad = nonfinite_names(scored)
        if bad:
            raise FloatingPointError(
                f"MagnitudePruneCallback: at {self.unit} {t} {', '.join(bad)} hold NaN or inf, so the pruning event"
                " cannot rank them: training diverged before it (lower the learning rate, or add a"
                " GradientClipCallback, which skips non-finite steps)."
            )

    def _after_event(self, trainer: pl.Trainer, t: int, target: float | None) -> None:
        """Apply the new masks: weights, optimizer state, gradient averages, the hot-path cache."""
        self._active = True
        self._last_event = t
        self.current_target = target
        self._build_cache()
        self._apply_weights()
        params = list(self._params.values())
        with torch.no_grad():
            # the multiply leaves -0.0 where a negative weight was pruned; + 0.0 makes it +0.0, so the sparse
            # export needs no sign bit (an exact zero then stays +0.0 under SGD, Adam and AdamW updates)
            torch._foreach_add_(params, 0.0)
        masks = [self.masks[n] for n in self._params]
        for optimizer in trainer.optimizers:
            mask_optimizer_state_(optimizer, params, masks)
        if self.criterion == "taylor":
            apply_masks_(list(self._grad_avg.values()), [self.masks[n] for n in self._grad_avg])
        if self.verbose or log.isEnabledFor(logging.INFO):
            pruned = sum(int((~m).sum()) for m in self.masks.values())
            total = sum(m.numel() for m in self.masks.values())
            goal = f"target {target:.4f}" if target is not None else f"threshold {self.threshold:g}"
            self._say(
                f"MagnitudePruneCallback: {self.unit} {t}: {goal}, {pruned}/{total} prunable weights pruned"
                f" ({pruned / max(total, 1):.4f})"
            )

    def _say(self, message: str) -> None:
        """An event line: to the ``lightning_clipprune`` logger at INFO; also to the console when ``verbose``."""
        if rank_zero_only.rank == 0:
            log.info(message)
        if self.verbose:
            rank_zero_info(message)

    def _build_cache(self) -> None:
        """The hot path's lists: parameters that have pruned entries and their float masks (one pass a step)."""
        live = [n for n in self.parameter_names if not bool(self.masks[n].all())]
        self._live = [self._params[n] for n in live]
        self._factors = mask_factors([self.masks[n] for n in live], self._live)
        self._factor_of = dict(zip(live, self._factors, strict=True))
        self._grads_masked = False

    def _drop_cache(self) -> None:
        self._live, self._factors, self._factor_of = None, [], {}
        self._grads_masked = False

    def _apply_weights(self, names: Sequence[str] | None = None) -> None:
        names = [n for n in (self.parameter_names if names is None else names) if n in self._factor_of]
        apply_masks_([self._params[n] for n in names], [self._factor_of[n] for n in names])

    def _make_post_hook(self, names: list[str], zero_keeping: bool) -> Any:
        # `zero_keeping` (pruning.keeps_pruned_weights_zero): with the gradients masked before the step and
        # the state zeroed at the event, this optimizer's step provably leaves pruned weights at zero, so the
        # weights need no second pass. Any other optimizer is re-masked after every step.
        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if self.criterion == "taylor":
                self._accumulate_grad(names)
            if self._live:
                if not self._grads_masked:  # stepped without mask_gradients(): the state may have moved too
                    live = [n for n in names if n in self._factor_of]
                    self._apply_weights(live)
                    mask_optimizer_state_(
                        optimizer, [self._params[n] for n in live], [self._factor_of[n] for n in live]
                    )
                elif not zero_keeping:
                    self._apply_weights(names)
            self._grads_masked = False

        return hook

    def _accumulate_grad(self, names: list[str]) -> None:
        # Runs after optimizer.step: `.grad` is the gradient the step used (backward done, masked, clipped,
        # AMP-unscaled). A step *pre*-hook would be too early: in automatic optimization Lightning passes
        # the closure to optimizer.step, so pre-hooks run before that step's backward.
        pairs = [(self._grad_avg[n], self._params[n].grad) for n in names if self._params[n].grad is not None]
        if not pairs:
            return
        with torch.no_grad():
            self._fold_gradients([a for a, _ in pairs], [g for _, g in pairs])
        self._ema_steps += 1

    def _fold_gradients(self, avgs: list[Tensor], grads: list[Tensor]) -> None:
        """One EMA step of the running gradient averages, in place: ``avg = beta * avg + (1 - beta) * g``."""
        torch._foreach_mul_(avgs, self.taylor_beta)
        torch._foreach_add_(avgs, grads, alpha=1.0 - self.taylor_beta)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
