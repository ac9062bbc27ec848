"""AutoClip, Seetharaman et al. 2020: clip the total norm to a percentile of its history."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_clipprune._sharded import local
from lightning_clipprune._validation import check_bool, check_int, check_real
from lightning_clipprune.clipping.base import (
    ThresholdClip,
    _cap,
    _nothing,
    _per_tensor_norms,
    _ratio,
    clip_coefficient,
    register_clipper,
)

__all__ = ["AutoClip"]


class AutoClip(ThresholdClip):
    r"""AutoClip: clip to a percentile of the gradient-norm history.

    Seetharaman, Wichern, Pardo, Le Roux 2020, "AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks", https://arxiv.org/abs/2007.14469. At step :math:`t` with norm :math:`n_t`:

    .. math::

        H_t = (n_1, \dots, n_t), \qquad
        \eta_t = \min\big(\text{percentile}_p(H_t),\ \text{max\_norm}\big), \qquad
        g \leftarrow g \cdot \min\left(1, \frac{\eta_t}{n_t + 10^{-6}}\right)

    As in the paper's reference code (``autoclip_gradient``): the current norm joins the history
    before the percentile is taken, the whole history is kept (``history_size=None``; an int keeps
    only the last ``history_size`` norms in a ring buffer), percentiles interpolate linearly
    (``numpy.percentile``'s default), and there is no cap (``max_norm=None``). The history lives on
    the gradients' device; non-finite norms are recorded as NaN and ignored by the percentile.

    With ``per_parameter=True`` each parameter keeps its own history of its own gradient norm and is
    clipped to its own percentile (the per-parameter variant of the ``autoclip`` package); pass the
    same parameters, in the same order, at every step (one without a gradient records nothing).
    Parameters appended to the list later (a param group added mid-fit, as ``BackboneFinetuning`` does)
    start with an empty history of their own; the others keep theirs.

    Args:
        percentile: p in [0, 100] (the paper: 10).
        history_size: norms kept; None for the whole history (the paper).
        max_norm: a hard cap on the threshold; None for no cap (the paper).
        per_parameter: one history and one threshold per parameter instead of the global norm.

    Raises:
        ValueError: if an argument is out of range (one line naming it).

    Example::

        >>> clipper = AutoClip(percentile=10.0)
        >>> w = torch.zeros(2, requires_grad=True)
        >>> for g in ([3.0, 4.0], [0.6, 0.8], [30.0, 40.0]):
        ...     w.grad = torch.tensor(g)
        ...     norm, coef = clipper.clip([w])
        >>> round(float(norm), 3), round(float(torch.linalg.vector_norm(w.grad)), 3)  # 10th pct of (5, 1, 50)
        (50.0, 1.8)
    """

    def __init__(
        self,
        percentile: float = 10.0,
        history_size: int | None = None,
        max_norm: float | None = None,
        per_parameter: bool = False,
    ) -> None:
        self.percentile = check_real("AutoClip", "percentile", percentile, low=0, high=100)
        self.history_size = check_int("AutoClip", "history_size", history_size, low=1, allow_none=True)
        self.max_norm = check_real("AutoClip", "max_norm", max_norm, low=0, low_open=True, allow_none=True)
        self.per_parameter = check_bool("AutoClip", "per_parameter", per_parameter)
        self.history: Tensor | None = None  # float32, (capacity,) or (capacity, n_params); NaN where empty
        self.position = 0  # next slot
        self.count = 0  # norms recorded (at most history_size when bounded)

    def _record(self, norm: Tensor) -> None:
        n = norm.detach().float()
        if self.history is not None and self.history.shape[1:] != n.shape:
            self._widen(n.shape)
        if self.history is None:
            capacity = self.history_size or 64
            self.history = torch.full((capacity, *n.shape), math.nan, dtype=torch.float32, device=n.device)
            self.position = self.count = 0
        elif self.history.device != n.device:
            self.history = self.history.to(n.device)
        if self.history_size is None and self.position == self.history.shape[0]:
            self.history = torch.cat((self.history, torch.full_like(self.history, math.nan)))  # doubles
        self.history[self.position] = torch.where(torch.isfinite(n), n, math.nan)
        self.count = self.count + 1 if self.history_size is None else min(self.count + 1, self.history_size)
        self.position = self.count if self.history_size is None else (self.position + 1) % self.history_size

    def _widen(self, shape: torch.Size) -> None:
        """Give parameters appended since the last step an empty (NaN) history column each; any other change of
        the parameter list drops the history, with a warning (no column can be matched to a parameter)."""
        assert self.history is not None
        old = self.history.shape[1:]
        if len(old) == len(shape) == 1 and shape[0] > old[0]:
            pad = self.history.new_full((self.history.shape[0], shape[0] - old[0]), math.nan)
            self.history = torch.cat((self.history, pad), dim=1)
            return
        warnings.warn(
            f"AutoClip: the clipped parameters are not the previous ones with new ones appended ({tuple(old)} norms"
            f" per step before, {tuple(shape)} now), so no history can be matched to a parameter: starting afresh.",
            stacklevel=4,
        )
        self.history = None

    def threshold(self, norm: Tensor) -> Tensor:
        """Record ``norm`` (0-d, or one per parameter) and return this step's threshold (the same shape)."""
        self._record(norm)
        assert self.history is not None
        thr = torch.nanquantile(self.history[: max(self.count, 1)], self.percentile / 100.0, dim=0)
        # NaN only when every recorded norm is non-finite, this one included: that step is not taken anyway.
        return _cap(torch.nan_to_num(thr, nan=math.inf), self.max_norm)

    @torch.no_grad()
    def clip(self, parameters: Iterable[Tensor] | Tensor, norm_type: float = 2.0) -> tuple[Tensor, Tensor]:
        """Record the norm(s), then clip to the percentile (globally, or each parameter to its own).

        Returns:
            ``(total_norm, clip_coef)``: the global norm before clipping and the factor applied (per
            parameter: ``||g_after||_p / ||g_before||_p``).
        """
        if not self.per_parameter:
            return super().clip(parameters, norm_type)
        params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
        present = [i for i, p in enumerate(params) if p.grad is not None]
        if not present:
            return _nothing()
        grads = [params[i].grad for i in present]
        norms = _per_tensor_norms(grads, float(norm_type))
        if len(present) < len(params):  # a parameter without a gradient this step records NaN (ignored)
            full = torch.full((len(params),), math.nan, dtype=norms.dtype, device=norms.device)
            full[present] = norms
            thresholds = self.threshold(full)[present]
        else:
            thresholds = self.threshold(norms)
        coefs = clip_coefficient(thresholds.to(norms.dtype), norms)
        for g, c in zip(grads, coefs.unbind(), strict=True):  # norms are global, each rank scales its shard
            g = local(g)
            g.mul_(c.to(g.device))
        pre = torch.linalg.vector_norm(norms, norm_type)
        return pre, _ratio(torch.linalg.vector_norm(norms * coefs, norm_type), pre)

    def state_dict(self) -> dict[str, Any]:
        """The recorded history (on CPU, only the filled rows when unbounded) and the ring-buffer position."""
        history = self.history
        if history is not None and self.history_size is None:
            history = history[: self.count]
        return {
            "history": None if history is None else history.detach().cpu().clone(),
            "position": self.position,
            "count": self.count,
            "history_size": self.history_size,
            "per_parameter": self.per_parameter,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the history moves to the gradients' device on the next step.

        Raises:
            ValueError: the history was recorded with another ``history_size`` (a ring buffer read as the
                whole history, or the other way round, would index past its end or mix the two orders).
        """
        history = state_dict["history"]
        # checkpoints written before the setting was saved: a ring buffer shows as a position behind the count
        ring = history is not None and int(state_dict["position"]) != int(state_dict["count"])
        if "history_size" in state_dict:
            saved = state_dict["history_size"]
        elif history is not None and (ring or history.shape[0] == self.history_size):
            saved = history.shape[0]  # a bounded buffer is saved whole, an unbounded one up to its count
        else:
            saved = None
        if history is not None and saved != self.history_size:
            raise ValueError(
                f"AutoClip history was recorded with history_size={saved} ({history.shape[0]} entries), this run"
                f" has history_size={self.history_size}: resume with the same history_size, or start a new run"
            )
        if history is not None and (history.dim() > 1) != self.per_parameter:
            warnings.warn(
                f"AutoClip: the checkpoint's history is {'per parameter' if history.dim() > 1 else 'global'}, this"
                f" run clips {'per parameter' if self.per_parameter else 'globally'}: starting a fresh history.",
                stacklevel=2,
            )
            history = None
            state_dict = {**state_dict, "position": 0, "count": 0}
        self.history = None if history is None else history.clone()
        self.position = int(state_dict["position"])
        self.count = int(state_dict["count"])
        if self.history is not None and self.history_size is None and self.history.shape[0] == 0:
            self.history = None


register_clipper("autoclip", AutoClip)
