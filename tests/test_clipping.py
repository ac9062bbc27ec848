"""Unit tests of the pure clipping functions in lightning_clipprune.clipping, on hand-built tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lightning_clipprune.clipping import (
    AGC,
    CLIPPERS,
    AutoClip,
    NormClip,
    ThresholdClip,
    ValueClip,
    ZClip,
    adaptive_grad_clip,
    clip_coefficient,
    clip_grad_norm,
    clip_grad_value,
    total_norm,
)

NORM_TYPES = [1.0, 2.0, 3.0, math.inf]


def make_params(
    seed: int = 0, scale: float = 3.0, shapes=((5, 3), (7,), (2, 3, 4), ())
) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g))
        p.grad = torch.randn(shape, generator=g) * scale
        params.append(p)
    return params


def clone_params(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def grad_norm(params, norm_type: float = 2.0) -> float:
    return torch.linalg.vector_norm(
        torch.cat([p.grad.flatten() for p in params if p.grad is not None]), norm_type
    ).item()


# ---------------------------------------------------------------------------------------- norm / value


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("max_norm", [0.5, 4.0, 1e6])
def test_clip_grad_norm_equals_torch(norm_type, max_norm):
    ours = make_params()
    ref = clone_params(ours)
    norm, coef = clip_grad_norm(ours, max_norm, norm_type)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type)
    assert torch.equal(norm, ref_norm)
    for p, q in zip(ours, ref, strict=True):
        assert torch.equal(p.grad, q.grad)
    assert torch.equal(coef, torch.clamp(max_norm / (ref_norm + 1e-6), max=1.0))
    assert coef.item() <= 1.0


def test_clip_grad_norm_hand_built():
    w = torch.nn.Parameter(torch.zeros(2))
    w.grad = torch.tensor([3.0, 4.0])
    norm, coef = clip_grad_norm([w], 1.0)
    assert norm.item() == pytest.approx(5.0)
    assert coef.item() == pytest.approx(1.0 / (5.0 + 1e-6))
    assert w.grad.tolist() == pytest.approx([0.6, 0.8], rel=1e-5)
    # below the bound: untouched, coefficient exactly 1
    w.grad = torch.tensor([0.3, 0.4])
    norm, coef = clip_grad_norm([w], 1.0)
    assert coef.item() == 1.0 and w.grad.tolist() == pytest.approx([0.3, 0.4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_clip_grad_norm_around_the_bound_equals_torch(dtype):
    """Under the bound no pass is made over the gradients (decided on the host); at and just around it the
    tensor path decides: every result is torch's, bit for bit."""
    g = torch.Generator().manual_seed(0)
    for i in range(400):
        ours = []
        for p in make_params(seed=i, scale=0.2):
            q = torch.nn.Parameter(p.detach().to(dtype))
            q.grad = p.grad.to(dtype)
            ours.append(q)
        norm = torch.linalg.vector_norm(torch.cat([p.grad.float().flatten() for p in ours])).item()
        # bounds at, and a few ulps to a few percent around, the gradients' norm
        rel = float(torch.randn((), generator=g)) * 10.0 ** float(torch.randint(-9, -1, (), generator=g))
        max_norm = norm * (1.0 + rel) + (1e-6 if i % 3 == 0 else 0.0)
        ref = clone_params(ours)
        before = [p.grad.data_ptr() for p in ours]
        n, coef = clip_grad_norm(ours, max_norm)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        assert torch.equal(n, ref_norm)
        assert torch.equal(coef, torch.clamp(max_norm / (ref_norm + 1e-6), max=1.0))
        assert coef.dtype == ref_norm.dtype
        for p, q, ptr in zip(ours, ref, before, strict=True):
            assert torch.equal(p.grad, q.grad) and p.grad.data_ptr() == ptr


def test_clip_grad_norm_under_the_bound_writes_no_gradient(monkeypatch):
    from lightning_clipprune.clipping import base

    scaled = []
    monkeypatch.setattr(base, "_scale_groups_", lambda groups, coef: scaled.append(coef))
    w = torch.nn.Parameter(torch.zeros(2))
    w.grad = torch.tensor([0.3, 0.4])
    _, coef = clip_grad_norm([w], 1.0)
    assert scaled == [] and coef.item() == 1.0
    for bound in (0.5, 0.5 + 1e-6, float("nan")):  # over it, at it (the tensor path decides), NaN
        clip_grad_norm([w], bound)
    w.grad = torch.tensor([float("nan"), 0.0])
    clip_grad_norm([w], 1.0)
    assert len(scaled) == 4


def test_parameters_without_grad_are_ignored_and_empty_is_a_no_op():
    params = make_params()
    params[1].grad = None
    ref = clone_params(params)
    norm, _ = clip_grad_norm(params, 1.0)
    assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(ref, 1.0))
    assert params[1].grad is None
    for fn in (clip_grad_norm, clip_grad_value, adaptive_grad_clip):
        norm, coef = fn([torch.nn.Parameter(torch.ones(2))], 1.0)
        assert norm.item() == 0.0 and coef.item() == 1.0


def test_total_norm_mixed_dtypes_matches_torch():
    a = torch.randn(10, dtype=torch.float64)
    b = torch.randn(3, 4, dtype=torch.float32)
    for norm_type in NORM_TYPES:
        ours = total_norm([a, b], norm_type)
        ref = torch.linalg.vector_norm(torch.cat([a.flatten(), b.double().flatten()]), norm_type)
        assert ours.item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("clip_value", [0.1, 1.0, 100.0])
def test_clip_grad_value_equals_torch(clip_value):
    ours = make_params(seed=1)
    ref = clone_params(ours)
    pre = grad_norm(ours)
    norm, coef = clip_grad_value(ours, clip_value)
    torch.nn.utils.clip_grad_value_(ref, clip_value)
    for p, q in zip(ours, ref, strict=True):
        assert torch.equal(p.grad, q.grad)
    assert norm.item() == pytest.approx(pre, rel=1e-6)
    assert coef.item() == pytest.approx(grad_norm(ours) / pre, rel=1e-6)
    if clip_value == 100.0:  # nothing clamped: ratio exactly 1
        assert coef.item() == 1.0


def test_clip_coefficient_bounds():
    assert clip_coefficient(math.inf, torch.tensor(3.0)).item() == 1.0
    assert clip_coefficient(1.0, torch.tensor(0.0)).item() == 1.0
    assert clip_coefficient(1.0, torch.tensor(4.0)).item() == pytest.approx(0.25, rel=1e-5)


# ---------------------------------------------------------------------------------------- AGC


def agc_reference(params, clip_factor, eps, norm_type=2.0):
    """Unit by unit, in Python loops, from the formula in Brock et al. 2021 (eq. 3)."""
    for p in params:
        w, g = p.detach(), p.grad
        units = [(slice(None),)] if p.ndim <= 1 else [(i,) for i in range(p.shape[0])]
        new = g.clone()
        for u in units:
            w_norm = max(torch.linalg.vector_norm(w[u], norm_type).item(), eps)
            g_norm = torch.linalg.vector_norm(g[u], norm_type).item()
            if g_norm / w_norm > clip_factor:
                new[u] = g[u] * (clip_factor * w_norm / max(g_norm, 1e-6))
        p.grad = new


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
def test_agc_matches_unitwise_reference(norm_type):
    ours = make_params(seed=2, scale=0.5, shapes=((6, 4), (6,), (3, 2, 3, 3)))
    ref = clone_params(ours)
    pre = grad_norm(ours, norm_type)
    norm, coef = adaptive_grad_clip(ours, clip_factor=0.1, eps=1e-3, norm_type=norm_type)
    agc_reference(ref, 0.1, 1e-3, norm_type)
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    assert norm.item() == pytest.approx(pre, rel=1e-5)
    assert coef.item() == pytest.approx(grad_norm(ours, norm_type) / pre, rel=1e-5)
    assert coef.item() < 1.0  # with lambda=0.1 and these gradients some unit is clipped


def test_agc_is_bit_identical_to_timm_formula():
    """timm utils/agc.py, vectorised per parameter: where(|G| < lambda*max(|W|, eps), G, G * bound/|G|)."""
    shapes = ((6, 4), (6,), (3, 2, 3, 3), ())
    ours = make_params(seed=5, scale=0.3, shapes=shapes)
    ref = clone_params(ours)
    adaptive_grad_clip(ours, clip_factor=0.05, eps=1e-3)
    for p in ref:
        dims = tuple(range(1, p.ndim))
        w_norm = p.detach().norm(2, dim=dims, keepdim=True) if p.ndim > 1 else p.detach().norm(2)
        g_norm = p.grad.norm(2, dim=dims, keepdim=True) if p.ndim > 1 else p.grad.norm(2)
        max_norm = w_norm.clamp(min=1e-3) * 0.05
        p.grad = torch.where(g_norm < max_norm, p.grad, p.grad * (max_norm / g_norm.clamp(min=1e-6)))
    for p, q in zip(ours, ref, strict=True):
        assert torch.equal(p.grad, q.grad)
    untouched = make_params(seed=5, scale=0.3, shapes=shapes)
    assert any(not torch.equal(p.grad, q.grad) for p, q in zip(ours, untouched, strict=True))  # it clipped


def test_agc_hand_built_rows_and_eps():
    # row 0: |W|=1, |G|=0.05 <= 0.1 * 1 -> kept; row 1: |W|=2, |G|=1 > 0.2 -> scaled to norm 0.2
    w = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    w.grad = torch.tensor([[0.03, 0.04], [0.6, 0.8]])
    adaptive_grad_clip([w], clip_factor=0.1)
    assert w.grad[0].tolist() == pytest.approx([0.03, 0.04])
    assert w.grad[1].tolist() == pytest.approx([0.12, 0.16], rel=1e-5)
    # zero weights: the bound is clip_factor * eps
    z = torch.nn.Parameter(torch.zeros(3))
    z.grad = torch.ones(3)
    adaptive_grad_clip([z], clip_factor=0.5, eps=1e-3)
    assert torch.linalg.vector_norm(z.grad).item() == pytest.approx(0.5e-3, rel=1e-4)


# ---------------------------------------------------------------------------------------- AutoClip


def test_autoclip_threshold_is_percentile_of_bounded_history():
    rng = np.random.default_rng(0)
    norms = rng.lognormal(size=40).tolist()
    clip = AutoClip(percentile=25.0, history_size=7)
    for t, n in enumerate(norms):
        thr = clip.threshold(torch.tensor(n))
        window = norms[max(0, t - 6) : t + 1]  # the current norm is part of the history
        assert thr.item() == pytest.approx(np.percentile(window, 25.0), rel=1e-5)
    assert clip.count == 7


def test_autoclip_ignores_nonfinite_and_caps():
    clip = AutoClip(percentile=50.0, history_size=10, max_norm=2.5)
    assert clip.threshold(torch.tensor(1.0)).item() == pytest.approx(1.0)
    assert clip.threshold(torch.tensor(math.inf)).item() == pytest.approx(1.0)  # inf ignored
    assert clip.threshold(torch.tensor(math.nan)).item() == pytest.approx(1.0)
    assert clip.threshold(torch.tensor(3.0)).item() == pytest.approx(2.0)  # median of 1, 3
    assert clip.threshold(torch.tensor(9.0)).item() == pytest.approx(2.5)  # median 3, capped
    assert torch.isinf(AutoClip().threshold(torch.tensor(math.nan)))  # nothing finite: no bound


def test_autoclip_clips_gradients_to_threshold():
    clip = AutoClip(percentile=0.0, history_size=5)
    first = make_params(seed=3, scale=1.0)
    n1 = grad_norm(first)
    clip.clip(first)  # history [n1], threshold n1: no change beyond the 1e-6 epsilon
    assert grad_norm(first) == pytest.approx(n1, rel=1e-5)
    second = make_params(seed=4, scale=10.0)
    norm, coef = clip.clip(second)
    assert norm.item() > n1
    assert grad_norm(second) == pytest.approx(n1, rel=1e-5)  # clipped to the minimum of the history
    assert coef.item() == pytest.approx(n1 / norm.item(), rel=1e-5)


def test_autoclip_state_dict_resumes_identically():
    rng = np.random.default_rng(1)
    norms = [torch.tensor(x) for x in rng.lognormal(size=30)]
    full = AutoClip(percentile=10.0, history_size=8)
    expected = [full.threshold(n) for n in norms]
    first = AutoClip(percentile=10.0, history_size=8)
    for n in norms[:13]:
        first.threshold(n)
    resumed = AutoClip(percentile=10.0, history_size=8)
    resumed.load_state_dict(first.state_dict())
    assert [resumed.threshold(n) for n in norms[13:]] == expected[13:]
    with pytest.raises(ValueError, match="history_size=4"):
        AutoClip(history_size=4).load_state_dict(first.state_dict())


# ---------------------------------------------------------------------------------------- ZClip


def zclip_reference(norms, alpha, z_thresh, warmup, max_norm=None, eps=1e-6):
    """Scalar transcription of the ZClip reference code (zscore mode, adaptive_scaling)."""
    buffer, mean, var, out = [], None, None, []
    for n in norms:
        if mean is None:
            buffer.append(n)
            if len(buffer) >= warmup:
                mean = sum(buffer) / len(buffer)
                var = sum((x - mean) ** 2 for x in buffer) / len(buffer)
            out.append(math.inf if max_norm is None else max_norm)
            continue
        std = var**0.5
        z = (n - mean) / (std + eps)
        thr = mean + z_thresh * std / (z / z_thresh) if z > z_thresh else None
        out.append(min(math.inf if thr is None else thr, math.inf if max_norm is None else max_norm))
        eff = thr if thr is not None else n
        mean = alpha * mean + (1 - alpha) * eff
        var = alpha * var + (1 - alpha) * (eff - mean) ** 2
    return out


@pytest.mark.parametrize("max_norm", [None, 3.0])
def test_zclip_matches_reference_with_spikes(max_norm):
    rng = np.random.default_rng(2)
    norms = (1.0 + 0.1 * rng.standard_normal(60)).tolist()
    norms[20] = 8.0  # spikes
    norms[41] = 5.0
    clip = ZClip(alpha=0.9, z_thresh=2.5, warmup_steps=10, max_norm=max_norm)
    got = [clip.threshold(torch.tensor(n, dtype=torch.float32)).item() for n in norms]
    ref = zclip_reference(np.float32(norms).tolist(), 0.9, 2.5, 10, max_norm)
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    assert got[20] < 8.0 and got[41] < 5.0  # the spikes are clipped
    flagged = {i for i, x in enumerate(got) if x < 3.0}  # adaptive thresholds (the cap is 3.0)
    assert {20, 41} <= flagged and len(flagged) <= 4  # the spikes, and few ordinary steps


def test_zclip_nonfinite_leaves_statistics():
    clip = ZClip(warmup_steps=3, max_norm=None)
    for n in (1.0, math.nan, 2.0):  # the NaN is left out of the warm-up statistics
        assert math.isinf(clip.threshold(torch.tensor(n)).item())
    assert clip.mean.item() == pytest.approx(1.5) and clip.var.item() == pytest.approx(0.25)
    mean, var = clip.mean.clone(), clip.var.clone()
    clip.threshold(torch.tensor(math.inf))
    assert torch.equal(clip.mean, mean) and torch.equal(clip.var, var)


def test_zclip_state_dict_resumes_identically():
    rng = np.random.default_rng(3)
    norms = [torch.tensor(x, dtype=torch.float32) for x in 1.0 + 0.2 * rng.standard_normal(40)]
    norms[30] = torch.tensor(10.0)
    full = ZClip(warmup_steps=5)
    expected = [full.threshold(n) for n in norms]
    for cut in (3, 17):  # inside and after the warm-up
        first = ZClip(warmup_steps=5)
        for n in norms[:cut]:
            first.threshold(n)
        resumed = ZClip(warmup_steps=5)
        resumed.load_state_dict(first.state_dict())
        assert [resumed.threshold(n) for n in norms[cut:]] == expected[cut:]
    with pytest.raises(ValueError, match="warmup_steps=7"):
        ZClip(warmup_steps=7).load_state_dict(first.state_dict())


# ---------------------------------------------------------------------------------------- properties

grads_strategy = st.lists(
    st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=20), min_size=1, max_size=4
)


def params_from(values: list[list[float]], weight_seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(weight_seed)
    params = []
    for v in values:
        p = torch.nn.Parameter(torch.randn(len(v), generator=g))
        p.grad = torch.tensor(v, dtype=torch.float32)
        params.append(p)
    return params


@settings(max_examples=60, deadline=None)
@given(grads_strategy, st.floats(1e-3, 1e3), st.sampled_from(NORM_TYPES))
@example([[833.5079956054688]], 833.5080197721541, 1.0)  # a float64 bound within float32 rounding of the norm
def test_property_norm_never_exceeds_bound(values, max_norm, norm_type):
    params = params_from(values)
    norm, coef = clip_grad_norm(params, max_norm, norm_type)
    assert grad_norm(params, norm_type) <= max_norm * (1 + 1e-5)
    assert 0.0 <= coef.item() <= 1.0
    # torch's epsilon: a norm right at the bound is scaled by ~1 - 1e-6; the coefficient is computed in
    # float32, so a float64 bound within float32 rounding of the norm may also give 1 - 6e-8
    if norm.item() + 1e-6 <= max_norm * (1 - 1e-6):
        assert coef.item() == 1.0


@settings(max_examples=60, deadline=None)
@given(grads_strategy, st.floats(1e-3, 1e3))
def test_property_value_bounds_every_entry(values, clip_value):
    params = params_from(values)
    _, coef = clip_grad_value(params, clip_value)
    assert max(p.grad.abs().max().item() for p in params) <= clip_value * (1 + 1e-6)
    assert 0.0 <= coef.item() <= 1.0 + 1e-6


@settings(max_examples=40, deadline=None)
@given(grads_strategy, st.floats(1e-3, 1.0))
def test_property_agc_unit_ratio_never_exceeds_lambda(values, clip_factor):
    params = params_from(values, weight_seed=1)
    adaptive_grad_clip(params, clip_factor=clip_factor, eps=1e-3)
    for p in params:
        bound = clip_factor * max(torch.linalg.vector_norm(p.detach()).item(), 1e-3)
        assert torch.linalg.vector_norm(p.grad).item() <= bound * (1 + 1e-5)


@settings(max_examples=40, deadline=None)
@given(st.lists(grads_strategy, min_size=1, max_size=5), st.floats(0, 100), st.sampled_from([None, 0.5]))
def test_property_autoclip_norm_never_exceeds_threshold(steps, percentile, cap):
    clip = AutoClip(percentile=percentile, history_size=3, max_norm=cap)
    for values in steps:
        params = params_from(values)
        norm, coef = clip.clip(params)
        history = clip.history[~torch.isnan(clip.history)].double().numpy()
        bound = float(np.percentile(history, percentile)) if len(history) else math.inf
        if cap is not None:
            bound = min(bound, cap)
        assert grad_norm(params) <= bound * (1 + 1e-5) + 1e-6


# ---------------------------------------------------------------------------------------- defaults, arguments


def test_adaptive_clippers_default_to_the_references():
    autoclip = AutoClip()
    assert (autoclip.percentile, autoclip.history_size, autoclip.max_norm, autoclip.per_parameter) == (
        10.0,
        None,
        None,
        False,
    )
    z = ZClip()
    assert (z.alpha, z.z_thresh, z.max_norm, z.eps, z.warmup_steps) == (0.97, 2.5, 1.0, 1e-6, 25)
    assert (z.mode, z.clip_option, z.clip_factor, z.skip_update_on_spike) == ("zscore", "adaptive_scaling", 1.0, False)


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (AutoClip, {"percentile": 150}, "percentile"),
        (AutoClip, {"history_size": 0}, "history_size"),
        (AutoClip, {"max_norm": -1.0}, "max_norm"),
        (AutoClip, {"per_parameter": "no"}, "per_parameter"),
        (ZClip, {"alpha": 1.5}, "alpha"),
        (ZClip, {"z_thresh": 0}, "z_thresh"),
        (ZClip, {"max_norm": math.inf}, "max_norm"),
        (ZClip, {"eps": "small"}, "eps"),
        (ZClip, {"warmup_steps": 0}, "warmup_steps"),
        (ZClip, {"mode": "zScore"}, "mode"),
        (ZClip, {"clip_option": None}, "clip_option"),
        (ZClip, {"clip_factor": -0.5}, "clip_factor"),
        (ZClip, {"skip_update_on_spike": 0}, "skip_update_on_spike"),
    ],
)
def test_adaptive_clippers_refuse_bad_arguments_in_one_line(cls, kwargs, name):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    message = str(info.value)
    assert message.startswith(f"`{cls.__name__}({name}=...)` must be ") and "\n" not in message
    assert message.endswith(f"got {kwargs[name]!r}.")


def test_autoclip_whole_history_grows_and_resumes():
    rng = np.random.default_rng(5)
    norms = rng.lognormal(size=200).tolist()
    full = AutoClip(percentile=10.0)
    got = [full.threshold(torch.tensor(n)).item() for n in norms]
    expected = [np.percentile(norms[: t + 1], 10.0) for t in range(len(norms))]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    first = AutoClip(percentile=10.0)
    for n in norms[:130]:
        first.threshold(torch.tensor(n))
    assert first.state_dict()["history"].shape == (130,)  # only the recorded norms are saved
    resumed = AutoClip(percentile=10.0)
    resumed.load_state_dict(first.state_dict())
    assert [resumed.threshold(torch.tensor(n)).item() for n in norms[130:]] == got[130:]


def test_autoclip_per_parameter_keeps_one_history_per_parameter():
    clip = AutoClip(percentile=0.0, per_parameter=True)
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([1.0])
    clip.clip([a, b])  # histories (5,) and (1,): nothing to clip
    a.grad, b.grad = torch.tensor([6.0, 8.0]), torch.tensor([0.5])
    norm, coef = clip.clip([a, b])
    assert norm.item() == pytest.approx(math.hypot(10.0, 0.5))
    assert torch.linalg.vector_norm(a.grad).item() == pytest.approx(5.0, rel=1e-5)  # a: min of its own (5, 10)
    assert b.grad.item() == pytest.approx(0.5, rel=1e-5)  # b: its own minimum is this step's 0.5
    assert coef.item() == pytest.approx(math.hypot(5.0, 0.5) / math.hypot(10.0, 0.5), rel=1e-5)
    assert clip.state_dict()["history"].shape == (2, 2)


def test_autoclip_per_parameter_a_missing_gradient_records_nothing():
    clip = AutoClip(percentile=0.0, per_parameter=True)
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([2.0]), torch.tensor([1.0])
    clip.clip([a, b])
    a.grad, b.grad = torch.tensor([4.0]), None  # b has no gradient this step
    clip.clip([a, b])
    assert a.grad.item() == pytest.approx(2.0, rel=1e-5)
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([5.0])
    clip.clip([a, b])
    assert (a.grad.item(), b.grad.item()) == pytest.approx((2.0, 1.0), rel=1e-5)  # histories kept apart
    history = clip.state_dict()["history"]
    assert history.shape == (3, 2) and math.isnan(history[1, 1])


# ---------------------------------------------------------------------------------------- one class per algorithm


@pytest.mark.parametrize(
    ("clipper", "function"),
    [
        (NormClip(0.5), lambda ps, p: clip_grad_norm(ps, 0.5, p)),
        (ValueClip(0.3), lambda ps, p: clip_grad_value(ps, 0.3, p)),
        (AGC(0.05, eps=1e-2), lambda ps, p: adaptive_grad_clip(ps, 0.05, 1e-2, p)),
    ],
    ids=["norm", "value", "agc"],
)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_fixed_bound_classes_are_their_functions(clipper, function, norm_type):
    params = make_params()
    ref = clone_params(params)
    norm, coef = clipper.clip(params, norm_type)
    ref_norm, ref_coef = function(ref, norm_type)
    assert torch.equal(norm, ref_norm) and torch.equal(coef, ref_coef)
    for p, r in zip(params, ref, strict=True):
        assert torch.equal(p.grad, r.grad)
    assert float(coef) < 1.0  # the bound bit, so the comparison covered the clipping path
    assert clipper.state_dict() == {}  # stateless


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (NormClip, {"max_norm": 0.0}, "max_norm"),
        (NormClip, {"max_norm": None}, "max_norm"),
        (ValueClip, {"clip_value": -1.0}, "clip_value"),
        (AGC, {"clip_factor": math.inf}, "clip_factor"),
        (AGC, {"eps": 0.0}, "eps"),
    ],
)
def test_fixed_bound_classes_refuse_bad_arguments_in_one_line(cls, kwargs, name):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    message = str(info.value)
    assert message.startswith(f"`{cls.__name__}({name}=...)` must be a finite number > 0") and "\n" not in message
    assert message.endswith(f"got {kwargs[name]!r}.")


def test_each_class_names_its_bound_and_shows_its_options():
    bounds = {"norm": "max_norm", "value": "clip_value", "agc": "clip_factor", "autoclip": "max_norm", "zclip": "max_norm"}
    assert {name: cls.clip_val_option for name, cls in CLIPPERS.items()} == bounds
    assert AGC(0.02).clip_val == 0.02 and AutoClip().clip_val is None and ZClip(max_norm=2.0).clip_val == 2.0
    assert repr(AGC(0.02)) == "AGC(clip_factor=0.02, eps=0.001)"
    assert repr(ZClip(alpha=0.9)).startswith("ZClip(alpha=0.9, z_thresh=2.5, max_norm=1.0, ")


class HalfOfFirstNorm(ThresholdClip):
    """A threshold algorithm in a few lines: the bound is half the first norm ever seen."""

    def __init__(self, max_norm: float | None = None) -> None:
        self.max_norm = max_norm
        self.first: torch.Tensor | None = None

    def threshold(self, norm: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            self.first = norm.detach().clone()
        return self.first / 2

    def state_dict(self) -> dict:
        return {"first": self.first}

    def load_state_dict(self, state_dict: dict) -> None:
        self.first = state_dict["first"]


def test_threshold_clip_does_the_clipping_for_a_subclass():
    clipper = HalfOfFirstNorm()
    params = make_params()
    first = grad_norm(params)
    norm, coef = clipper.clip(params)
    assert float(norm) == pytest.approx(first) and float(coef) == pytest.approx(0.5, rel=1e-5)
    assert grad_norm(params) == pytest.approx(first / 2, rel=1e-5)
    with torch.no_grad():
        for p in params:
            p.grad.mul_(0.1)  # now below the bound: untouched
    before = [p.grad.clone() for p in params]
    assert float(clipper.clip(params)[1]) == 1.0
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))


def _autoclip_state(history_size: int | None, per_parameter: bool = False, steps: int = 7) -> dict:
    clipper = AutoClip(history_size=history_size, per_parameter=per_parameter)
    w = torch.zeros(3, requires_grad=True)
    for i in range(steps):
        w.grad = torch.full((3,), float(i + 1))
        clipper.clip([w])
    return clipper.state_dict()


@pytest.mark.parametrize(("saved", "now"), [(5, None), (None, 5), (5, 50)])
def test_autoclip_refuses_a_history_of_another_size_in_one_line(saved, now) -> None:
    with pytest.raises(ValueError, match=rf"recorded with history_size={saved} .* this run has history_size={now}"):
        AutoClip(history_size=now).load_state_dict(_autoclip_state(saved))


def test_autoclip_reads_the_history_size_of_an_older_checkpoint_from_its_ring() -> None:
    state = _autoclip_state(5)  # 7 norms in a ring of 5: position 2, count 5
    del state["history_size"], state["per_parameter"]
    with pytest.raises(ValueError, match="history_size=5"):
        AutoClip().load_state_dict(state)
    AutoClip(history_size=5).load_state_dict(state)  # the same setting: fine


def test_autoclip_warns_and_starts_afresh_when_global_becomes_per_parameter() -> None:
    clipper = AutoClip(per_parameter=True)
    with pytest.warns(UserWarning, match="history is global, this run clips per parameter: starting a fresh"):
        clipper.load_state_dict(_autoclip_state(None))
    assert clipper.history is None and clipper.count == 0
