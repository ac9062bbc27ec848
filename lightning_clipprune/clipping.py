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

__all__ = [
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


def _grads(parameters: Iterable[Tensor] | Tensor) -> list[Tensor]:
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def _group_by_device_and_dtype(
    tensors: Sequence[Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
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
    norms: list[Tensor] = []
    for (device, _), group in _group_by_device_and_dtype(tensors).items():
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
        coef_d = coef.to(device)
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
    r"""AutoClip: clip to a percentile of the recent gradient-norm history.

    Seetharaman, Wichern, Pardo, Le Roux 2020, "AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks", https://arxiv.org/abs/2007.14469. At step :math:`t` with norm :math:`n_t`:

    .. math::

        H_t = (n_{t-h+1}, \dots, n_t), \qquad
        \eta_t = \min\big(\text{percentile}_p(H_t),\ \text{max\_norm}\big), \qquad
        g \leftarrow g \cdot \min\left(1, \frac{\eta_t}{n_t + 10^{-6}}\right)

    The current norm is in the history before the percentile is taken, as in the paper's reference
    code. The paper keeps the whole history; here it is bounded to the last ``history_size`` norms (a
    ring buffer on the gradients' device). Percentiles use linear interpolation (``numpy.percentile``'s
    default). Non-finite norms are recorded as NaN and ignored by the percentile.

    Args:
        percentile: p in [0, 100].
        history_size: h, how many recent norms are kept.
        max_norm: a hard cap on the threshold; None for no cap.
    """

    def __init__(
        self, percentile: float = 10.0, history_size: int = 1000, max_norm: float | None = None
    ) -> None:
        self.percentile = float(percentile)
        self.history_size = int(history_size)
        self.max_norm = max_norm
        self.history: Tensor | None = None  # float32, NaN where empty
        self.position = 0  # next slot of the ring buffer
        self.count = 0  # norms recorded, at most history_size

    def threshold(self, norm: Tensor) -> Tensor:
        """Record ``norm`` into the history and return this step's clipping threshold (0-d tensor)."""
        if self.history is None:
            self.history = torch.full((self.history_size,), math.nan, dtype=torch.float32, device=norm.device)
        elif self.history.device != norm.device:
            self.history = self.history.to(norm.device)
        n = norm.detach().float()
        self.history[self.position] = torch.where(torch.isfinite(n), n, torch.full_like(n, math.nan))
        self.position = (self.position + 1) % self.history_size
        self.count = min(self.count + 1, self.history_size)
        thr = torch.nanquantile(self.history, self.percentile / 100.0)
        # NaN only when every recorded norm is non-finite, this one included: that step is not taken anyway.
        thr = torch.nan_to_num(thr, nan=math.inf)
        return _cap(thr, self.max_norm)

    def state_dict(self) -> dict[str, Any]:
        """The history (on CPU) and the ring-buffer position."""
        return {
            "history": None if self.history is None else self.history.detach().cpu().clone(),
            "position": self.position,
            "count": self.count,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the history moves to the gradients' device on the next step."""
        history = state_dict["history"]
        if history is not None and history.numel() != self.history_size:
            raise ValueError(
                f"AutoClip history has {history.numel()} entries, expected history_size={self.history_size}"
            )
        self.history = None if history is None else history.clone()
        self.position = int(state_dict["position"])
        self.count = int(state_dict["count"])


class ZClip(_NormHistoryClipper):
    r"""ZClip: clip gradient-norm spikes detected by a z-score against EMA statistics.

    Kumar, Owen, Ashkboos, Hoefler 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training",
    https://arxiv.org/abs/2504.02507 (the "zscore" mode with "adaptive_scaling" of the reference code).

    Warm-up: the first ``warmup_steps`` norms are collected (only ``max_norm`` clips), then
    :math:`\mu` and :math:`\sigma^2` are their mean and (population) variance. After warm-up, at norm
    :math:`n_t`:

    .. math::

        z_t = \frac{n_t - \mu_{t-1}}{\sigma_{t-1} + \epsilon}, \qquad
        \eta_t = \begin{cases}
            \mu_{t-1} + \dfrac{z_{thres}}{z_t / z_{thres}}\,\sigma_{t-1} & z_t > z_{thres} \\
            \infty & \text{otherwise}
        \end{cases}

        g \leftarrow g \cdot \min\left(1, \frac{\min(\eta_t, \text{max\_norm})}{n_t + 10^{-6}}\right)

    and the statistics follow the clipped norm :math:`\tilde n_t = \min(n_t, \eta_t)` (so a spike does
    not inflate them):

    .. math::

        \mu_t = \alpha \mu_{t-1} + (1-\alpha)\,\tilde n_t, \qquad
        \sigma^2_t = \alpha \sigma^2_{t-1} + (1-\alpha)\,(\tilde n_t - \mu_t)^2

    Non-finite norms leave the statistics unchanged. Everything stays on the device.

    Args:
        alpha: EMA smoothing factor in (0, 1).
        z_thresh: z-score above which a norm is a spike.
        warmup_steps: norms collected before the statistics are initialised.
        max_norm: a hard cap on the norm at every step, warm-up included; None for no cap.
        eps: added to sigma in the z-score (the reference code's default).
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        max_norm: float | None = None,
        eps: float = 1e-6,
    ) -> None:
        self.alpha = float(alpha)
        self.z_thresh = float(z_thresh)
        self.warmup_steps = int(warmup_steps)
        self.max_norm = max_norm
        self.eps = float(eps)
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

    def threshold(self, norm: Tensor) -> Tensor:
        """Update the statistics with ``norm`` and return this step's clipping threshold (0-d tensor)."""
        warmup, mean, var = self._state_on(norm.device)
        n = norm.detach().float()
        finite = torch.isfinite(n)
        inf = torch.full_like(n, math.inf)
        if self.step < self.warmup_steps:
            warmup[self.step] = torch.where(finite, n, torch.full_like(n, math.nan))
            self.step += 1
            if self.step == self.warmup_steps:
                valid = ~torch.isnan(warmup)
                count = valid.sum().clamp(min=1)
                w_mean = torch.where(valid, warmup, 0.0).sum() / count
                w_var = (torch.where(valid, warmup - w_mean, 0.0) ** 2).sum() / count
                # mean stays NaN (uninitialised) when every warm-up norm was non-finite.
                self.mean = torch.where(valid.any(), w_mean, mean)
                self.var = torch.where(valid.any(), w_var, var)
            return _cap(inf, self.max_norm)
        self.step += 1
        # Statistics still uninitialised (no finite warm-up norm): start them at the first finite norm.
        uninit = torch.isnan(mean) & finite
        mean = torch.where(uninit, n, mean)
        var = torch.where(uninit, torch.zeros_like(n), var)
        std = var.sqrt()
        z = (n - mean) / (std + self.eps)
        spike = z > self.z_thresh
        eta = z / self.z_thresh
        adaptive = mean + self.z_thresh * std / eta
        thr = torch.where(spike, adaptive, inf)
        effective = torch.where(spike, adaptive, n)
        new_mean = self.alpha * mean + (1 - self.alpha) * effective
        new_var = self.alpha * var + (1 - self.alpha) * (effective - new_mean) ** 2
        self.mean = torch.where(finite, new_mean, mean)
        self.var = torch.where(finite, new_var, var)
        return _cap(thr, self.max_norm)

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
