"""Regrowth (RigL, SET) against the current defaults, dense and Lightning's pair: accuracy and cost (issue 28).

Every run goes through ``bench_vs_lightning.run_arm`` (the same data, model, Trainer and seeds as the
headline study: 10 epochs of Fashion-MNIST LeNet-300-100, one torch thread, paired seeds), so the dense,
default and Lightning runs recorded in ``results/bench_vs_lightning.json`` pair with the runs here; a
``default`` run is repeated first to check that they still reproduce.

The full study of the issue (every flag; hours on one core per seed and target)::

    python benchmarks/bench_regrow.py --seeds 0 1 2 3 4 --sparsities 0.9 0.95 0.98 0.99 \\
        --variants default rigl rigl_a01 rigl_a05 rigl_dt50 rigl_dt200 rigl_end90 rigl_noclip rigl_s0 set
    python benchmarks/bench_regrow.py --epochs 20 --arms dense ours lightning --variants default rigl ...
    python benchmarks/bench_regrow.py --experiment fashion_cnn ...          # LeNet-5
    python benchmarks/bench_regrow.py --report                               # the tables

Cost: every "ours" run with regrowth times its regrowth events and dense-gradient copies (``regrow_s``,
``perf_counter`` around them); their share of the fit is the extra time regrowth adds, since a step
without an event pays one attribute test (``--step-cost`` measures that per-step test in isolation).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import sys
import time
import timeit
import warnings
from typing import Any

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_vs_lightning as bvl

from lightning_clipprune import MagnitudePruneCallback
from lightning_clipprune.callbacks import _regrow
from lightning_clipprune.pruning import ranking as _ranking
from lightning_clipprune.pruning.criteria import Criterion, register_criterion

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_JSON = os.path.join(HERE, "results", "bench_regrow.json")
PAIR_JSON = os.path.join(HERE, "results", "bench_vs_lightning.json")
PAIR_JSON_CNN = os.path.join(HERE, "results", "bench_vs_lightning_cnn.json")  # LeNet-5 (fashion_cnn)
_DEFAULTS = {"end": 0.5}  # the library defaults (ER budgets, no ceiling under them), end written out


def _rigl(**regrow: Any) -> dict[str, Any]:
    return {"prune": {**_DEFAULTS, "regrow": {"method": "rigl", **regrow}}}


#: RigL's published settings are alpha 0.3, delta T 100, end 0.75; regrowth starts where the ramp ends (0.5).
REGROW_VARIANTS: dict[str, dict[str, Any]] = {
    "rigl": _rigl(),
    "rigl_a01": _rigl(fraction=0.1),
    "rigl_a05": _rigl(fraction=0.5),
    "rigl_dt50": _rigl(interval=50),
    "rigl_dt200": _rigl(interval=200),
    "rigl_end90": _rigl(end=0.9),
    "rigl_s0": _rigl(start=0.0),  # also during the ramp (from the first pruning event)
    "rigl_noclip": {**_rigl(), "clip": None},
    "default_noclip": {"prune": dict(_DEFAULTS), "clip": None},  # rigl_noclip's pair: the defaults without clipping
    "set": {"prune": {**_DEFAULTS, "regrow": {"method": "set"}}},
    "set_a01": {"prune": {**_DEFAULTS, "regrow": {"method": "set", "fraction": 0.1}}},
    # the adaptive clippers in place of the norm clip at 1.0, each at its defaults (issue 28, second round)
    "default_autoclip": {"prune": dict(_DEFAULTS), "clip": None, "clip_algorithm": "autoclip"},
    "default_zclip": {"prune": dict(_DEFAULTS), "clip": 1.0, "clip_algorithm": "zclip"},
    "default_zclip_spikes": {"prune": dict(_DEFAULTS), "clip": None, "clip_algorithm": "zclip"},
    "default_agc": {"prune": dict(_DEFAULTS), "clip": 0.057, "clip_algorithm": "agc"},
    # the schedule around the defaults again, now under their ER budgets (issue 12 tuned it under raw ranking)
    "default_end40": {"prune": {"end": 0.4}},
    "default_end60": {"prune": {"end": 0.6}},
    "default_f50": {"prune": {**_DEFAULTS, "frequency": 50}},
    "default_p2": {"prune": {**_DEFAULTS, "power": 2.0}},
    # the ramp starting after some dense training (fifth round): the first masks no longer come from the init
    "default_s05": {"prune": {**_DEFAULTS, "start": 0.05}},
    "default_s10": {"prune": {**_DEFAULTS, "start": 0.1}},
    "default_s20": {"prune": {**_DEFAULTS, "start": 0.2}},
    "default_s10_end60": {"prune": {"start": 0.1, "end": 0.6}},
    # a tighter norm clip under the ER budgets (issue 12 tried 0.25 and 2.0 under raw ranking only)
    "default_clip05": {"prune": dict(_DEFAULTS), "clip": 0.5},
    "default_clip07": {"prune": dict(_DEFAULTS), "clip": 0.7},
    # sixth round: LAMP scores (Lee et al. 2021) ranked globally instead of the ER budgets; see Lamp below
    "lamp": {"prune": {**_DEFAULTS, "ranking": "raw", "criterion": "lamp"}},
    "lamp_end60": {"prune": {"end": 0.6, "ranking": "raw", "criterion": "lamp"}},
    # ... a steeper start of the ramp (p2 lost 0.09), and the gradient criterion under the ER budgets
    "default_p4": {"prune": {**_DEFAULTS, "power": 4.0}},
    "taylor_er": {"prune": {**_DEFAULTS, "criterion": "taylor"}},
    # seventh round: learning-rate rewinding after the ramp, MagnitudePruneCallback(lr_rewind=...); first run by a
    # prototype of this script, which set the same rates (the library gives the same accuracies on seed 0)
    "lr_rewind": {"prune": {**_DEFAULTS, "lr_rewind": 1.0}},
    "lr_rewind_75": {"prune": {**_DEFAULTS, "lr_rewind": 0.75}},
    "lr_rewind_e40": {"prune": {"end": 0.4, "lr_rewind": 1.0}},
    "lr_rewind_e60": {"prune": {"end": 0.6, "lr_rewind": 1.0}},
    "rewind_e60": {"prune": {"end": 0.6, "lr_rewind": 1.0}},  # the name of the library check in the results
    # eighth round: the rewinding recipe (prune=rewind) with a later ramp end, with regrowth after it
    "lr_rewind_e70": {"prune": {"end": 0.7, "lr_rewind": 1.0}},
    "lr_rewind_e80": {"prune": {"end": 0.8, "lr_rewind": 1.0}},
    "rewind_rigl_a01": {"prune": {"end": 0.6, "lr_rewind": 1.0, "regrow": {"method": "rigl", "fraction": 0.1}}},
    "lr_rewind15_e60": {"prune": {"end": 0.6, "lr_rewind": 1.5}},
    # eleventh round: the rewinding recipe under a looser norm clip (0.5 and 0.7 lost under the defaults)
    "rewind_clip15": {"prune": {"end": 0.6, "lr_rewind": 1.0}, "clip": 1.5},
    "rewind_clip20": {"prune": {"end": 0.6, "lr_rewind": 1.0}, "clip": 2.0},
}
#: A prototype, not a library option: layer-wise reconstruction (criterion "obs", SparseGPT) at every event of
#: the default cubic ramp instead of magnitude. The library allows "obs" only after training; the schedule is
#: switched after construction. 256 calibration samples per event, one allocation each.
GRADUAL_OBS = {"gradual_obs": "global_magnitude", "gradual_obs_er": "er"}


class Lamp(Criterion):
    """Prototype (sixth round): LAMP, layer-adaptive magnitude (Lee et al. 2021): ``w_u^2 / sum_{|w_v| >= |w_u|}
    w_v^2`` within a layer, then one global threshold; the layers' shares come from their weights' spread
    instead of their shapes (ER)."""

    name = "lamp"

    def score(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        sq = weight.detach().reshape(-1).double().square()
        ordered, index = torch.sort(sq)
        suffix = ordered.flip(0).cumsum(0).flip(0)
        out = torch.empty_like(sq)
        out[index] = ordered / suffix.clamp_min(torch.finfo(torch.float64).tiny)
        return out.float().reshape(weight.shape)


register_criterion("lamp", Lamp)


bvl.VARIANTS.update(REGROW_VARIANTS)
bvl.VARIANTS.update({name: {} for name in GRADUAL_OBS})  # built by _capture


class _Timer:
    """Wall time spent in regrowth (events and dense-gradient copies) during one fit."""

    seconds = 0.0

    @classmethod
    def wrap(cls, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                cls.seconds += time.perf_counter() - t0

        return timed


_BEFORE_MASK = _regrow.Regrowth.before_mask  # unwrapped, for --step-cost
_regrow.Regrowth._event = _Timer.wrap(_regrow.Regrowth._event)
_regrow.Regrowth.before_mask = _Timer.wrap(_regrow.Regrowth.before_mask)
_made: list[MagnitudePruneCallback] = []
_variant_callbacks = bvl.variant_callbacks


def _gradual_obs(sparsity: float, allocation: str) -> list[Any]:
    from lightning_clipprune import GradientClipCallback
    from lightning_clipprune.posttrain.criterion import Reconstruction

    criterion = Reconstruction(progress=False, num_samples=256, allocation=allocation)
    prune = MagnitudePruneCallback(sparsity=sparsity, schedule="oneshot", start=1.0, criterion=criterion, verbose=False)
    prune.schedule, prune.start, prune.end = "cubic", 0.0, 0.5
    return [GradientClipCallback(clip_val=1.0, algorithm="norm"), prune]


class _Feedback(L.Callback):
    """Prototype, not a library option: dynamic pruning with feedback (DPF, Lin et al. 2020).

    During the ramp each step's forward and backward see the masked weights, while the optimizer updates the
    dense ones: a pruned weight keeps learning from the gradient at the masked point and comes back at a later
    event if it grows past the threshold (masks are recomputed from the dense weights, not only growing). The
    schedule and budgets are the library defaults' (cubic to 0.5 of training, an event every ``frequency``
    steps, ER budgets); at the ramp's end the mask is fixed and the weights and momentum pruned for good.
    """

    def __init__(self, sparsity: float, end: float = 0.5, frequency: int | None = None) -> None:
        self.sparsity, self.end, self.frequency = sparsity, end, frequency
        self.masks: dict[str, torch.Tensor] = {}
        self.dense: dict[str, torch.Tensor] = {}
        self.hard = False

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.params = {n: p for n, p in pl_module.named_parameters() if p.dim() > 1}
        self.ramp = max(1, int(self.end * trainer.estimated_stepping_batches))
        self.every = self.frequency or max(1, min(100, self.ramp // 10))

    def _target(self, step: int) -> float:
        return self.sparsity if step >= self.ramp else self.sparsity * (1.0 - (1.0 - step / self.ramp) ** 3)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        from lightning_clipprune.pruning import compute_masks

        step = trainer.global_step
        if self.hard:
            return
        if step >= self.ramp:  # the last mask, at the target: weights and momentum pruned for good
            self.masks = compute_masks({n: p.detach() for n, p in self.params.items()}, sparsity=self.sparsity,
                                       ranking="er", max_layer_sparsity=None)
            self.hard = True
            with torch.no_grad():
                for n, p in self.params.items():
                    p.mul_(self.masks[n])
                    for state in trainer.optimizers[0].state.get(p, {}).values():
                        if isinstance(state, torch.Tensor) and state.shape == p.shape:
                            state.mul_(self.masks[n])
            return
        if step % self.every == 0 and step > 0:
            self.masks = compute_masks({n: p.detach() for n, p in self.params.items()}, sparsity=self._target(step),
                                       ranking="er", max_layer_sparsity=None)
        if self.masks:
            with torch.no_grad():
                for n, p in self.params.items():
                    self.dense[n] = p.detach().clone()
                    p.mul_(self.masks[n])

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        with torch.no_grad():
            if self.hard:
                for n, p in self.params.items():
                    if p.grad is not None:
                        p.grad.mul_(self.masks[n])
            elif self.dense:  # the update goes to the dense weights (the gradient was taken at the masked ones)
                for n, p in self.params.items():
                    p.copy_(self.dense[n])
                self.dense.clear()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.hard:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.mul_(self.masks[n])


class _DecayAfterRamp(L.Callback):
    """Prototype: the optimizer's weight decay times ``factor`` from the end of the pruning ramp on (the sparse
    network's few weights carry the whole function; the dense network's regulariser may hold them back)."""

    def __init__(self, end: float, factor: float) -> None:
        self.end, self.factor, self.done = end, factor, False

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self.done and trainer.global_step >= self.end * trainer.estimated_stepping_batches:
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group["weight_decay"] = group.get("weight_decay", 0.0) * self.factor
            self.done = True


#: Prototypes: the defaults with weight decay scaled after the ramp (``_DecayAfterRamp``).
DECAY = {"default_wd0": 0.0, "default_wd01": 0.1, "default_wd3": 3.0}
bvl.VARIANTS.update({name: {} for name in DECAY})  # built by _capture


def _replace_rate(trainer: Any, end: float, after: Any, until: Any = None) -> None:
    """Every scheduler's factor (the rate over its peak): ``until(step)`` before ``end`` of the run (None: the
    module's own schedule), ``after(step, t_end, total, before)`` from there on."""
    total = int(trainer.estimated_stepping_batches)
    t_end = int(end * total)
    for config in trainer.lr_scheduler_configs:
        before = config.scheduler.lr_lambdas[0]

        def factor(step: int, before: Any = before) -> float:
            if step < t_end:
                return before(step) if until is None else until(step)
            return after(step, t_end, total, before)

        config.scheduler.lr_lambdas[0] = factor


class _LrAfterRamp(L.Callback):
    """Prototype (seventh round): what ``lr_rewind`` cannot express. ``"hold"``: the peak rate during the whole
    ramp, then one cosine to 0 over the rest. ``"rewind"`` without a pruning callback (the dense network with the
    restart ``lr_rewind`` gives a pruned one): the schedule as before until ``end``, then the peak again and a
    fresh cosine to 0."""

    def __init__(self, end: float, mode: str) -> None:
        self.end, self.mode = end, mode

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        from lightning_clipprune.callbacks._lr_rewind import rewound_lr

        _replace_rate(trainer, self.end, lambda step, t_end, total, before: rewound_lr(1.0, 1.0, step, t_end, total),
                      until=None if self.mode == "rewind" else (lambda step: 1.0))


#: Prototypes: the learning rate around the ramp's end where ``lr_rewind`` cannot set it (``_LrAfterRamp``):
#: variant -> (the variant it starts from, None: the dense arm without pruning or clipping; the end; mode).
LR_AFTER = {"lr_hold": ("default", 0.5, "hold"), "dense_rewind": (None, 0.5, "rewind")}
bvl.VARIANTS.update({name: {} for name in LR_AFTER})  # built by _capture


class _TailAverage(L.Callback):
    """Prototype (ninth round): the uniform average of the weights over the optimizer steps after ``start`` (a
    fraction of the run), loaded into the model at the end of training (tail averaging, as SWA without its own
    rate schedule). After the ramp the masks no longer change, so a pruned entry is 0.0 at every step averaged
    and stays exactly 0.0 in the average: the sparsity is the recipe's. Placed after the pruning callback."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.avg: dict[str, torch.Tensor] = {}
        self.n = 0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.t0 = int(self.start * int(trainer.estimated_stepping_batches))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if trainer.global_step <= self.t0:
            return
        self.n += 1
        with torch.no_grad():
            for name, p in pl_module.named_parameters():
                if name not in self.avg:
                    self.avg[name] = p.detach().clone()
                else:
                    self.avg[name].lerp_(p.detach(), 1.0 / self.n)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        with torch.no_grad():
            for name, p in pl_module.named_parameters():
                if name in self.avg:
                    p.copy_(self.avg[name])


#: Prototypes: tail averaging (``_TailAverage``): variant -> (the variant it starts from, None: the dense arm
#: without pruning or clipping; the fraction of the run where averaging starts).
TAIL_AVG = {"rewind_avg70": ("lr_rewind_e60", 0.7), "rewind_avg85": ("lr_rewind_e60", 0.85),
            "dense_avg70": (None, 0.7), "dense_avg85": (None, 0.85)}
bvl.VARIANTS.update({name: {} for name in TAIL_AVG})  # built by _capture


class _SwaAfterRamp(L.Callback):
    """Prototype (tenth round): stochastic weight averaging after the ramp (Izmailov et al. 2018). The schedule as
    before until ``end``; there the peak rate again (as ``lr_rewind=1.0``), a cosine down to ``floor`` times the
    peak at ``swa``, then ``floor`` held to the last step; the weights are averaged over the held steps
    (:class:`_TailAverage` from ``swa``). Without a pruning callback, the same schedule on the dense network."""

    def __init__(self, end: float, swa: float, floor: float) -> None:
        self.end, self.swa, self.floor = end, swa, floor

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        t_swa = int(self.swa * int(trainer.estimated_stepping_batches))

        def after(step: int, t_end: int, total: int, before: Any) -> float:
            progress = min(1.0, (step - t_end) / max(1, t_swa - t_end))
            return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        _replace_rate(trainer, self.end, after)


class _WarmRestart(L.Callback):
    """Prototype (eleventh round): ``lr_rewind=1.0`` with a warm-up. The schedule as before until ``end``; then
    a linear climb from the rate reached there to the peak over ``warm`` of the run, and a cosine to 0 at the
    last step (``rewound_lr``), instead of the jump straight to the peak."""

    def __init__(self, end: float, warm: float) -> None:
        self.end, self.warm = end, warm

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        from lightning_clipprune.callbacks._lr_rewind import rewound_lr

        t_peak = int((self.end + self.warm) * int(trainer.estimated_stepping_batches))

        def after(step: int, t_end: int, total: int, before: Any) -> float:
            if step < t_peak:
                start = before(t_end)
                return start + (1.0 - start) * (step - t_end) / max(1, t_peak - t_end)
            return rewound_lr(1.0, 1.0, step, t_peak, total)

        _replace_rate(trainer, self.end, after)


#: Prototypes: the restart with a warm-up (``_WarmRestart``): variant -> (the variant it starts from, None: the
#: dense arm without pruning or clipping; the ramp's end; the warm-up's length).
WARM = {"rewind_warm05": ("default_end60", 0.6, 0.05), "rewind_warm10": ("default_end60", 0.6, 0.1),
        "dense_warm05": (None, 0.6, 0.05)}
bvl.VARIANTS.update({name: {} for name in WARM})  # built by _capture


#: Prototypes: SWA after the ramp (``_SwaAfterRamp`` + ``_TailAverage``): variant -> (the variant it starts from,
#: None: the dense arm without pruning or clipping; the ramp's end; where the held rate and the average start;
#: the held rate as a fraction of the peak). ``default_end60`` is the recipe's ramp without ``lr_rewind``.
SWA = {"rewind_swa05": ("default_end60", 0.6, 0.8, 0.05), "rewind_swa20": ("default_end60", 0.6, 0.8, 0.2),
       "rewind_swa05_s70": ("default_end60", 0.6, 0.7, 0.05), "dense_swa05": (None, 0.6, 0.8, 0.05)}
bvl.VARIANTS.update({name: {} for name in SWA})  # built by _capture


class _Shrink(L.Callback):
    """Prototype (seventh round): the weights the next event will prune shrink to ``floor`` times their value
    over the steps before it, so the network adapts before they go (after growing regularisation, GReg, Wang
    et al. 2021). Placed after the default ``MagnitudePruneCallback`` ``cb``: at each of its events before the
    ramp's end, the next event's masks are computed now (the same criterion, ER budgets, schedule); the kept
    weights outside them are scaled after every optimizer step, linearly from 1 to ``floor`` at the next event."""

    def __init__(self, cb: MagnitudePruneCallback, floor: float) -> None:
        self.cb, self.floor = cb, floor
        self.doomed: dict[str, torch.Tensor] = {}
        self.length = self.j = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        from lightning_clipprune.pruning import compute_masks
        from lightning_clipprune.schedules import sparsity_at

        cb, step = self.cb, trainer.global_step
        start, end, every = cb._positions
        if cb._last_event != step or step >= end:
            return
        nxt = min(step + every, end)
        target = sparsity_at(cb.schedule, nxt, start, end, cb.sparsity, cb.initial_sparsity, cb.power)
        params = {n: p.detach() for n, p in cb._params.items()}
        new = compute_masks(params, sparsity=target, ranking=cb.ranking, masks=cb.masks, max_layer_sparsity=cb._ceiling)
        self.doomed = {n: cb.masks[n] & ~new[n] for n in params}
        self.length, self.j = nxt - step, 0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.j >= self.length:
            return
        self.j += 1  # the doomed weights go from v(j - 1) to v(j), v(j) = 1 - (1 - floor) j / length
        before, after = (1 - (1 - self.floor) * i / self.length for i in (self.j - 1, self.j))
        with torch.no_grad():
            for name, p in self.cb._params.items():
                p[self.doomed[name]] *= after / before


#: Prototypes: the defaults with the next event's weights shrunk first (``_Shrink``), to 0 or to half.
SHRINK = {"shrink0": 0.0, "shrink05": 0.5}
bvl.VARIANTS.update({name: {} for name in SHRINK})  # built by _capture

#: Prototypes of dynamic pruning with feedback (``_Feedback``), with the default norm clip at 1.0.
FEEDBACK = {"dpf": {}, "dpf_f20": {"frequency": 20}, "dpf_end75": {"end": 0.75}}
bvl.VARIANTS.update({name: {} for name in FEEDBACK})  # built by _capture


#: Prototypes (sixth round): ER budgets with densities proportional to ``((n_in + n_out) / (n_in n_out)) ** gamma``
#: instead of gamma = 1 (ER): gamma < 1 moves weights towards the wide first layer, gamma > 1 away from it.
GAMMA = {"er_g07": 0.7, "er_g13": 1.3}
bvl.VARIANTS.update({name: {} for name in GAMMA})  # built by _capture
_gamma = [1.0]
_erk_counts = _ranking.erk_counts


def _erk_gamma(shapes: Any, k: int, caps: Any = None, already: Any = None) -> dict[str, int]:
    if _gamma[0] == 1.0:
        return _erk_counts(shapes, k, caps, already)
    n = {x: math.prod(s) for x, s in shapes.items()}
    raw = {x: (sum(s) / n[x]) ** _gamma[0] for x, s in shapes.items()}
    lo = {x: 1.0 - (caps[x] if caps is not None else n[x]) / n[x] for x in n}
    hi = {x: 1.0 - (already[x] if already is not None else 0) / n[x] for x in n}

    def pruned(eps: float) -> dict[str, float]:
        return {x: n[x] * (1.0 - min(max(eps * raw[x], lo[x]), hi[x])) for x in n}

    a, b = 0.0, 1.0 / min(raw.values())
    for _ in range(200):
        mid = (a + b) / 2
        a, b = (mid, b) if sum(pruned(mid).values()) > k else (a, mid)
    return _ranking.round_to_total(pruned(b), k, n, {x: n[x] if caps is None else caps[x] for x in n})


_ranking.erk_counts = _erk_gamma


def _on(sparsity: float, base: str | None, *extra: Any) -> list[Any]:
    """The callbacks of variant ``base`` (None: none, the dense arm), then ``extra``; the pruning callback recorded."""
    callbacks = [*(_variant_callbacks(sparsity, base) if base is not None else []), *extra]
    _made.extend(c for c in callbacks if isinstance(c, MagnitudePruneCallback))
    return callbacks


def _capture(sparsity: float, variant: str) -> list[Any]:
    _gamma[0] = GAMMA.get(variant, 1.0)
    if variant in GAMMA:
        return _on(sparsity, "default")
    if variant in DECAY:
        return _on(sparsity, "default", _DecayAfterRamp(_DEFAULTS["end"], DECAY[variant]))
    if variant in SHRINK:
        callbacks = _variant_callbacks(sparsity, "default")
        prune = next(c for c in callbacks if isinstance(c, MagnitudePruneCallback))
        _made.append(prune)
        return [*callbacks, _Shrink(prune, SHRINK[variant])]
    if variant in LR_AFTER:
        base, end, mode = LR_AFTER[variant]
        return _on(sparsity, base, _LrAfterRamp(end, mode))
    if variant in TAIL_AVG:
        base, start = TAIL_AVG[variant]
        return _on(sparsity, base, _TailAverage(start))
    if variant in SWA:
        base, end, swa, floor = SWA[variant]
        return _on(sparsity, base, _SwaAfterRamp(end, swa, floor), _TailAverage(swa))
    if variant in WARM:
        base, end, warm = WARM[variant]
        return _on(sparsity, base, _WarmRestart(end, warm))
    if variant in FEEDBACK:
        from lightning_clipprune import GradientClipCallback

        return [GradientClipCallback(clip_val=1.0, algorithm="norm"), _Feedback(sparsity, **FEEDBACK[variant])]
    if variant in GRADUAL_OBS:
        return _on(sparsity, None, *_gradual_obs(sparsity, GRADUAL_OBS[variant]))
    return _on(sparsity, variant)


bvl.variant_callbacks = _capture


def run(arm: str, seed: int, sparsity: float | None, args: argparse.Namespace, variant: str) -> dict[str, Any]:
    _Timer.seconds, _made[:] = 0.0, []
    r = bvl.run_arm(arm, seed, sparsity, args, variant)
    regrowth = _made[0]._regrow if _made and _made[0]._regrow is not None else None
    r["regrow_s"] = _Timer.seconds if regrowth is not None else 0.0
    r["regrow_events"] = regrowth.events if regrowth is not None else 0
    r["regrown_total"] = regrowth.regrown_total if regrowth is not None else 0
    r["regrow_share"] = r["regrow_s"] / r["fit_s"]
    r["settings"] = bvl.VARIANTS.get(variant, {}) if arm == "ours" else {}
    r["overrides"] = list(args.override)  # Hydra overrides of every arm (the twelfth round's label smoothing)
    return r


def step_cost(n: int = 200_000) -> dict[str, float]:
    """Seconds per call of the test regrowth adds to ``mask_gradients``, net of an empty call's cost.

    "off": ``regrow=None`` (one ``is None`` test); "on": regrowth on, a step without an event (the test, a
    method call and the ``armed`` test). Interleaved, median of 5; a shared machine.
    """
    off = MagnitudePruneCallback(sparsity=0.5)
    on = MagnitudePruneCallback(sparsity=0.5, regrow="rigl")
    hot = on._hot
    before_mask = _BEFORE_MASK

    def empty() -> None:
        pass

    def test_off() -> None:
        if off._regrow is not None:
            before_mask(off._regrow, hot)

    def test_on() -> None:
        if on._regrow is not None:
            before_mask(on._regrow, hot)

    times: dict[str, list[float]] = {"empty": [], "off": [], "on": []}
    for _ in range(5):
        for name, fn in (("empty", empty), ("off", test_off), ("on", test_on)):
            times[name].append(timeit.timeit(fn, number=n) / n)
    base = statistics.median(times["empty"])
    return {k: statistics.median(v) - base for k, v in times.items() if k != "empty"}


def _pairs(runs: list[dict[str, Any]], a: tuple[str, str], b: tuple[str, str], target: float) -> list[float]:
    by = {}
    for r in runs:
        if r["target"] == target or (r["arm"] == "dense" and r["target"] is None):
            by.setdefault((r["arm"], r["variant"]), {})[r["seed"]] = r["test_acc"]
    x, y = by.get(a, {}), by.get(b, {})
    return [100 * (x[s] - y[s]) for s in sorted(set(x) & set(y))]


def _fmt(d: list[float]) -> str:
    if not d:
        return ""
    se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
    return f"{statistics.mean(d):+.2f} (se {se:.2f}, n={len(d)}, {sum(v > 0 for v in d)}/{len(d)} > 0)"


def report(runs: list[dict[str, Any]], pair: list[dict[str, Any]], epochs: int, experiment: str) -> None:
    runs = [r for r in runs if r.get("epochs") == epochs and r.get("experiment", "fashion_mnist") == experiment]
    pair = [r for r in pair if r.get("epochs") == epochs and r.get("experiment", "fashion_mnist") == experiment]
    print(f"\n### {experiment}, {epochs} epochs: every run (test accuracy %, seeds in order)\n")
    print("| arm | variant | target | seeds | test acc (mean; per seed) | regrown | regrowth share of fit | fit s |")
    print("|---|---|---|---|---|---|---|---|")
    for key in sorted({(r["arm"], r["variant"], r["target"] or 0.0) for r in runs}):
        rs = sorted((r for r in runs if (r["arm"], r["variant"], r["target"] or 0.0) == key), key=lambda r: r["seed"])
        accs = ", ".join(f"{100 * r['test_acc']:.2f}" for r in rs)
        share = statistics.mean(r.get("regrow_share", 0.0) for r in rs)
        print(f"| {key[0]} | {key[1] or '-'} | {key[2] or '-'} | {','.join(str(r['seed']) for r in rs)} "
              f"| {statistics.mean(r['test_acc'] for r in rs) * 100:.2f} ({accs}) "
              f"| {statistics.mean(r.get('regrown_total', 0) for r in rs):.0f} | {100 * share:.3f} % "
              f"| {statistics.mean(r['fit_s'] for r in rs):.1f} |")
    print("\n### paired differences in points (test accuracy), mean over the common seeds\n")
    print("Pairs within this study's runs (one code tree), then against Lightning's runs recorded in"
          " bench_vs_lightning*.json by an earlier tree (they no longer reproduce exactly: see the md).\n")
    print("| variant | target | vs current defaults | vs Lightning's pair | vs dense | vs Lightning (recorded) |")
    print("|---|---|---|---|---|---|")
    for variant, target in sorted({(r["variant"], r["target"]) for r in runs if r["arm"] == "ours"}):
        me = ("ours", variant)
        both = pair + [r for r in runs if r["arm"] == "ours"]
        print(f"| {variant} | {target} | {_fmt(_pairs(runs, me, ('ours', 'default'), target))} "
              f"| {_fmt(_pairs(runs, me, ('lightning', ''), target))} | {_fmt(_pairs(runs, me, ('dense', ''), target))} "
              f"| {_fmt(_pairs(both, me, ('lightning', ''), target))} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="fashion_mnist", help="fashion_mnist (LeNet-300-100) | fashion_cnn (LeNet-5)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.98])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--arms", nargs="+", default=["ours"], choices=["dense", "ours", "lightning"],
                        help="dense and lightning are recorded in bench_vs_lightning.json for 10 epochs; run them for others")
    parser.add_argument("--variants", nargs="+", default=["default", "rigl", "set"], choices=list(bvl.VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=DEFAULT_JSON, help="runs are added as they finish (one file per process)")
    parser.add_argument("--report", action="store_true", help="only print the tables of results/bench_regrow*.json")
    parser.add_argument("--limit-train-batches", type=int, default=None, help="a smoke run (not for the tables)")
    parser.add_argument("--step-cost", action="store_true", help="only time the per-step test regrowth adds")
    parser.add_argument("override", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()
    pair = bvl.load_runs([PAIR_JSON, PAIR_JSON_CNN])
    if args.step_cost:
        print(json.dumps({k: f"{v * 1e9:.1f} ns" for k, v in step_cost().items()}))
        return
    if args.report:
        report(bvl.load_runs(sorted(glob.glob(os.path.join(HERE, "results", "bench_regrow*.json")))), pair, args.epochs, args.experiment)
        return
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*`ModelPruning`.*")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; shared machine: timings are indicative")
    try:
        bvl.check_overrides(args.override)
    except ValueError as err:
        sys.exit(f"error: {err}")
    runs = bvl.load_runs([args.json], key=bvl.cache_key)
    done = {bvl.cache_key(r) for r in runs}  # a run with other overrides is trained, not replayed
    for seed in args.seeds:
        todo = [("dense", None, "")] if "dense" in args.arms else []
        for s in args.sparsities:
            todo += [("ours", s, v) for v in args.variants if "ours" in args.arms]
            todo += [("lightning", s, "")] if "lightning" in args.arms else []
        for arm, s, variant in todo:
            if (args.experiment, arm, variant, seed, s, args.epochs, tuple(args.override)) in done:
                continue
            r = run(arm, seed, s, args, variant)
            runs.append(r)
            done.add(bvl.cache_key(r))
            print(json.dumps({k: v for k, v in r.items() if k not in ("train_tensors", "settings")}), flush=True)
            bvl.write_json(args.json, runs)
    report(runs, pair, args.epochs, args.experiment)


if __name__ == "__main__":
    main()
