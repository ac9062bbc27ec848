"""MagnitudePruneCallback under ModelParallelStrategy (FSDP2 DTensors sharded along dim 0).

Fast tests (default suite): the distributed k-th selection and the sharded masks against the masks of
whole tensors, with ``world`` ranks simulated as threads around a summing all-reduce.

Slow tests (``-m slow``): two CPU gloo processes train with ``ModelParallelStrategy`` and are compared
with one process on the same global batches: masks at every event exactly, final weights to 1e-6, the
pruned counts, an interrupted and resumed run, and the largest tensor allocated during an event.
The processes are started by the test itself (``LOCAL_RANK`` set: Lightning does not relaunch), running
this file as a script (``python tests/test_fsdp2_prune.py OUT CONFIG...``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_clipprune.pruning import (
    Magnitude,
    compute_masks,
    parse_pattern,
    resolve_max_layer_sparsity,
    uses_budgets,
)
from lightning_clipprune.pruning.distributed import (
    Piece,
    Shard,
    compute_masks_sharded,
    distributed_keep_by_count,
    score_keys,
    sharded_refusal,
)
from lightning_clipprune.pruning.ranking import keep_mask_by_count

# ------------------------------------------------------------------ ranks as threads (fast tests)


class FakeGroup:
    """``world`` ranks as threads of one process: ``all_reduce`` sums in place once every rank has called it."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[Any] = [None] * world
        self.calls = 0

    def all_reduce(self, rank: int) -> Any:
        def reduce(t: torch.Tensor) -> None:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].clone())
            if rank == 0:
                self.calls += 1
            self.barrier.wait()
            t.copy_(total)

        return reduce

    def run(self, fn: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        errors: list[BaseException] = []

        def target(r: int) -> None:
            try:
                out[r] = fn(r, self.all_reduce(r))
            except BaseException as e:
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out


def dim0_shards(w: torch.Tensor, world: int) -> list[Shard]:
    """``w`` split as FSDP2 does (``torch.chunk`` along dim 0, empty shards at the end)."""
    parts = list(torch.chunk(w, world, dim=0))
    parts += [w[:0]] * (world - len(parts))
    out, row = [], 0
    row_size = w[0].numel() if w.dim() > 1 else 1
    for p in parts:
        out.append(Shard(p, w.shape, row * row_size))
        row += p.shape[0]
    return out


def sharded_equals_whole(weights: dict[str, torch.Tensor], world: int, masks: dict | None = None, **kw: Any) -> dict:
    """Assert compute_masks_sharded on ``world`` simulated ranks == compute_masks on the whole tensors."""
    ref = compute_masks(weights, masks=masks, **kw)
    kind = parse_pattern(kw.get("pattern", "unstructured"))[0]
    budgets = uses_budgets(kw.get("ranking", "er"), kw.get("scope", "global"), kind, kw.get("threshold"))
    ceiling = resolve_max_layer_sparsity(kw.get("max_layer_sparsity", "auto"), budgets)
    shards = {n: dim0_shards(w, world) for n, w in weights.items()}
    local_masks = None if masks is None else {n: [s.local for s in dim0_shards(m, world)] for n, m in masks.items()}

    def one_rank(r: int, all_reduce: Any) -> dict:
        return compute_masks_sharded(
            {n: s[r] for n, s in shards.items()},
            sparsity=kw.get("sparsity"),
            threshold=kw.get("threshold"),
            scope=kw.get("scope", "global"),
            pattern=kw.get("pattern", "unstructured"),
            criterion=Magnitude(),
            masks=None if local_masks is None else {n: v[r] for n, v in local_masks.items()},
            ceiling=ceiling,
            ranking=kw.get("ranking", "er"),
            layer_sparsity=kw.get("layer_sparsity"),
            layouts={},
            all_reduce=all_reduce,
            rank=r,
            world=world,
        )

    outs = FakeGroup(world).run(one_rank)
    for n in weights:
        assert torch.equal(torch.cat([o[n] for o in outs]), ref[n]), (n, kw, world)
    return ref


def test_score_keys_keep_the_order_of_the_floats() -> None:
    x = torch.tensor([-1.0, -0.0, 0.0, 1e-30, 0.5, 3.0, float("inf")])
    keys = score_keys(x)
    assert torch.equal(keys.argsort(stable=True), torch.arange(7))
    assert keys[1] == keys[2]  # -0.0 == +0.0
    y = torch.randn(1000, dtype=torch.float64)
    assert torch.equal(score_keys(y).argsort(), y.argsort())


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_distributed_keep_by_count_equals_one_process_ties_included(world: int) -> None:
    g = torch.Generator().manual_seed(world)
    for trial in range(20):
        x = torch.randint(0, 5, (37,), generator=g).float() * (0.1 if trial % 2 else 1.0)  # many ties
        y = torch.randint(0, 5, (11,), generator=g).float()
        k = int(torch.randint(-1, 50, (), generator=g))
        ref = keep_mask_by_count(torch.cat([x, y]), k)
        xs, ys = dim0_shards(x, world), dim0_shards(y, world)
        group = FakeGroup(world)

        def one_rank(r: int, ar: Any, xs: list = xs, ys: list = ys, k: int = k) -> list:
            pieces = [Piece(xs[r].local, xs[r].offset), Piece(ys[r].local, ys[r].offset)]
            return distributed_keep_by_count([pieces], [k], ar, r, world)[0]

        outs = group.run(one_rank)
        got = torch.cat([torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])])
        assert torch.equal(got, ref), (trial, k)
        assert group.calls == 5  # 4 histogram rounds (float32) + one for the ties, whatever the size


_CONFIGS = [
    dict(sparsity=0.6),  # global, "er" budgets (the default)
    dict(sparsity=0.6, ranking="erk"),
    dict(sparsity=0.6, ranking="raw"),  # one threshold, ceiling 0.99 ("auto")
    dict(sparsity=0.85, ranking="raw"),
    dict(sparsity=0.7, max_layer_sparsity=0.9),
    dict(sparsity=0.6, scope="local"),
    dict(sparsity=0.5, scope="local", layer_sparsity={"b": 0.9}),
    dict(threshold=0.3),
    dict(sparsity=0.5, pattern="2:4"),
    dict(sparsity=0.5, pattern="2:4", scope="local"),
    dict(sparsity=0.5, pattern="channel", scope="local"),
    dict(sparsity=0.0),
    dict(sparsity=1.0, ranking="raw", max_layer_sparsity=None),
]


@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("kw", _CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_sharded_masks_equal_the_whole_tensors_masks(world: int, ties: bool, kw: dict) -> None:
    g = torch.Generator().manual_seed(0)
    w = {"a": torch.randn(7, 8, generator=g), "b": torch.randn(16, 12, generator=g), "c": torch.randn(3, 16, generator=g)}
    w["e"] = torch.randn(5, 4, 3, 3, generator=g)  # a convolution: rows are output channels
    if "2:4" not in kw.get("pattern", ""):
        w["d"] = torch.randn(5, generator=g)  # a 1-D tensor (a bias)
    if ties:
        w = {n: (v * 4).round() / 4 for n, v in w.items()}  # a few values only: ties everywhere
    first = sharded_equals_whole(w, world, **kw)
    if kw.get("threshold") is None and kw.get("sparsity", 0) < 0.85:  # a second event: masks only grow
        later = dict(kw, sparsity=kw["sparsity"] + 0.1) if kw.get("pattern", "channel") == "channel" else kw
        sharded_equals_whole(w, world, masks=first, **later)


def test_sharded_float64_and_empty_shards() -> None:
    g = torch.Generator().manual_seed(1)
    w = {"a": torch.randn(3, 8, generator=g, dtype=torch.float64), "b": torch.randn(2, 4, generator=g)}
    sharded_equals_whole(w, 5, sparsity=0.7)  # ranks 2..4 hold no row of `b`, ranks 3, 4 none of `a`


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(scope="global", pattern="channel", ranking="er"), "scope='local'"),
        (dict(scope="global", pattern="unstructured", ranking="layer_normalized"), "ranking 'er'"),
    ],
)
def test_sharded_refusals_are_one_line(kw: dict, match: str) -> None:
    why = sharded_refusal(threshold=None, ceiling=None, layouts={}, **kw)
    assert why is not None and match in why and "\n" not in why


def test_transposed_layouts_refused_where_rows_cross_shards() -> None:
    from lightning_clipprune.pruning import Layout

    layouts = {"up.weight": Layout(transposed=True)}
    args = dict(scope="global", ranking="er", threshold=None, layouts=layouts)
    assert sharded_refusal(pattern="2:4", ceiling=None, **args) is not None
    assert sharded_refusal(pattern="unstructured", ceiling=0.99, **args) is not None
    assert sharded_refusal(pattern="unstructured", ceiling=None, **args) is None


def test_non_finite_weights_are_named_alike_on_every_rank() -> None:
    from types import SimpleNamespace

    from lightning_clipprune.callbacks._prune_plan import check_finite

    local = [
        {"a": torch.tensor([1.0, float("nan")]), "b": torch.ones(2), "c": torch.ones(2)},
        {"a": torch.ones(2), "b": torch.tensor([float("inf")]), "c": torch.ones(0)},
    ]

    def one_rank(r: int, all_reduce: Any) -> str:
        with pytest.raises(FloatingPointError) as err:
            check_finite(local[r], "at step 3", sharding=SimpleNamespace(all_reduce=all_reduce))
        return str(err.value)

    messages = FakeGroup(2).run(one_rank)
    assert messages[0] == messages[1] and "`a`, `b` hold NaN or inf" in messages[0]  # every rank raises the same line


@pytest.mark.parametrize("world", [2, 3, 5])
def test_a_whole_mask_is_cut_into_the_rows_each_rank_holds(world: int) -> None:
    from lightning_clipprune.callbacks._prune_sharded import local_rows

    whole = torch.rand(7, 6) > 0.5
    shards = dim0_shards(torch.zeros(7, 6), world)
    assert torch.equal(torch.cat([local_rows(whole, s) for s in shards]), whole)


def test_restored_masks_are_the_zeros_checked_against_the_pruned_counts() -> None:
    from lightning_clipprune import MagnitudePruneCallback
    from lightning_clipprune.callbacks._prune_sharded import masks_from_zeros

    cb = MagnitudePruneCallback(sparsity=0.5)
    w = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    cb._params = {"w": nn.Parameter(w)}
    masks = masks_from_zeros(cb, {"w": 2}, None)  # as many zeros as pruned entries: exactly the masks
    assert torch.equal(masks["w"], w != 0)
    with pytest.warns(UserWarning, match=r"`w` \(2 zeros, 1 pruned\).*kept weights that are exactly zero"):
        masks_from_zeros(cb, {"w": 1}, None)


def _model_parallel_trainer(**strategy: Any) -> Any:
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, **strategy),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.mark.parametrize(
    ("kwargs", "strategy", "match"),
    [
        (dict(sparsity=0.5, criterion="taylor"), {}, r"criterion 'taylor' ranks by a running average of the gradient"),
        (dict(sparsity=0.5, criterion="obs", schedule="oneshot", start=1.0), {}, r"criterion 'obs' \(post-training"),
        (dict(sparsity=0.5, regrow="rigl"), {}, r"regrowth"),
        (dict(sparsity=0.5, pattern="channel"), {}, r"pattern 'channel' with scope 'global'"),
        (dict(sparsity=0.5, ranking="layer_normalized"), {}, r"ranking 'layer_normalized'"),
    ],
)
def test_what_is_not_built_is_refused_at_setup_in_one_line(kwargs: dict, strategy: dict, match: str) -> None:
    from lightning_clipprune import MagnitudePruneCallback

    trainer = _model_parallel_trainer(**strategy)
    module = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"^MagnitudePruneCallback under ModelParallelStrategy: " + match) as err:
        MagnitudePruneCallback(**kwargs).setup(trainer, module, "fit")
    assert "\n" not in str(err.value)


def test_supported_options_pass_setup_under_model_parallel() -> None:
    from lightning_clipprune import MagnitudePruneCallback

    trainer = _model_parallel_trainer()
    module = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    for kwargs in (dict(sparsity=0.5), dict(sparsity=0.5, scope="local", pattern="channel"), dict(pattern="2:4")):
        MagnitudePruneCallback(**kwargs).setup(trainer, module, "fit")  # the parameters are chosen at fit start


# ------------------------------------------------------------------ two processes (slow tests)

#: name -> MagnitudePruneCallback arguments (besides the schedule below)
RUNS: dict[str, dict[str, Any]] = {
    "global_er": {},
    "global_raw": {"ranking": "raw"},
    "local": {"scope": "local"},
    "nm": {"pattern": "2:4", "sparsity": None, "scope": "local"},
    "channel": {"pattern": "channel", "scope": "local", "sparsity": 0.4},
}
SCHEDULE = dict(sparsity=0.8, schedule="cubic", start=0, end=10, frequency=2)
STEPS_PER_EPOCH, EPOCHS, RESUME_AT_EPOCH = 4, 4, 2
FULL_CHECKPOINT_RUN = "global_er"  # also resumed with save_distributed_checkpoint=False
N_SAMPLES, GLOBAL_BATCH = 64, 16


def _net_class() -> type:
    import lightning as L

    class Net(L.LightningModule):
        """Three Linear layers of different shapes; the last has 7 rows (not divisible by 2)."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(32, 96), nn.ReLU(), nn.Linear(96, 24), nn.ReLU(), nn.Linear(24, 7))

        def configure_model(self) -> None:
            if self.device_mesh is None:  # one process: nothing to shard
                return
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)

    return Net


def _loader(devices: int) -> Any:
    """The same global batches of ``GLOBAL_BATCH`` samples on one process or split over two (rank r: every
    other sample from r, in order; the Trainer's own sampler is off, it would shuffle)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_SAMPLES, 32, generator=g)
    y = torch.randint(0, 7, (N_SAMPLES,), generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    sampler = None
    if devices > 1:
        rank = int(os.environ["LOCAL_RANK"])
        sampler = torch.utils.data.DistributedSampler(data, num_replicas=devices, rank=rank, shuffle=False)
    return torch.utils.data.DataLoader(data, batch_size=GLOBAL_BATCH // devices, shuffle=False, sampler=sampler)


def _full(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)
    return (full() if full is not None else t).detach().clone()


class _Recorder:
    """Wraps the callback's event: gathers (test only) the weights before and the masks after each event,
    and records the largest plain tensor allocated during the event (a dispatch mode: DTensor wrappers,
    which allocate nothing, are not counted)."""

    def __init__(self, prune: Any) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        self.events: dict[int, dict[str, Any]] = {}
        self.largest = 0
        recorder = self

        class Largest(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    if type(t) is torch.Tensor:
                        recorder.largest = max(recorder.largest, t.numel())
                return out

        original = prune._update

        def update(trainer: Any, t: int) -> None:
            before = {n: _full(p) for n, p in prune._params.items()}
            previous = {n: _full(m) for n, m in prune.masks.items()} if prune._active else None
            with Largest():
                original(trainer, t)
            self.events[t] = {
                "before": before,
                "previous": previous,
                "masks": {n: _full(m) for n, m in prune.masks.items()},
                "target": prune.current_target,
                "pruned": prune._hot.pruned,
            }

        prune._update = update


class _Interrupt:
    """Save a checkpoint at the end of epoch ``RESUME_AT_EPOCH`` and stop there (an interrupted run)."""

    def __new__(cls, path: Path) -> Any:
        from lightning.pytorch.callbacks import Callback

        class Interrupt(Callback):
            def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
                if trainer.current_epoch == RESUME_AT_EPOCH - 1:
                    trainer.save_checkpoint(path)
                    trainer.should_stop = True

        return Interrupt()


def _metrics_logger() -> Any:
    """A Lightning logger that keeps every ``sparsity/*`` metric logged, by step."""
    from lightning.pytorch.loggers import Logger

    class Metrics(Logger):
        name, version = "metrics", 0

        def __init__(self) -> None:
            super().__init__()
            self.logged: dict[int, dict[str, float]] = {}

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.logged.setdefault(int(step or 0), {}).update({k: float(v) for k, v in metrics.items() if k.startswith("sparsity/")})

    return Metrics()


def _trainer(devices: int, callbacks: list, epochs: int, root: Path, logger: Any = False, full: bool = False) -> Any:
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    # full: one checkpoint file gathered on rank zero instead of the distributed checkpoint (a folder)
    kwargs = dict(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=not full)
    strategy = ModelParallelStrategy(**kwargs) if devices == 2 else "auto"
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )


def _prune_kwargs(name: str) -> dict[str, Any]:
    return {**SCHEDULE, **RUNS[name]}


def run(devices: int, name: str, root: Path, resume: bool = False, full: bool = False) -> dict[str, Any]:
    """Train the Net with the pruning run ``name`` on ``devices`` processes; the record of its events and end."""
    from lightning_clipprune import MagnitudePruneCallback, SparsityLogger

    Net = _net_class()
    prune = MagnitudePruneCallback(**_prune_kwargs(name))
    recorder = _Recorder(prune)
    model = Net()
    restored: dict[str, torch.Tensor] = {}
    if not resume:
        metrics = _metrics_logger()
        trainer = _trainer(devices, [prune, SparsityLogger(print_table=False)], EPOCHS, root, logger=metrics)
        trainer.fit(model, train_dataloaders=_loader(devices))
    else:
        ckpt = root / f"{name}-interrupted.ckpt"
        trainer = _trainer(devices, [prune, _Interrupt(ckpt)], EPOCHS, root, full=full)
        trainer.fit(model, train_dataloaders=_loader(devices))
        assert trainer.global_step == STEPS_PER_EPOCH * RESUME_AT_EPOCH
        prune2 = MagnitudePruneCallback(**_prune_kwargs(name))
        recorder2 = _Recorder(prune2)
        train_start = prune2.on_train_start

        def on_train_start(trainer: Any, pl_module: Any) -> None:  # the masks as restored, before any event
            train_start(trainer, pl_module)
            restored.update({n: _full(m) for n, m in prune2.masks.items()})

        prune2.on_train_start = on_train_start
        model = Net()
        trainer = _trainer(devices, [prune2], EPOCHS, root, full=full)
        trainer.fit(model, train_dataloaders=_loader(devices), ckpt_path=ckpt)
        recorder2.events = {**recorder.events, **recorder2.events}
        recorder2.largest = max(recorder.largest, recorder2.largest)
        recorder, prune = recorder2, prune2
    shard_sizes = {n: (p.to_local().numel() if hasattr(p, "to_local") else p.numel()) for n, p in prune._params.items()}
    return {
        "events": recorder.events,
        "largest": recorder.largest,
        "shard_sizes": shard_sizes,
        "weights": {n: _full(p) for n, p in model.named_parameters()},
        "masks": {n: _full(m) for n, m in prune.masks.items()},
        "steps": trainer.global_step,
        "logged": metrics.logged if not resume else {},
        "restored": restored,
    }


def _worker(out: Path, names: list[str]) -> None:
    """One rank of the two-process run (LOCAL_RANK set by the test): every run of ``names``, whole and resumed."""
    rank = int(os.environ["LOCAL_RANK"])
    for name in names:
        results = {}
        for resume in (False, True):
            results["resumed" if resume else "whole"] = run(2, name, out / f"{name}-{int(resume)}", resume)
        if name == FULL_CHECKPOINT_RUN:  # also resumed from one whole checkpoint file
            results["resumed_full"] = run(2, name, out / f"{name}-full", True, full=True)
        if rank == 0:
            torch.save(results, out / f"{name}.pt")
    from helpers import shut_down_process_groups

    shut_down_process_groups()  # run as a script: tests/ is on sys.path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run this file as two gloo ranks once for every run in RUNS; the folder of their records."""
    out = tmp_path_factory.mktemp("fsdp2_prune")
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": "2",
        "NODE_RANK": "0",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(out), *RUNS],
            env={**env, "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-6000:]
    (out / "rank0.log").write_text(logs[0])
    return out


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("one_process")
    return {name: run(1, name, root / name) for name in RUNS}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_equal_one_process(name: str, two_process_runs: Path, one_process_runs: dict) -> None:
    two = torch.load(two_process_runs / f"{name}.pt", weights_only=False)["whole"]
    one = one_process_runs[name]
    assert two["steps"] == one["steps"] == STEPS_PER_EPOCH * EPOCHS
    assert sorted(two["events"]) == sorted(one["events"]) == [0, 2, 4, 6, 8, 10]
    kw = _prune_kwargs(name)
    for t, event in two["events"].items():
        ref = one["events"][t]
        assert event["target"] == ref["target"] and event["pruned"] == ref["pruned"], t
        for n, mask in event["masks"].items():
            assert torch.equal(mask, ref["masks"][n]), (t, n)  # exactly the one-process masks
        # and exactly compute_masks on the two-process weights themselves (whatever the float drift)
        own = compute_masks(
            event["before"],
            sparsity=event["target"],
            scope=kw.get("scope", "global"),
            pattern=kw.get("pattern", "unstructured"),
            ranking=kw.get("ranking", "er"),
            masks=event["previous"],
        )
        for n, mask in event["masks"].items():
            assert torch.equal(mask, own[n]), (t, n)
    for n, w in two["weights"].items():
        torch.testing.assert_close(w, one["weights"][n], rtol=0, atol=1e-6)
    for n, m in two["masks"].items():
        assert (two["weights"][n][~m] == 0).all()  # pruned weights exactly zero at the end
    # SparsityLogger (counts all-reduced over the shards) logs the one-process numbers at every step
    last = STEPS_PER_EPOCH * EPOCHS - 1  # the last step: where Lightning (and the logger) put epoch-end rows
    assert set(range(1, last + 1)) <= set(two["logged"]) and "sparsity/global" in two["logged"][last]
    assert two["logged"] == one["logged"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "checkpoint"), [(name, "distributed") for name in RUNS] + [(FULL_CHECKPOINT_RUN, "full")]
)
def test_two_processes_resumed_equal_uninterrupted(name: str, checkpoint: str, two_process_runs: Path) -> None:
    runs = torch.load(two_process_runs / f"{name}.pt", weights_only=False)
    whole, resumed = runs["whole"], runs["resumed" if checkpoint == "distributed" else "resumed_full"]
    assert resumed["steps"] == whole["steps"]
    assert sorted(resumed["events"]) == sorted(whole["events"])  # no event repeated or lost at the resume
    last_before = max(t for t in whole["events"] if t < STEPS_PER_EPOCH * RESUME_AT_EPOCH)
    for n, mask in whole["events"][last_before]["masks"].items():  # read back from the weights' zeros
        assert torch.equal(resumed["restored"][n], mask), n
    for n in whole["masks"]:
        assert torch.equal(resumed["masks"][n], whole["masks"][n])
    for n in whole["weights"]:
        assert torch.equal(resumed["weights"][n], whole["weights"][n]), n


@pytest.mark.slow
def test_two_process_event_allocates_no_full_size_parameter(two_process_runs: Path) -> None:
    for name in RUNS:
        two = torch.load(two_process_runs / f"{name}.pt", weights_only=False)["whole"]
        full = {n: w.numel() for n, w in two["weights"].items() if n in two["shard_sizes"]}
        # the largest plain tensor made during any event is at most the largest local shard
        assert 0 < two["largest"] <= max(two["shard_sizes"].values()), (name, two["largest"], two["shard_sizes"])
        assert two["largest"] < max(full.values())


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2:])
