"""GradientClipCallback and SparsityLogger under ModelParallelStrategy (FSDP2, DTensor shards), 2 CPU processes.

The slow tests run this file as a script (``python tests/test_fsdp2_clip.py OUT``): Lightning's subprocess
launcher starts the second rank by running the same command again, which a pytest process cannot be. The
script trains every configuration of :data:`CONFIGS` under
``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` with ``fully_shard`` on three Linear
layers (7, 10 and 3 rows: two row counts that 2 does not divide), and writes each rank's logged norms,
sparsity metrics, end-of-fit report and gathered final weights to ``OUT``; then the configurations of
:data:`TP_CONFIGS` under tensor parallelism (``data_parallel_size=1, tensor_parallel_size=2``). The test
process trains the same configurations on one process on the same global batches and compares: the per-step
pre-clip norm and the final weights to 1e-6, the sparsity numbers exactly, and that no all-gather ran while
clipping. About 30 s on two CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clipprune import GradientClipCallback, SparsityLogger
from lightning_clipprune._sharded import local
from lightning_clipprune.loggers import MemoryLogger
from lightning_clipprune.sparsity import sparsity_report

STEPS = 6
GLOBAL_BATCH = 8
IN_FEATURES = 6
DEAD_INPUT = 5  # this input feature is always 0, and its weights start at (+/-)0: exact zeros all along
NAN_STEP = 2  # the "nonfinite" configuration puts a NaN into rank 1's shard of net.0.weight's gradient here
NAN_ROW = 5  # a row of net.0.weight (7 rows: 0-3 on rank 0, 4-6 on rank 1)

#: name -> GradientClipCallback arguments. Bounds are small enough that most steps clip.
CONFIGS: dict[str, dict[str, Any]] = {
    "norm": dict(clip_val=0.5, algorithm="norm"),
    "norm_inf": dict(clip_val=0.05, algorithm="norm", norm_type=math.inf),
    "norm_p3": dict(clip_val=0.3, algorithm="norm", norm_type=3.0),
    "value": dict(clip_val=0.02, algorithm="value"),
    "agc": dict(clip_val=0.02, algorithm="agc"),
    "autoclip": dict(clip_val=None, algorithm="autoclip", algorithm_options={"percentile": 50.0}),
    "autoclip_per_param": dict(algorithm="autoclip", algorithm_options={"percentile": 50.0, "per_parameter": True}),
    "zclip": dict(clip_val=None, algorithm="zclip", algorithm_options={"warmup_steps": 3, "z_thresh": 0.5}),
    "nonfinite": dict(clip_val=0.5, algorithm="norm"),
}

#: The configurations also run under tensor parallelism (AGC refuses it: see the last test).
TP_CONFIGS = ["norm", "norm_inf", "value", "autoclip_per_param", "zclip", "nonfinite"]


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * GLOBAL_BATCH, IN_FEATURES, generator=g)
    x[:, DEAD_INPUT] = 0.0
    y = torch.randint(0, 3, (STEPS * GLOBAL_BATCH,), generator=g)
    return x, y


class Net(L.LightningModule):
    """Three Linear layers of shapes 7x6, 10x7, 3x10; under ModelParallelStrategy each is `fully_shard`ed.

    ``tp=True``: shapes 8x6, 10x8, 3x10 (tensor parallelism needs even splits here), the first layer
    ``ColwiseParallel`` (Shard(0)), the second ``RowwiseParallel`` (weight Shard(1), bias Replicate), the
    third a plain replicated tensor: every kind of placement the norm must count once.
    """

    def __init__(self, tp: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        hidden = 8 if tp else 7
        self.tp = tp
        self.net = nn.Sequential(
            nn.Linear(IN_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, 10), nn.Tanh(), nn.Linear(10, 3)
        )
        with torch.no_grad():  # exact zeros that stay: rows 0-3 +0.0, the others -0.0 (rank 1's shard)
            self.net[0].weight[:4, DEAD_INPUT] = 0.0
            self.net[0].weight[4:, DEAD_INPUT] = -0.0

    def configure_model(self) -> None:
        if self.device_mesh is None:  # the one-process reference
            return
        if self.tp:
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
            parallelize_module(self.net, self.device_mesh["tensor_parallel"], plan)
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        x, y = make_data()
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        dp = mesh.size() if mesh is not None else 1
        if dp > 1:  # each data-parallel rank takes its half of every global batch: rows [8k + 4r, 8k + 4r + 4)
            rows = torch.arange(len(x)).view(STEPS, dp, GLOBAL_BATCH // dp)[:, mesh.get_local_rank()].reshape(-1)
            x, y = x[rows], y[rows]
        return DataLoader(TensorDataset(x, y), batch_size=GLOBAL_BATCH // dp, shuffle=False)


class InjectNaN(Callback):
    """At NAN_STEP, a NaN in row NAN_ROW of net.0.weight's gradient: on the rank holding it (rank 1 under FSDP2)."""

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if trainer.global_step != NAN_STEP:
            return
        grad = pl_module.net[0].weight.grad
        shard = local(grad)
        first_row = 4 * trainer.global_rank if trainer.world_size > 1 else 0  # 7 rows: 4 on rank 0, 3 on rank 1
        row = NAN_ROW - first_row
        if 0 <= row < shard.shape[0]:
            shard[row, 0] = math.nan


class NoGather(Callback):
    """Fails the run if any all-gather or DTensor redistribution happens while the clip callback runs."""

    def __init__(self, clip: GradientClipCallback) -> None:
        self.clip = clip
        self.all_reduces = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        original = self.clip.on_before_optimizer_step
        guard = self

        def wrapped(trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
            with guard._no_gather():
                original(trainer, pl_module, optimizer)

        self.clip.on_before_optimizer_step = wrapped  # type: ignore[method-assign]

    @contextmanager
    def _no_gather(self):
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol
        from torch.distributed.tensor import DTensor

        def forbidden(name: str):
            def fail(*args: Any, **kwargs: Any) -> None:
                raise AssertionError(f"{name} called while clipping")

            return fail

        targets = [(dist, "all_gather"), (dist, "all_gather_into_tensor"), (dist, "all_gather_object"),
                   (funcol, "all_gather_tensor"), (DTensor, "full_tensor"), (DTensor, "redistribute")]
        saved = [(obj, attr, getattr(obj, attr)) for obj, attr in targets]
        all_reduce = dist.all_reduce

        def counting_all_reduce(*args: Any, **kwargs: Any) -> Any:
            self.all_reduces += 1
            return all_reduce(*args, **kwargs)

        try:
            for obj, attr in targets:
                setattr(obj, attr, forbidden(attr))
            dist.all_reduce = counting_all_reduce
            yield
        finally:
            for obj, attr, value in saved:
                setattr(obj, attr, value)
            dist.all_reduce = all_reduce


def train(name: str, strategy: Any, devices: int, root: Path, tp: bool = False) -> dict[str, Any]:
    """Train configuration ``name``; return the rank's logged rows, report and full final weights."""
    clip = GradientClipCallback(**CONFIGS[name], log_every_n_steps=1)
    callbacks: list[Callback] = [InjectNaN()] if name == "nonfinite" else []
    guard = NoGather(clip) if devices > 1 else None
    callbacks += [clip, SparsityLogger(log_every_n_steps=1, inference_latency=True)]
    if guard is not None:
        callbacks.append(guard)
    logger = MemoryLogger()
    model = Net(tp=tp)
    trainer = L.Trainer(
        default_root_dir=str(root),
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=STEPS,
        logger=logger,
        callbacks=callbacks,
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(model)
    names = [f"net.{i}.weight" for i in (0, 2, 4)]
    report = sparsity_report(model, names)  # collective under FSDP2: every rank calls it
    weights = {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().tolist()  # the test may gather
        for n, p in model.named_parameters()
    }
    return {
        "norms": [m["grad/norm"] for _, m in logger.rows if "grad/norm" in m],
        "coefs": [m["grad/clip_coef"] for _, m in logger.rows if "grad/clip_coef" in m],
        "skipped": [m["grad/nonfinite_skipped"] for _, m in logger.rows if "grad/nonfinite_skipped" in m],
        "sparsity": [{k: v for k, v in m.items() if k.split("/")[0] in ("sparsity", "params", "size")}
                     for _, m in logger.rows if "sparsity/global" in m],
        "report": [[r.name, list(r.shape), r.numel, r.nonzero, r.dense_bytes, r.compressed_bytes]
                   for r in report.rows],
        "report_other": None if report.other is None else [report.other.numel, report.other.nonzero],
        "weights": weights,
        "all_reduces": None if guard is None else guard.all_reduces,
        "steps": clip.summary()["steps"],
    }


def _agc_refuses_tensor_parallel_rows() -> str:
    """AGC on a weight sharded Shard(1) (tensor parallel): the one-line refusal, or "" if it did not refuse."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_clipprune.clipping import adaptive_grad_clip

    assert dist.is_initialized()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    weight = nn.Parameter(distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)]))
    weight.grad = distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)])
    try:
        adaptive_grad_clip([weight], clip_factor=0.01)
    except ValueError as err:
        return str(err)
    return ""


def main(out: Path) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    for name in CONFIGS:
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        result = train(name, strategy, 2, out / "runs")
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        (out / f"{name}.rank{rank}.json").write_text(json.dumps(result))
    for name in TP_CONFIGS:
        strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
        result = train(name, strategy, 2, out / "runs", tp=True)
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        (out / f"tp_{name}.rank{rank}.json").write_text(json.dumps(result))
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    (out / f"agc_tp.rank{rank}.json").write_text(json.dumps(_agc_refuses_tensor_parallel_rows()))
    from helpers import shut_down_process_groups

    shut_down_process_groups()  # run as a script: tests/ is on sys.path


if __name__ == "__main__":
    main(Path(sys.argv[1]))


# ---------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2_clip")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__)), str(out)], capture_output=True, text=True,
                          timeout=900, env=env, cwd=str(Path(__file__).resolve().parents[1]))
    (out / "stdout.txt").write_text(proc.stdout)
    (out / "seconds.txt").write_text(f"{time.perf_counter() - start:.1f}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("single")
    return {name: train(name, "auto", 1, root) for name in CONFIGS}


def _close(a: Any, b: Any, what: str) -> None:
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=1e-6, atol=1e-6, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _compare(name: str, ranks: list[dict[str, Any]], single: dict[str, Any]) -> None:
    assert len(single["norms"]) == STEPS
    for rank, result in enumerate(ranks):
        # the pre-clip norm of every step: the whole model's, on each rank
        _close(result["norms"], single["norms"], f"rank {rank} grad/norm")
        _close(result["coefs"], single["coefs"], f"rank {rank} grad/clip_coef")
        assert result["skipped"] == single["skipped"]
        for n, w in single["weights"].items():
            _close(result["weights"][n], w, f"rank {rank} final {n}")
        # no all-gather nor redistribution while clipping; the norm is all-reduced
        assert result["all_reduces"] and result["all_reduces"] >= STEPS
    # every rank decides the same, bit for bit
    assert ranks[0]["norms"] == ranks[1]["norms"] and ranks[0]["coefs"] == ranks[1]["coefs"]
    if name == "nonfinite":  # the NaN was in rank 1's shard only: both ranks skipped the step, as one process did
        assert math.isnan(ranks[0]["norms"][NAN_STEP]) and ranks[0]["skipped"][-1] == 1.0
    else:
        assert all(math.isfinite(n) for n in ranks[0]["norms"])
        assert any(c < 1 for c in single["coefs"]), "the configuration never clips: it tests nothing"
    # the sparsity numbers: logged by rank zero only, the one-process numbers exactly; the report on every rank
    assert ranks[1]["sparsity"] == []
    assert len(ranks[0]["sparsity"]) >= STEPS
    assert ranks[0]["sparsity"] == single["sparsity"]
    assert ranks[0]["report"] == ranks[1]["report"] == single["report"]
    assert ranks[0]["report_other"] == ranks[1]["report_other"] == single["report_other"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_fsdp2_ranks_clip_as_one_process(name: str, fsdp2_runs: Path, single_runs: dict) -> None:
    ranks = [json.loads((fsdp2_runs / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]
    _compare(name, ranks, single_runs[name])


@pytest.fixture(scope="module")
def single_tp_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("single_tp")
    return {name: train(name, "auto", 1, root, tp=True) for name in TP_CONFIGS}


@pytest.mark.slow
@pytest.mark.parametrize("name", TP_CONFIGS)
def test_two_tensor_parallel_ranks_clip_as_one_process(name: str, fsdp2_runs: Path, single_tp_runs: dict) -> None:
    # Shard(0), Shard(1), Replicate and plain parameters together: each counted once
    ranks = [json.loads((fsdp2_runs / f"tp_{name}.rank{r}.json").read_text()) for r in (0, 1)]
    _compare(name, ranks, single_tp_runs[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["norm", "nonfinite"])
def test_sparsity_logger_counts_are_global(name: str, fsdp2_runs: Path, single_runs: dict) -> None:
    ranks = [json.loads((fsdp2_runs / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]
    single = single_runs[name]
    # logged metrics: rank zero only, the one-process numbers exactly
    assert ranks[1]["sparsity"] == []
    assert ranks[0]["sparsity"] == single["sparsity"]
    first = ranks[0]["sparsity"][0]
    assert first["params/total"] == 7 * 6 + 7 + 10 * 7 + 10 + 3 * 10 + 3
    assert first["sparsity/net.0.weight"] == pytest.approx(7 / 42)  # the dead input's column, on both shards
    # the end-of-fit report: global numbers on every rank (negative zeros live on rank 1's shard only)
    assert ranks[0]["report"] == ranks[1]["report"] == single["report"]
    assert ranks[0]["report_other"] == single["report_other"]
    assert ranks[0]["report"][0][:4] == ["net.0.weight", [7, 6], 42, 35]


@pytest.mark.slow
def test_the_table_is_printed_once_and_latency_is_skipped(fsdp2_runs: Path) -> None:
    stdout = (fsdp2_runs / "stdout.txt").read_text()
    assert stdout.count("at the end of fit") == len(CONFIGS) + len(TP_CONFIGS)  # rank zero only (FSDP2 renames the class)
    assert "Inference latency (CPU)" not in stdout


@pytest.mark.slow
def test_agc_refuses_weights_sharded_off_dim_0(fsdp2_runs: Path) -> None:
    for rank in (0, 1):
        message = json.loads((fsdp2_runs / f"agc_tp.rank{rank}.json").read_text())
        assert message.startswith("AGC needs each unit (a row) on one rank") and "\n" not in message
        assert "Shard(dim=1)" in message


@pytest.mark.slow
def test_report_how_long_the_two_process_run_took(fsdp2_runs: Path) -> None:
    seconds = float((fsdp2_runs / "seconds.txt").read_text())
    print(f"2-process runs of {len(CONFIGS) + len(TP_CONFIGS)} configurations: {seconds:.1f} s")
    assert seconds < 600


# ------------------------------------------------------------------ fast: no process group needed


def test_plain_tensors_take_the_one_process_path() -> None:
    from lightning_clipprune._sharded import any_sharded, global_counts

    tensors = [torch.ones(3), torch.zeros(2, 2)]
    counts = torch.tensor([3, 0])
    assert not any_sharded(tensors)
    assert global_counts(counts, tensors) is counts  # no collective without a DTensor
    assert local(tensors[0]) is tensors[0]


@pytest.mark.parametrize(
    ("placement", "transposed", "refused"),
    [("Shard(0)", False, False), ("Replicate()", False, False), ("Shard(1)", False, True), ("Shard(0)", True, True)],
)
def test_agc_refuses_units_split_across_ranks(placement: str, transposed: bool, refused: bool) -> None:
    from types import SimpleNamespace

    from torch.distributed.tensor import Replicate, Shard

    from lightning_clipprune.clipping.agc import _check_units_whole

    placements = ({"Shard(0)": Shard(0), "Shard(1)": Shard(1), "Replicate()": Replicate()}[placement],)
    p = SimpleNamespace(shape=(8, 6), placements=placements, grad=SimpleNamespace(placements=placements, ndim=2))
    if not refused:
        _check_units_whole(p, transposed)
        return
    with pytest.raises(ValueError, match=r"^AGC needs each unit \(a (row|column of an \(in, out\) weight)\) on one rank"):
        _check_units_whole(p, transposed)
