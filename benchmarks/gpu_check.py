"""GPU check: throughput, host syncs, accuracy and 2:4 inference of the callbacks on one NVIDIA GPU.

One prepared script for the rare minutes a GPU is lent: every part runs in its own ``try`` (an error is
recorded and the next part runs), a global time budget skips what no longer fits (and a hard alarm stops a
part that overruns it), and ``gpu_check.json`` + ``gpu_check.md`` are rewritten in ``--out`` after every
measurement, so a run killed half-way still leaves its figures. Imports: torch, lightning and this project
only (no hydra, omegaconf or scikit-learn), so it runs on a machine that has only torch and lightning.

Parts, in the order they run (cheap and decisive first, ``torch.compile`` last):

1. ``environment``: GPU name, capability and memory, torch / CUDA / cuDNN / Lightning versions,
   ``nvidia-smi``; at the end, which of hydra/omegaconf/sklearn got imported (must be none).
2. ``sparse24``: a stack of ``--sparse-layers`` ``Linear(4096, 4096)`` (+ ReLU) in bf16, batch 4096,
   pruned with ``compute_masks(pattern="2:4")`` and converted with
   ``lightning_clipprune.export.to_semi_structured``: time per forward dense vs 2:4 and the max abs
   difference of the outputs (target: >= 1.3x faster). Falls back to the CUTLASS kernels if cuSPARSELt fails.
3. ``throughput_eager``: ResNet-20 (``CifarResNet``) on 50,000 random CIFAR-shaped images held on the GPU,
   batch 512, bf16-mixed, channels_last, 2 epochs per arm; arms: no callbacks, each callback alone
   (``GradientClipCallback(1.0)``, ``MagnitudePruneCallback(0.9)`` cubic, ``SparsityLogger()``), the three
   together. Images/s over the steps after ``--warmup-steps`` (CUDA events, no host sync per step), and
   over the last 20 % of the steps (after the last pruning event). Target: the three cost <= 3 %. With
   2 epochs (194 steps) the default schedule prunes every 14 steps (about every 100 in a long run), so
   the whole-window figure is pessimistic for pruning; the last-20 % figure is the steady state.
4. ``syncs``: the same arms for a few steps under ``torch.cuda.set_sync_debug_mode("warn")``, counting the
   warnings (with their source lines), plus a device-independent count of the ops that read a device
   value on the host (``aten._local_scalar_dense`` behind ``.item()``/``float()``/``bool()``, ``nonzero``,
   ``equal``...) through a ``TorchDispatchMode``. Target: 0 added per step besides the clip callback's
   documented non-finite check (one read per step without a GradScaler, as under bf16).
5. ``accuracy``: the ``fashion_cnn`` recipe (LeNet-5, SGD lr 0.05, momentum 0.9, weight decay 5e-4,
   cosine, batch 128, 10 epochs, bf16-mixed) on the real Fashion-MNIST IDX files in ``--fashion-dir``
   (the device machine has no network), with the app's default callbacks (clip norm 1.0, SparsityLogger):
   dense vs cubic pruning to 0.9 and 0.98: val/test accuracy, sparsity reached, wall time.
6. ``throughput_compiled``: part 3 with ``torch.compile`` (one compiled network shared by the arms, its
   weights reset in place between arms, compiled in a short warm-up fit before them); counts the graphs
   compiled and the recompilations per arm (``torch._dynamo.utils.counters`` and the ``recompiles`` log).
   Target: no recompilation caused by masking or clipping (graphs added and recompiles in the arms: 0).

Run it on the device machine (the ``run`` tool of this workplace), Fashion-MNIST carried from here::

    # here, once: put the data in an ignored folder of the checkout so it can travel
    mkdir -p .data && cp -r /usr/share/datasets/fashion-mnist .data/ && echo /.data/ >> .git/info/exclude
    # run tool: command below, carry [".data"], timeout_s 540
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT --fashion-dir .data/fashion-mnist --budget-s 420

then copy ``gpu_check.json`` / ``gpu_check.md`` from the returned files into ``benchmarks/results/``.
Anywhere else: ``python benchmarks/gpu_check.py --out DIR --fashion-dir DIR``. ``--smoke`` runs every
part with tiny sizes on the CPU in well under a minute (the CUDA-only pieces report "skipped: no CUDA");
the test suite runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

# Spinning OpenMP waiters starve the working threads on a shared CPU (the smoke run); before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import Tensor, nn

try:
    import lightning_clipprune  # noqa: F401
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
from lightning.pytorch.callbacks import Callback

from lightning_clipprune import GradientClipCallback, MagnitudePruneCallback, SparsityLogger
from lightning_clipprune._io import atomic_write_text
from lightning_clipprune.app.data import FashionMNISTDataModule, TensorBatches
from lightning_clipprune.app.models import CifarResNet, Classifier, LeNet5
from lightning_clipprune.export import is_n_m_sparse, to_semi_structured
from lightning_clipprune.loggers import MemoryLogger
from lightning_clipprune.pruning import apply_masks_, compute_masks

ARMS = ("none", "clip", "prune", "logger", "all_three")
PARTS = ("environment", "sparse24", "throughput_eager", "syncs", "accuracy", "throughput_compiled")
UNWANTED = ("hydra", "omegaconf", "sklearn")
SYNC_WARNING = "synchronizing CUDA operation"


@dataclass
class Sizes:
    """The sizes of one run: the real check, or ``--smoke``."""

    n_images: int = 50_000
    batch: int = 512
    epochs: int = 2
    warmup_steps: int = 10
    sync_steps: int = 50  # the window holds one logging step (Lightning's log_every_n_steps=50)
    fashion_epochs: int = 10
    fashion_limit_batches: int | None = None
    sparse_width: int = 4096
    sparse_batch: int = 4096
    sparse_layers: int = 8
    sparse_iters: int = 30
    arms: tuple[str, ...] = ARMS
    sparsities: tuple[float | None, ...] = (None, 0.9, 0.98)


# Smoke: every code path once (two arms cover all three callbacks), seconds of compute on a CPU.
SMOKE = Sizes(
    n_images=32, batch=8, epochs=1, warmup_steps=1, sync_steps=3, fashion_epochs=1, fashion_limit_batches=3,
    sparse_width=128, sparse_batch=64, sparse_layers=2, sparse_iters=3, arms=("none", "all_three"),
    sparsities=(None, 0.9),
)


class BudgetExceeded(Exception):
    """Raised by the hard alarm when the global time budget is spent."""


# ---------------------------------------------------------------------------------------------- report


class Check:
    """The results of the run, saved (JSON + markdown, atomically) after every measurement.

    Args:
        out: output folder.
        budget_s: the global time budget in seconds.
        meta: run settings recorded in the JSON.
    """

    def __init__(self, out: Path, budget_s: float, meta: dict[str, Any]) -> None:
        self.out = out
        self.budget_s = budget_s
        self.t0 = time.monotonic()
        self.data: dict[str, Any] = {
            "check": "gpu_check",
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "budget_s": budget_s,
            **meta,
            "parts": {},
        }
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        _atomic_write(self.out / "gpu_check.json", json.dumps(self.data, indent=2, default=str) + "\n")
        try:
            text = to_markdown(self.data)
        except Exception as err:  # a rendering bug must not cost the JSON
            text = f"# GPU check\n\nmarkdown rendering failed: {err!r}\n"
        _atomic_write(self.out / "gpu_check.md", text)

    def run_part(self, name: str, fn: Callable[[dict[str, Any]], None], need_s: float) -> None:
        """Run ``fn(entry)`` if about ``need_s`` seconds are left; record its error instead of raising."""
        entry: dict[str, Any] = {"status": "running"}
        self.data["parts"][name] = entry
        left = self.left()
        if left < need_s:
            entry.update(status="skipped", reason=f"time budget: {left:.0f} s left, the part needs about {need_s:.0f} s")
            self.save()
            return
        self.save()
        t = time.monotonic()
        try:
            fn(entry)
            if entry["status"] == "running":
                entry["status"] = "ok"
        except BudgetExceeded:
            entry.update(status="stopped", reason="time budget spent (hard alarm) during this part")
        except Exception as err:
            entry.update(status="error", error=f"{type(err).__name__}: {err}"[:2000],
                         traceback=traceback.format_exc()[-4000:])
        finally:
            entry["seconds"] = round(time.monotonic() - t, 1)
            _free_cuda()
            self.save()
        print(f"[gpu_check] {name}: {entry['status']} in {entry['seconds']} s", flush=True)


def _atomic_write(path: Path, text: str) -> None:
    atomic_write_text(path, text)  # never through a link, never over a device


def _free_cuda() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def _precision() -> str:
    # bf16 autocast on a CPU without bf16 units runs reference kernels (seconds per ResNet step): smoke runs fp32
    return "bf16-mixed" if _has_cuda() else "32-true"


# ---------------------------------------------------------------------------------------------- training pieces


class StepTimer(Callback):
    """Marks the start of every training step and the end of training: CUDA events (no host sync) or clocks."""

    def __init__(self) -> None:
        self.marks: list[Any] = []

    def _mark(self) -> Any:
        if _has_cuda():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.marks.append(self._mark())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.marks.append(self._mark())

    def step_seconds(self) -> list[float]:
        """Seconds of each step (one host sync, here, after training)."""
        if len(self.marks) < 2:
            return []
        if isinstance(self.marks[0], float):
            return [b - a for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1000.0 for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]


def arm_callbacks(arm: str) -> list[Callback]:
    """The callbacks of one arm, with the defaults a user gets (no console output)."""
    clip = partial(GradientClipCallback, clip_val=1.0, algorithm="norm")
    prune = partial(MagnitudePruneCallback, sparsity=0.9, schedule="cubic", verbose=False)
    logger = partial(SparsityLogger, print_table=False)
    return {
        "none": lambda: [],
        "clip": lambda: [clip()],
        "prune": lambda: [prune()],
        "logger": lambda: [logger()],
        "all_three": lambda: [clip(), prune(), logger()],
    }[arm]()


def _trainer(callbacks: list[Callback], root: str, **kwargs: Any) -> L.Trainer:
    cuda = _has_cuda()
    defaults: dict[str, Any] = {
        "accelerator": "gpu" if cuda else "cpu",
        "devices": 1,
        "precision": _precision(),
        "benchmark": cuda,
        "logger": MemoryLogger(keep_rows=False),
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": root,
        "callbacks": callbacks,
    }
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class ResNetBench:
    """ResNet-20 on random CIFAR-shaped images held on the device, shared by the throughput and sync parts."""

    def __init__(self, sizes: Sizes) -> None:
        self.sizes = sizes
        self.device = torch.device("cuda" if _has_cuda() else "cpu")
        g = torch.Generator(device=self.device).manual_seed(0)
        self.x = torch.randn(sizes.n_images, 3, 32, 32, device=self.device, generator=g).contiguous(
            memory_format=torch.channels_last
        )
        self.y = torch.randint(0, 10, (sizes.n_images,), device=self.device, generator=g)
        torch.manual_seed(0)
        self.net = CifarResNet(20).to(self.device, memory_format=torch.channels_last)
        self.init = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        self.compiled: nn.Module | None = None

    def loader(self) -> TensorBatches:
        return TensorBatches(self.x, self.y, self.sizes.batch, drop_last=True)

    def module(self, compiled: bool) -> Classifier:
        """A fresh Classifier around the (shared) network, its weights reset in place to the same init."""
        with torch.no_grad():
            for k, v in self.net.state_dict().items():
                v.copy_(self.init[k])
        net = self.net
        if compiled:
            if self.compiled is None:
                raise RuntimeError("compile() first")
            net = self.compiled
        return Classifier(net)

    def compile(self, backend: str) -> None:
        self.compiled = torch.compile(self.net, backend=backend)


def _quantile_summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def throughput_arm(bench: ResNetBench, arm: str, compiled: bool) -> dict[str, Any]:
    """Images per second of one arm over ``epochs`` epochs, the warm-up steps left out."""
    sizes = bench.sizes
    timer = StepTimer()
    model = bench.module(compiled)
    with tempfile.TemporaryDirectory() as root:
        trainer = _trainer([*arm_callbacks(arm), timer], root, max_epochs=sizes.epochs, limit_val_batches=0)
        t0 = time.perf_counter()
        trainer.fit(model, train_dataloaders=bench.loader())
        fit_s = time.perf_counter() - t0
    steps = timer.step_seconds()
    measured = steps[sizes.warmup_steps:]
    tail = steps[max(sizes.warmup_steps, int(0.8 * len(steps))):]
    sparsity = _prunable_sparsity(bench.net)
    return {
        "arm": arm,
        "steps": len(steps),
        "measured_steps": len(measured),
        "images_per_s": sizes.batch * len(measured) / sum(measured) if measured and sum(measured) > 0 else None,
        "images_per_s_last20pct": sizes.batch * len(tail) / sum(tail) if tail and sum(tail) > 0 else None,
        "step_ms": {k: 1000 * v if k != "n" else v for k, v in _quantile_summary(measured).items()},
        "fit_s": round(fit_s, 2),
        "sparsity_reached": sparsity,
    }


def _prunable_sparsity(net: nn.Module) -> float:
    ws = [m.weight.detach() for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    total = sum(w.numel() for w in ws)
    zeros = sum(int((w == 0).sum()) for w in ws)
    return zeros / total if total else 0.0


def _relative(results: list[dict[str, Any]]) -> None:
    base = next((r["images_per_s"] for r in results if r["arm"] == "none"), None)
    for r in results:
        if base and r.get("images_per_s"):
            r["vs_none"] = r["images_per_s"] / base
            r["cost_pct"] = 100.0 * (1.0 - r["images_per_s"] / base)


# ---------------------------------------------------------------------------------------------- recompilations


class _RecordHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.messages.append(record.getMessage()[:500])


def _watch_recompiles() -> _RecordHandler:
    """Collects dynamo's ``recompiles`` log (the reason of every recompilation)."""
    handler = _RecordHandler()
    with contextlib.suppress(Exception):
        torch._logging.set_logs(recompiles=True)
    logging.getLogger("torch._dynamo.guards.__recompiles").addHandler(handler)
    return handler


def _dynamo_counts() -> dict[str, int]:
    try:
        from torch._dynamo.utils import counters

        return {
            "unique_graphs": int(counters["stats"]["unique_graphs"]),
            "frames_ok": int(counters["frames"]["ok"]),
            "frames_total": int(counters["frames"]["total"]),
        }
    except Exception:
        return {}


# ---------------------------------------------------------------------------------------------- host syncs


_SYNC_OPS = (
    "_local_scalar_dense",  # .item(), float(t), int(t), bool(t), if t: ...
    "nonzero",
    "equal",
    "masked_select",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "repeat_interleave",
    "allclose",
    "is_nonzero",
)


class HostReadCounter:
    """Counts the aten ops that make the host wait for a device value, whatever the device.

    A ``TorchDispatchMode`` entered in one hook and left in another, so it covers the training steps only.
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.__name__.split(".")[0]
                if name in _SYNC_OPS or (name in ("_to_copy", "copy_") and _device_to_host(func, args, kwargs)):
                    counter.record(name if name in _SYNC_OPS else "device_to_host_copy")
                return func(*args, **(kwargs or {}))

        self.mode = _Mode()
        self.ops: Counter[str] = Counter()
        self.sources: Counter[str] = Counter()
        self.total = 0

    def record(self, op: str) -> None:
        self.ops[op] += 1
        self.total += 1
        frame = sys._getframe(2)
        while frame is not None and (f"{os.sep}torch{os.sep}" in frame.f_code.co_filename or "gpu_check" in frame.f_code.co_filename):
            frame = frame.f_back
        if frame is not None:
            self.sources[f"{op} at {_short(frame.f_code.co_filename)}:{frame.f_lineno}"] += 1


def _short(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("lightning_clipprune", "lightning", "pytorch_lightning", "torchmetrics"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor):])
    return Path(filename).name


def _device_to_host(func: Any, args: tuple, kwargs: dict | None) -> bool:
    kwargs = kwargs or {}
    if not args or not isinstance(args[0], Tensor):
        return False
    if func.__name__.startswith("copy_") and len(args) > 1 and isinstance(args[1], Tensor):
        return args[1].device.type != "cpu" and args[0].device.type == "cpu"
    target = kwargs.get("device")
    return args[0].device.type != "cpu" and target is not None and torch.device(target).type == "cpu"


class SyncProbe(Callback):
    """From step ``warmup`` on: CUDA sync warnings on, host-read ops counted; the count at each step start."""

    def __init__(self, warmup: int, caught: list[warnings.WarningMessage], use_dispatch: bool) -> None:
        self.warmup = warmup
        self.caught = caught
        self.reads = HostReadCounter() if use_dispatch else None
        self.active = False
        self.per_step_warnings: list[int] = []
        self.per_step_reads: list[int] = []
        self.first_warning = 0

    def _marks(self) -> None:
        self.per_step_warnings.append(sum(1 for w in self.caught if SYNC_WARNING in str(w.message)))
        self.per_step_reads.append(self.reads.total if self.reads is not None else 0)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.warmup and not self.active:
            self.active = True
            if _has_cuda():
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
            if self.reads is not None:
                self.reads.mode.__enter__()
        if self.active:
            self._marks()

    def stop(self) -> None:
        if not self.active:
            return
        self._marks()
        if self.reads is not None:
            self.reads.mode.__exit__(None, None, None)
        if _has_cuda():
            torch.cuda.set_sync_debug_mode("default")
        self.active = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stop()


def sync_arm(bench: ResNetBench, arm: str, use_dispatch: bool) -> dict[str, Any]:
    """Host syncs per training step of one arm (eager)."""
    sizes = bench.sizes
    model = bench.module(compiled=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = SyncProbe(sizes.warmup_steps, caught, use_dispatch)
        try:
            with tempfile.TemporaryDirectory() as root:
                trainer = _trainer(
                    [*arm_callbacks(arm), probe], root, max_steps=sizes.warmup_steps + sizes.sync_steps,
                    limit_val_batches=0,
                )
                trainer.fit(model, train_dataloaders=bench.loader())
        finally:
            probe.stop()
        sync_warnings = [w for w in caught if SYNC_WARNING in str(w.message)]
    steps = max(1, len(probe.per_step_warnings) - 1)
    w_steps = [b - a for a, b in zip(probe.per_step_warnings[:-1], probe.per_step_warnings[1:], strict=True)]
    r_steps = [b - a for a, b in zip(probe.per_step_reads[:-1], probe.per_step_reads[1:], strict=True)]
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in sync_warnings)
    out: dict[str, Any] = {
        "arm": arm,
        "steps": steps,
        "cuda_sync_warnings": len(sync_warnings) if _has_cuda() else None,
        "cuda_syncs_per_step": len(sync_warnings) / steps if _has_cuda() else None,
        "cuda_syncs_per_step_median": statistics.median(w_steps) if (w_steps and _has_cuda()) else None,
        "cuda_sync_sources": dict(where.most_common(8)),
    }
    if probe.reads is not None:
        out.update(
            host_reads=probe.reads.total,
            host_reads_per_step=probe.reads.total / steps,
            host_reads_per_step_median=statistics.median(r_steps) if r_steps else None,
            host_read_ops=dict(probe.reads.ops),
            host_read_sources=dict(probe.reads.sources.most_common(6)),
        )
    return out


# ---------------------------------------------------------------------------------------------- parts


def part_environment(entry: dict[str, Any]) -> None:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "lightning": L.__version__,
        "cpu_count": os.cpu_count(),
        "cuda_available": _has_cuda(),
    }
    with contextlib.suppress(Exception):
        info["cudnn"] = torch.backends.cudnn.version()
    if _has_cuda():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
        )
        with contextlib.suppress(Exception):
            info["bf16_supported"] = torch.cuda.is_bf16_supported()
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except Exception as err:
            info["nvidia_smi"] = f"unavailable: {err!r}"
    else:
        info["gpu"] = "none (no CUDA): CUDA-only parts are skipped"
    entry.update(info)


def part_sparse24(check: Check, sizes: Sizes, entry: dict[str, Any]) -> None:
    cuda = _has_cuda()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    w, n_layers = sizes.sparse_width, sizes.sparse_layers
    entry.update(width=w, batch=sizes.sparse_batch, layers=n_layers, dtype="bfloat16", device=str(device))
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers.append(nn.Linear(w, w, device=device, dtype=dtype))
        if i < n_layers - 1:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers).eval()
    linears = {f"{i}.weight": m.weight for i, m in enumerate(model) if isinstance(m, nn.Linear)}
    weights = {k: v.detach() for k, v in linears.items()}
    try:
        masks = compute_masks(weights, sparsity=0.5, scope="local", pattern="2:4")
    except RuntimeError as err:  # older cores reject bf16 weights (abs into a float32 buffer)
        entry["bf16_masks_error"] = f"{type(err).__name__}: {err}"[:500]
        masks = compute_masks({k: v.float() for k, v in weights.items()}, sparsity=0.5, scope="local", pattern="2:4")
    apply_masks_(list(linears.values()), [masks[k] for k in linears])
    entry["pattern_ok"] = all(is_n_m_sparse(v) for v in linears.values())
    x = torch.randn(sizes.sparse_batch, w, device=device, dtype=dtype)
    with torch.inference_mode():
        dense_out = model(x).float()
        entry["dense_ms"] = _time_forward(lambda: model(x), sizes.sparse_iters)
    check.save()
    if not cuda:
        entry.update(status="skipped", reason="skipped: no CUDA (the dense half ran; 2:4 kernels need a CUDA GPU)")
        return
    pruned_copy = copy.deepcopy(model)
    backend = "cuSPARSELt (torch default)"
    try:
        converted = to_semi_structured(model)
        with torch.inference_mode():
            sparse_out = model(x).float()
    except Exception as err:
        entry["first_backend_error"] = f"{type(err).__name__}: {err}"[:1000]
        from torch.sparse import SparseSemiStructuredTensor

        SparseSemiStructuredTensor._FORCE_CUTLASS = True
        backend = "CUTLASS (forced after the default failed)"
        model = pruned_copy
        converted = to_semi_structured(model)
        with torch.inference_mode():
            sparse_out = model(x).float()
    entry["backend"] = backend
    entry["converted"] = len(converted)
    with torch.inference_mode():
        entry["sparse_ms"] = _time_forward(lambda: model(x), sizes.sparse_iters)
    diff = (dense_out - sparse_out).abs().max().item()
    entry["max_abs_diff"] = diff
    entry["max_abs_output"] = dense_out.abs().max().item()
    entry["speedup"] = entry["dense_ms"]["median"] / entry["sparse_ms"]["median"]
    entry["target_speedup"] = 1.3
    entry["meets_target"] = entry["speedup"] >= 1.3


def _time_forward(fn: Callable[[], Any], iters: int, warmup: int = 3) -> dict[str, float]:
    """Milliseconds per call (median, min) after ``warmup`` calls: CUDA events on a GPU, a clock on a CPU."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if _has_cuda():
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    return {"median": statistics.median(times), "min": min(times), "iters": iters}


def part_throughput(check: Check, bench: ResNetBench, entry: dict[str, Any], compiled: bool, backend: str,
                    arm_need_s: float) -> None:
    sizes = bench.sizes
    entry.update(
        model="ResNet-20 (CifarResNet(20))", images=sizes.n_images, batch=sizes.batch, epochs=sizes.epochs,
        precision=_precision(), memory_format="channels_last", warmup_steps=sizes.warmup_steps,
        device=str(bench.device), compiled=compiled, arms=[], skipped_arms={},
    )
    handler = None
    if compiled:
        entry["backend"] = backend
        handler = _watch_recompiles()
        bench.compile(backend)
    # A short fit before the arms: compilation (and cuDNN's algorithm search) land there, not in an arm.
    before, t = _dynamo_counts(), time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        _trainer([], root, max_steps=sizes.warmup_steps + 2, limit_val_batches=0).fit(
            bench.module(compiled), train_dataloaders=bench.loader()
        )
    entry["warmup_fit_s"] = round(time.perf_counter() - t, 2)
    if compiled:
        entry["graphs_compiled_in_warmup"] = _dynamo_counts().get("unique_graphs", 0) - before.get("unique_graphs", 0)
    check.save()
    results: list[dict[str, Any]] = entry["arms"]
    for arm in sizes.arms:
        need = arm_need_s
        if check.left() < need:
            entry["skipped_arms"][arm] = f"time budget: {check.left():.0f} s left"
            continue
        before, n_msgs = _dynamo_counts(), len(handler.messages) if handler else 0
        try:
            res = throughput_arm(bench, arm, compiled)
        except BudgetExceeded:
            raise
        except Exception as err:
            entry["skipped_arms"][arm] = f"error: {type(err).__name__}: {err}"[:1000]
            check.save()
            continue
        if compiled:
            after = _dynamo_counts()
            res["graphs_added"] = after.get("unique_graphs", 0) - before.get("unique_graphs", 0)
            res["frames_compiled"] = after.get("frames_ok", 0) - before.get("frames_ok", 0)
            msgs = handler.messages[n_msgs:] if handler else []
            res["recompiles"] = len(msgs)
            res["recompile_reasons"] = msgs[:3]
        results.append(res)
        _relative(results)
        check.save()
    three = next((r for r in results if r["arm"] == "all_three"), None)
    if three is not None and "cost_pct" in three:
        entry["all_three_cost_pct"] = three["cost_pct"]
        entry["meets_target_3pct"] = three["cost_pct"] <= 3.0
    if compiled:  # after the warm-up fit nothing should compile again: masking and clipping change no guard
        entry["recompiles_in_arms"] = sum(r.get("recompiles", 0) for r in results)
        entry["graphs_added_in_arms"] = sum(r.get("graphs_added", 0) for r in results)
    if not _has_cuda():
        entry["note"] = "no CUDA: ran on the CPU with smoke sizes; the figures say nothing about a GPU"


def part_syncs(check: Check, bench: ResNetBench, entry: dict[str, Any], arm_need_s: float) -> None:
    cuda = _has_cuda()
    entry.update(
        warmup_steps=bench.sizes.warmup_steps, steps=bench.sizes.sync_steps, arms=[], skipped_arms={},
        method=("torch.cuda.set_sync_debug_mode('warn') warnings; " if cuda else "")
        + "TorchDispatchMode count of host-reading aten ops",
    )
    if not cuda:
        entry["cuda_sync_debug_mode"] = "skipped: no CUDA"
    results: list[dict[str, Any]] = entry["arms"]
    for arm in bench.sizes.arms:
        if check.left() < arm_need_s:
            entry["skipped_arms"][arm] = f"time budget: {check.left():.0f} s left"
            continue
        try:
            results.append(sync_arm(bench, arm, use_dispatch=True))
        except BudgetExceeded:
            raise
        except Exception as err:
            entry["skipped_arms"][arm] = f"error: {type(err).__name__}: {err}"[:1000]
        check.save()
    base = next((r for r in results if r["arm"] == "none"), None)
    if base is not None:
        for r in results:
            for key in ("cuda_syncs_per_step", "host_reads_per_step"):
                if r.get(key) is not None and base.get(key) is not None:
                    r[key.replace("_per_step", "_added_per_step")] = r[key] - base[key]
            # GradientClipCallback reads the norm once per step without a GradScaler (bf16 has none)
            r["documented_per_step"] = 1 if r["arm"] in ("clip", "all_three") else 0


def part_accuracy(check: Check, sizes: Sizes, fashion_dir: str | None, entry: dict[str, Any], arm_need_s: float) -> None:
    if not fashion_dir:
        entry.update(status="skipped", reason="no --fashion-dir given")
        return
    entry.update(
        recipe=f"fashion_cnn: LeNet-5, SGD lr 0.05 momentum 0.9 wd 5e-4, cosine, batch 128, {_precision()}",
        callbacks="GradientClipCallback(1.0) + SparsityLogger() (+ MagnitudePruneCallback(s), cubic)",
        epochs=sizes.fashion_epochs, limit_train_batches=sizes.fashion_limit_batches, arms=[], skipped_arms={},
    )
    dm = FashionMNISTDataModule(root=fashion_dir, download=False, batch_size=128, seed=0)
    dm.prepare_data()
    limit = sizes.fashion_limit_batches
    for target in sizes.sparsities:
        name = "dense" if target is None else f"sparsity {target}"
        if check.left() < arm_need_s:
            entry["skipped_arms"][name] = f"time budget: {check.left():.0f} s left"
            continue
        L.seed_everything(0, verbose=False)
        model = Classifier(
            LeNet5(), optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
        )
        callbacks: list[Callback] = [GradientClipCallback(clip_val=1.0)]
        if target is not None:
            callbacks.append(MagnitudePruneCallback(sparsity=target, schedule="cubic", verbose=False))
        callbacks.append(SparsityLogger(print_table=False))
        with tempfile.TemporaryDirectory() as root:
            trainer = _trainer(
                callbacks, root, max_epochs=sizes.fashion_epochs, limit_train_batches=limit,
                limit_val_batches=2 if limit else None, limit_test_batches=2 if limit else None,
            )
            t0 = time.perf_counter()
            trainer.fit(model, datamodule=dm)
            fit_s = time.perf_counter() - t0
            val = trainer.callback_metrics.get("val/acc")
            test = trainer.test(model, datamodule=dm, verbose=False)
        entry["arms"].append({
            "arm": name,
            "target": target,
            "val_acc": float(val) if val is not None else None,
            "test_acc": float(test[0]["test/acc"]) if test else None,
            "sparsity_reached": _prunable_sparsity(model.net),
            "fit_s": round(fit_s, 2),
            "steps": trainer.global_step,
        })
        check.save()


# ---------------------------------------------------------------------------------------------- markdown


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec) if math.isfinite(value) else str(value)
    return str(value)


def to_markdown(data: dict[str, Any]) -> str:
    """The JSON as markdown tables (what the README shows)."""
    parts = data.get("parts", {})
    lines = ["# GPU check", ""]
    env = parts.get("environment", {})
    lines.append(
        f"{env.get('gpu', '?')}, torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda', '-')}), "
        f"Lightning {env.get('lightning', '?')}; budget {data.get('budget_s')} s, elapsed {data.get('elapsed_s')} s"
        + (" (smoke: tiny sizes)" if data.get("smoke") else "")
    )
    lines.append("")
    lines.append("| part | status | seconds | note |")
    lines.append("|---|---|---|---|")
    for name, p in parts.items():
        note = p.get("reason") or p.get("error") or ""
        lines.append(f"| {name} | {p.get('status')} | {_fmt(p.get('seconds'))} | {str(note)[:160]} |")
    for key, title in (("throughput_eager", "Throughput (eager)"), ("throughput_compiled", "Throughput (torch.compile)")):
        p = parts.get(key)
        if not p or not p.get("arms"):
            continue
        lines += ["", f"## {title}: ResNet-20, batch {p.get('batch')}, {p.get('precision')}, channels_last", ""]
        lines.append("| arm | images/s | vs none | cost % | images/s last 20 % | step ms (median) | recompiles |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in p["arms"]:
            lines.append(
                f"| {r['arm']} | {_fmt(r.get('images_per_s'), '.0f')} | {_fmt(r.get('vs_none'), '.3f')} | "
                f"{_fmt(r.get('cost_pct'), '.1f')} | {_fmt(r.get('images_per_s_last20pct'), '.0f')} | "
                f"{_fmt(r.get('step_ms', {}).get('median'), '.2f')} | {_fmt(r.get('recompiles'))} |"
            )
    p = parts.get("syncs")
    if p and p.get("arms"):
        lines += ["", "## Host syncs per training step (eager)", ""]
        lines.append("| arm | CUDA syncs/step | added | host reads/step | added | documented | sources |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in p["arms"]:
            sources = r.get("cuda_sync_sources") or r.get("host_read_sources") or {}
            src = ", ".join(f"{k} x{v}" for k, v in list(sources.items())[:3])
            lines.append(
                f"| {r['arm']} | {_fmt(r.get('cuda_syncs_per_step'), '.2f')} | "
                f"{_fmt(r.get('cuda_syncs_added_per_step'), '.2f')} | {_fmt(r.get('host_reads_per_step'), '.2f')} | "
                f"{_fmt(r.get('host_reads_added_per_step'), '.2f')} | {r.get('documented_per_step')} | {src or '-'} |"
            )
    p = parts.get("accuracy")
    if p and p.get("arms"):
        lines += ["", f"## Accuracy: Fashion-MNIST, fashion_cnn recipe, {p.get('epochs')} epochs", ""]
        lines.append("| arm | val acc | test acc | sparsity reached | fit s |")
        lines.append("|---|---|---|---|---|")
        for r in p["arms"]:
            lines.append(
                f"| {r['arm']} | {_fmt(r.get('val_acc'), '.4f')} | {_fmt(r.get('test_acc'), '.4f')} | "
                f"{_fmt(r.get('sparsity_reached'), '.4f')} | {_fmt(r.get('fit_s'), '.1f')} |"
            )
    p = parts.get("sparse24")
    if p and "dense_ms" in p:
        lines += ["", f"## 2:4 inference: {p.get('layers')} x Linear({p.get('width')}), batch {p.get('batch')}, bf16", ""]
        lines.append("| dense ms | 2:4 ms | speedup | max abs diff | backend |")
        lines.append("|---|---|---|---|---|")
        lines.append(
            f"| {_fmt(p['dense_ms'].get('median'), '.3f')} | {_fmt(p.get('sparse_ms', {}).get('median'), '.3f')} | "
            f"{_fmt(p.get('speedup'), '.2f')} | {_fmt(p.get('max_abs_diff'), '.3g')} | {p.get('backend', '-')} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main


@contextlib.contextmanager
def hard_budget(seconds: float) -> Iterator[None]:
    """Raise :class:`BudgetExceeded` in the main thread when ``seconds`` have passed (POSIX; else a no-op)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum: int, frame: Any) -> None:
        raise BudgetExceeded(f"time budget of {seconds:.0f} s spent")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--fashion-dir", default=None, help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--budget-s", type=float, default=None, help="global time budget (default 420; smoke 60)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device there is (CPU in the tests)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; smoke eager)")
    parser.add_argument("--fashion-epochs", type=int, default=None)
    parser.add_argument("--sparse-layers", type=int, default=None)
    args = parser.parse_args(argv)

    sizes = copy.deepcopy(SMOKE if args.smoke else Sizes())
    if args.fashion_epochs is not None:
        sizes.fashion_epochs = args.fashion_epochs
    if args.sparse_layers is not None:
        sizes.sparse_layers = args.sparse_layers
    budget = args.budget_s if args.budget_s is not None else (60.0 if args.smoke else 420.0)
    backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    scale = 0.1 if args.smoke else 1.0  # seconds an arm needs, to decide what still fits
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with contextlib.suppress(Exception):
        torch.set_float32_matmul_precision("high")

    check = Check(Path(args.out), budget, {
        "smoke": args.smoke, "sizes": asdict(sizes), "compile_backend": backend,
        "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
    })

    def on_term(signum: int, frame: Any) -> None:
        check.data["terminated"] = f"signal {signum} after {time.monotonic() - check.t0:.0f} s"
        check.save()
        sys.exit(128 + signum)

    with contextlib.suppress(Exception):
        signal.signal(signal.SIGTERM, on_term)

    bench: dict[str, ResNetBench] = {}

    def resnet() -> ResNetBench:
        if "b" not in bench:
            bench["b"] = ResNetBench(sizes)
        return bench["b"]

    steps = {
        "environment": (lambda e: part_environment(e), 1),
        "sparse24": (lambda e: part_sparse24(check, sizes, e), 20 * scale),
        "throughput_eager": (lambda e: part_throughput(check, resnet(), e, False, backend, 12 * scale), 15 * scale),
        "syncs": (lambda e: part_syncs(check, resnet(), e, 10 * scale), 12 * scale),
        "accuracy": (lambda e: part_accuracy(check, sizes, args.fashion_dir, e, 45 * scale), 45 * scale),
        "throughput_compiled": (lambda e: part_throughput(check, resnet(), e, True, backend, 12 * scale), 60 * scale),
    }
    try:
        with hard_budget(budget):
            for name in PARTS:
                if name in args.parts:
                    fn, need = steps[name]
                    check.run_part(name, fn, need)
    except BudgetExceeded as err:  # fired between two measurements (while saving, say)
        check.data["stopped"] = str(err)
    env = check.data["parts"].get("environment")
    if env is not None:
        env["unwanted_modules_imported"] = sorted(
            m for m in list(sys.modules) if m.split(".")[0] in UNWANTED and sys.modules.get(m) is not None
        )
    check.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    check.save()
    print(to_markdown(check.data), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
