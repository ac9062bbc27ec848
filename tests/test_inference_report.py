"""What pruning bought, shown to the user (issue #24): SparsityLogger's latency line, the app summary, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_clipprune import MagnitudePruneCallback, SparsityLogger
from lightning_clipprune.app.summary import print_summary
from lightning_clipprune.export import inference_report, load_inference, read_sparse_metadata
from lightning_clipprune.export.__main__ import main as export_main
from lightning_clipprune.export.latency import format_latency, measure_inference
from tests.helpers import TinyClassifier, random_loader, tiny_trainer

KEYS = {"batch_size", "threads", "dense_ms", "inference_ms", "speedup", "csr_layers", "compacted_layers",
        "compaction_skipped"}


def _fit(tmp_path, logger: SparsityLogger) -> TinyClassifier:
    model = TinyClassifier()
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[MagnitudePruneCallback(sparsity=0.9, schedule="oneshot"),
                                                              logger])
    trainer.fit(model, random_loader())
    return model


def test_the_end_of_fit_table_has_a_measured_latency_line(tmp_path, capsys) -> None:
    logger = SparsityLogger(latency_batch_size=64, inference_latency=True)
    model = _fit(tmp_path, logger)
    assert logger.inference_latency is not None and set(logger.inference_latency) == KEYS
    assert logger.inference_latency["batch_size"] == 64
    assert logger.inference_latency["dense_ms"] > 0 and logger.inference_latency["inference_ms"] > 0
    assert "Inference latency (CPU): batch 64" in capsys.readouterr().out
    assert isinstance(model.net[0], torch.nn.Linear)


def test_the_latency_line_defaults_to_the_training_batch_and_can_be_turned_off(tmp_path, capsys) -> None:
    on = SparsityLogger(inference_latency=True)
    _fit(tmp_path, on)
    assert on.inference_latency["batch_size"] == 16  # random_loader's batch size
    off = SparsityLogger(inference_latency=False)
    _fit(tmp_path, off)
    quiet = SparsityLogger(print_table=False)
    _fit(tmp_path, quiet)
    assert off.inference_latency is None and quiet.inference_latency is None
    assert capsys.readouterr().out.count("Inference latency") == 1


def test_auto_measures_after_long_fits_only(tmp_path, capsys, monkeypatch) -> None:
    import lightning_clipprune.callbacks.sparsity_logger as module

    short = SparsityLogger()  # "auto": a fit of a second or two is under the 10 s
    _fit(tmp_path, short)
    out = capsys.readouterr().out
    assert short.inference_latency is None
    assert "not measured after a fit of" in out and "inference_latency=True" in out
    assert "callbacks.sparsity.inference_latency=true" in out  # the app's override, no `+` (conf/config.yaml)
    monkeypatch.setattr(module, "AUTO_LATENCY_MIN_FIT_S", 0.0)  # every fit is long enough now
    long = SparsityLogger()
    _fit(tmp_path, long)
    assert long.inference_latency is not None and long.inference_latency["batch_size"] == 16
    assert "Inference latency (CPU): batch 16" in capsys.readouterr().out


def test_bad_latency_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="latency_batch_size"):
        SparsityLogger(latency_batch_size=0)
    with pytest.raises(ValueError, match=r"inference_latency=.*True, False or 'auto', got 'yes'"):
        SparsityLogger(inference_latency="yes")


def test_measure_inference_leaves_the_model_alone() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)).train()
    stats = net[1].running_mean.clone()
    result = measure_inference(net, torch.randn(4, 8), batch_size=32, rounds=1)
    assert net.training and torch.equal(net[1].running_mean, stats)
    assert result["batch_size"] == 32 and "32" in format_latency(result)


def test_a_dense_model_is_reported_as_unchanged_not_as_a_speedup() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    result = measure_inference(net, torch.randn(4, 8), rounds=1)
    assert result["csr_layers"] == result["compacted_layers"] == 0
    assert result["speedup"] == 1.0 and result["inference_ms"] == result["dense_ms"]
    line = format_latency(result)
    assert "inference stays dense" in line and "->" not in line


def test_without_torch_pruning_the_latency_line_says_so_and_nothing_warns(monkeypatch, recwarn) -> None:
    import lightning_clipprune.export.compact as compact

    monkeypatch.setattr(compact, "torch_pruning_missing", lambda: True)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with torch.no_grad():
        net[0].weight[:4] = 0  # four whole output channels
    result = measure_inference(net, torch.randn(4, 8), rounds=1)
    assert result["compaction_skipped"] and result["compacted_layers"] == 0
    assert "pip install 'lightning-clipprune[compact]'" in format_latency(result)
    assert not [w for w in recwarn if "Torch-Pruning" in str(w.message)]


def test_a_ratio_near_one_is_called_noise() -> None:
    near = {"batch_size": 8, "threads": 1, "dense_ms": 1.0, "inference_ms": 1.02, "speedup": 0.98,
            "csr_layers": 0, "compacted_layers": 1}
    assert "within timing noise" in format_latency(near)
    assert "noise" not in format_latency({**near, "inference_ms": 0.5, "speedup": 2.0})


def test_app_summary_shows_the_latency_row(capsys) -> None:
    results = {
        "experiment": "x", "val_acc": 0.9, "sparsity": 0.9, "params_nonzero": 10, "params_total": 100,
        "clip": None, "epochs": 1, "steps": 2, "wall_time_s": 1.0,
        "inference_latency": {"batch_size": 256, "threads": 2, "dense_ms": 3.0, "inference_ms": 1.0, "speedup": 3.0,
                              "csr_layers": 2, "compacted_layers": 0},
    }
    print_summary(results)
    out = capsys.readouterr().out
    assert "inference latency (CPU)" in out and "3.00x" in out


def test_export_cli_writes_the_inference_recipe(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    model = TinyClassifier(in_features=64, hidden=128)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.rand_like(p) > 0.95)
    ckpt, out = tmp_path / "m.ckpt", tmp_path / "m.lcps"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    assert export_main([str(ckpt), str(out), "--inference-batch-size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "inference    net.0: " in printed and "inference    net.2: " in printed
    recipe = read_sparse_metadata(out)["user"]["inference_recipe"]
    assert recipe["batch_size"] == 64 and [layer["name"] for layer in recipe["layers"]] == ["net.0", "net.2"]
    json.dumps(recipe)  # data only
    fresh = TinyClassifier(in_features=64, hidden=128)
    fast = load_inference(fresh.net, str(out), example_input=torch.randn(2, 64), prefix="net.")
    assert sorted(inference_report(fast).sparse_names()) == sorted(n.removeprefix("net.") for n in recipe["csr"])
    for name in recipe["csr"]:  # each CSR layer with the kernel timed faster, printed and replayed
        kernel = recipe["kernels"][name]
        assert f"inference    {name}: " in printed and f"-> csr, {kernel} kernel (" in printed
        assert fast.get_submodule(name.removeprefix("net.")).kernel == kernel
    x = torch.randn(5, 64)
    with torch.inference_mode():
        assert torch.allclose(fast(x), model.net(x), atol=1e-5)


def test_export_cli_refuses_a_bad_batch_size(tmp_path, capsys) -> None:
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": TinyClassifier().state_dict()}, ckpt)
    assert export_main([str(ckpt), str(tmp_path / "o.lcps"), "--inference-batch-size", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --inference-batch-size must be a positive integer") and err.count("\n") == 1


def test_bench_inference_smoke(tmp_path) -> None:
    import runpy
    import sys
    from pathlib import Path

    out = tmp_path / "bench.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_inference.py"
    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = [str(script), "--smoke", "--out", str(out)]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(script), run_name="__main__")
    finally:  # the benchmark sets the thread count: give the test session its own back
        sys.argv = argv
        torch.set_num_threads(threads)
    assert done.value.code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["threads"]) for r in rows] == [(1, 1), (32, 1)]
    assert all(r["max_abs_diff"] < 1e-4 and r["dense_ms"] > 0 and r["model_bytes_dense"] > 0 for r in rows)


def _sparse_mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    with torch.no_grad():
        for layer in (net[0], net[2]):
            layer.weight.mul_(torch.rand_like(layer.weight) < 0.1)
    return net


def _fake_timer(penalty: float = 0.0):
    """Seconds per call from the layer kinds: dense Linear 2 ms, a CSR layer 1 ms, plus ``penalty`` for a whole
    model holding any CSR layer (what a layout change can cost the layers after it)."""

    def timer(module: torch.nn.Module, x: torch.Tensor) -> float:
        kinds = [type(m).__name__ for m in module.modules()]
        sparse = sum("Sparse" in k for k in kinds)
        dense = sum(k in ("Linear", "FeatureMajorLinear") for k in kinds)
        return 2e-3 * dense + 1e-3 * sparse + (penalty if sparse and len(kinds) > 1 else 0.0)

    return timer


def test_the_end_to_end_check_is_the_measurement_when_it_kept_every_csr_layer(monkeypatch) -> None:
    import lightning_clipprune.export.latency as latency

    def no_second_timing(*args, **kwargs):
        raise AssertionError("timed the same two models twice")

    monkeypatch.setattr(latency, "compare_latency", no_second_timing)
    result = measure_inference(_sparse_mlp(), torch.randn(4, 64), batch_size=32, rounds=1, timer=_fake_timer())
    assert result["csr_layers"] == 2
    assert result["dense_ms"] == pytest.approx(4.0) and result["inference_ms"] == pytest.approx(2.0)


def test_layers_put_back_by_the_end_to_end_check_leave_no_reused_timing() -> None:
    from lightning_clipprune.export import to_inference

    x = torch.randn(4, 64)
    kept = inference_report(to_inference(_sparse_mlp(), example_input=x, rounds=1, timer=_fake_timer()))
    assert kept.end_to_end == pytest.approx((4e-3, 2e-3))
    back = inference_report(to_inference(_sparse_mlp(), example_input=x, rounds=1, timer=_fake_timer(penalty=1.0)))
    assert back.sparse_names() == [] and back.end_to_end is None
    result = measure_inference(_sparse_mlp(), x, rounds=1, timer=_fake_timer(penalty=1.0))
    assert result["csr_layers"] == 0 and result["speedup"] == 1.0


def test_the_end_of_fit_latency_line_takes_short_samples(tmp_path, monkeypatch) -> None:
    import lightning_clipprune.export.latency as latency

    seen: dict = {}
    real = latency.measure_inference

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(latency, "measure_inference", spy)
    logger = SparsityLogger(inference_latency=True)
    _fit(tmp_path, logger)
    assert logger.inference_latency is not None
    # samples of at least 2 ms, 3 rounds, cost LeNet-300-100 about 0.13 s at the end of every fit
    assert seen["rounds"] <= 3 and seen["timer"].keywords["min_seconds"] < 2e-3


def test_call_timer_refuses_a_non_positive_duration() -> None:
    from lightning_clipprune.export._timing import call_timer

    with pytest.raises(ValueError, match="min_seconds"):
        call_timer(0.0)


def test_printing_the_inference_report_gives_one_line_per_layer() -> None:
    from torch import nn

    from lightning_clipprune import to_inference

    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    with torch.no_grad():
        net[0].weight[torch.rand(32, 16, generator=torch.Generator().manual_seed(0)) < 0.9] = 0
    text = str(inference_report(to_inference(net, example_input=torch.randn(2, 16), compact=False, rounds=1)))
    lines = text.splitlines()
    assert lines[1].split()[:2] == ["layer", "sparsity"] and len(lines) == 4
    assert lines[2].startswith("0 ") and lines[3].startswith("2 ") and "min_sparsity" in lines[3]
