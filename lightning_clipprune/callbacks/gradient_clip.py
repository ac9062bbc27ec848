"""GradientClipCallback: norm, value, AGC, AutoClip and ZClip gradient clipping as a Lightning callback.

The math lives in :mod:`lightning_clipprune.clipping`; this module decides when to call it, on which
parameters, what to do with a non-finite norm, and what to log.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
    bad_value,
    check_bool,
    check_choice,
    check_int,
    check_patterns,
    check_real,
)
from lightning_clipprune.callbacks._strategy import check_strategy
from lightning_clipprune.callbacks.contract import GradientMasker, find_callbacks
from lightning_clipprune.clipping import (
    ZCLIP_MODES,
    ZCLIP_OPTIONS,
    AutoClip,
    ZClip,
    adaptive_grad_clip,
    clip_grad_norm,
    clip_grad_value,
    total_norm,
)

__all__ = ["DEFAULT_CLIP_VAL", "GradientClipCallback"]

_OWNER = "GradientClipCallback"
_NONFINITE = ("skip", "error")
#: ``clip_val`` when it is left out, per algorithm: the published default of each method.
DEFAULT_CLIP_VAL: dict[str, float | None] = {
    "norm": 1.0,  # no published default (torch and Lightning require one); 1.0 is the common choice
    "value": 1.0,  # idem
    "agc": 0.01,  # NFNets (Brock et al. 2021), tuned for batch 4096
    "autoclip": None,  # the paper has no cap
    "zclip": 1.0,  # the official zclip package's max_grad_norm
}
# Per-step norms and coefficients are folded into the summary accumulators in batches of this many steps,
# so a step costs a list append instead of a dozen tiny kernels.
_FOLD_EVERY = 256


class _AlgorithmDefault:
    """The sentinel of ``clip_val`` left out: ``DEFAULT_CLIP_VAL[algorithm]``."""

    def __repr__(self) -> str:
        return "<the algorithm's default>"


_DEFAULT = _AlgorithmDefault()


class GradientClipCallback(Callback):
    r"""Clip gradients once per optimizer step, log the norm, and never apply a non-finite gradient.

    Algorithms (the formulas and papers are in :mod:`lightning_clipprune.clipping`), and what ``clip_val``
    means for each and its value when left out:

    ============  ===========================================================  ===================================
    algorithm     ``clip_val``                                                 left out
    ============  ===========================================================  ===================================
    ``norm``      max global p-norm (``torch.nn.utils.clip_grad_norm_``)       1.0 (no published default)
    ``value``     max absolute entry (``torch.nn.utils.clip_grad_value_``)     1.0 (no published default)
    ``agc``       lambda, max unit-wise ``||G|| / max(||W||, eps)``            0.01 (NFNets, batch 4096)
    ``autoclip``  hard cap on the percentile threshold (None: none)            None (the paper has no cap)
    ``zclip``     hard cap on the norm at every step (None: none)              1.0 (``zclip`` package)
    ============  ===========================================================  ===================================

    - ``"norm"`` is what ``Trainer(gradient_clip_val=...)`` does, bit for bit; ``"value"`` what
      ``gradient_clip_algorithm="value"`` does.
    - ``"agc"``: unit-wise adaptive gradient clipping (Brock et al. 2021) with weight-norm floor
      ``agc_eps`` (1e-3). NFNets' 0.01 is for batch 4096; smaller batches have noisier gradients and
      want a larger lambda (about ``0.01 * sqrt(4096 / batch_size)``: 0.08 at batch 64). The paper leaves
      the final classifier out: pass e.g. ``exclude=["fc.*"]``.
    - ``"autoclip"``: clip to the ``autoclip_percentile``-th percentile (10) of the whole history of
      norms (Seetharaman et al. 2020); ``history_size`` keeps only the last n;
      ``autoclip_per_parameter`` gives each parameter its own history and threshold.
    - ``"zclip"``: clip norm spikes against an EMA mean/variance of the norm (Kumar et al. 2025), with
      the ``zclip`` package's options and defaults: ``zclip_alpha`` 0.97, ``zclip_z_thresh`` 2.5,
      ``zclip_warmup_steps`` 25, ``zclip_mode`` "zscore" | "percentile", ``zclip_clip_option``
      "adaptive_scaling" | "mean", ``zclip_clip_factor`` 1.0, ``zclip_skip_update_on_spike`` False,
      ``zclip_eps`` 1e-6.

    Clipping happens in ``on_before_optimizer_step``: there the gradients are complete (after the last
    micro-batch of gradient accumulation, so they are clipped once per optimizer step), unscaled under
    16-bit AMP (the precision plugin unscales before calling the hook), and the hook also runs when a
    ``LightningModule`` with manual optimization calls ``optimizer.step()``. Only the parameters of the
    optimizer being stepped are clipped, minus those whose name matches an ``exclude`` pattern. Before
    the norm is computed, every :class:`~lightning_clipprune.callbacks.contract.GradientMasker` on the
    Trainer (a pruning callback) zeroes the gradients of pruned weights, whatever the order of the
    callback list (see :mod:`lightning_clipprune.callbacks.contract`).

    Logged through the Trainer's loggers every ``log_every_n_steps`` optimizer steps (values are read
    from the device only then): ``grad/norm`` (global p-norm of the clipped parameters' gradients
    before clipping), ``grad/clip_coef`` (the factor applied, ``<= 1``; for ``"value"``, ``"agc"`` and
    per-parameter AutoClip, which do not scale uniformly, the ratio of the norms after and before
    clipping), and ``grad/nonfinite_skipped`` (cumulative count of steps with an inf or NaN gradient).
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
        clip_val: the bound; its meaning and its value when left out depend on ``algorithm`` (table
            above). None (no cap) is allowed only for ``"autoclip"`` and ``"zclip"``.
        algorithm: one of ``"norm"``, ``"value"``, ``"agc"``, ``"autoclip"``, ``"zclip"``.
        norm_type: p of the p-norm (``float("inf")`` for the max-norm); used for clipping by
            ``"norm"``, ``"agc"``, ``"autoclip"`` and ``"zclip"``, and for the logged norm.
        exclude: ``fnmatch`` patterns over parameter names (``pl_module.named_parameters()``); matching
            parameters are neither clipped nor counted in the norm (still checked for inf/NaN).
        nonfinite: ``"skip"`` or ``"error"``: what to do with a non-finite gradient without a gradient scaler.
        agc_eps: AGC's floor on the weight norm (so zero-initialised weights can move).
        autoclip_percentile: AutoClip's percentile p in [0, 100].
        history_size: AutoClip's number of recent norms kept; None keeps them all (the paper).
        autoclip_per_parameter: AutoClip per parameter (own history and threshold) instead of global.
        zclip_alpha: ZClip's EMA factor in (0, 1).
        zclip_z_thresh: ZClip's z-score threshold (> 0).
        zclip_warmup_steps: ZClip's number of steps collected before the statistics start (>= 1).
        zclip_mode: ``"zscore"`` (clip spikes by z-score) or ``"percentile"`` (clip above mean + z * std).
        zclip_clip_option: ``"adaptive_scaling"`` or ``"mean"``: the threshold of a spike (zscore mode).
        zclip_clip_factor: multiplies the adaptive threshold (0.5 to 0.9 clips harder).
        zclip_skip_update_on_spike: leave ZClip's statistics unchanged at a spike.
        zclip_eps: added to the standard deviation in the z-score.
        log_every_n_steps: log every this many optimizer steps; None uses the Trainer's
            ``log_every_n_steps``.

    Raises:
        ValueError: in ``__init__``, if an argument is out of range; the message names the argument,
            the allowed values and the value received.
        MisconfigurationException: in ``setup()``, if the Trainer also clips (``gradient_clip_val``) or
            has a second ``GradientClipCallback``.
        RuntimeError: with ``nonfinite="error"``, at the first optimizer step whose gradient is not finite.

    Example::

        import lightning as L
        from lightning_clipprune import GradientClipCallback

        trainer = L.Trainer(callbacks=[GradientClipCallback(clip_val=1.0, algorithm="norm")])
        # adaptive clipping (lambda 0.01), not applied to the classifier head:
        GradientClipCallback(algorithm="agc", exclude=["head.*"])
        # AutoClip at the 10th percentile of every norm so far, never above 5:
        GradientClipCallback(clip_val=5.0, algorithm="autoclip", autoclip_percentile=10.0)
    """

    def __init__(
        self,
        clip_val: float | None | _AlgorithmDefault = _DEFAULT,
        algorithm: str = "norm",
        norm_type: float = 2.0,
        *,
        exclude: Sequence[str] | str = (),
        nonfinite: str = "skip",
        agc_eps: float = 1e-3,
        autoclip_percentile: float = 10.0,
        history_size: int | None = None,
        autoclip_per_parameter: bool = False,
        zclip_alpha: float = 0.97,
        zclip_z_thresh: float = 2.5,
        zclip_warmup_steps: int = 25,
        zclip_mode: str = "zscore",
        zclip_clip_option: str = "adaptive_scaling",
        zclip_clip_factor: float = 1.0,
        zclip_skip_update_on_spike: bool = False,
        zclip_eps: float = 1e-6,
        log_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        o = _OWNER
        self.algorithm = check_choice(o, "algorithm", algorithm, DEFAULT_CLIP_VAL)
        self.clip_val = self._check_clip_val(DEFAULT_CLIP_VAL[algorithm] if clip_val is _DEFAULT else clip_val)
        self.norm_type = check_real(o, "norm_type", norm_type, low=0, low_open=True, allow_inf=True)
        self.exclude = check_patterns(o, "exclude", exclude)
        self.nonfinite = check_choice(o, "nonfinite", nonfinite, _NONFINITE)
        self.agc_eps = check_real(o, "agc_eps", agc_eps, low=0, low_open=True)
        self.autoclip_percentile = check_real(o, "autoclip_percentile", autoclip_percentile, low=0, high=100)
        self.history_size = check_int(o, "history_size", history_size, low=1, allow_none=True)
        self.autoclip_per_parameter = check_bool(o, "autoclip_per_parameter", autoclip_per_parameter)
        self.zclip_alpha = check_real(o, "zclip_alpha", zclip_alpha, low=0, high=1, low_open=True, high_open=True)
        self.zclip_z_thresh = check_real(o, "zclip_z_thresh", zclip_z_thresh, low=0, low_open=True)
        self.zclip_warmup_steps = check_int(o, "zclip_warmup_steps", zclip_warmup_steps, low=1)
        self.zclip_mode = check_choice(o, "zclip_mode", zclip_mode, ZCLIP_MODES)
        self.zclip_clip_option = check_choice(o, "zclip_clip_option", zclip_clip_option, ZCLIP_OPTIONS)
        self.zclip_clip_factor = check_real(o, "zclip_clip_factor", zclip_clip_factor, low=0, low_open=True)
        self.zclip_skip_update_on_spike = check_bool(o, "zclip_skip_update_on_spike", zclip_skip_update_on_spike)
        self.zclip_eps = check_real(o, "zclip_eps", zclip_eps, low=0)
        self.log_every_n_steps = check_int(o, "log_every_n_steps", log_every_n_steps, low=1, allow_none=True)

        self._clippers: dict[int, AutoClip | ZClip] = {}  # per optimizer index, adaptive algorithms only
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

    def _check_clip_val(self, clip_val: Any) -> float | None:
        if clip_val is None and self.algorithm not in ("autoclip", "zclip"):
            raise bad_value(
                _OWNER,
                "clip_val",
                f"a finite number > 0 (None is allowed only for 'autoclip' and 'zclip', algorithm is "
                f"{self.algorithm!r})",
                clip_val,
            )
        return check_real(_OWNER, "clip_val", clip_val, low=0, low_open=True, allow_none=True)

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
        named = list(pl_module.named_parameters())
        self._names = {id(p): n for n, p in named}
        self._plans.clear()
        self._maskers = find_callbacks(trainer, GradientMasker, exclude=self)
        for pattern in self.exclude:
            if not any(fnmatchcase(n, pattern) for n, _ in named):
                rank_zero_warn(
                    f"GradientClipCallback: exclude pattern {pattern!r} matches no parameter name"
                    f" (names look like {[n for n, _ in named[:3]]})."
                )
        self._has_scaler = _scaler(trainer) is not None
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
        plan = self._plan(trainer, optimizer)
        others = [p.grad for p in plan.others if p.grad is not None]
        if not others and all(p.grad is None for p in plan.clipped):
            return
        norm, coef = self._clip(plan.index, plan.clipped)  # the cores skip parameters without a gradient
        # Every stepped gradient is checked for inf/NaN, the excluded ones too: a norm sum is non-finite iff one is.
        checked = norm if not others else norm + total_norm(others, self.norm_type).to(norm.device)
        self._pending.append((norm, coef, checked))
        if len(self._pending) >= _FOLD_EVERY:
            self._fold()
        self._steps[plan.index] = self._steps.get(plan.index, 0) + 1
        # Without a GradScaler, skipping needs this one host read per step (see the class docstring).
        if not self._has_scaler and not math.isfinite(checked.item()):
            self._on_nonfinite(trainer, optimizer, plan.index, checked)
        self._log(trainer, plan.index, norm, coef)

    # ------------------------------------------------------------------------------------------ state

    @override
    def state_dict(self) -> dict[str, Any]:
        self._fold()
        return {
            "algorithm": self.algorithm,
            "steps": dict(self._steps),
            "acc": None if self._acc is None else self._acc.detach().cpu().clone(),
            "max_norm": None if self._max_norm is None else self._max_norm.detach().cpu().clone(),
            "clippers": {idx: c.state_dict() for idx, c in self._clippers.items()},
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
            clipper = self._new_clipper()
            clipper.load_state_dict(sd)
            self._clippers[int(idx)] = clipper

    def summary(self) -> dict[str, float]:
        """Totals over every optimizer step so far (reads the device once; call it at the end of a run).

        Returns:
            ``steps`` (optimizer steps with gradients), ``clipped_fraction`` (share of steps with
            ``clip_coef < 1``), ``mean_norm`` and ``max_norm`` (of the finite pre-clip norms) and
            ``nonfinite_skipped`` (steps with an inf or NaN gradient).
        """
        self._fold()
        steps = float(sum(self._steps.values()))
        if self._acc is None or self._max_norm is None or steps == 0:
            return dict.fromkeys(("steps", "clipped_fraction", "mean_norm", "max_norm", "nonfinite_skipped"), 0.0)
        sum_norm, n_finite, clipped, nonfinite = self._acc.tolist()
        max_norm = float(self._max_norm)
        return {
            "steps": steps,
            "clipped_fraction": clipped / steps,
            "mean_norm": sum_norm / n_finite if n_finite else 0.0,
            "max_norm": max_norm if math.isfinite(max_norm) else 0.0,
            "nonfinite_skipped": nonfinite,
        }

    # ------------------------------------------------------------------------------------------ internals

    def _new_clipper(self) -> AutoClip | ZClip:
        if self.algorithm == "autoclip":
            return AutoClip(self.autoclip_percentile, self.history_size, self.clip_val, self.autoclip_per_parameter)
        return ZClip(
            self.zclip_alpha,
            self.zclip_z_thresh,
            self.clip_val,
            self.zclip_eps,
            self.zclip_warmup_steps,
            self.zclip_mode,
            self.zclip_clip_option,
            self.zclip_clip_factor,
            self.zclip_skip_update_on_spike,
        )

    def _clip(self, idx: int, params: list[Tensor]) -> tuple[Tensor, Tensor]:
        if self.algorithm in ("autoclip", "zclip"):
            clipper = self._clippers.get(idx)
            if clipper is None:
                clipper = self._clippers[idx] = self._new_clipper()
            return clipper.clip(params, self.norm_type)
        assert self.clip_val is not None  # None only for autoclip/zclip (checked in __init__)
        if self.algorithm == "norm":
            return clip_grad_norm(params, self.clip_val, self.norm_type)
        if self.algorithm == "value":
            return clip_grad_value(params, self.clip_val, self.norm_type)
        return adaptive_grad_clip(params, self.clip_val, self.agc_eps, self.norm_type)

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
        counts = torch.stack((finite.sum(), (finite & (coefs < 1)).sum(), (~torch.isfinite(checked)).sum()))
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
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if not trainer.loggers or self._steps[idx] % every != 0:
            return
        self._fold()
        nonfinite = self._acc[3] if self._acc is not None else torch.zeros((), device=norm.device)
        suffix = f"_opt{idx}" if idx else ""
        # The only device read of the logging path, once every `every` steps.
        values = torch.stack((norm.float(), coef.float(), nonfinite.float())).tolist()
        metrics = {f"grad/norm{suffix}": values[0], f"grad/clip_coef{suffix}": values[1]}
        metrics["grad/nonfinite_skipped"] = values[2]
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


class _Plan(NamedTuple):
    index: int  # the optimizer's index in trainer.optimizers
    n_params: int  # its parameter count when the plan was made
    clipped: list[Tensor]  # clipped and counted in the norm
    others: list[Tensor]  # excluded: only checked for inf/NaN


def _scaler(trainer: pl.Trainer) -> Any:
    return getattr(trainer.precision_plugin, "scaler", None)
