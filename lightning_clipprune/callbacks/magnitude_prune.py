r"""
Magnitude pruning
^^^^^^^^^^^^^^^^^

Removes the weights that matter least while a LightningModule trains, and keeps them removed: masks are
applied in place (the state-dict keys never change), pruned weights stay exactly zero after every
optimizer step, and a mask only ever grows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_clipprune._validation import (
    check_bool,
    check_choice,
    check_int,
    check_patterns,
    check_position,
    check_real,
)
from lightning_clipprune.callbacks._lr_rewind import make_rewind
from lightning_clipprune.callbacks._prune_coupling import resolve_coupling, take_example, with_followers
from lightning_clipprune.callbacks._prune_event import (
    after_fit,
    apply_event,
    check_first_batch,
    end_of_training,
    event_masks,
    log,
)
from lightning_clipprune.callbacks._prune_masking import MaskHotPath
from lightning_clipprune.callbacks._prune_plan import (
    OWNER,
    check_combination,
    check_finite,
    check_manual_clock,
    check_reachable,
    check_resumable,
    check_single,
    cpu_copy,
    event_layouts,
    parameter_changes,
    position,
    resolve_positions,
    resume_fields,
    select_parameters,
)
from lightning_clipprune.callbacks._prune_report import (
    after_validation,
    announce_coverage,
    before_post_training,
    post_training_line,
)
from lightning_clipprune.callbacks._prune_sharded import (
    Sharding,
    check_supported,
    is_model_parallel,
    local_mask,
    masks_from_zeros,
    sharding_of,
)
from lightning_clipprune.callbacks._regrow import make_regrow
from lightning_clipprune.callbacks._strategy import check_model_sharded, check_strategy
from lightning_clipprune.pruning import (
    DEFAULT_RANKING,
    RANKINGS,
    SCOPES,
    check_layer_sparsity,
    check_pattern_fits,
    make_criterion,
    parse_pattern,
    resolve_max_layer_sparsity,
    uses_budgets,
    weight_layouts,
)
from lightning_clipprune.schedules import SCHEDULES, event_due

_UNITS = ("step", "epoch")


class MagnitudePruneCallback(Callback):
    r"""Prune the weights of ``Linear`` and ``Conv*`` layers during training, on a schedule.

    Each pruning event computes keep-masks from the current weights, sets the pruned weights to ``+0.0`` in
    place together with their optimizer state (momentum, Adam moments), and from then on:

    - gradients of pruned weights are set to exactly zero in ``on_before_optimizer_step``
      (:meth:`mask_gradients`, the :class:`~lightning_clipprune.callbacks.contract.GradientMasker`
      contract), NaN and infinities included, before Lightning's own clipping; a ``GradientClipCallback``
      calls :meth:`mask_gradients` too, so the clip norm never sees them whatever the callback order;
    - pruned weights stay exactly zero after every optimizer step (automatic or manual optimization,
      gradient accumulation, AMP), whatever the gradient. For SGD, Adam, AdamW, NAdam, RAdam, RMSprop,
      Adagrad and Adadelta (exact classes, ``eps > 0``, not ``fused``:
      :func:`~lightning_clipprune.pruning.keeps_pruned_weights_zero`) that follows from the masked gradient
      and the zeroed state; any other optimizer gets its weights re-masked after every step.

    The per-step cost is one foreach integer multiply of the gradients' bits by 1/0 masks (4 bytes per
    pruned-layer weight, held during ``fit`` only, beside the 1-byte bool :attr:`masks`), over the layers
    that have pruned entries; no host synchronisation. Weights that are not finite end the run with one
    line (``FloatingPointError`` naming them): at a pruning event (which cannot rank them) and at the end
    of training, one check per ``fit``.

    Events happen at ``start``, every ``frequency`` steps (or epochs) after the previous one, and always at
    ``end``, where the target is reached. When ``end`` (or a one-shot ``start``) falls at or after the
    last step (``1.0``), the final event runs in ``on_train_end``: post-training pruning without
    retraining (the default of "oneshot"). The metrics before are printed, kept in :attr:`metrics_before_pruning`
    and in ``callback_metrics`` as ``<name>_before_pruning``; the next ``trainer.validate`` prints before -> after.
    (Checkpoints written during training predate that event: save the pruned model after ``fit``.)

    Masks only grow. Unstructured masks prune exactly ``round(s * n)`` entries; ties by flat index.

    Which parameters: frozen ones (``requires_grad=False``) are left dense unless ``prune_frozen`` (one
    info line names them). A lazy layer (``nn.LazyLinear``) must be materialised before ``fit`` (one forward
    pass). When a second ``fit`` finds the prunable parameters changed (a layer replaced, a new shape, other
    names), the masks are rebuilt from scratch, with a one-line warning saying what changed.

    Args:
        sparsity: target fraction of prunable weights that are zero at the end of the schedule, in
            [0, 1). For pattern "N:M" it may be left out (it is ``1 - N/M``).
        threshold: instead of a sparsity: at each event prune where the score ``<= threshold`` (``|w|``
            for "magnitude"). Pattern "unstructured" only.
        schedule: "oneshot" (everything at ``start``), "linear" or "cubic" (Zhu & Gupta 2017:
            :math:`s_t = s_f + (s_i - s_f)(1 - (t - t_0)/(t_1 - t_0))^{power}`).
        start: the first event. An ``int`` is a step (or an epoch with ``unit="epoch"``); a ``float`` in
            [0, 1] a fraction of the whole training. Note ``1`` is step 1 while ``1.0`` is the end of training.
            None: ``0.0``, but ``1.0`` for "oneshot" (never pruning at initialisation by magnitude by default).
        end: where the target is reached, as ``start``; default half-way, so the second half of training
            fine-tunes the sparse network (``benchmarks/bench_vs_lightning.md``). Ignored by "oneshot".
        unit: "step" (``trainer.global_step``; under manual optimization, training batches) or "epoch".
        frequency: steps (or epochs) between two events. None (default): 100 steps as in Zhu & Gupta,
            lowered to ``(end - start) // 10`` (at least 1) for a window shorter than 1,000 steps; 1 with
            ``unit="epoch"``. The event at ``end`` always happens.
        power: the exponent of "cubic".
        initial_sparsity: :math:`s_i`, the sparsity at ``start``, in ``[0, sparsity]``.
        scope: "global" (one ranking over all prunable weights) or "local" (each tensor to the same sparsity).
        pattern: "unstructured", "N:M" such as "2:4" (in each group of M consecutive weights along the
            input dimension keep N) or "channel" (whole output rows by their L2 norm).
        criterion: a registered name, "magnitude" (``|w|``) or "taylor" (``|w * g|``, ``g`` an EMA of the
            gradient as the optimizer sees it), a criterion class or instance
            (:mod:`lightning_clipprune.pruning.criteria`, :func:`~lightning_clipprune.pruning.register_criterion`).
            A criterion that needs gradients and has seen none yet ranks the first event by magnitude.
            A criterion that needs calibration data ("obs": layer-wise reconstruction,
            :mod:`lightning_clipprune.posttrain`) runs with ``schedule="oneshot", start=1.0`` only: at the end
            of training, on batches of the training loader, it prunes and updates the weights.
        include: ``fnmatch`` patterns of parameter names to prune (replaces the default selection).
        exclude: patterns of parameter names to keep dense.
        prune_bias: also prune the biases of the default layers.
        keep_first_and_last: keep the first and the last prunable layer dense.
        taylor_beta: EMA factor of the gradient, passed as ``beta`` to a criterion given by name that takes
            one ("taylor"), in [0, 1).
        verbose: also print the line of each event on the console (``rank_zero_info``). The line always
            goes to the ``lightning_clipprune`` Python logger at INFO (the app writes it to ``run.log``).
        max_layer_sparsity: "global" scope never prunes one layer past this fraction, nor the last weight of
            any output row; what a capped layer would have lost is pruned from the others, so the global
            target is still met exactly. "auto" (default, as in ``compute_masks``): no ceiling where per-layer
            budgets ("er", "erk") decide, else 0.99 (:data:`~lightning_clipprune.pruning.CEILING`). None: no
            ceiling. The instance keeps the value given; :attr:`effective_max_layer_sparsity` is the number.
        ranking: how "global" scope shares an unstructured target between layers (default
            :data:`~lightning_clipprune.pruning.DEFAULT_RANKING`, as in ``compute_masks``). "er":
            Erdos-Renyi budgets, each layer's density proportional to ``(fan_in + fan_out) / (fan_in *
            fan_out)`` (Mocanu et al. 2018); "erk": Erdos-Renyi-Kernel (Evci et al. 2020); "raw": one
            threshold on the scores of all layers (as ``torch.nn.utils.prune.global_unstructured``);
            "layer_normalized": each score divided by its layer's RMS, then one threshold. Measured against
            Lightning's ``ModelPruning`` in ``benchmarks/bench_vs_lightning.md``.
        layer_sparsity: ``{parameter name or fnmatch pattern: final sparsity}`` with ``scope="local"``;
            layers not named follow ``sparsity``. A key matching no prunable parameter raises at the first event.
        prune_frozen: also prune parameters with ``requires_grad=False``.
        include_tied: also prune a tensor tied to a layer left dense (GPT-2's ``lm_head`` is ``wte``); by
            default one line names the tie. Under 50 % prunable, setup warns naming what is left dense and why.
        regrow: dynamic sparse training once the target is reached: "rigl" (drop the smallest live weights,
            regrow as many where the clipped gradient is largest), "set" (regrow at random), or a
            :class:`~lightning_clipprune.RegrowConfig` (or mapping) for fraction, interval,
            start, end. Per-layer sparsity unchanged, but masks then move (they no longer only grow); logs
            ``prune/regrown``. See ``docs/regrowth.md``.
        couple_channels: with ``pattern="channel"``, prune together the output channels that must be removed
            together (those a residual addition sums), grouped as Torch-Pruning's ``DependencyGraph`` traces
            them, the same channels in every member, so :func:`~lightning_clipprune.to_inference` can remove the
            residual stream's channels physically; their ``BatchNorm`` weight and bias and layer bias follow
            them. False (default): each layer on its own. True: coupled (Torch-Pruning needed, else one
            ``ImportError`` line with the pip command). "auto": coupled when Torch-Pruning is installed. Refused
            under ``ModelParallelStrategy``, with ``layer_sparsity`` and with a calibration criterion. The
            details (scores, exclusions, couplings it cannot map, exact resume): ``docs/pruning.md``.
        lr_rewind: learning-rate rewinding (Renda et al. 2020): from the ramp's ``end`` on, every parameter
            group's rate restarts at ``lr_rewind`` times its base rate (``initial_lr``, else its rate at train
            start), cosine to 0 at the last step, overriding the module's scheduler. None (default): left alone.
            ``end=0.6, lr_rewind=1.0``: ``docs/pruning.md``, ``benchmarks/bench_regrow.md``. Needs a known length.

    Raises:
        ImportError: ``couple_channels=True`` without Torch-Pruning (in ``__init__``, one line with the pip command).
        ValueError: for a bad argument (in ``__init__``); at ``setup()`` when the module has no prunable
            parameter, a shape does not fit the pattern or a lazy layer is not materialised; at train start
            when the prune window lies past the end of the run.
        MisconfigurationException: at ``setup()`` when the Trainer has a second ``MagnitudePruneCallback``.
        FloatingPointError: at a pruning event or at the end of training, when a weight holds NaN or inf.

    Attributes:
        masks: ``{parameter name: bool tensor}``, True = kept.
        parameter_names: the pruned parameters, in ``named_parameters`` order.
        current_target: the scheduled sparsity at the last event (0.0 before ``start``); None in threshold mode.
        metrics_before_pruning: ``trainer.callback_metrics`` (scalars) just before a post-training event, else None.

    Under DDP the masks are identical on every rank: criteria that need nothing but the weights rank
    weights DDP keeps identical; the masks of the others (gradient EMAs) are broadcast from rank 0.

    Under ``ModelParallelStrategy`` (FSDP2: ``fully_shard`` in ``configure_model``, ``tensor_parallel_size=1``)
    the masks are DTensors sharded like their parameters and an event finds the cut by a distributed k-th
    selection (:mod:`lightning_clipprune.pruning.distributed`): nothing gathered, masks bit for bit those of one
    process. What is supported and refused there, and how checkpoints resume: ``docs/strategies.md``.

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
        start: int | float | None = None,
        end: int | float = 0.5,
        unit: str = "step",
        frequency: int | None = None,
        power: float = 3.0,
        initial_sparsity: float = 0.0,
        scope: str = "global",
        pattern: str = "unstructured",
        criterion: Any = "magnitude",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        prune_bias: bool = False,
        keep_first_and_last: bool = False,
        taylor_beta: float = 0.9,
        verbose: bool = False,
        max_layer_sparsity: float | str | None = "auto",
        ranking: str = DEFAULT_RANKING,
        layer_sparsity: dict[str, float] | None = None,
        prune_frozen: bool = False,
        include_tied: bool = False,
        regrow: Any = None,
        couple_channels: bool | str = False,
        lr_rewind: float | None = None,
    ) -> None:
        super().__init__()
        kind, n, m = parse_pattern(pattern, owner=OWNER)
        sparsity = 1.0 - n / m if kind == "nm" and sparsity is None and threshold is None else sparsity
        self.sparsity = check_real(OWNER, "sparsity", sparsity, low=0, high=1, high_open=True, allow_none=True)
        self.threshold = check_real(OWNER, "threshold", threshold, low=0, allow_none=True)
        self.schedule = check_choice(OWNER, "schedule", schedule, SCHEDULES)
        self.start = check_position(OWNER, "start", (1.0 if schedule == "oneshot" else 0.0) if start is None else start)
        self.end = check_position(OWNER, "end", end)
        self.unit = check_choice(OWNER, "unit", unit, _UNITS)
        self.frequency = check_int(OWNER, "frequency", frequency, low=1, allow_none=True)
        self.power = check_real(OWNER, "power", power, low=0, low_open=True)
        self.initial_sparsity = check_real(OWNER, "initial_sparsity", initial_sparsity, low=0, high=self.sparsity or 0.0)
        self.scope = check_choice(OWNER, "scope", scope, SCOPES)
        self.pattern = pattern
        self.taylor_beta = check_real(OWNER, "taylor_beta", taylor_beta, low=0, high=1, high_open=True)
        self.criterion = criterion  # as given; the object in use is self._criterion
        self._criterion = make_criterion(criterion, owner=OWNER, beta=self.taylor_beta)
        post_training = self.schedule == "oneshot" and isinstance(self.start, float) and self.start == 1.0
        if self._criterion.needs == "calibration" and not (post_training and self.threshold is None):
            raise ValueError(
                f"`{OWNER}(criterion={criterion!r})` needs a calibration pass after training: give it a"
                " `sparsity` with schedule='oneshot', start=1.0."
            )
        self.include = None if include is None else list(check_patterns(OWNER, "include", include, allow_none=True))
        self.exclude = list(check_patterns(OWNER, "exclude", exclude, allow_none=True) or ())
        self.prune_bias = check_bool(OWNER, "prune_bias", prune_bias)
        self.keep_first_and_last = check_bool(OWNER, "keep_first_and_last", keep_first_and_last)
        self.prune_frozen = check_bool(OWNER, "prune_frozen", prune_frozen)
        self.include_tied = check_bool(OWNER, "include_tied", include_tied)
        self.verbose = check_bool(OWNER, "verbose", verbose)
        self.ranking = check_choice(OWNER, "ranking", ranking, RANKINGS)
        self._budgets = uses_budgets(self.ranking, self.scope, kind, threshold)
        self.max_layer_sparsity = max_layer_sparsity  # as given ("auto" stays "auto")
        self._ceiling = resolve_max_layer_sparsity(max_layer_sparsity, self._budgets, owner=OWNER)
        self.layer_sparsity = check_layer_sparsity(OWNER, layer_sparsity)
        check_combination(self, kind, n, m)
        self.regrow = regrow  # as given; the state in use is self._regrow (None: off)
        self._regrow = make_regrow(regrow, self, kind)
        self.lr_rewind, self._rewind = make_rewind(lr_rewind)  # (the state in use: self._rewind, None when off)
        self.couple_channels = couple_channels  # as given ("auto" stays "auto")
        self._couple = resolve_coupling(self, kind)  # whether the events couple channels
        self._example: Any = None  # one sample of the first training batch: the input the groups are traced on
        self._outputs_checked = False  # "channel": whether this fit checked for pruned model outputs
        self._followers: frozenset[str] = frozenset()  # pruned only with their coupled channels (BatchNorm, bias)
        self._params: dict[str, torch.nn.Parameter] = {}
        self._handles: list[Any] = []
        #: the 1-D mesh of the pruned parameters under ModelParallelStrategy (FSDP2), else None
        self._sharding: Sharding | None = None
        #: the pruned counts of a restored sharded state, whose masks are read from the zeros at train start
        self._restored_counts: dict[str, int] | None = None
        self._pruned_counts: dict[str, int] = {}  # each mask's pruned count over all ranks (sharded runs)
        self._reset()

    def _reset(self) -> None:
        """No masks, no event, no criterion state: the state of a callback that has pruned nothing."""
        self.masks: dict[str, Tensor] = {}
        self.parameter_names: list[str] = []
        self.current_target: float | None = 0.0 if self.sparsity is not None else None
        self._active = False  # True once an event has happened: before that there is nothing to mask
        self._last_event: int | None = None
        self._hot = MaskHotPath()  # the per-step work, rebuilt at each event
        self._positions: tuple[int, int, int] | None = None  # resolved (start, end, frequency)
        self._saturated_layers: set[str] = set()  # already named in a warning
        self._groups: list[dict[str, Tensor]] | None = None  # coupled channels, traced at the first event of a fit
        self._groups_key: tuple[int, ...] | None = None  # the identities of the parameters they were traced for
        #: ``trainer.callback_metrics`` at post-training pruning (None otherwise).
        self.metrics_before_pruning: dict[str, float] | None = None

    @property
    def effective_max_layer_sparsity(self) -> float | None:
        """The ceiling in use: ``max_layer_sparsity`` with "auto" resolved (a number, or None for none)."""
        return self._ceiling

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads it on every hook call (hundreds of times a fit): rebuilt only when an argument changed.
        args = (self.sparsity, self.threshold, self.schedule, self.pattern)
        cached = self.__dict__.get("_state_key_cache")
        if cached is None or cached[0] != args:
            key = self._generate_state_key(sparsity=args[0], threshold=args[1], schedule=args[2], pattern=args[3])
            self.__dict__["_state_key_cache"] = cached = (args, key)
        return cached[1]

    # ------------------------------------------------------------------ the contract (callbacks/contract.py)

    def mask_gradients(self) -> None:
        """Set ``.grad`` of the pruned entries to exactly zero (:class:`~lightning_clipprune.callbacks.contract.GradientMasker`).

        One foreach multiply of the gradients' bits over the parameters that have pruned entries, no host
        sync; a NaN or infinite gradient of a pruned entry becomes zero too. Idempotent: only the first call
        after a backward pass (or an optimizer step) does work, so this callback's own
        ``on_before_optimizer_step`` and a ``GradientClipCallback`` may both call it.
        """
        if not self._hot.built:  # outside fit (the cache is dropped at its end): rebuild it once
            if not self._active:
                return
            self._build_cache()
        if self._regrow is not None:  # a regrowth step copies the dense gradients first
            self._regrow.before_mask(self._hot)
        self._hot.mask_gradients()

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__, "prune")  # sharded strategies are refused here
        check_single(trainer, MagnitudePruneCallback)
        if is_model_parallel(trainer):
            # configure_model (fully_shard) runs after setup: the parameters are chosen in on_fit_start
            check_supported(self, weight_layouts(pl_module))
            return
        self._select(pl_module, stage)

    def _select(self, pl_module: pl.LightningModule, stage: str) -> None:
        """Choose the parameters to prune and check them against the pattern and the previous fit."""
        params, self._followers = with_followers(self, pl_module, select_parameters(self, pl_module, stage == "fit"))
        if stage == "fit" and list(params) != self.parameter_names:
            announce_coverage(self, pl_module, list(params))
        layouts = weight_layouts(pl_module, params)
        check_pattern_fits(params, self.pattern, layouts)
        check_reachable(self, params, layouts)
        change = parameter_changes(self._params, params, self.parameter_names)
        if change is not None:
            # this instance pruned other parameters before: start afresh (a checkpoint restored after setup
            # is checked against the new names in load_state_dict)
            rank_zero_warn(
                f"{OWNER}: the module's prunable parameters changed since the last fit ({change}): the previous"
                " masks are dropped and pruning starts afresh on the new parameters."
            )
            self._reset()
            self._criterion.load_state_dict({})  # an empty state: the criterion starts afresh too
        self._params = params
        self.parameter_names = list(params)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Optimizers exist from here on; hooks on them see every step, whoever calls optimizer.step.
        self._remove_hooks()
        if is_model_parallel(trainer):  # the sharded (DTensor) parameters exist from here on
            check_model_sharded(trainer, pl_module, OWNER)
            self._select(pl_module, "fit")
            self._sharding = sharding_of(self._params)
            if self._sharding is not None:
                check_supported(self, event_layouts(self, pl_module))
        observe = self._criterion.observe if self._criterion.needs == "gradients" else None
        self._handles.extend(self._hot.register(trainer.optimizers, self._params, observe))
        if self._regrow is not None:
            self._regrow.on_fit_start(self, trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._positions, self._clock_checked = resolve_positions(self, trainer), False
        self._example, self._outputs_checked, self._batch_checked = None, False, False  # from this fit's first batch
        if self._restored_counts is not None:  # a sharded run's state: its masks are the zeros of the weights
            self.masks = masks_from_zeros(self, self._restored_counts, self._sharding)
            self._pruned_counts, self._restored_counts = dict(self._restored_counts), None
        for name, p in self._params.items():
            mask = self.masks.get(name)
            if mask is not None and mask.shape != p.shape:
                raise ValueError(
                    f"{OWNER}: the mask of `{name}` has shape {tuple(mask.shape)} but the parameter {tuple(p.shape)}:"
                    " the checkpoint comes from another model."
                )
            if mask is not None and self._sharding is not None:  # a whole mask of an unsharded run: our rows
                mask = local_mask(self._sharding, name, mask, p)
            self.masks[name] = torch.ones_like(p, dtype=torch.bool) if mask is None else mask.to(p.device)
        self._criterion.prepare(self._params)
        if self._rewind is not None:
            self._rewind.on_train_start(self, trainer)
        if self._active:  # resumed: weights from the checkpoint are already masked; make sure of it
            self._build_cache()
            self._apply_weights()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # Before the forward pass, so the whole step trains the pruned network; once per position
        # (gradient accumulation calls this for each micro-batch).
        t = position(self, trainer)
        start, end, frequency = self._positions
        take_example(self, pl_module, batch)  # the input the coupled channels are traced on
        check_first_batch(self, batch)  # a calibrating criterion reads these batches at the end
        if event_due(t, self._last_event, start, end, frequency):
            self._update(trainer, t)
        if self._regrow is not None:
            self._regrow.on_train_batch_start(self, trainer)
        if self._rewind is not None:
            self._rewind.apply(self, trainer, t)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        check_manual_clock(self, trainer)  # once: does max_steps count this run's batches?
        if self._rewind is not None:  # again after the scheduler's step: what a LearningRateMonitor reads next
            self._rewind.apply(self, trainer, position(self, trainer))

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # New gradients: the next mask_gradients() call must work again (also when a step was skipped).
        self._hot.grads_masked = False

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # Lightning calls this after backward (and AMP unscaling), before its own gradient clipping. A
        # GradientClipCallback calls mask_gradients() too: whichever runs first masks, the other returns.
        self.mask_gradients()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        t = position(self, trainer)  # post-training pruning runs here (also after an early end), without retraining
        if end_of_training(self, trainer, t):
            self.metrics_before_pruning = before_post_training(self, trainer)
            self._update(trainer, t)
            rank_zero_info(post_training_line(self.metrics_before_pruning))
        params = self._params if self._sharding is not None else dict(pl_module.named_parameters())  # one sync a fit
        check_finite(params, "training ended with weights that are not finite:", sharding=self._sharding, trainer=trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        after_validation(self, trainer)  # a trainer.validate after post-training pruning: before -> after

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        after_fit(self, trainer)  # SWA / EMA averages of a denser past; a ModelCheckpoint's best from mid-ramp

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        if stage == "fit":
            self._drop_cache()  # the integer masks are a training-time cache

    @override
    def state_dict(self) -> dict[str, Any]:
        # Sharded: rank zero alone writes this state, so it holds the pruned counts, not the masks (their zeros
        # are in the checkpoint's weights: masks_from_zeros)
        sharded = self._sharding is not None and self._active
        return {
            "masks": {n: m.cpu() for n, m in self.masks.items()} if self._active and not sharded else {},
            **({"pruned_counts": dict(self._pruned_counts)} if sharded else {}),
            "parameter_names": list(self.parameter_names),
            "active": self._active,
            "last_event": self._last_event,
            "current_target": self.current_target,
            **resume_fields(self),
            "criterion": cpu_copy(self._criterion.state_dict()),  # its tensors are updated in place
            **({"regrow": self._regrow.state_dict()} if self._regrow is not None else {}),
            **({"lr_rewind": self._rewind.state_dict()} if self._rewind is not None else {}),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_resumable(self, state_dict)
        self.parameter_names = list(state_dict.get("parameter_names", [])) or self.parameter_names
        self.masks = dict(state_dict["masks"])
        counts = state_dict.get("pruned_counts")
        self._restored_counts = {str(k): int(v) for k, v in counts.items()} if isinstance(counts, dict) else None
        self._active = bool(state_dict["active"])
        self._last_event = state_dict["last_event"]
        self.current_target = state_dict["current_target"]
        # checkpoints written before criteria were objects hold the "taylor" state at the top level
        self._criterion.load_state_dict(state_dict.get("criterion", state_dict))
        if self._regrow is not None:
            self._regrow.load_state_dict(state_dict.get("regrow", {}))
        if self._rewind is not None:
            self._rewind.load_state_dict(state_dict.get("lr_rewind", {}))
        self._drop_cache()  # rebuilt from these masks at train start

    # ------------------------------------------------------------------ internals

    def _update(self, trainer: pl.Trainer, t: int) -> None:
        """A pruning event at position ``t``: new masks from the scheduled target, applied everywhere."""
        new, target = event_masks(self, trainer, t)
        self.masks.update(new)
        apply_event(self, trainer, t, target)

    def _say(self, message: str) -> None:
        """An event line: to the ``lightning_clipprune`` logger at INFO; also to the console when ``verbose``."""
        if rank_zero_only.rank == 0:
            log.info(message)
        if self.verbose:
            rank_zero_info(message)

    def _build_cache(self) -> None:
        self._hot.build(self._params, self.masks, self.parameter_names)

    def _drop_cache(self) -> None:
        self._hot.drop()

    def _apply_weights(self) -> None:
        self._hot.apply_weights(self.parameter_names)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
