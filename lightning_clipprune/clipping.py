"""Gradient clipping: pure tensor functions and small state objects (no Lightning import).

Every function takes the parameters whose ``.grad`` it clips in place and returns two 0-d tensors on
the gradients' device, ``(total_norm, clip_coef)``: the global p-norm of the gradients *before*
clipping and the factor the clipping applied (``<= 1``). Nothing here reads a value back to the host,
so a training step that calls these functions does not synchronise with the accelerator.

Algorithms:

- :func:`clip_grad_norm`: global norm clipping, the same result as ``torch.nn.utils.clip_grad_norm_``.
- :func:`clip_grad_value`: element-wise clamp, the same result as ``torch.nn.utils.clip_grad_value_``.
- :func:`adaptive_grad_clip`: unit-wise adaptive gradient clipping (AGC), Brock et al. 2021.
- :class:`AutoClip`: a percentile of the recent history of norms, Seetharaman et al. 2020.
- :class:`ZClip`: z-score of the norm against an EMA mean and variance, Kumar et al. 2025.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_clipprune._validation import check_bool, check_choice, check_int, check_real

__all__ = [
    "ZCLIP_MODES",
    "ZCLIP_OPTIONS",
    "AutoClip",
    "ZClip",
    "adaptive_grad_clip",
    "clip_coefficient",
    "clip_grad_norm",
    "clip_grad_value",
    "scale_grads_",
    "total_norm",
]

# torch's clip_grad_norm_ adds this to the norm before dividing; kept identical so results match bit for bit.
_NORM_EPS = 1e-6
# Device types whose foreach kernels are known to work; others use a per-tensor loop.
_FOREACH_DEVICE_TYPES = frozenset({"cpu", "cuda", "xpu"})
ZCLIP_MODES = ("zscore", "percentile")
ZCLIP_OPTIONS = ("adaptive_scaling", "mean")


def _grads(parameters: Iterable[Tensor] | Tensor) -> list[Tensor]:
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def _group_by_device_and_dtype(
    tensors: Sequence[Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    first = tensors[0]
    device, dtype = first.device, first.dtype
    if all(t.device == device and t.dtype == dtype for t in tensors):  # the usual case: one group, no copying
        return {(device, dtype): tensors if isinstance(tensors, list) else list(tensors)}
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def total_norm(tensors: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """The p-norm of ``tensors`` viewed as one concatenated vector, as ``torch.nn.utils.get_total_norm``.

    One ``torch._foreach_norm`` per (device, dtype) group, then the p-norm of the stacked per-tensor norms:
    ``||(||t_1||_p, ..., ||t_k||_p)||_p == ||concat(t_1, ..., t_k)||_p`` for every p, including inf.

    Args:
        tensors: the tensors (usually gradients).
        norm_type: p of the p-norm; ``float("inf")`` for the max-norm.

    Returns:
        A 0-d tensor on the first tensor's device (a CPU zero when ``tensors`` is empty).
    """
    if len(tensors) == 0:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    first_device = tensors[0].device
    groups = _group_by_device_and_dtype(tensors)
    if len(groups) == 1 and first_device.type in _FOREACH_DEVICE_TYPES:  # one kernel, no copies
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, norm_type)), norm_type)
    norms: list[Tensor] = []
    for (device, _), group in groups.items():
        if device.type in _FOREACH_DEVICE_TYPES:
            norms.extend(torch._foreach_norm(group, norm_type))
        else:
            norms.extend(torch.linalg.vector_norm(t, norm_type) for t in group)
    return torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), norm_type)


def clip_coefficient(max_norm: float | Tensor, norm: Tensor) -> Tensor:
    r"""The factor that scales a gradient of norm ``norm`` down to at most ``max_norm``.

    .. math:: c = \min\left(1, \frac{\text{max\_norm}}{\text{norm} + 10^{-6}}\right)

    ``max_norm = inf`` gives 1 (no clipping). The same expression as ``torch.nn.utils.clip_grad_norm_``.
    """
    return torch.clamp(max_norm / (norm + _NORM_EPS), max=1.0)


def scale_grads_(grads: Sequence[Tensor], coef: Tensor) -> None:
    """Multiply every tensor of ``grads`` in place by the 0-d tensor ``coef`` (foreach per device group)."""
    for (device, _), group in _group_by_device_and_dtype(grads).items():
        coef_d = coef if coef.device == device else coef.to(device)
        if device.type in _FOREACH_DEVICE_TYPES:
            torch._foreach_mul_(group, coef_d)
        else:
            for g in group:
                g.mul_(coef_d)


def _ratio(post: Tensor, pre: Tensor) -> Tensor:
    """post/pre, and 1 where pre is 0 (nothing to clip)."""
    return torch.where(pre > 0, post / torch.where(pre > 0, pre, torch.ones_like(pre)), torch.ones_like(pre))


@torch.no_grad()
def clip_grad_norm(
    parameters: Iterable[Tensor] | Tensor, max_norm: float | Tensor, norm_type: float = 2.0
) -> tuple[Tensor, Tensor]:
    r"""Clip the global p-norm of the gradients to ``max_norm`` in place (``torch.nn.utils.clip_grad_norm_``).

    .. math::

        \|g\|_p = \Big(\sum_i |g_i|^p\Big)^{1/p}, \qquad
        g \leftarrow g \cdot \min\left(1, \frac{\text{max\_norm}}{\|g\|_p + 10^{-6}}\right)

    where :math:`g` is the concatenation of all gradients (Pascanu et al. 2013, "On the difficulty of
    training recurrent neural networks", https://arxiv.org/abs/1211.5063).

    Args:
        parameters: parameters whose ``.grad`` is clipped; those without a gradient are ignored.
        max_norm: the bound on the norm (a float, or a 0-d tensor such as an adaptive threshold).
        norm_type: p; ``float("inf")`` for the max-norm.

    Returns:
        ``(total_norm, clip_coef)``: the norm before clipping and the factor applied.

    Example::

        >>> w = torch.zeros(2, requires_grad=True)
        >>> w.grad = torch.tensor([3.0, 4.0])
        >>> norm, coef = clip_grad_norm([w], max_norm=1.0)
        >>> round(norm.item(), 4), round(torch.linalg.vector_norm(w.grad).item(), 4)
        (5.0, 1.0)
    """
    grads = _grads(parameters)
    if not grads:
        return torch.tensor(0.0), torch.tensor(1.0)
    norm = total_norm(grads, norm_type)
    coef = clip_coefficient(max_norm, norm)
    scale_grads_(grads, coef)
    return norm, coef


@torch.no_grad()
def clip_grad_value(
    parameters: Iterable[Tensor] | Tensor, clip_value: float, norm_type: float = 2.0
) -> tuple[Tensor, Tensor]:
    r"""Clamp every gradient entry to ``[-clip_value, clip_value]`` in place (``torch.nn.utils.clip_grad_value_``).

    .. math:: g_i \leftarrow \max(-c, \min(c, g_i))

    Args:
        parameters: parameters whose ``.grad`` is clipped; those without a gradient are ignored.
        clip_value: c, the largest allowed magnitude of an entry.
        norm_type: p of the reported norms.

    Returns:
        ``(total_norm, clip_coef)``: the p-norm before clipping and ``||g_after||_p / ||g_before||_p``
        (1 when nothing changed or the norm is 0). Value clipping is not a scaling; this ratio says how
        much of the gradient's norm survived.
    """
    grads = _grads(parameters)
    if not grads:
        return torch.tensor(0.0), torch.tensor(1.0)
    clip_value = float(clip_value)
    pre = total_norm(grads, norm_type)
    for (device, _), group in _group_by_device_and_dtype(grads).items():
        if device.type in _FOREACH_DEVICE_TYPES:
            torch._foreach_clamp_min_(group, -clip_value)
            torch._foreach_clamp_max_(group, clip_value)
        else:
            for g in group:
                g.clamp_(min=-clip_value, max=clip_value)
    return pre, _ratio(total_norm(grads, norm_type), pre)


def _unitwise_norm(x: Tensor, norm_type: float) -> Tensor:
    """Norm per output unit (over all dims but 0, kept for broadcasting); whole-tensor norm for ndim <= 1."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x, norm_type)
    return torch.linalg.vector_norm(x, norm_type, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def adaptive_grad_clip(
    parameters: Iterable[Tensor] | Tensor,
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    norm_type: float = 2.0,
) -> tuple[Tensor, Tensor]:
    r"""Unit-wise adaptive gradient clipping (AGC), in place.

    Brock, De, Smith, Simonyan 2021, "High-Performance Large-Scale Image Recognition Without
    Normalization", https://arxiv.org/abs/2102.06171, eq. 3. For every unit :math:`i` (a row of a
    weight: all dimensions but the first; a whole bias or other 1-d/0-d tensor):

    .. math::

        G_i \leftarrow \begin{cases}
            \lambda \dfrac{\max(\|W_i\|, \epsilon)}{\max(\|G_i\|, 10^{-6})} G_i
                & \text{if } \dfrac{\|G_i\|}{\max(\|W_i\|, \epsilon)} > \lambda \\
            G_i & \text{otherwise}
        \end{cases}

    The same computation as timm's ``utils/agc.py``. The paper does not clip the final classifier
    layer; leave it out of ``parameters``.

    Args:
        parameters: parameters whose ``.grad`` is clipped against their own values.
        clip_factor: lambda, the largest allowed ratio of gradient norm to weight norm per unit.
        eps: epsilon, the floor on the weight norm (so zero-initialised weights can move).
        norm_type: p of the unit-wise and the reported norms.

    Returns:
        ``(total_norm, clip_coef)``: the global p-norm of the gradients before clipping and
        ``||g_after||_p / ||g_before||_p``.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0), torch.tensor(1.0)
    first_device = params[0].grad.device
    unit_pre: list[Tensor] = []
    unit_post: list[Tensor] = []
    for p in params:
        g = p.grad
        max_norm = _unitwise_norm(p.detach(), norm_type).clamp(min=eps).mul_(clip_factor)
        grad_norm = _unitwise_norm(g, norm_type)
        # scale 1 where the unit is within bounds, so those entries stay bit-identical
        scale = torch.where(grad_norm < max_norm, 1.0, max_norm / grad_norm.clamp(min=_NORM_EPS))
        g.mul_(scale)
        unit_pre.append(grad_norm.flatten().to(first_device))
        unit_post.append((grad_norm * scale).flatten().to(first_device))
    # The p-norm of all units' p-norms is the global p-norm: no extra pass over the gradients.
    pre = torch.linalg.vector_norm(torch.cat(unit_pre), norm_type)
    return pre, _ratio(torch.linalg.vector_norm(torch.cat(unit_post), norm_type), pre)


def _per_tensor_norms(tensors: Sequence[Tensor], norm_type: float) -> Tensor:
    """The p-norm of each tensor, stacked in the order given, on the first tensor's device."""
    first_device = tensors[0].device
    norms = list(tensors)  # each entry is replaced by its norm
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    for (device, _), index in groups.items():
        group = [tensors[i] for i in index]
        if device.type in _FOREACH_DEVICE_TYPES:
            group_norms = torch._foreach_norm(group, norm_type)
        else:
            group_norms = [torch.linalg.vector_norm(t, norm_type) for t in group]
        for i, n in zip(index, group_norms, strict=True):
            norms[i] = n.to(first_device)
    return torch.stack(norms)


def _cap(threshold: Tensor, max_norm: float | None) -> Tensor:
    return threshold if max_norm is None else torch.clamp(threshold, max=max_norm)


class _NormHistoryClipper:
    """Shared by :class:`AutoClip` and :class:`ZClip`: a ``threshold(norm)`` that updates the statistics."""

    def threshold(self, norm: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def clip(self, parameters: Iterable[Tensor] | Tensor, norm_type: float = 2.0) -> tuple[Tensor, Tensor]:
        """Update the statistics with the gradients' norm, then clip them to the threshold.

        Returns:
            ``(total_norm, clip_coef)``, both 0-dim tensors on the gradients' device.
        """
        grads = _grads(parameters)
        if not grads:
            return torch.tensor(0.0), torch.tensor(1.0)
        norm = total_norm(grads, norm_type)
        coef = clip_coefficient(self.threshold(norm).to(norm.dtype), norm)
        scale_grads_(grads, coef)
        return norm, coef


class AutoClip(_NormHistoryClipper):
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
        if self.history is None or self.history.shape[1:] != n.shape:
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
            return torch.tensor(0.0), torch.tensor(1.0)
        grads = [params[i].grad for i in present]
        norms = _per_tensor_norms(grads, float(norm_type))
        if len(present) < len(params):  # a parameter without a gradient this step records NaN (ignored)
            full = torch.full((len(params),), math.nan, dtype=norms.dtype, device=norms.device)
            full[present] = norms
            thresholds = self.threshold(full)[present]
        else:
            thresholds = self.threshold(norms)
        coefs = clip_coefficient(thresholds.to(norms.dtype), norms)
        for g, c in zip(grads, coefs.unbind(), strict=True):
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
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the history moves to the gradients' device on the next step."""
        history = state_dict["history"]
        if history is not None and self.history_size is not None and history.shape[0] != self.history_size:
            raise ValueError(
                f"AutoClip history has {history.shape[0]} entries, expected history_size={self.history_size}"
            )
        self.history = None if history is None else history.clone()
        self.position = int(state_dict["position"])
        self.count = int(state_dict["count"])
        if self.history is not None and self.history_size is None and self.history.shape[0] == 0:
            self.history = None


class ZClip(_NormHistoryClipper):
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

    Args:
        alpha: EMA smoothing factor in (0, 1).
        z_thresh: z-score above which a norm is a spike (``"zscore"``), or the number of standard
            deviations above the mean that is the threshold (``"percentile"``).
        max_norm: a hard cap on the norm at every step, warm-up included; None for no cap.
        eps: added to sigma in the z-score.
        warmup_steps: norms collected before the statistics are initialised.
        mode: ``"zscore"`` or ``"percentile"``.
        clip_option: ``"adaptive_scaling"`` or ``"mean"`` (``"zscore"`` mode only).
        clip_factor: multiplies the adaptive threshold (``"adaptive_scaling"`` only; 0.5 to 0.9 clips harder).
        skip_update_on_spike: leave the statistics unchanged at a spike.

    Raises:
        ValueError: if an argument is out of range (one line naming it).

    Example::

        >>> clipper = ZClip(warmup_steps=2)
        >>> w = torch.zeros(1, requires_grad=True)
        >>> for g in (0.5, 0.7, 0.6, 5.0):
        ...     w.grad = torch.tensor([g])
        ...     norm, coef = clipper.clip([w])
        >>> round(float(w.grad), 4)  # the spike 5.0 is clipped to the adaptive threshold
        0.6138
    """

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
        self.step = 0  # norms seen
        self.warmup: Tensor | None = None  # the warm-up norms, NaN where empty or non-finite
        self.mean: Tensor | None = None
        self.var: Tensor | None = None

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
