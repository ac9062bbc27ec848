"""Smoke tests of ``benchmarks/gpu_check.py`` and ``benchmarks/bench_overhead.py`` (tiny sizes, CPU).

Both scripts run in a subprocess, as from the command line. ``gpu_check.py`` and the public imports run
with hydra, omegaconf and scikit-learn made unimportable (``sys.modules[name] = None``), as on a GPU
machine that has only torch and lightning. No timing is asserted: only that every part ran (or was
skipped for the documented reason) and that the figures are coherent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.py"
BENCH_OVERHEAD = ROOT / "benchmarks" / "bench_overhead.py"
FASHION = Path("/usr/share/datasets/fashion-mnist")
BLOCK_OPTIONAL = textwrap.dedent(
    """
    import sys
    for _name in ("hydra", "omegaconf", "sklearn"):
        sys.modules[_name] = None  # `import hydra` now raises ImportError, as where it is not installed
    """
)


def _python(code: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _load(path: Path) -> ModuleType:
    name = f"_benchmark_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_public_api_imports_without_hydra_omegaconf_sklearn():
    code = BLOCK_OPTIONAL + textwrap.dedent(
        """
        try:
            import hydra  # noqa: F401
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker did not block hydra")
        import lightning as L
        from lightning_clipprune import GradientClipCallback, MagnitudePruneCallback, SparsityLogger
        import lightning_clipprune.models
        import lightning_clipprune.data
        from lightning_clipprune.export import to_semi_structured  # noqa: F401
        callbacks = [GradientClipCallback(clip_val=1.0), MagnitudePruneCallback(sparsity=0.9), SparsityLogger()]
        L.Trainer(callbacks=callbacks, logger=False, accelerator="cpu", enable_progress_bar=False)
        lightning_clipprune.models.CifarResNet(20)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("hydra", "omegaconf", "sklearn")
                        and sys.modules[m] is not None)
        print("loaded:", loaded)
        """
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded: []" in proc.stdout


def test_host_read_counter_counts_reads_and_names_the_caller():
    gpu_check = _load(GPU_CHECK)
    counter = gpu_check.HostReadCounter()
    t = torch.tensor([0.0, 2.0, 3.0])
    with counter.mode:
        t.sum().item()
        bool(t[1] > 0)
        t.nonzero()
        t * 2  # no read
    assert counter.total == 3
    assert counter.ops["_local_scalar_dense"] == 2
    assert counter.ops["nonzero"] == 1
    assert all("test_benchmarks.py" in src for src in counter.sources)


def test_gpu_check_markdown_reports_errors_and_skips():
    gpu_check = _load(GPU_CHECK)
    data = {
        "budget_s": 10,
        "elapsed_s": 3,
        "parts": {
            "environment": {"status": "ok", "gpu": "none", "torch": "x", "lightning": "y", "seconds": 0.1},
            "sparse24": {"status": "error", "error": "RuntimeError: boom", "seconds": 0.2},
            "accuracy": {"status": "skipped", "reason": "no --fashion-dir given"},
        },
    }
    text = gpu_check.to_markdown(data)
    assert "| sparse24 | error | 0.2 | RuntimeError: boom |" in text
    assert "no --fashion-dir given" in text


def test_gpu_check_smoke_runs_every_part_without_optional_packages(tmp_path):
    out = tmp_path / "gpu"
    argv = ["gpu_check.py", "--smoke", "--out", str(out), "--budget-s", "900"]
    if FASHION.is_dir():
        argv += ["--fashion-dir", str(FASHION)]
    code = BLOCK_OPTIONAL + f"import runpy\nsys.argv = {argv!r}\nrunpy.run_path({str(GPU_CHECK)!r}, run_name='__main__')\n"
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    parts = data["parts"]
    assert data["smoke"] is True
    assert list(parts) == ["environment", "sparse24", "throughput_eager", "syncs", "accuracy", "throughput_compiled"]
    assert parts["environment"]["unwanted_modules_imported"] == []
    cuda = torch.cuda.is_available()

    sparse = parts["sparse24"]
    assert sparse["pattern_ok"] is True and sparse["dense_ms"]["median"] > 0
    assert sparse["status"] == ("ok" if cuda else "skipped")
    if not cuda:
        assert "no CUDA" in sparse["reason"]

    for key in ("throughput_eager", "throughput_compiled"):
        part = parts[key]
        assert part["status"] == "ok", part
        arms = {r["arm"]: r for r in part["arms"]}
        assert set(arms) == {"none", "all_three"}
        assert all(r["images_per_s"] > 0 and r["measured_steps"] == 3 for r in arms.values())
        assert arms["none"]["sparsity_reached"] == 0.0
        assert arms["all_three"]["sparsity_reached"] == pytest.approx(0.9, abs=0.01)
        assert arms["none"]["vs_none"] == 1.0
    compiled = parts["throughput_compiled"]
    assert compiled["graphs_compiled_in_warmup"] >= 1
    assert compiled["recompiles_in_arms"] == 0 and compiled["graphs_added_in_arms"] == 0

    syncs = parts["syncs"]
    assert syncs["status"] == "ok", syncs
    arms = {r["arm"]: r for r in syncs["arms"]}
    assert arms["none"]["host_reads_added_per_step"] == 0.0
    assert arms["all_three"]["documented_per_step"] == 1
    assert arms["all_three"]["host_reads_per_step"] is not None

    accuracy = parts["accuracy"]
    if FASHION.is_dir():
        assert accuracy["status"] == "ok", accuracy
        acc = {r["arm"]: r for r in accuracy["arms"]}
        assert acc["dense"]["sparsity_reached"] == 0.0
        assert acc["sparsity 0.9"]["sparsity_reached"] == pytest.approx(0.9, abs=0.01)
        assert all(0.0 <= r["test_acc"] <= 1.0 for r in acc.values())
    else:
        assert accuracy["status"] == "skipped" and "fashion-dir" in accuracy["reason"]

    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# GPU check") and "Throughput (eager)" in md and "Host syncs" in md


def test_bench_overhead_smoke(tmp_path):
    out = tmp_path / "bench_overhead.json"
    proc = _python(
        f"import runpy, sys\nsys.argv = ['bench_overhead.py', '--smoke', '--out', {str(out)!r}]\n"
        f"runpy.run_path({str(BENCH_OVERHEAD)!r}, run_name='__main__')\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    lenet = data["lenet300"]["summary"]
    assert list(lenet) == ["none", "lightning_pair", "clip", "prune", "logger", "ours_three"]
    assert lenet["none"]["ratio"]["median"] == 1.0
    assert all(s["steps"] == 4 and s["epoch_s"]["median"] > 0 for s in lenet.values())
    pruned = lenet["prune"]["pruned_weight_bytes"]
    # LeNet-300-100's three Linear weights in float32
    assert pruned == 4 * (784 * 300 + 300 * 100 + 100 * 10)
    # ModelPruning: weight_orig + weight_mask + the computed weight, i.e. +200 % of the pruned weights
    assert lenet["lightning_pair"]["added_bytes"] == pytest.approx(2 * pruned, rel=0.01)
    assert 0 < lenet["prune"]["added_bytes"] < lenet["lightning_pair"]["added_bytes"]
    assert lenet["none"]["added_bytes"] == 0
    resnet = data["resnet20"]["summary"]
    assert list(resnet) == ["none", "lightning_pair", "ours_three"]
    assert all(s["steps"] == 3 for s in resnet.values())
    assert "| ours_three |" in proc.stdout


def test_bench_overhead_hook_costs_smoke(tmp_path):
    """``--whole-fit --hook-costs``: each arm's hooks timed, Lightning's own clipping counted where it clips."""
    out = tmp_path / "whole.json"
    proc = _python(
        "import runpy, sys\nsys.argv = ['bench_overhead.py', '--smoke', '--whole-fit', '--hook-costs', '--arms', 'none',"
        f" 'lightning_pair', 'ours_three', '--models', 'lenet300', '--out', {str(out)!r}]\n"
        f"runpy.run_path({str(BENCH_OVERHEAD)!r}, run_name='__main__')\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    costs = json.loads(out.read_text())["whole_fit"]["hook_costs"]["1"]
    assert list(costs) == ["none", "lightning_pair", "ours_three"]
    clip = "Lightning gradient_clip_val (Precision._clip_gradients)"
    assert costs["lightning_pair"][clip] > 0 and "ModelPruning.on_train_epoch_end" in costs["lightning_pair"]
    assert costs["ours_three"]["GradientClipCallback.on_before_optimizer_step"] > 0
    assert costs["ours_three"]["MagnitudePruneCallback.on_train_batch_start"] > 0  # the pruning events
    assert all(hooks["total"] >= max(v for k, v in hooks.items() if k != "total") for hooks in costs.values())
    assert "Time in the hooks, CPU ms per 1-epoch fit" in proc.stdout


def test_bench_clip_resnet_smoke():
    """``bench_clip.py --resnet``: the clipper and ``clip_grad_norm_`` timed on ResNet-20's gradients, both cases."""
    script = ROOT / "benchmarks" / "bench_clip.py"
    proc = _python(
        f"import runpy, sys\nsys.argv = ['bench_clip.py', '--resnet', '--quick']\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| under") or line.startswith("| over")]
    assert len(rows) == 2 and all(row.count(" us") == 2 for row in rows)


def test_bench_overhead_summary_pairs_each_arm_with_the_same_round():
    bench = _load(BENCH_OVERHEAD)
    runs = [
        {"round": 0, "arm": "none", "epoch_s": 2.0, "epoch_cpu_s": 4.0},
        {"round": 0, "arm": "clip", "epoch_s": 3.0, "epoch_cpu_s": 4.4},
        {"round": 1, "arm": "none", "epoch_s": 10.0, "epoch_cpu_s": 4.0},
        {"round": 1, "arm": "clip", "epoch_s": 11.0, "epoch_cpu_s": 4.8},
    ]
    for r in runs:
        r.update(steps=1, added_bytes=0, callback_bytes=0, model_extra_bytes=0, pruned_weight_bytes=1)
    summary = bench.summarise(runs, ["none", "clip"])
    assert summary["clip"]["ratio"]["min"] == pytest.approx(1.1)
    assert summary["clip"]["ratio"]["max"] == pytest.approx(1.5)
    assert summary["clip"]["ratio"]["median"] == pytest.approx(1.3)
    assert summary["clip"]["cpu_ratio"]["median"] == pytest.approx(1.15)
    assert summary["none"]["ratio"]["median"] == 1.0


BENCH_VS_LIGHTNING = ROOT / "benchmarks" / "bench_vs_lightning.py"


def _prune_settings(cb) -> dict:
    keep = ("sparsity", "schedule", "start", "end", "frequency", "power", "scope", "criterion", "ranking",
            "max_layer_sparsity", "taylor_beta")
    return {k: getattr(cb, "effective_max_layer_sparsity" if k == "max_layer_sparsity" else k) for k in keep}


def test_bench_vs_lightning_published_variant_is_the_library_defaults_and_old_variants_are_pinned():
    bench = _load(BENCH_VS_LIGHTNING)
    from lightning_clipprune import GradientClipCallback, MagnitudePruneCallback

    def parts(callbacks):
        prune = next(c for c in callbacks if isinstance(c, MagnitudePruneCallback))
        clip = [c.clip_val for c in callbacks if isinstance(c, GradientClipCallback)]
        return _prune_settings(prune), clip

    user = parts(bench.ours_callbacks(0.98))  # what a user writes: the library defaults
    assert parts(bench.variant_callbacks(0.98, bench.RECOMMENDED)) == user
    assert parts(bench.variant_callbacks(0.98, "default")) == user
    # a variant measured before the defaults changed still runs what it ran: raw ranking, 0.99 ceiling
    settings, clip = parts(bench.variant_callbacks(0.98, "end50"))
    assert (settings["ranking"], settings["max_layer_sparsity"], settings["end"], clip) == ("raw", 0.99, 0.5, [1.0])
    assert parts(bench.variant_callbacks(0.98, "end50_noclip"))[1] == []
    squared = next(c for c in bench.variant_callbacks(0.98, "end50_taylor_sq") if isinstance(c, MagnitudePruneCallback))
    assert isinstance(squared.criterion, bench.SquaredTaylor) and squared.criterion.beta == 0.99
