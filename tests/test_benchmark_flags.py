"""The benchmark scripts' flags: nothing a user passes is silently dropped, and nothing replays a stale result.

Fast: the scripts are imported from ``benchmarks/`` (as in ``tests/test_benchmarks.py``) and their argument
checks called directly; where ``main`` runs, the measuring function is replaced by a stub, so no model trains
and no timing runs.

- ``bench_vs_lightning.py``: a Hydra override of a group the script does not instantiate (``trainer.*``,
  ``prune.*``, ``seed``, ...) is refused before any run; the overrides are part of the JSON cache key (a run
  recorded without an ``overrides`` field counts as ``[]``), so other overrides train instead of replaying.
- ``bench_prune_step.py``: ``--out`` writes elsewhere than the tracked results file (still the default); a link
  or a non-regular file (``/dev/null``) is refused before any timing, and every script's writer refuses them.
- ``bench_inference.py``: ``--smoke`` keeps the ``--threads`` given; an ``--only`` matching no model exits 2
  with one line naming the models it accepts.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _load(path: Path) -> ModuleType:
    name = f"_benchmark_{path.stem}"  # the name tests/test_benchmarks.py uses: one module per session
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the scripts set the thread count: give the session its own back


@pytest.fixture(autouse=True)
def keep_log_levels():
    """The scripts quieten Lightning's loggers: give later tests (which read Lightning's info lines) theirs back."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning_clipprune")]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


# ---------------------------------------------------------------- bench_vs_lightning.py


@pytest.fixture(scope="module")
def vsl() -> ModuleType:
    return _load(BENCH / "bench_vs_lightning.py")


@pytest.mark.parametrize(
    "override",
    ["+trainer.limit_train_batches=5", "trainer.max_epochs=2", "prune.sparsity=0.5", "clip.clip_val=0.5",
     "~prune", "seed=3", "+experiment=cifar", "data@other=mnist"],
)
def test_vs_lightning_refuses_overrides_it_would_ignore(vsl, override):
    with pytest.raises(ValueError, match=r"not honoured.*data\.\* and model\.\*") as err:
        vsl.check_overrides(["data.batch_size=256", override])
    message = str(err.value)
    assert repr(override) in message and "data.batch_size" not in message and "\n" not in message


def test_vs_lightning_accepts_data_and_model_overrides(vsl):
    vsl.check_overrides(["data.batch_size=512", "model.label_smoothing=0.1", "++model.optimizer.lr=0.05",
                         "model=lenet5", "data=mnist", "~data.eval_batch_size"])
    vsl.check_overrides([])


def test_vs_lightning_refuses_an_unparsable_override_in_one_line(vsl):
    with pytest.raises(ValueError, match="KEY=VALUE") as err:
        vsl.check_overrides(["data.batch_size"])
    assert "\n" not in str(err.value)


def _record(arm: str, seed: int, target: float | None, variant: str, epochs: int, overrides: list[str] | None,
            acc: float = 0.5) -> dict[str, Any]:
    r = {"experiment": "fashion_mnist", "arm": arm, "variant": variant, "seed": seed, "target": target,
         "epochs": epochs, "steps": 1, "val_acc": acc, "test_acc": acc, "sparsity": target or 0.0, "fit_s": 1.0}
    if overrides is not None:
        r["overrides"] = overrides
    return r


@pytest.fixture
def fake_runs(vsl, monkeypatch, keep_threads):
    """``run_arm`` replaced by a stub that records its calls (no training)."""
    calls: list[tuple[str, int, float | None, str, list[str]]] = []

    def run_arm(arm, seed, sparsity, args, variant=""):
        calls.append((arm, seed, sparsity, variant, list(args.override)))
        return _record(arm, seed, sparsity, variant, args.epochs or 10, list(args.override), acc=0.7)

    monkeypatch.setattr(vsl, "run_arm", run_arm)
    return calls


def _main(vsl, monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_vs_lightning.py", *argv])
    vsl.main()


def test_vs_lightning_refuses_an_ignored_override_before_any_run(vsl, fake_runs, monkeypatch, tmp_path, capsys):
    out = tmp_path / "b.json"
    with pytest.raises(SystemExit) as done:
        _main(vsl, monkeypatch, "--quick", "--no-dense", "--arms", "ours", "--json", str(out),
              "+trainer.limit_train_batches=5")
    assert str(done.value.code).startswith("error: Hydra override(s) '+trainer.limit_train_batches=5' not honoured")
    assert fake_runs == [] and not out.exists()


def test_vs_lightning_overrides_are_part_of_the_cache_key(vsl, fake_runs, monkeypatch, tmp_path, capsys):
    out = tmp_path / "b.json"
    old = _record("ours", 0, 0.9, vsl.RECOMMENDED, 1, None)  # recorded before overrides were kept: counts as []
    out.write_text(json.dumps([old]))
    quick = ("--quick", "--no-dense", "--arms", "ours", "--json", str(out))

    _main(vsl, monkeypatch, *quick)
    assert fake_runs == []  # the same run without overrides: replayed from the file
    capsys.readouterr()

    _main(vsl, monkeypatch, *quick, "data.batch_size=512")
    assert fake_runs == [("ours", 0, 0.9, vsl.RECOMMENDED, ["data.batch_size=512"])]  # trained, not replayed
    shown = capsys.readouterr().out
    assert "## fashion_mnist [data.batch_size=512]: all runs" in shown and "70.00" in shown and "50.00" not in shown

    _main(vsl, monkeypatch, *quick, "data.batch_size=512")
    assert len(fake_runs) == 1  # now it is in the file
    _main(vsl, monkeypatch, *quick, "data.batch_size=256")
    assert len(fake_runs) == 2

    runs = json.loads(out.read_text())  # every run kept, none overwritten by another's overrides
    assert sorted(tuple(r.get("overrides", [])) for r in runs) == [(), ("data.batch_size=256",), ("data.batch_size=512",)]


def test_vs_lightning_report_keeps_runs_of_other_overrides_apart(vsl, tmp_path, capsys):
    plain = [_record("ours", 0, 0.9, "v", 10, None, 0.8), _record("lightning", 0, 0.9, "", 10, [], 0.7)]
    other = [_record("ours", 0, 0.9, "v", 10, ["model.label_smoothing=0.1"], 0.123)]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(plain + other))
    runs = vsl.load_runs([str(path)], key=vsl.cache_key)
    assert len(runs) == 3
    assert len(vsl.load_runs([str(path)])) == 2  # the study's key (bench_regrow.py pairs by it) is unchanged
    vsl.report(runs, "v", "fashion_mnist")
    shown = capsys.readouterr().out
    assert "| ours | v | 0.9 | 0 | 80.00 (80.00)" in shown and "12.30" not in shown and "+10.00" in shown
    assert "label_smoothing" not in shown
    vsl.report(runs, "v", "fashion_mnist", ("model.label_smoothing=0.1",))
    shown = capsys.readouterr().out
    assert "## fashion_mnist [model.label_smoothing=0.1]: all runs" in shown and "12.30 (12.30)" in shown


# ---------------------------------------------------------------- bench_prune_step.py


@pytest.fixture(scope="module")
def prune_step() -> ModuleType:
    return _load(BENCH / "bench_prune_step.py")


def test_prune_step_out_writes_elsewhere_and_the_default_is_the_recorded_file(prune_step, monkeypatch, tmp_path,
                                                                             keep_threads):
    recorded = prune_step.RESULTS / "bench_prune_step_micro.json"
    assert prune_step.output_path(prune_step.parse_args(["--micro"])) == recorded
    assert prune_step.output_path(prune_step.parse_args(["--model", "resnet20", "--tag", "before"])) == (
        prune_step.RESULTS / "bench_prune_step_resnet20_before.json")
    before = recorded.read_bytes() if recorded.exists() else None
    monkeypatch.setattr(prune_step, "micro", lambda: {"stub": 1.0})  # no timing
    out = tmp_path / "sub" / "micro.json"
    prune_step.main(["--micro", "--out", str(out)])
    assert json.loads(out.read_text())["micro_us"] == {"stub": 1.0}
    assert (recorded.read_bytes() if recorded.exists() else None) == before
    assert prune_step.output_path(prune_step.parse_args(["--micro", "--json", str(out)])) == out  # the alias


def test_prune_step_refuses_tag_with_out_and_a_folder(prune_step, tmp_path):
    with pytest.raises(SystemExit, match="--tag 'x' only names the default results file"):
        prune_step.output_path(prune_step.parse_args(["--micro", "--tag", "x", "--out", str(tmp_path / "m.json")]))
    with pytest.raises(SystemExit, match="is a folder"):
        prune_step.output_path(prune_step.parse_args(["--micro", "--out", str(tmp_path)]))


def test_prune_step_refuses_a_link_or_a_device_before_any_timing(prune_step, monkeypatch, tmp_path):
    """`--out /dev/null` (as root) replaced the device with a regular file, and `--out LINK` wrote through it."""
    import os

    monkeypatch.setattr(prune_step, "micro", lambda: pytest.fail("timed before the destination was checked"))
    fifo, target, link = tmp_path / "fifo", tmp_path / "target.json", tmp_path / "link.json"
    os.mkfifo(fifo)  # a non-regular file, as a device is
    target.write_text("{}")
    link.symlink_to(target)
    for out, what in ((fifo, "not a regular file"), (link, "symbolic link")):
        with pytest.raises(SystemExit, match=f"--out: .*{what}"):
            prune_step.main(["--micro", "--out", str(out)])
    assert target.read_text() == "{}" and fifo.exists() and not fifo.is_file()


def test_the_scripts_json_writers_refuse_a_non_regular_file(vsl, tmp_path):
    import os

    from lightning_clipprune._io import RefusedPathError

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(RefusedPathError, match="not a regular file"):
        vsl.write_json(str(fifo), [])
    assert not fifo.is_file()


def test_prune_step_help_says_the_default_is_the_recorded_file(prune_step, capsys):
    with pytest.raises(SystemExit):
        prune_step.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--out PATH" in shown and "recorded, tracked results file" in shown


# ---------------------------------------------------------------- bench_inference.py


@pytest.fixture(scope="module")
def inference() -> ModuleType:
    return _load(BENCH / "bench_inference.py")


@pytest.fixture
def fake_rows(inference, monkeypatch, keep_threads):
    """``run_row`` replaced by a stub that records (model, batch, threads): no conversion, no timing."""
    calls: list[tuple[str, int, int]] = []

    def run_row(name, dense, make_x, batch, threads, rounds):
        calls.append((name, batch, threads))
        return {"model": name, "batch": batch, "threads": threads, "dense_ms": 1.0, "inference_ms": 1.0,
                "speedup": 1.0, "csr_layers": [], "compacted": {}, "kernels": {}, "model_bytes_dense": 1,
                "model_bytes_inference": 1, "forward_peak_bytes_dense": 1, "forward_peak_bytes_inference": 1}

    monkeypatch.setattr(inference, "run_row", run_row)
    return calls


def test_inference_smoke_keeps_the_threads_given(inference, fake_rows):
    assert inference.main(["--smoke", "--threads", "2"]) == 0
    assert [(b, t) for _, b, t in fake_rows] == [(1, 2), (32, 2)]
    fake_rows.clear()
    assert inference.main(["--smoke"]) == 0  # the tests' smoke run: one thread, as before
    assert [(b, t) for _, b, t in fake_rows] == [(1, 1), (32, 1)]
    plan = inference.plan
    parse = inference.argparse.Namespace
    assert plan(parse(smoke=True, rounds=None, threads=None, gpt2_wide=False)) == (3, (1, 32), (1,))
    assert plan(parse(smoke=True, rounds=7, threads=[1, 2], gpt2_wide=False)) == (7, (1, 32), (1, 2))
    assert plan(parse(smoke=False, rounds=None, threads=None, gpt2_wide=False)) == (15, (1, 256), (1, 2))


@pytest.mark.parametrize(("argv", "names"), [
    (["--smoke", "--only", "ResNet"], ["'LeNet-300-100 95 %'"]),  # the README's filter under --smoke
    (["--only", "Resnet", "--threads", "1"], ["'LeNet-300-100 90 %'", "'ResNet-20 channels 50 % (compacted)'"]),
])
def test_inference_only_matching_nothing_exits_nonzero_naming_the_models(inference, fake_rows, capsys, argv, names):
    assert inference.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --only {argv[argv.index('--only') + 1]!r} matches no model name")
    assert err.count("\n") == 1 and all(n in err for n in names)
    assert ("under --smoke" in err) == ("--smoke" in argv)
    assert fake_rows == []


def test_inference_refuses_a_thread_count_below_one(inference, fake_rows, capsys):
    assert inference.main(["--smoke", "--threads", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --threads must be positive integers, got 0")
    assert fake_rows == []
