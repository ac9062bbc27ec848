"""GradientClipCallback: norm, value, AGC, AutoClip and ZClip gradient clipping as a Lightning callback.

The math lives in :mod:`lightning_clipprune.clipping`; this module decides when to call it, on which
parameters, what to do with a non-finite norm, and what to log.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_clipprune.clipping import AutoClip, ZClip, adaptive_grad_clip, clip_grad_norm, clip_grad_value

__all__ = ["GradientClipCallback"]

_ALGORITHMS = ("norm", "value", "agc", "autoclip", "zclip")
_NONFINITE = ("skip", "error")
# Per-step norms and coefficients are folded into the summary accumulators in batches of this many steps,
# so a step costs a list append instead of a dozen tiny kernels.
_FOLD_EVERY = 256


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _bad(name: str, allowed: str, value: Any) -> ValueError:
    return ValueError(f"`GradientClipCallback({name}=...)` must be {allowed}, got {value!r}.")


class GradientClipCallback(Callback):
    r"""Clip gradients once per optimizer step, log the norm, and never apply a non-finite gradient.

    Algorithms (the formulas and papers are in :mod:`lightning_clipprune.clipping`):

    - ``"norm"``: scale all gradients so their global p-norm is at most ``clip_val``
      (``torch.nn.utils.clip_grad_norm_``, what ``Trainer(gradient_clip_val=...)`` does).
    - ``"value"``: clamp every entry to ``[-clip_val, clip_val]`` (``torch.nn.utils.clip_grad_value_``).
    - ``"agc"``: unit-wise adaptive gradient clipping (Brock et al. 2021) with clip factor
      lambda = ``clip_val`` (the paper uses 0.01 to 0.16) and weight-norm floor ``agc_eps``. The paper
      leaves the final classifier out: pass e.g. ``exclude=["fc.*"]``.
    - ``"autoclip"``: clip to the ``autoclip_percentile``-th percentile of the last ``history_size``
      norms (Seetharaman et al. 2020); ``clip_val`` is a hard cap (None: none).
    - ``"zclip"``: clip norm spikes whose z-score against an EMA mean/variance exceeds
      ``zclip_z_thresh`` (Kumar et al. 2025) after ``zclip_warmup_steps`` steps; ``clip_val`` is a
      hard cap (None: none).

    Clipping happens in ``on_before_optimizer_step``: there the gradients are complete (after the last
    micro-batch of gradient accumulation, so they are clipped once per optimizer step), unscaled under
    16-bit AMP (the precision plugin unscales before calling the hook), and the hook also runs when a
    ``LightningModule`` with manual optimization calls ``optimizer.step()``. Only the parameters of the
    optimizer being stepped are clipped, minus those whose name matches an ``exclude`` pattern. Before
    the norm is computed, every other callback with a ``mask_gradients()`` method (a pruning callback)
    is asked to zero the gradients of pruned weights, whatever the order of the callback list.

    Logged through the Trainer's loggers every ``log_every_n_steps`` optimizer steps (values are read
    from the device only then): ``grad/norm`` (global p-norm of the clipped parameters' gradients
    before clipping), ``grad/clip_coef`` (the factor applied, ``<= 1``; for ``"value"`` and ``"agc"``,
    which do not scale uniformly, the ratio of the norms after and before clipping), and
    ``grad/nonfinite_skipped`` (cumulative count of steps whose norm was inf or NaN). With several
    optimizers, the metrics of optimizer ``k > 0`` end in ``_opt{k}``.

    Non-finite norms: under 16-bit AMP the gradient scaler already skips the step (and lowers its
    scale); the callback only counts it. Otherwise ``nonfinite="skip"`` drops the step: the gradients
    of all the optimizer's parameters are set to ``None``, which every ``torch.optim`` optimizer treats
    as "no gradient for this parameter", so neither the parameters nor the optimizer state (momentum,
    Adam moments and step count, weight decay) change; ``nonfinite="error"`` raises naming the step.
    Deciding to skip needs one host read of the norm per optimizer step (``GradScaler.step`` does the
    same read of its inf flag under AMP): a step cannot be both taken and not taken without the host
    knowing, short of snapshotting all parameters and optimizer state every step. The read comes after
    the clipping kernels are queued, so on a GPU it waits for the backward pass and costs about the
    optimizer's kernel-launch latency once per step (see ``benchmarks/bench_clip.md``); with a
    GradScaler there is no read. Only the clipped parameters are checked.

    Args:
        clip_val: the bound; its meaning depends on ``algorithm`` (see above). None is allowed only for
            ``"autoclip"`` and ``"zclip"`` (no hard cap).
        algorithm: one of ``"norm"``, ``"value"``, ``"agc"``, ``"autoclip"``, ``"zclip"``.
        norm_type: p of the p-norm (``float("inf")`` for the max-norm); used for clipping by
            ``"norm"``, ``"agc"``, ``"autoclip"`` and ``"zclip"``, and for the logged norm.
        exclude: ``fnmatch`` patterns over parameter names (``pl_module.named_parameters()``); matching
            parameters are neither clipped nor counted in the norm. A single string is one pattern.
        nonfinite: ``"skip"`` or ``"error"``: what to do with a non-finite norm without a gradient scaler.
        agc_eps: AGC's floor on the weight norm (so zero-initialised weights can move).
        autoclip_percentile: AutoClip's percentile p in [0, 100].
        history_size: AutoClip's number of recent norms kept.
        zclip_alpha: ZClip's EMA factor in (0, 1).
        zclip_z_thresh: ZClip's z-score threshold (> 0).
        zclip_warmup_steps: ZClip's number of steps collected before the statistics start (>= 1).
        log_every_n_steps: log every this many optimizer steps; None uses the Trainer's
            ``log_every_n_steps``.

    Raises:
        ValueError: in ``__init__``, if an argument is out of range; the message names the argument,
            the allowed values and the value received.
        MisconfigurationException: in ``setup()``, if the Trainer also clips (``gradient_clip_val``).
        RuntimeError: with ``nonfinite="error"``, at the first optimizer step whose norm is not finite.

    Example::

        import lightning as L
        from lightning_clipprune import GradientClipCallback

        trainer = L.Trainer(callbacks=[GradientClipCallback(clip_val=1.0, algorithm="norm")])
        # adaptive clipping, not applied to the classifier head:
        GradientClipCallback(clip_val=0.01, algorithm="agc", exclude=["head.*"])
        # AutoClip at the 10th percentile of the last 1000 norms, never above 5:
        GradientClipCallback(clip_val=5.0, algorithm="autoclip", autoclip_percentile=10.0)
    """

    #: This callback calls ``mask_gradients()`` of every other callback that has one, first thing in its
    #: ``on_before_optimizer_step``; ``MagnitudePruneCallback`` then skips its own (identical) pass.
    calls_mask_gradients: bool = True

    def __init__(
        self,
        clip_val: float | None = 1.0,
        algorithm: str = "norm",
        norm_type: float = 2.0,
        *,
        exclude: Sequence[str] | str = (),
        nonfinite: str = "skip",
        agc_eps: float = 1e-3,
        autoclip_percentile: float = 10.0,
        history_size: int = 1000,
        zclip_alpha: float = 0.97,
        zclip_z_thresh: float = 2.5,
        zclip_warmup_steps: int = 25,
        log_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(algorithm, str) or algorithm not in _ALGORITHMS:
            raise _bad("algorithm", f"one of {_ALGORITHMS}", algorithm)
        adaptive = algorithm in ("autoclip", "zclip")
        if clip_val is None:
            if not adaptive:
                raise _bad(
                    "clip_val",
                    f"a positive finite number (None is allowed only for 'autoclip' and 'zclip', "
                    f"algorithm is {algorithm!r})",
                    clip_val,
                )
        elif not (_is_real(clip_val) and 0 < clip_val < math.inf):
            raise _bad("clip_val", "a positive finite number" + (" or None" if adaptive else ""), clip_val)
        if not (_is_real(norm_type) and norm_type > 0):
            raise _bad("norm_type", "a positive number or float('inf')", norm_type)
        if isinstance(exclude, str):
            exclude = (exclude,)
        if not isinstance(exclude, Sequence) or not all(isinstance(p, str) for p in exclude):
            raise _bad("exclude", "a sequence of fnmatch patterns (strings), e.g. ['fc.*']", exclude)
        if nonfinite not in _NONFINITE:
            raise _bad("nonfinite", f"one of {_NONFINITE}", nonfinite)
        if not (_is_real(agc_eps) and 0 < agc_eps < math.inf):
            raise _bad("agc_eps", "a positive finite number", agc_eps)
        if not (_is_real(autoclip_percentile) and 0 <= autoclip_percentile <= 100):
            raise _bad("autoclip_percentile", "a number in [0, 100]", autoclip_percentile)
        if not (isinstance(history_size, int) and not isinstance(history_size, bool) and history_size >= 1):
            raise _bad("history_size", "an integer >= 1", history_size)
        if not (_is_real(zclip_alpha) and 0 < zclip_alpha < 1):
            raise _bad("zclip_alpha", "a number in the open interval (0, 1)", zclip_alpha)
        if not (_is_real(zclip_z_thresh) and 0 < zclip_z_thresh < math.inf):
            raise _bad("zclip_z_thresh", "a positive finite number", zclip_z_thresh)
        if not (
            isinstance(zclip_warmup_steps, int)
            and not isinstance(zclip_warmup_steps, bool)
            and zclip_warmup_steps >= 1
        ):
            raise _bad("zclip_warmup_steps", "an integer >= 1", zclip_warmup_steps)
        if log_every_n_steps is not None and not (
            isinstance(log_every_n_steps, int)
            and not isinstance(log_every_n_steps, bool)
            and log_every_n_steps >= 1
        ):
            raise _bad("log_every_n_steps", "None or an integer >= 1", log_every_n_steps)

        self.clip_val = None if clip_val is None else float(clip_val)
        self.algorithm = algorithm
        self.norm_type = float(norm_type)
        self.exclude = tuple(exclude)
        self.nonfinite = nonfinite
        self.agc_eps = float(agc_eps)
        self.autoclip_percentile = float(autoclip_percentile)
        self.history_size = history_size
        self.zclip_alpha = float(zclip_alpha)
        self.zclip_z_thresh = float(zclip_z_thresh)
        self.zclip_warmup_steps = zclip_warmup_steps
        self.log_every_n_steps = log_every_n_steps

        self._clippers: dict[int, AutoClip | ZClip] = {}  # per optimizer index, adaptive algorithms only
        self._steps: dict[int, int] = {}  # optimizer steps seen, per optimizer index
        # On the gradients' device: [sum of finite norms, finite steps, clipped steps, non-finite steps].
        self._acc: Tensor | None = None
        self._max_norm: Tensor | None = None
        self._pending: list[tuple[Tensor, Tensor]] = []  # (norm, clip_coef) of steps not yet folded in
        self._names: dict[int, str] = {}  # id(parameter) -> name
        self._params_cache: dict[int, tuple[int, int, list[Tensor]]] = {}
        self._warned_nonfinite = False

    # ------------------------------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.gradient_clip_val:
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
        self._params_cache.clear()
        for pattern in self.exclude:
            if not any(fnmatchcase(n, pattern) for n, _ in named):
                rank_zero_warn(
                    f"GradientClipCallback: exclude pattern {pattern!r} matches no parameter name"
                    f" (names look like {[n for n, _ in named[:3]]})."
                )
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
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
        for cb in trainer.callbacks:
            if cb is not self and callable(getattr(cb, "mask_gradients", None)):
                cb.mask_gradients()
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # unwrap a LightningOptimizer
        idx = self._optimizer_index(trainer, optimizer)
        params = [p for p in self._clipped_params(idx, optimizer) if p.grad is not None]
        if not params:
            return
        norm, coef = self._clip(idx, params)
        self._pending.append((norm.detach(), coef.detach()))
        if len(self._pending) >= _FOLD_EVERY:
            self._fold()
        self._steps[idx] = self._steps.get(idx, 0) + 1
        # Without a GradScaler, skipping needs this one host read per step (see the class docstring).
        if getattr(trainer.precision_plugin, "scaler", None) is None and not math.isfinite(norm.item()):
            self._on_nonfinite(trainer, optimizer, idx, norm)
        self._log(trainer, idx, norm, coef)

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
            ``nonfinite_skipped`` (steps whose norm was inf or NaN).
        """
        self._fold()
        steps = float(sum(self._steps.values()))
        if self._acc is None or self._max_norm is None or steps == 0:
            return {
                "steps": steps,
                "clipped_fraction": 0.0,
                "mean_norm": 0.0,
                "max_norm": 0.0,
                "nonfinite_skipped": 0.0,
            }
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
            return AutoClip(self.autoclip_percentile, self.history_size, max_norm=self.clip_val)
        return ZClip(self.zclip_alpha, self.zclip_z_thresh, self.zclip_warmup_steps, max_norm=self.clip_val)

    def _clip(self, idx: int, params: list[Tensor]) -> tuple[Tensor, Tensor]:
        # clip_val is None only for autoclip/zclip (checked in __init__), where it means "no cap".
        bound = math.inf if self.clip_val is None else self.clip_val
        if self.algorithm == "norm":
            return clip_grad_norm(params, bound, self.norm_type)
        if self.algorithm == "value":
            return clip_grad_value(params, bound, self.norm_type)
        if self.algorithm == "agc":
            return adaptive_grad_clip(params, bound, self.agc_eps, self.norm_type)
        clipper = self._clippers.get(idx)
        if clipper is None:
            clipper = self._clippers[idx] = self._new_clipper()
        return clipper.clip(params, self.norm_type)

    @staticmethod
    def _optimizer_index(trainer: pl.Trainer, optimizer: Optimizer) -> int:
        for i, opt in enumerate(trainer.optimizers):
            if opt is optimizer:
                return i
        return 0  # an optimizer the Trainer does not know (stepped by hand): treat as the first

    def _clipped_params(self, idx: int, optimizer: Optimizer) -> list[Tensor]:
        """The optimizer's parameters minus the excluded ones, cached until its parameter list changes."""
        n_params = sum(len(g["params"]) for g in optimizer.param_groups)
        cached = self._params_cache.get(idx)
        if cached is not None and cached[0] == id(optimizer) and cached[1] == n_params:
            return cached[2]
        params = [
            p
            for g in optimizer.param_groups
            for p in g["params"]
            if not any(fnmatchcase(self._names.get(id(p), ""), pat) for pat in self.exclude)
        ]
        self._params_cache[idx] = (id(optimizer), n_params, params)
        return params

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
        norms = torch.stack([n.to(device=device, dtype=dtype) for n, _ in self._pending])
        coefs = torch.stack([c.to(device=device, dtype=dtype) for _, c in self._pending])
        self._pending = []
        finite = torch.isfinite(norms)
        counts = torch.stack((finite.sum(), (finite & (coefs < 1)).sum(), (~finite).sum())).to(dtype)
        self._acc.add_(torch.cat((torch.where(finite, norms, 0.0).sum().unsqueeze(0), counts)))
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
        values = torch.stack((norm.detach().float(), coef.detach().float(), nonfinite.float())).tolist()
        metrics = {f"grad/norm{suffix}": values[0], f"grad/clip_coef{suffix}": values[1]}
        metrics["grad/nonfinite_skipped"] = values[2]
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
