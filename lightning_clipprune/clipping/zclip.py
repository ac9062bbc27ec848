"""ZClip, Kumar et al. 2025: clip gradient-norm spikes detected against EMA statistics of the norm."""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_clipprune._validation import check_bool, check_choice, check_int, check_real
from lightning_clipprune.clipping.base import ThresholdClip, _cap, option_defaults, register_clipper

__all__ = ["ZCLIP_MODES", "ZCLIP_OPTIONS", "ZClip"]

ZCLIP_MODES = ("zscore", "percentile")
ZCLIP_OPTIONS = ("adaptive_scaling", "mean")


class ZClip(ThresholdClip):
    r"""ZClip: clip gradient-norm spikes detected against EMA statistics of the norm.

    Kumar, Owen, Ashkboos, Hoefler 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training",
    https://arxiv.org/abs/2504.02507; the same computation as the official ``zclip`` package
    (``zclip.ZClip``), with the same arguments and defaults.

    Warm-up: the first ``warmup_steps`` norms are collected (only ``max_norm`` clips), then
    :math:`\mu` and :math:`\sigma^2` are their mean and (population) variance. After warm-up, at norm
    :math:`n_t`, with :math:`z_t = (n_t - \mu_{t-1}) / (\sigma_{t-1} + \epsilon)`, the threshold is

    - ``mode="zscore"`` (a spike is :math:`z_t > z_{thres}`), ``clip_option="adaptive_scaling"``:
      :math:`\eta_t = f \cdot \big(\mu_{t-1} + z_{thres}\sigma_{t-1} / (z_t / z_{thres})\big)`
      (:math:`f` = ``clip_factor``); ``clip_option="mean"``: :math:`\eta_t = \mu_{t-1}`;
    - ``mode="percentile"`` (a spike is :math:`n_t > \eta_t`): :math:`\eta_t = \mu_{t-1} + z_{thres}\sigma_{t-1}`;

    and :math:`\infty` when the norm is no spike. Then

    .. math::

        g \leftarrow g \cdot \min\left(1, \frac{\min(\eta_t, \text{max\_norm})}{n_t + 10^{-6}}\right)

    and the statistics follow the clipped norm :math:`\tilde n_t = \min(n_t, \eta_t)` (so a spike does
    not inflate them; with ``skip_update_on_spike`` a spike leaves them unchanged):

    .. math::

        \mu_t = \alpha \mu_{t-1} + (1-\alpha)\,\tilde n_t, \qquad
        \sigma^2_t = \alpha \sigma^2_{t-1} + (1-\alpha)\,(\tilde n_t - \mu_t)^2

    Non-finite norms leave the statistics unchanged (the reference has no such rule). Everything stays
    on the device.

    The hard cap ``max_norm`` (1.0 by default, the package's ``max_grad_norm``) is plain norm clipping on
    top of the spike detection, at every step: on a model whose usual gradient norm is above the cap,
    the cap, not the z-score, clips nearly every step (it clipped 75 % of the steps of a small CNN).
    Pass ``max_norm=None`` to clip only spikes, or a cap above the usual norm to keep it as a safety net;
    ``GradientClipCallback.summary()["clipped_fraction"]`` says how often a run was clipped, and the
    callback warns at the end of training when a spike clipper (:attr:`clips_spikes`) clipped more than
    half of the steps.

    Args:
        alpha: EMA smoothing factor in (0, 1).
        z_thresh: z-score above which a norm is a spike (``"zscore"``), or the number of standard
            deviations above the mean that is the threshold (``"percentile"``).
        max_norm: a hard cap on the norm at every step, warm-up included (``GradientClipCallback``'s
            ``clip_val``); None for no cap, so that only spikes are clipped (see above).
        eps: added to sigma in the z-score.
        warmup_steps: norms collected before the statistics are initialised.
        mode: ``"zscore"`` or ``"percentile"``.
        clip_option: ``"adaptive_scaling"`` or ``"mean"`` (``"zscore"`` mode only).
        clip_factor: multiplies the adaptive threshold (``"adaptive_scaling"`` only; 0.5 to 0.9 clips harder).
        skip_update_on_spike: leave the statistics unchanged at a spike.

    Raises:
        ValueError: if an argument is out of range (one line naming it).

    Warns:
        UserWarning: ``clip_option`` or ``clip_factor`` set to a value other than its default where it has no
            effect (``clip_option`` with ``mode="percentile"``; ``clip_factor`` there or with ``clip_option="mean"``).

    Example::

        >>> clipper = ZClip(warmup_steps=2)
        >>> w = torch.zeros(1, requires_grad=True)
        >>> for g in (0.5, 0.7, 0.6, 5.0):
        ...     w.grad = torch.tensor([g])
        ...     norm, coef = clipper.clip([w])
        >>> round(float(w.grad), 4)  # the spike 5.0 is clipped to the adaptive threshold
        0.6138
    """

    #: Meant to clip rare spikes: ``GradientClipCallback`` warns when it clipped most steps (the cap at work).
    clips_spikes: ClassVar[bool] = True

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        max_norm: float | None = 1.0,
        eps: float = 1e-6,
        warmup_steps: int = 25,
        mode: str = "zscore",
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
    ) -> None:
        self.alpha = check_real("ZClip", "alpha", alpha, low=0, high=1, low_open=True, high_open=True)
        self.z_thresh = check_real("ZClip", "z_thresh", z_thresh, low=0, low_open=True)
        self.max_norm = check_real("ZClip", "max_norm", max_norm, low=0, low_open=True, allow_none=True)
        self.eps = check_real("ZClip", "eps", eps, low=0)
        self.warmup_steps = check_int("ZClip", "warmup_steps", warmup_steps, low=1)
        self.mode = check_choice("ZClip", "mode", mode, ZCLIP_MODES)
        self.clip_option = check_choice("ZClip", "clip_option", clip_option, ZCLIP_OPTIONS)
        self.clip_factor = check_real("ZClip", "clip_factor", clip_factor, low=0, low_open=True)
        self.skip_update_on_spike = check_bool("ZClip", "skip_update_on_spike", skip_update_on_spike)
        self._warn_unused_options()
        self.step = 0  # norms seen
        self.warmup: Tensor | None = None  # the warm-up norms, NaN where empty or non-finite
        self.mean: Tensor | None = None
        self.var: Tensor | None = None

    def _warn_unused_options(self) -> None:
        """Warn about an option set away from its default where this mode ignores it (the default itself may be
        passed: Hydra's preset lists every option)."""
        defaults = option_defaults(type(self))
        unused = []
        if self.mode == "percentile" and self.clip_option != defaults.get("clip_option", self.clip_option):
            unused.append(f"clip_option={self.clip_option!r} has no effect with mode='percentile' (its threshold is"
                          " mean + z_thresh * std): drop it, or use mode='zscore'")
        adaptive = self.mode == "zscore" and self.clip_option == "adaptive_scaling"
        if not adaptive and self.clip_factor != defaults.get("clip_factor", self.clip_factor):
            unused.append(f"clip_factor={self.clip_factor!r} has no effect with mode={self.mode!r}, "
                          f"clip_option={self.clip_option!r}: only mode='zscore' with clip_option='adaptive_scaling'"
                          " scales its threshold")
        for message in unused:
            warnings.warn(f"ZClip: {message}.", stacklevel=3)

    def _state_on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(warm-up buffer, mean, var) on ``device``, created on first use."""
        if self.warmup is None or self.mean is None or self.var is None:
            self.warmup = torch.full((self.warmup_steps,), math.nan, dtype=torch.float32, device=device)
            self.mean = torch.tensor(math.nan, device=device)
            self.var = torch.tensor(math.nan, device=device)
        elif self.warmup.device != device:
            self.warmup, self.mean, self.var = (t.to(device) for t in (self.warmup, self.mean, self.var))
        return self.warmup, self.mean, self.var

    def _end_warmup(self, warmup: Tensor, mean: Tensor, var: Tensor) -> None:
        valid = ~torch.isnan(warmup)
        count = valid.sum().clamp(min=1)
        w_mean = torch.where(valid, warmup, 0.0).sum() / count
        w_var = (torch.where(valid, warmup - w_mean, 0.0) ** 2).sum() / count
        # mean stays NaN (uninitialised) when every warm-up norm was non-finite.
        self.mean = torch.where(valid.any(), w_mean, mean)
        self.var = torch.where(valid.any(), w_var, var)

    def _spike_threshold(self, n: Tensor, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
        """(is the norm a spike, the threshold it is clipped to if so)."""
        if self.mode == "percentile":
            thr = mean + self.z_thresh * std
            return n > thr, thr
        z = (n - mean) / (std + self.eps)
        if self.clip_option == "mean":
            return z > self.z_thresh, mean
        return z > self.z_thresh, (mean + self.z_thresh * std / (z / self.z_thresh)) * self.clip_factor

    def threshold(self, norm: Tensor) -> Tensor:
        """Update the statistics with ``norm`` and return this step's clipping threshold (0-d tensor)."""
        warmup, mean, var = self._state_on(norm.device)
        n = norm.detach().float()
        finite = torch.isfinite(n)
        inf = torch.full_like(n, math.inf)
        if self.step < self.warmup_steps:
            warmup[self.step] = torch.where(finite, n, math.nan)
            self.step += 1
            if self.step == self.warmup_steps:
                self._end_warmup(warmup, mean, var)
            return _cap(inf, self.max_norm)
        self.step += 1
        # Statistics still uninitialised (no finite warm-up norm): start them at the first finite norm.
        uninit = torch.isnan(mean) & finite
        mean = torch.where(uninit, n, mean)
        var = torch.where(uninit, torch.zeros_like(n), var)
        spike, spike_thr = self._spike_threshold(n, mean, var.sqrt())
        effective = torch.where(spike, spike_thr, n)
        new_mean = self.alpha * mean + (1 - self.alpha) * effective
        new_var = self.alpha * var + (1 - self.alpha) * (effective - new_mean) ** 2
        update = finite & ~spike if self.skip_update_on_spike else finite
        self.mean = torch.where(update, new_mean, mean)
        self.var = torch.where(update, new_var, var)
        return _cap(torch.where(spike, spike_thr, inf), self.max_norm)

    def state_dict(self) -> dict[str, Any]:
        """Step count, warm-up norms and EMA statistics (tensors on CPU)."""

        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().cpu().clone()

        return {"step": self.step, "warmup": cpu(self.warmup), "mean": cpu(self.mean), "var": cpu(self.var)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; tensors move to the gradients' device on the next step."""
        warmup = state_dict["warmup"]
        if warmup is not None and warmup.numel() != self.warmup_steps:
            raise ValueError(
                f"ZClip warm-up buffer has {warmup.numel()} entries, expected warmup_steps={self.warmup_steps}"
            )
        self.step = int(state_dict["step"])
        self.warmup = None if warmup is None else warmup.clone()
        self.mean = None if state_dict["mean"] is None else state_dict["mean"].clone()
        self.var = None if state_dict["var"] is None else state_dict["var"].clone()


register_clipper("zclip", ZClip)
