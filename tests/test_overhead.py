"""Cost guarantees that can be checked without a clock (issue #26).

- a bad value on the command line is answered before Lightning (or torch) is imported;
- a pruning event calls no ``Tensor.item()`` (no host synchronisation per weight tensor);
- the fast CPU paths of a pruning event (numpy selection, integer fill of pruned scores, the exact early
  stop of the ER bisection, the 2-norm finiteness check) give exactly what the plain torch paths give.
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from lightning_clipprune import MagnitudePruneCallback
from lightning_clipprune.callbacks import magnitude_prune as mp
from lightning_clipprune.pruning import (
    Magnitude,
    erk_counts,
    keep_mask_by_count,
    kth_smallest,
    nonfinite_names,
    ranking,
)
from lightning_clipprune.pruning.ranking import (
    PRUNED_SCORE,
    _erk_bracket,
    _erk_total,
    fill_pruned_,
    round_to_total,
)
from tests.helpers import TinyClassifier, random_loader, tiny_trainer

ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import atexit, sys
def _report():
    print("MODULES", "lightning" in sys.modules, "torch" in sys.modules, file=sys.stderr)
atexit.register(_report)
sys.argv = ["lightning_clipprune.run", *sys.argv[1:]]
from lightning_clipprune.run import main
main()
"""


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("prune.sparsity=1.5", "prune: `MagnitudePruneCallback(sparsity=...)` must be a finite number in [0, 1)"),
        ("prune.power=-1", "prune: `MagnitudePruneCallback(power=...)` must be a finite number > 0"),
        ("clip.norm_type=0", "clip: `GradientClipCallback(norm_type=...)` must be a number > 0"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0: must be an integer >= 1"),
        ("clip.algorithm=median", "clip: `GradientClipCallback(algorithm=...)` must be one of 'norm'"),
        ("prune.scope=everywhere", "prune: `MagnitudePruneCallback(scope=...)` must be one of 'global', 'local'"),
        ("trainer.precision=17", "trainer.precision=17: must be one of"),
        ("model.lr_schedule=step", "model: `Classifier(lr_schedule=...)` must be one of 'cosine', 'constant'"),
    ],
)
def test_bad_value_exits_before_lightning_is_imported(tmp_path: Path, override: str, words: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, override, f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("MODULES")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], proc.stderr
    assert "MODULES False False" in proc.stderr  # neither Lightning nor torch was imported to say so
    assert not (tmp_path / "run" / "results.json").exists()


def test_pruning_event_calls_no_item(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = {"in_event": False, "item": 0, "events": 0}
    real_item, real_update = torch.Tensor.item, mp.MagnitudePruneCallback._update

    def item(self: torch.Tensor) -> object:
        calls["item"] += calls["in_event"]
        return real_item(self)

    def update(self: MagnitudePruneCallback, trainer: L.Trainer, t: int) -> None:
        calls["in_event"], calls["events"] = True, calls["events"] + 1
        try:
            real_update(self, trainer, t)
        finally:
            calls["in_event"] = False

    monkeypatch.setattr(torch.Tensor, "item", item)
    monkeypatch.setattr(mp.MagnitudePruneCallback, "_update", update)
    cb = MagnitudePruneCallback(sparsity=0.8, end=12, frequency=2)
    tiny_trainer(tmp_path, callbacks=[cb]).fit(TinyClassifier(), random_loader())
    assert calls["events"] >= 3
    assert calls["item"] == 0
    kept = sum(int(m.sum()) for m in cb.masks.values())
    total = sum(m.numel() for m in cb.masks.values())
    assert total - kept == round(0.8 * total)  # exact sparsity on the fast path


def _scores(n: int, g: torch.Generator, pruned: float, levels: int) -> torch.Tensor:
    s = torch.randint(0, levels, (n,), generator=g).float() / levels  # many ties
    s[torch.rand(n, generator=g) < pruned] = PRUNED_SCORE
    return s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_selection_is_the_torch_selection(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    cases = []
    for _ in range(60):
        n = int(torch.randint(1, 5000, (1,), generator=g))
        s = _scores(n, g, float(torch.rand(1, generator=g)), int(torch.randint(2, 3000, (1,), generator=g))).to(dtype)
        cases.append((s, int(torch.randint(0, n + 1, (1,), generator=g))))
    fast = [(keep_mask_by_count(s, k), kth_smallest(s, max(k, 1))) for s, k in cases]
    monkeypatch.setattr(ranking, "_host_array", lambda x: None)  # the torch (accelerator) path
    for (s, k), (keep, kth) in zip(cases, fast, strict=True):
        assert torch.equal(keep, keep_mask_by_count(s, k))
        assert kth.item() == s.kthvalue(max(k, 1)).values.item()
        assert s.numel() - int(keep.sum()) == k  # exactly k pruned, ties by flat index


@pytest.mark.parametrize("layout", ["shuffled", "sorted", "half pruned", "one value"])
def test_large_cpu_selection_narrowed_to_a_band_is_exact(layout: str) -> None:
    # Arrays of 2**14 entries or more are narrowed to a band around the answer before the partition (in
    # slices of 2**18: about half the sizes here take several);
    # the answer must be the full selection's whatever the sample sees: ties, an already-pruned block, order.
    g = torch.Generator().manual_seed(2)
    for _ in range(12):
        n = int(torch.randint(1 << 14, 1 << 19, (1,), generator=g))
        s = _scores(n, g, float(torch.rand(1, generator=g)), int(torch.randint(2, 50_000, (1,), generator=g)))
        if layout == "sorted":
            s = s.sort().values
        elif layout == "half pruned":
            s[: n // 2] = PRUNED_SCORE
        elif layout == "one value":
            s.fill_(0.5)
        for k in (1, int(torch.randint(1, n + 1, (1,), generator=g)), n // 2, n):
            assert kth_smallest(s, k).item() == s.kthvalue(k).values.item(), (n, k)
            keep = keep_mask_by_count(s, k)
            assert s.numel() - int(keep.sum()) == k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [4099, 3 * (1 << 16) + 5])  # one slice of the CPU path, several and a short one
def test_fill_pruned_is_masked_fill_bit_for_bit(dtype: torch.dtype, n: int) -> None:
    g = torch.Generator().manual_seed(1)
    s = torch.rand(n, generator=g, dtype=dtype) * 10
    s[::7] = 0.0
    s[5], s[-1], s[-2] = math.inf, math.nan, -3.0  # kept entries keep their bits, whatever they hold
    live = torch.rand(n, generator=g) < 0.4
    live[-2:] = True
    expected = s.clone().masked_fill_(~live, PRUNED_SCORE)
    fill_pruned_(s, live)
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    assert torch.equal(s.view(bits), expected.view(bits))


class _Doubled(Magnitude):
    def score_into(self, name: str, weight: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(weight.detach().reshape(-1)).abs_().mul_(2)


@pytest.mark.parametrize("criterion", [Magnitude(), _Doubled()], ids=["magnitude", "subclass"])
def test_flat_scores_one_pass_path_is_the_plain_one(criterion: Magnitude) -> None:
    # |w| and the pruned entries' score are written slice by slice for Magnitude on the CPU; a subclass with
    # its own score_into is not taken for it. Both must equal score_into then masked_fill.
    g = torch.Generator().manual_seed(3)
    weights = {"a": torch.randn(300, 700, generator=g), "b": torch.randn(7, 3, generator=g)}
    weights["a"][0, :5] = torch.tensor([0.0, -0.0, math.inf, -math.inf, 1e-30])
    masks = {n: torch.rand(w.shape, generator=g) < 0.7 for n, w in weights.items()}
    flat = ranking.flat_scores(weights, criterion, masks)
    expected = []
    for n, w in weights.items():
        part = torch.empty(w.numel())
        criterion.score_into(n, w, part)
        expected.append(part.masked_fill_(~masks[n].reshape(-1), PRUNED_SCORE))
    assert torch.equal(flat.view(torch.int32), torch.cat(expected).view(torch.int32))


def test_hot_path_rewrites_its_own_integer_masks_only() -> None:
    # The hot path writes an event's integer masks into the last event's buffers (no fresh allocation);
    # a mask handed in already as integers is the caller's and is never written.
    from lightning_clipprune.callbacks._prune_masking import MaskHotPath

    params = {"w": nn.Parameter(torch.randn(4, 5)), "v": nn.Parameter(torch.randn(3))}
    hot = MaskHotPath()
    first = {"w": torch.rand(4, 5) < 0.5, "v": torch.tensor([1, 0, 1], dtype=torch.int32)}
    hot.build(params, first, ["w", "v"])
    buffer, given = hot.factor_of["w"], hot.factor_of["v"]
    assert given is first["v"]
    second = {"w": first["w"] & (torch.rand(4, 5) < 0.5), "v": torch.tensor([True, False, False])}
    second["w"][0, 0] = False
    hot.build(params, second, ["w", "v"])
    assert hot.factor_of["w"] is buffer and torch.equal(buffer, second["w"].to(torch.int32))
    assert torch.equal(first["v"], torch.tensor([1, 0, 1], dtype=torch.int32))  # not written
    assert torch.equal(hot.factor_of["v"], torch.tensor([1, 0, 0], dtype=torch.int32))
    params["w"].grad = torch.full((4, 5), math.nan)
    hot.mask_gradients()
    assert torch.equal(params["w"].grad == 0, ~second["w"])


def _erk_reference(shapes: dict, k: int, caps: dict | None, already: dict | None) -> dict:
    """erk_counts with the plain 100-step bisection (before its exact early stop)."""
    n = {x: math.prod(s) for x, s in shapes.items()}
    raw = {x: sum(s) / n[x] for x, s in shapes.items()}
    lo = {x: 1.0 - (caps[x] if caps is not None else n[x]) / n[x] for x in n}
    hi = {x: 1.0 - (already[x] if already is not None else 0) / n[x] for x in n}

    def pruned(eps: float) -> dict:
        return {x: n[x] * (1.0 - min(max(eps * raw[x], lo[x]), hi[x])) for x in n}

    a, b = 0.0, 1.0 / min(raw.values())
    for _ in range(100):
        mid = (a + b) / 2
        a, b = (mid, b) if sum(pruned(mid).values()) > k else (a, mid)
    return round_to_total(pruned(b), k, n, {x: n[x] if caps is None else caps[x] for x in n})


def test_erk_early_stop_is_the_full_bisection() -> None:
    rng = random.Random(0)
    checked = 0
    for _ in range(1500):
        shapes = {f"l{i}": (rng.randint(1, 300), rng.randint(1, 300)) for i in range(rng.randint(1, 8))}
        n = {x: math.prod(s) for x, s in shapes.items()}
        already = {x: rng.randint(0, n[x] // 2) for x in n} if rng.random() < 0.5 else None
        caps = {x: rng.randint(n[x] // 2, n[x]) for x in n} if rng.random() < 0.5 else None
        low, high = sum((already or {}).values()), sum((caps or n).values())
        if low > high:
            continue
        k = rng.choice([low, high, rng.randint(low, high), rng.randint(low, high)])
        assert erk_counts(shapes, k, caps, already) == _erk_reference(shapes, k, caps, already)
        checked += 1
    assert checked > 1000


def test_erk_bracket_brackets_the_bisections_boundary() -> None:
    """The piecewise-linear solve's bracket holds the root the full bisection ends on, in the usual cases."""
    rng = random.Random(1)
    taken = 0
    for _ in range(500):
        sizes = [(rng.randint(1, 3000), rng.randint(1, 300)) for _ in range(rng.randint(1, 30))]
        rows = [(a * b, (a + b) / (a * b), 0.0, 1.0 - rng.randint(0, a * b // 2) / (a * b)) for a, b in sizes]
        low, high = sum(size * (1.0 - top) for size, _, _, top in rows), sum(size for size, *_ in rows)
        k = rng.randint(math.ceil(low), int(high) - 1)
        bracket = _erk_bracket(rows, k)
        if bracket is not None:
            a, b = bracket
            assert _erk_total(rows, a) > k >= _erk_total(rows, b) and b - a <= 1e-11 * b + 1e-299
            taken += 1
    assert taken > 450  # only a k at a clamp's flat part may miss it (then the whole range is bisected)


def test_nonfinite_names_fast_path_is_exact() -> None:
    huge = torch.full((8,), 1e30)  # finite, but its 2-norm overflows float32: the exact check must clear it
    assert nonfinite_names({"huge": huge, "ok": torch.ones(3)}) == []
    bad = torch.ones(5)
    bad[2] = math.nan
    assert nonfinite_names({"huge": huge, "bad": bad, "inf": torch.tensor([-math.inf])}) == ["bad", "inf"]


def test_event_layouts_follow_a_replaced_layer() -> None:
    from lightning_clipprune.callbacks._prune_plan import event_layouts

    module = nn.Sequential(nn.Linear(4, 4), nn.ConvTranspose2d(4, 4, 3))
    cb = MagnitudePruneCallback(sparsity=0.5)
    cb._params = {n: p for n, p in module.named_parameters() if n.endswith("weight")}
    cb.parameter_names = list(cb._params)
    first = event_layouts(cb, module)
    assert event_layouts(cb, module) is first  # cached
    module[1] = nn.Linear(4, 4)
    cb._params = {n: p for n, p in module.named_parameters() if n.endswith("weight")}
    assert event_layouts(cb, module) == {}  # recomputed: no transposed layer any more


def test_state_key_is_cached_but_follows_the_arguments() -> None:
    cb = MagnitudePruneCallback(sparsity=0.9)
    first = cb.state_key
    assert cb.state_key is first  # built once, not on every hook call
    cb.sparsity = 0.8
    assert cb.state_key != first and "0.8" in cb.state_key
