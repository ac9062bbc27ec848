"""GradientClipCallback: any clip algorithm of :mod:`lightning_clipprune.clipping` as a Lightning callback.

The math lives in the clipper objects of :mod:`lightning_clipprune.clipping`; this module decides when to
call them, on which parameters, what to do with a non-finite norm, and what to log. It holds no
per-algorithm branch: an algorithm is a clipper object, chosen by name or passed in.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_clipprune._validation import (
    check_choice,
    check_int,
    check_patterns,
    check_real,
    unmatched_patterns,
)
from lightning_clipprune.callbacks._clip_algorithm import (
    DEFAULT_CLIP_VAL,
    OWNER,
    UNSET,
    Unset,
    resolve_clipper,
)
from lightning_clipprune.callbacks._clip_guards import ClipCallGuard, StepGuard, mostly_clipped_message
from lightning_clipprune.callbacks._strategy import check_model_sharded, check_strategy
from lightning_clipprune.callbacks.contract import GradientMasker, find_callbacks
from lightning_clipprune.clipping import Clipper, clipper_name, total_norm
from lightning_clipprune.pruning import weight_layouts

__all__ = ["DEFAULT_CLIP_VAL", "GradientClipCallback"]

_NONFINITE = ("skip", "error")
# Per-step norms and coefficients are folded into the summary accumulators in batches of this many steps,
# so a step costs a list append instead of a dozen tiny kernels.
_FOLD_EVERY = 256
# A step counts as clipped when it lowered the norm by more than one part in a million: torch's c / (n + 1e-6)
# scales a norm n >= 1 that sits right at the bound c (AutoClip's first step) by less, and leaves it unclipped.
_CLIPPED_BELOW = 1.0 - 1e-6


class GradientClipCallback(Callback):
    r"""Clip gradients once per optimizer step, log the norm, and never apply a non-finite gradient.

    ``algorithm`` is a name of :data:`lightning_clipprune.clipping.CLIPPERS`, a clipper class, or a
    clipper object (anything with ``clip``, ``state_dict`` and ``load_state_dict``: see
    :class:`lightning_clipprune.clipping.Clipper`). Given a name or a class, the callback builds the
    clipper from ``clip_val`` (the option each class names as its bound) and ``algorithm_options`` (its
    other options); each class checks its own options and holds their defaults. The built-in algorithms
    (formulas and papers in :mod:`lightning_clipprune.clipping`):

    ============  ===============================  =============================================================
    algorithm     class                            ``clip_val`` (left out: the class's default)
    ============  ===============================  =============================================================
    ``norm``      :class:`~.clipping.NormClip`     ``max_norm``, the max global p-norm (``clip_grad_norm_``)
    ``value``     :class:`~.clipping.ValueClip`    ``clip_value``, the max absolute entry (``clip_grad_value_``)
    ``agc``       :class:`~.clipping.AGC`          ``clip_factor``, lambda: max unit-wise ``||G|| / max(||W||, eps)``
    ``autoclip``  :class:`~.clipping.AutoClip`     ``max_norm``, hard cap on the percentile threshold (None: none)
    ``zclip``     :class:`~.clipping.ZClip`        ``max_norm``, hard cap on the norm at every step (None: none)
    ============  ===============================  =============================================================

    - ``"norm"`` is what ``Trainer(gradient_clip_val=...)`` does, bit for bit; ``"value"`` what
      ``gradient_clip_algorithm="value"`` does.
    - ``"agc"``: the paper leaves the final classifier out: pass e.g. ``exclude=["fc.*"]``; its default
      lambda is tuned for batch 4096 (see :class:`~.clipping.AGC`).
    - ``"zclip"``: its default cap clips *every* step whose norm is above it, spike or not (see
      :class:`~.clipping.ZClip`); ``clip_val=None`` clips spikes only. ``summary()["clipped_fraction"]``
      says how often a run was clipped.

    A clipper that remembers something between steps (AutoClip's history, ZClip's statistics) is kept per
    optimizer: the one given (or built) serves the first optimizer, a copy of it as it was given serves
    each further one. Their states are saved in the checkpoint and restored on resume.

    Clipping happens in ``on_before_optimizer_step``: there the gradients are complete (after the last
    micro-batch of gradient accumulation, so they are clipped once per optimizer step), unscaled under
    16-bit AMP (the precision plugin unscales before calling the hook), and the hook also runs when a
    ``LightningModule`` with manual optimization calls ``optimizer.step()`` on the ``LightningOptimizer`` that
    ``self.optimizers()`` returns. An optimizer that evaluates its closure several times a step (LBFGS) has
    each evaluation clipped and the step counted once, by Lightning's count of the optimizer steps it started
    (whatever the optimizer does with torch's step hooks: a wrapper such as timm's ``Lookahead`` too). Only the
    parameters of the optimizer being stepped are clipped, minus those whose name matches an ``exclude``
    pattern. Before the norm is computed, every :class:`~lightning_clipprune.callbacks.contract.GradientMasker`
    on the Trainer (a pruning callback) zeroes the gradients of pruned weights, whatever the order of the
    callback list (see :mod:`lightning_clipprune.callbacks.contract`).

    Sharded models (``ModelParallelStrategy``: FSDP2's ``fully_shard``, and tensor parallelism; parameters and
    gradients are DTensors): the norm is the whole model's, for every p and ``inf``, equal to one process's
    on the same global batch. Each rank takes the norms of its gradient shards and one ``all_reduce`` of one
    number per parameter combines them (a ``Replicate`` piece counted once); no gradient is gathered.
    ``"value"`` clamps each shard; ``"agc"`` clips each row on the rank that holds it and raises (one line) on
    a weight sharded off dim 0 (``RowwiseParallel``'s ``Shard(1)``); AutoClip and ZClip are fed the global
    norm, so their state is the same on every rank, and so is the non-finite skip.

    Logged through the Trainer's loggers on the Trainer's own logging rows: at a batch whose logging step (the
    Trainer's ``_batches_that_stepped``, which also counts a batch whose ``training_step`` returned None) plus
    one is a multiple of ``log_every_n_steps``, as Lightning decides for ``self.log`` (values are read from
    the device only then; an optimizer stepped twice in one batch logs its first step): ``grad/norm``
    (global p-norm of the clipped parameters' gradients before clipping), ``grad/clip_coef`` (the factor
    applied, ``<= 1``; for ``"value"``, ``"agc"`` and per-parameter AutoClip, which do not scale uniformly,
    the ratio of the norms after and before clipping), and ``grad/nonfinite_skipped`` (cumulative count of
    steps with an inf or NaN gradient).
    With several optimizers, the metrics of optimizer ``k > 0`` end in ``_opt{k}``.

    Non-finite gradients: every parameter the optimizer steps is checked, excluded ones too. Under
    16-bit AMP the gradient scaler already skips the step (and lowers its scale); the callback only
    counts it. Otherwise ``nonfinite="skip"`` drops the step: the gradients of all the optimizer's
    parameters are set to ``None``, which every ``torch.optim`` optimizer treats as "no gradient for
    this parameter", so neither the parameters nor the optimizer state (momentum, Adam moments and step
    count, weight decay) change; ``nonfinite="error"`` raises naming the step. Deciding to skip needs
    one host read of the norm per optimizer step (``GradScaler.step`` does the same read of its inf flag
    under AMP): a step cannot be both taken and not taken without the host knowing, short of
    snapshotting all parameters and optimizer state every step. On CPU the read waits for nothing; on a
    GPU it comes after the clipping kernels are queued and costs about one kernel-launch latency per step
    (see ``benchmarks/bench_clip.md``). With a GradScaler there is no read.

    Args:
        clip_val: the bound: the value of the option the algorithm's class names (table above); left
            out, the class's default. Must be left out when ``algorithm`` is a clipper object.
        algorithm: an algorithm name (``"norm"``, ``"value"``, ``"agc"``, ``"autoclip"``, ``"zclip"``, or
            one added with :func:`~lightning_clipprune.clipping.register_clipper`), a clipper class, or
            a clipper object such as ``ZClip(z_thresh=3.0)``.
        norm_type: p of the p-norm (``float("inf")`` for the max-norm); given to the clipper, and used
            for the logged norm.
        algorithm_options: the other options of the algorithm's class, e.g. ``{"alpha": 0.9}`` for
            ``"zclip"`` (names and defaults: the class's signature). Only with a name or a class.
        exclude: ``fnmatch`` patterns over parameter names (``pl_module.named_parameters()``); matching
            parameters are neither clipped nor counted in the norm (still checked for inf/NaN).
        nonfinite: ``"skip"`` or ``"error"``: what to do with a non-finite gradient without a gradient scaler.
        log_every_n_steps: log every this many of the Trainer's logging steps (batches that stepped); None
            uses the Trainer's ``log_every_n_steps``, so ``grad/*`` share the rows of ``self.log``.
        **deprecated: the keywords of the previous release, kept for this one with a ``FutureWarning``:
            ``agc_eps``, ``autoclip_percentile``, ``history_size``, ``autoclip_per_parameter`` and
            ``zclip_<option>`` (``alpha``, ``z_thresh``, ``warmup_steps``, ``mode``, ``clip_option``,
            ``clip_factor``, ``skip_update_on_spike``, ``eps``) set the option of that name on the
            class (``zclip_alpha=0.9`` is ``algorithm_options={"alpha": 0.9}``); None means not given.

    Raises:
        ValueError: in ``__init__``, if an argument is out of range; the message names the argument,
            the allowed values and the value received.
        MisconfigurationException: in ``setup()``, if the Trainer also clips (``gradient_clip_val``) or
            has a second ``GradientClipCallback``.
        RuntimeError: with ``nonfinite="error"``, at the first optimizer step whose gradient is not finite.

    Warns:
        UserWarning: once per fit, when the module clips too: at fit start if it overrides
            ``configure_gradient_clipping`` (automatic optimization; a pass-through of the Trainer's
            ``gradient_clip_val`` clips nothing, so this is not refused), and at the first
            ``self.clip_gradients(opt, gradient_clip_val=...)`` with a clip value (manual optimization). Also once
            when an optimizer is stepped around Lightning (``self.optimizers(use_pl_optimizer=False).step()``),
            which the hook never sees.

    Example::

        import lightning as L
        from lightning_clipprune import GradientClipCallback
        from lightning_clipprune.clipping import ZClip

        trainer = L.Trainer(callbacks=[GradientClipCallback(clip_val=1.0, algorithm="norm")])
        # adaptive clipping (lambda 0.01), not applied to the classifier head:
        GradientClipCallback(algorithm="agc", exclude=["head.*"])
        # AutoClip at the 10th percentile of every norm so far, never above 5:
        GradientClipCallback(clip_val=5.0, algorithm="autoclip", algorithm_options={"percentile": 10.0})
        # ZClip that clips spikes only (no hard cap), as an object:
        GradientClipCallback(algorithm=ZClip(z_thresh=3.0, max_norm=None))
    """

    def __init__(
        self,
        clip_val: float | None | Unset = UNSET,
        algorithm: str | type | Clipper = "norm",
        norm_type: float = 2.0,
        *,
        algorithm_options: Mapping[str, Any] | None = None,
        exclude: Sequence[str] | str = (),
        nonfinite: str = "skip",
        log_every_n_steps: int | None = None,
        **deprecated: Any,
    ) -> None:
        super().__init__()
        #: The clipper of the first optimizer (the object given, or the one built from the name).
        self.clipper: Clipper = resolve_clipper(clip_val, algorithm, algorithm_options, deprecated)
        #: The algorithm's registered name (its class name when it has none).
        self.algorithm: str = clipper_name(self.clipper)
        #: The clipper's bound (``clip_val``), None when it has none or it is uncapped.
        self.clip_val: float | None = getattr(self.clipper, "clip_val", None)
        self.norm_type = check_real(OWNER, "norm_type", norm_type, low=0, low_open=True, allow_inf=True)
        self.exclude = check_patterns(OWNER, "exclude", exclude)
        self.nonfinite = check_choice(OWNER, "nonfinite", nonfinite, _NONFINITE)
        self.log_every_n_steps = check_int(OWNER, "log_every_n_steps", log_every_n_steps, low=1, allow_none=True)

        self._template = copy.deepcopy(self.clipper)  # as given: the start of each further optimizer's clipper
        self._clippers: dict[int, Clipper] = {}  # per optimizer index
        self._steps: dict[int, int] = {}  # optimizer steps seen, per optimizer index
        # On the gradients' device: [sum of finite norms, finite steps, clipped steps, non-finite steps].
        self._acc: Tensor | None = None
        self._max_norm: Tensor | None = None
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []  # (norm, coef, checked norm) not yet folded
        self._names: dict[int, str] = {}  # id(parameter) -> name
        self._plans: dict[int, _Plan] = {}  # per optimizer index
        self._maskers: list[GradientMasker] = []
        self._has_scaler = False  # a GradScaler (16-bit AMP) skips non-finite steps itself
        self._warned_nonfinite = False
        self._layouts: dict[int, Any] = {}  # id(parameter) -> Layout, for weights not stored (out, in, *k)
        self._step_guard = StepGuard(OWNER)  # new step or closure re-evaluation (LBFGS); steps the hook missed
        self._clip_guard = ClipCallGuard(OWNER)  # the module clipping too
        self._logged_at: dict[int, int] = {}  # optimizer index -> the Trainer's logging step it last logged at

    # ------------------------------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__, "clip")  # sharded strategies are refused here
        if stage != "fit":
            return
        clippers = [cb for cb in trainer.callbacks if isinstance(cb, GradientClipCallback)]
        if len(clippers) > 1:
            raise MisconfigurationException(
                f"The Trainer has {len(clippers)} `GradientClipCallback`s, which would clip each step "
                f"{len(clippers)} times: keep one (algorithms: {[cb.algorithm for cb in clippers]})."
            )
        if trainer.gradient_clip_val:
            raise MisconfigurationException(
                f"`Trainer(gradient_clip_val={trainer.gradient_clip_val!r})` and `GradientClipCallback` both clip "
                "gradients, which would clip twice. Drop one: remove `gradient_clip_val` from the Trainer to clip "
                f"with the callback (`GradientClipCallback(clip_val={self.clip_val!r}, "
                f"algorithm={self.algorithm!r})`), or remove the callback."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After strategy setup: the optimizers exist and the parameters are the ones that will be stepped.
        check_model_sharded(trainer, pl_module, type(self).__name__)
        named = list(pl_module.named_parameters())
        self._names = {id(p): n for n, p in named}
        self._plans.clear()
        self._maskers = find_callbacks(trainer, GradientMasker, exclude=self)
        for pattern in unmatched_patterns(self.exclude, [n for n, _ in named]):
            rank_zero_warn(
                f"GradientClipCallback: exclude pattern {pattern!r} matches no parameter name"
                f" (names look like {[n for n, _ in named[:3]]})."
            )
        # clippers that need each weight's layout (AGC: units are columns of a ConvTranspose or HF Conv1D)
        layouts = weight_layouts(pl_module)
        self._layouts = {id(p): layouts[n] for n, p in named if n in layouts}
        for clipper in self._clippers.values():
            _bind_layouts(clipper, self._layouts)
        self._has_scaler = _scaler(trainer) is not None
        self._logged_at = {}
        # Only a fit the callback belongs to (one that forwards its hooks by hand never calls its teardown).
        registered = any(cb is self for cb in trainer.callbacks)
        self._step_guard.attach(trainer.optimizers if registered else [])
        self._clip_guard.detach()
        if registered:
            remedy = f"`GradientClipCallback(clip_val={self.clip_val!r}, algorithm={self.algorithm!r})`"
            self._clip_guard.attach(trainer, pl_module, remedy)
        if self._has_scaler:
            for opt in trainer.optimizers:
                if getattr(opt, "_step_supports_amp_scaling", False):
                    raise RuntimeError(
                        f"GradientClipCallback cannot clip for {type(opt).__qualname__}: it unscales gradients"
                        " inside `step()` (a fused optimizer?), so they are still scaled when the callback runs."
                    )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # The one hook where the gradients are final: after accumulation, unscaled by AMP, in manual optimization too.
        for masker in self._maskers:
            masker.mask_gradients()
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # unwrap a LightningOptimizer
        new_step = self._step_guard.is_new_step(trainer, pl_module, optimizer)
        plan = self._plan(trainer, optimizer)
        others = [p.grad for p in plan.others if p.grad is not None]
        if not others and all(p.grad is None for p in plan.clipped):
            return
        if not new_step:
            self._reclip(trainer, optimizer, plan, others)
            return
        # the clippers skip parameters without a gradient
        norm, coef = self._clipper(plan.index).clip(plan.clipped, self.norm_type)
        checked = self._checked(norm, others)
        if self._has_scaler:  # the scaler saw the gradients before any pruning mask: it decides the skip
            checked = _with_scaler_skip(trainer, optimizer, checked)
        self._pending.append((norm, coef, checked))
        if len(self._pending) >= _FOLD_EVERY:
            self._fold()
        self._steps[plan.index] = self._steps.get(plan.index, 0) + 1
        self._skip_if_nonfinite(trainer, optimizer, plan.index, checked)
        self._log(trainer, plan.index, norm, coef)

    def _checked(self, norm: Tensor, others: list[Tensor]) -> Tensor:
        """The norm that says whether any stepped gradient is inf/NaN, the excluded ones (``others``) too: a norm
        sum is non-finite iff one of its terms is."""
        return norm if not others else norm + total_norm(others, self.norm_type).to(norm.device)

    def _skip_if_nonfinite(self, trainer: pl.Trainer, optimizer: Optimizer, idx: int, checked: Tensor) -> None:
        # Without a GradScaler, skipping needs this one host read per step (see the class docstring).
        if not self._has_scaler and not math.isfinite(checked.item()):
            self._on_nonfinite(trainer, optimizer, idx, checked)

    def _reclip(self, trainer: pl.Trainer, optimizer: Optimizer, plan: _Plan, others: list[Tensor]) -> None:
        """Clip a closure's re-evaluation within one optimizer step (LBFGS evaluates it up to ``max_iter`` times).

        Each evaluation's gradient is clipped and checked; the statistics, the log and an adaptive clipper's
        history count the step once (its first evaluation), as Lightning counts the step once.
        """
        clipper = self._clipper(plan.index)
        state = clipper.state_dict()
        norm, _ = clipper.clip(plan.clipped, self.norm_type)
        if state:
            clipper.load_state_dict(state)
        self._skip_if_nonfinite(trainer, optimizer, plan.index, self._checked(norm, others))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._step_guard.detach()
            self._clip_guard.detach()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # One host read per fit, for a spike clipper only: if it clipped most steps, say which of its rules did.
        if not getattr(self.clipper, "clips_spikes", False):
            return
        message = mostly_clipped_message(OWNER, self.algorithm, self.clipper, self.clip_val, self.summary())
        if message:
            rank_zero_warn(message)

    # ------------------------------------------------------------------------------------------ state

    @override
    def state_dict(self) -> dict[str, Any]:
        self._fold()
        clippers = {idx: c.state_dict() for idx, c in self._clippers.items()}
        return {
            "algorithm": self.algorithm,
            "steps": dict(self._steps),
            "acc": None if self._acc is None else self._acc.detach().cpu().clone(),
            "max_norm": None if self._max_norm is None else self._max_norm.detach().cpu().clone(),
            "clippers": {idx: sd for idx, sd in clippers.items() if sd},  # stateless clippers save nothing
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._steps = {int(k): int(v) for k, v in state_dict.get("steps", {}).items()}
        self._acc = state_dict.get("acc")
        self._max_norm = state_dict.get("max_norm")
        self._pending = []
        self._clippers = {}
        clippers = state_dict.get("clippers", {})
        if clippers and state_dict.get("algorithm") != self.algorithm:
            rank_zero_warn(
                f"GradientClipCallback: the checkpoint's clipping history is for algorithm "
                f"{state_dict.get('algorithm')!r}, this callback uses {self.algorithm!r}; starting a fresh history."
            )
            return
        for idx, sd in clippers.items():
            self._clipper(int(idx)).load_state_dict(sd)

    def summary(self) -> dict[str, float]:
        """Totals over every optimizer step so far (reads the device once; call it at the end of a run).

        Returns:
            ``steps`` (optimizer steps with gradients), ``clipped_fraction`` (share of steps with
            ``clip_coef < 1 - 1e-6``: clipping that lowered the norm by more than one part in a million, for every
            algorithm; not torch's ``c / (n + 1e-6)`` at a norm right at the bound), ``clipped_steps`` (their
            count), ``mean_norm`` and ``max_norm`` (of the finite pre-clip norms) and ``nonfinite_skipped`` (steps
            with an inf or NaN gradient).
        """
        self._fold()
        steps = float(sum(self._steps.values()))
        if self._acc is None or self._max_norm is None or steps == 0:
            keys = ("steps", "clipped_fraction", "clipped_steps", "mean_norm", "max_norm", "nonfinite_skipped")
            return dict.fromkeys(keys, 0.0)
        sum_norm, n_finite, clipped, nonfinite = self._acc.tolist()
        max_norm = float(self._max_norm)
        return {
            "steps": steps,
            "clipped_fraction": clipped / steps,
            "clipped_steps": clipped,
            "mean_norm": sum_norm / n_finite if n_finite else 0.0,
            "max_norm": max_norm if math.isfinite(max_norm) else 0.0,
            "nonfinite_skipped": nonfinite,
        }

    # ------------------------------------------------------------------------------------------ internals

    def _clipper(self, idx: int) -> Clipper:
        """The clipper of optimizer ``idx``: the one given for the first, a copy of it as given for the others."""
        clipper = self._clippers.get(idx)
        if clipper is None:
            clipper = self._clippers[idx] = self.clipper if idx == 0 else copy.deepcopy(self._template)
            _bind_layouts(clipper, self._layouts)
        return clipper

    def _plan(self, trainer: pl.Trainer, optimizer: Optimizer) -> _Plan:
        """Which of the optimizer's parameters are clipped and which are only checked, until its list changes."""
        n_params = sum(len(g["params"]) for g in optimizer.param_groups)
        plan = self._plans.get(id(optimizer))
        if plan is not None and plan.n_params == n_params:
            return plan
        # an optimizer the Trainer does not know (stepped by hand) counts as the first
        index = next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), 0)
        clipped: list[Tensor] = []
        others: list[Tensor] = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = self._names.get(id(p), "")
                (others if any(fnmatchcase(name, pat) for pat in self.exclude) else clipped).append(p)
        sparse = [self._names.get(id(p), "?") for p in clipped + others if p.grad is not None and p.grad.is_sparse]
        if sparse:
            raise ValueError(
                f"{OWNER}: the gradient of {', '.join(f'`{n}`' for n in sparse)} is sparse (a layer built with"
                " `sparse=True`, such as `nn.Embedding(sparse=True)`), and sparse gradients cannot be clipped"
                " (torch's `clip_grad_norm_` cannot either): build the layer with `sparse=False`."
            )
        plan = self._plans[id(optimizer)] = _Plan(index, n_params, clipped, others)
        return plan

    def _fold(self) -> None:
        """Fold the pending steps into the device accumulators: a few kernels for up to _FOLD_EVERY steps."""
        if not self._pending:
            return
        device = self._pending[0][0].device
        if self._acc is None or self._max_norm is None:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._acc = torch.zeros(4, dtype=dtype, device=device)
            self._max_norm = torch.tensor(-math.inf, dtype=dtype, device=device)
        elif self._acc.device != device:
            self._acc, self._max_norm = self._acc.to(device), self._max_norm.to(device)
        dtype = self._acc.dtype
        norms, coefs, checked = (
            torch.stack([t.to(device).float() for t in column]).to(dtype) for column in zip(*self._pending, strict=True)
        )
        self._pending = []
        finite = torch.isfinite(norms)
        clipped = finite & (coefs < _CLIPPED_BELOW)
        counts = torch.stack((finite.sum(), clipped.sum(), (~torch.isfinite(checked)).sum()))
        self._acc.add_(torch.cat((torch.where(finite, norms, 0.0).sum().unsqueeze(0), counts.to(dtype))))
        torch.maximum(self._max_norm, torch.where(finite, norms, -math.inf).max(), out=self._max_norm)

    def _on_nonfinite(self, trainer: pl.Trainer, optimizer: Optimizer, idx: int, norm: Tensor) -> None:
        where = f"global step {trainer.global_step} (optimizer {idx}, epoch {trainer.current_epoch})"
        if self.nonfinite == "error":
            raise RuntimeError(
                f"GradientClipCallback: the gradient norm is {float(norm)} at {where}. Use nonfinite='skip' to "
                "skip such steps, or find the source of the inf/NaN (e.g. `Trainer(detect_anomaly=True)`)."
            )
        # Parameters without a gradient are left untouched by torch.optim: no update, no state change.
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            rank_zero_warn(
                f"GradientClipCallback: non-finite gradient norm ({float(norm)}) at {where}; the step is skipped."
                " Further skips are counted in `grad/nonfinite_skipped` without a warning."
            )

    def _log(self, trainer: pl.Trainer, idx: int, norm: Tensor, coef: Tensor) -> None:
        # Lightning's own cadence (`should_update_logs`): the batch's logging step, +1 as Lightning counts it before
        # the batch ends; a batch that stepped nothing (training_step returned None) still counts, as for Lightning.
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if not trainer.loggers or not every or self._logged_at.get(idx) == step:  # the Trainer's 0: no step logging
            return
        if (step + 1) % every != 0 and not trainer.should_stop:
            return
        self._logged_at[idx] = step  # once per batch: an optimizer stepped twice in one batch logs its first step
        self._fold()
        nonfinite = self._acc[3] if self._acc is not None else torch.zeros((), device=norm.device)
        suffix = f"_opt{idx}" if idx else ""
        # The only device read of the logging path, once every `every` steps.
        values = torch.stack((norm.float(), coef.float(), nonfinite.float())).tolist()
        metrics = {f"grad/norm{suffix}": values[0], f"grad/clip_coef{suffix}": values[1]}
        metrics["grad/nonfinite_skipped"] = values[2]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


class _Plan(NamedTuple):
    index: int  # the optimizer's index in trainer.optimizers
    n_params: int  # its parameter count when the plan was made
    clipped: list[Tensor]  # clipped and counted in the norm
    others: list[Tensor]  # excluded: only checked for inf/NaN


def _bind_layouts(clipper: Clipper, layouts: dict[int, Any]) -> None:
    """Give ``layouts`` to a clipper that takes them (an optional ``set_layouts`` method, as AGC's)."""
    bind = getattr(clipper, "set_layouts", None)
    if callable(bind):
        bind(layouts)


def _scaler(trainer: pl.Trainer) -> Any:
    return getattr(trainer.precision_plugin, "scaler", None)


def _with_scaler_skip(trainer: pl.Trainer, optimizer: Optimizer, checked: Tensor) -> Tensor:
    """``checked``, NaN when the GradScaler found an inf or NaN in ``optimizer``'s gradients at its ``unscale_``
    (so it skips the step): also one only in a pruned entry's gradient, which the mask then zeroed. No host read."""
    state = getattr(_scaler(trainer), "_per_optimizer_states", {}).get(id(optimizer))
    found = list((state or {}).get("found_inf_per_device", {}).values())
    if not found:
        return checked
    any_inf = torch.stack([f.to(checked.device, torch.float32).reshape(()) for f in found]).sum() > 0
    return torch.where(any_inf, torch.full_like(checked, math.nan), checked)
