"""A run folder and a sweep folder are files from somewhere else: the search and report CLIs run no code from
them, read them bounded, refuse crafted files in one line, and never write through a planted link."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from lightning_clipprune.app.report import collect
from lightning_clipprune.app.report import main as report_main
from lightning_clipprune.app.rundir import RUN_RECORD, read_run_overrides
from lightning_clipprune.app.search_cli import compose_run_config, run_overrides
from lightning_clipprune.app.search_cli import main as search_main
from lightning_clipprune.app.targets import (
    ALLOWED_TARGETS,
    UntrustedConfigError,
    check_overrides,
    check_targets,
)
from lightning_clipprune.run import config_dir, train

REPO = Path(__file__).resolve().parents[1]
RUN_OVERRIDES = ["~prune", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                 "callbacks.sparsity.print_table=false", "model.net.hidden=[32]"]
FAST_SEARCH = ["--grid", "0.5", "--resolution", "0.5", "--no-test"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real one-epoch run of the app (digits, small MLP): run_config.json, results.json, checkpoints/."""
    from hydra import compose, initialize_config_dir

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={run_dir}", *RUN_OVERRIDES])
    train(cfg, RUN_OVERRIDES)
    return run_dir


@pytest.fixture
def run(trained_run: Path, tmp_path: Path) -> Path:
    """A copy of the trained run folder, free to be crafted."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns(".clipprune.lock"))
    return copy


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: ")
    return err


def write_record(run: Path, overrides: list[str]) -> None:
    (run / RUN_RECORD).write_text(json.dumps({"format": 1, "overrides": overrides}))


# ---------------------------------------------------------------------------------------------------------
# 1. no code from a run folder
# ---------------------------------------------------------------------------------------------------------


def test_every_target_of_the_suites_configs_is_allowed() -> None:
    targets = set()
    for path in (REPO / "conf").rglob("*.yaml"):
        targets |= set(re.findall(r"^\s*_target_:\s*([\w.]+)", path.read_text(), flags=re.MULTILINE))
    assert targets and targets <= ALLOWED_TARGETS, targets - ALLOWED_TARGETS


def evil_model_yaml(run: Path, marker: Path) -> str:
    """A YAML planted in the run folder that opens (creates) ``marker`` when instantiated; the group option
    that reaches it from conf/model/."""
    (run / "evil.yaml").write_text(yaml.safe_dump({"_target_": "builtins.open", "file": str(marker), "mode": "w"}))
    return "model=" + os.path.relpath(run / "evil", config_dir() / "model")


def test_the_planted_payload_would_run_without_the_checks(run: Path, tmp_path: Path) -> None:
    """Control: the payload of the tests below is real (composed and instantiated unchecked, it creates the file)."""
    import hydra
    from hydra import compose, initialize_config_dir

    marker = tmp_path / "control-marker"
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[evil_model_yaml(run, marker), f"output_dir={tmp_path}"])
    hydra.utils.instantiate(cfg.model).close()
    assert marker.exists()


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        (["model.net._target_=builtins.open", "+model.net.file=MARKER", "+model.net.mode=w"], "model.net._target_"),
        (["+model.net._args_=[MARKER]"], "model.net._args_"),
        (["+model.net._partial_=true"], "model.net._partial_"),
        (["++model._call_=false"], "model._call_"),
        (["+callbacks.evil={_target_: builtins.open, file: MARKER, mode: w}"], "callbacks.evil._target_"),
        (["+model.junk='${oc.decode:\"{_target_: builtins.open, file: MARKER, mode: w}\"}'"], "oc.decode"),
        (["EVIL_MODEL"], "is not one of the suite's model configs"),
    ],
)
def test_search_refuses_a_run_record_that_would_run_code(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, payload: list[str], named: str
) -> None:
    marker = tmp_path / "marker"
    overrides = [o.replace("MARKER", str(marker)) for o in payload]
    overrides = [evil_model_yaml(run, marker) if o == "EVIL_MODEL" else o for o in overrides]
    write_record(run, [*RUN_OVERRIDES, *overrides])
    assert search_main([str(run), *FAST_SEARCH]) == 1
    err = one_error_line(capsys)
    assert named in err
    if "._target_" not in named or "callbacks" in named:  # refused on the override string: the file is named
        assert str(run / RUN_RECORD) in err or "oc.decode" in named
    assert not marker.exists() and not (run / "search").exists()


def test_check_targets_walks_the_composed_tree_whatever_put_the_value_there(run: Path, tmp_path: Path) -> None:
    """A _target_ smuggled in by a group option (no override names _target_) is refused on the composed config."""
    from hydra import compose, initialize_config_dir

    marker = tmp_path / "marker"
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[evil_model_yaml(run, marker), f"output_dir={tmp_path}"])
    with pytest.raises(UntrustedConfigError, match=r"^model\._target_='builtins.open': not one of the suite's own"):
        check_targets(cfg)
    # nested in a list, and through an interpolation to another key
    nested = OmegaConf.create({"a": {"b": [{"_target_": "os.system"}]}})
    with pytest.raises(UntrustedConfigError, match=r"^a\.b\[0\]\._target_='os.system'"):
        check_targets(nested)
    interpolated = OmegaConf.create({"evil": "posix.system", "m": {"_target_": "${evil}"}})
    with pytest.raises(UntrustedConfigError, match=r"^m\._target_='posix.system'"):
        check_targets(interpolated)
    assert not marker.exists()


def test_check_targets_admits_the_suites_configs_and_safe_resolvers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPPRUNE_TEST_NAME", "from-the-env")
    for experiment in sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml")):
        cfg = compose_run_config([f"+experiment={experiment}", "name=${oc.env:CLIPPRUNE_TEST_NAME}"], tmp_path)
        assert cfg.name == "from-the-env"  # resolved: what was checked is what is built
        assert "${" not in json.dumps(OmegaConf.to_container(cfg))
    with pytest.raises(UntrustedConfigError, match="resolver 'python_version' is not allowed"):
        check_targets(OmegaConf.create({"x": "${python_version:}"}))


def test_check_overrides_refuses_group_paths_and_sweeps() -> None:
    assert check_overrides(["model=lenet5", "~prune", "+experiment=cifar", "prune.sparsity=0.5"], source="f") == [
        "model=lenet5", "~prune", "+experiment=cifar", "prune.sparsity=0.5"]
    for bad, fragment in [("model=../../../tmp/x", "model configs"), ("data=/etc/passwd", "data configs"),
                          ("prune.sparsity=0.1,0.2", "a sweep"), ("model.net@_target_=x", "_target_"),
                          ("model.net={a: {_convert_: all}}", "model.net.a._convert_"), ("a=[", "cannot read")]:
        with pytest.raises(UntrustedConfigError, match=re.escape(fragment)):
            check_overrides([bad], source="RUN/run_config.json")


@pytest.mark.parametrize("where", [".hydra", "results.json"])
def test_older_run_folders_are_checked_the_same_way(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, where: str) -> None:
    """Without run_config.json the search reads .hydra/overrides.yaml, else results.json: same checks."""
    marker = tmp_path / "marker"
    (run / RUN_RECORD).unlink()
    payload = [*RUN_OVERRIDES, "model.net._target_=builtins.open", f"+model.net.file={marker}"]
    if where == ".hydra":
        (run / ".hydra").mkdir()
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(payload))
    else:
        results = json.loads((run / "results.json").read_text())
        (run / "results.json").write_text(json.dumps({**results, "overrides": payload}))
    assert search_main([str(run), *FAST_SEARCH]) == 1
    err = one_error_line(capsys)
    assert "model.net._target_" in err and ("overrides.yaml" in err if where == ".hydra" else "results.json" in err)
    assert not marker.exists()


def crafted_json_files() -> dict[str, object]:
    return {
        "a list": "[1, 2]",
        "overrides a string": json.dumps({"overrides": "model=mlp"}),
        "overrides with a mapping": json.dumps({"overrides": [{"_target_": "os.system"}]}),
        "deep nesting": "[" * 200_000 + "]" * 200_000,
        "bad json": "{'val_acc': 0.9",
        "NaN": '{"overrides": [NaN]}',
        "too big": json.dumps({"overrides": ["x" * 100] * 60_000}),
        "not utf-8": b"\xff\xfe{}",
        "a folder": "DIR",
        "a link to /dev/zero": Path("/dev/zero"),
        "a FIFO": "FIFO",
    }


def plant(path: Path, content: object) -> None:
    if content == "DIR":
        path.mkdir()
    elif content == "FIFO":
        os.mkfifo(path)
    elif isinstance(content, Path):
        path.symlink_to(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(str(content))


def test_crafted_results_json_is_one_line_for_the_search(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (run / RUN_RECORD).unlink()
    for name, content in crafted_json_files().items():
        target = run / "results.json"
        if target.is_dir() and not target.is_symlink():
            target.rmdir()
        else:
            target.unlink(missing_ok=True)
        plant(target, content)
        assert search_main([str(run), *FAST_SEARCH]) == 1, name
        err = one_error_line(capsys)
        assert "results.json" in err, (name, err)


def test_a_crafted_run_record_is_refused_not_bypassed(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A broken run_config.json is an error, never a reason to fall back to the other files."""
    for name, content in crafted_json_files().items():
        record = run / RUN_RECORD
        if record.is_dir() and not record.is_symlink():
            record.rmdir()
        else:
            record.unlink(missing_ok=True)
        plant(record, content)
        with pytest.raises(ValueError, match=re.escape(str(record))):
            read_run_overrides(run)
        assert search_main([str(run), *FAST_SEARCH]) == 1, name
        assert RUN_RECORD in one_error_line(capsys)


# ---------------------------------------------------------------------------------------------------------
# 2. the search on a crafted checkpoint
# ---------------------------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoints(good: Path, tmp_path: Path, marker: Path) -> dict[str, object]:
    data = good.read_bytes()
    state = torch.load(good, map_location="cpu", weights_only=True)["state_dict"]
    transposed = {k: v.t().contiguous() if v.ndim == 2 else v for k, v in state.items()}
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}

    def saved(obj: object) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"state_dict": _Payload(marker)}, protocol=2))
        z.writestr("archive/version", "3\n")
    return {
        "truncated": data[: len(data) // 2],
        "truncated header": data[:100],
        "not a zip": os.urandom(4096),
        "zip with an os.system pickle": zipped.getvalue(),
        "torch.save of an os.system payload": saved({"state_dict": _Payload(marker)}),
        "plain pickle of a payload": pickle.dumps(_Payload(marker)),
        "another model": saved({"state_dict": {"layer.weight": torch.zeros(3, 3)}}),
        "transposed shapes": saved({"state_dict": transposed}),
        "NaN weights": saved({"state_dict": nan}),
        "plain state dict, other keys": saved({"w": torch.ones(2)}),
        "a list": saved([torch.ones(2)]),
        "state_dict a list": saved({"state_dict": [1, 2]}),
        "state_dict holds strings": saved({"state_dict": dict.fromkeys(state, "x")}),
        "empty": b"",
        "a folder": "DIR",
        "a link to /dev/zero": Path("/dev/zero"),
    }


def test_crafted_checkpoints_are_one_line_and_run_nothing(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "marker"
    good = run / "checkpoints" / "final.ckpt"
    crafted = crafted_checkpoints(good, tmp_path, marker)
    for name, content in crafted.items():
        ckpt = tmp_path / "ckpts" / name.replace(" ", "_").replace("/", "_") / "checkpoints" / "final.ckpt"
        ckpt.parent.mkdir(parents=True)
        shutil.copy(run / RUN_RECORD, ckpt.parent.parent / RUN_RECORD)
        plant(ckpt, content)
        assert search_main([str(ckpt), *FAST_SEARCH]) == 1, name
        err = one_error_line(capsys)
        assert "final.ckpt" in err, (name, err)
        assert not marker.exists(), name


def test_a_plain_state_dict_of_the_runs_model_loads(run: Path, tmp_path: Path) -> None:
    from lightning_clipprune.app.build import instantiate
    from lightning_clipprune.app.search_cli import load_weights

    state = torch.load(run / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    torch.save(state, tmp_path / "bare.pt")
    model = instantiate(compose_run_config(run_overrides(run), tmp_path).model, "model")
    load_weights(model, tmp_path / "bare.pt")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------------
# 4. the run's own record of its config
# ---------------------------------------------------------------------------------------------------------


def test_a_refused_second_run_cannot_change_what_the_search_reads(run: Path, capsys: pytest.CaptureFixture) -> None:
    from hydra import compose, initialize_config_dir

    from lightning_clipprune.app.checks import ConfigError

    record = (run / RUN_RECORD).read_bytes()
    assert json.loads(record)["overrides"] == RUN_OVERRIDES
    second = ["model=lenet5", "trainer.max_epochs=1"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={run}", *second])
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg, second)
    # what Hydra does for the refused run before it starts: rewrite .hydra/overrides.yaml
    (run / ".hydra").mkdir(exist_ok=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(second))
    assert (run / RUN_RECORD).read_bytes() == record
    assert run_overrides(run) == RUN_OVERRIDES
    assert search_main([str(run), *FAST_SEARCH]) == 0
    summary = json.loads((run / "search" / "search.json").read_text())
    assert "model.net.hidden=[32]" in summary["commands"][0] and "lenet5" not in summary["commands"][0]
    # the run's overrides, shell-quoted: the command pastes back into a shell as exactly these words
    words = shlex.split(summary["commands"][0])
    assert words[3 : 3 + len(RUN_OVERRIDES) - 1] == RUN_OVERRIDES[1:]


# ---------------------------------------------------------------------------------------------------------
# 5. no write follows a planted link
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("planted", ["link", "file"])
def test_a_planted_search_link_or_file_is_refused_and_its_target_untouched(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, planted: str
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "search.json").write_text("precious")
    if planted == "link":
        (run / "search").symlink_to(elsewhere, target_is_directory=True)
    else:
        (run / "search").write_text("a file")
    assert search_main([str(run), *FAST_SEARCH]) == 1
    err = one_error_line(capsys)
    assert str(run / "search") in err and ("symbolic link" in err if planted == "link" else "not a folder" in err)
    assert [p.name for p in elsewhere.iterdir()] == ["search.json"] and (elsewhere / "search.json").read_text() == "precious"


def test_planted_links_inside_the_search_folder_are_never_written_through(run: Path, tmp_path: Path) -> None:
    """The old fixed temporary names and the final names: a link there never has its target written."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = run / "search"
    out.mkdir()
    for name in ("search.tmp.png", "search.csv.tmp", "pruned.ckpt.tmp", ".summary.tmp.csv"):
        (out / name).symlink_to(victim)
    assert search_main([str(run), *FAST_SEARCH]) == 0
    assert victim.read_text() == "precious"
    (out / "search.csv").unlink()
    (out / "search.csv").symlink_to(victim)
    search_main([str(run), *FAST_SEARCH])
    assert victim.read_text() == "precious"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]


# ---------------------------------------------------------------------------------------------------------
# 3. the report on crafted job folders
# ---------------------------------------------------------------------------------------------------------


def good_job(root: Path, name: str, sparsity: float) -> None:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    overrides = [f"prune.sparsity={sparsity}"]
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "results.json").write_text(json.dumps({"overrides": overrides, "val_acc": 0.9, "sparsity": sparsity,
                                                  "params_total": 100, "params_nonzero": 50, "wall_time_s": 1.0}))


def crafted_jobs() -> dict[str, tuple[str, object]]:
    """name -> (file inside the job folder, content)."""
    base = {"val_acc": 0.9, "sparsity": 0.5, "params_total": 100, "params_nonzero": 50}
    return {
        "string val_acc": ("results.json", json.dumps({**base, "val_acc": "0.9"})),
        "bool sparsity": ("results.json", json.dumps({**base, "sparsity": True})),
        "val_acc above 1": ("results.json", json.dumps({**base, "val_acc": 97.5})),
        "float count": ("results.json", json.dumps({**base, "params_total": 1.5})),
        "NaN": ("results.json", '{"val_acc": NaN}'),
        "huge integer": ("results.json", '{"params_total": 1' + "0" * 5000 + "}"),
        "deep nesting": ("results.json", '{"a": ' + "[" * 200_000 + "]" * 200_000 + "}"),
        "a list": ("results.json", json.dumps([base])),
        "overrides not a list": ("results.json", json.dumps({**base, "overrides": {"a": 1}})),
        "bad json": ("results.json", "{"),
        "a folder": ("results.json", "DIR"),
        "a link to /dev/urandom": ("results.json", Path("/dev/urandom")),
        "a FIFO": ("results.json", "FIFO"),
        "too big": ("results.json", " " * (5 * 2**20) + "{}"),
        "bad yaml": (".hydra/overrides.yaml", "- [unclosed\n"),
        "yaml mapping": (".hydra/overrides.yaml", "a: 1\n"),
        "yaml deep": (".hydra/overrides.yaml", "[" * 5000 + "]" * 5000),
        "yaml folder": (".hydra/overrides.yaml", "DIR"),
        "yaml billion laughs": (".hydra/overrides.yaml",
                                "- &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
                                    f"- &{c} [" + ", ".join([f"*{p}"] * 9) + "]\n"
                                    for p, c in zip("abcdefgh", "bcdefghi", strict=True))),
    }


def test_a_crafted_job_is_one_warning_and_the_sweep_still_gets_its_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for i, (name, (file, content)) in enumerate(crafted_jobs().items()):
        root = tmp_path / f"sweep{i}"
        good_job(root, "0", 0.5)
        good_job(root, "1", 0.9)
        target = root / "1" / file
        target.unlink()
        plant(target, content)
        assert report_main([str(root), "--quiet"]) == 0, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("warning: job 1") and str(target) in err, (name, err)
        jobs = collect(root, warn=lambda line: None)
        expected = "ok" if file.startswith(".hydra") else "unreadable"
        assert [j.status for j in jobs] == ["ok", expected], name
        assert (root / "summary.md").is_file() and (root / "accuracy_vs_sparsity.png").is_file()
        assert not [p.name for p in root.iterdir() if "tmp" in p.name], name


def test_a_sweep_with_nothing_usable_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "sweep"
    good_job(root, "0", 0.5)
    (root / "0" / "results.json").write_text('{"val_acc": "high"}')
    assert report_main([str(root), "--quiet"]) == 1
    err = one_error_line(capsys)
    assert "no job" in err and str(root / "0" / "results.json") in err
    (tmp_path / "empty").mkdir()
    assert report_main([str(tmp_path / "empty"), "--quiet"]) == 1
    assert "no job folders" in one_error_line(capsys)


@pytest.mark.parametrize("planted", ["folder", "link"])
def test_report_outputs_never_replace_a_folder_or_write_through_a_link(
    tmp_path: Path, capsys: pytest.CaptureFixture, planted: str
) -> None:
    root = tmp_path / "sweep"
    good_job(root, "0", 0.5)
    victim = tmp_path / "victim.csv"
    victim.write_text("precious")
    if planted == "folder":
        (root / "summary.csv").mkdir()
    else:
        (root / "summary.csv").symlink_to(victim)
    code = report_main([str(root), "--quiet"])
    if planted == "folder":
        assert code == 1 and "summary.csv" in one_error_line(capsys)
        assert (root / "summary.csv").is_dir()
    assert victim.read_text() == "precious"
    assert not [p.name for p in root.iterdir() if "tmp" in p.name]


def test_a_symlinked_job_folder_is_left_out(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "sweep"
    good_job(root, "0", 0.5)
    good_job(tmp_path / "outside", "x", 0.9)
    (root / "1").symlink_to(tmp_path / "outside" / "x", target_is_directory=True)
    assert report_main([str(root), "--quiet"]) == 0
    assert "symbolic link" in capsys.readouterr().err
    assert [j.name for j in collect(root, warn=lambda line: None)] == ["0"]


def test_results_objective_refuses_a_crafted_results_json(tmp_path: Path) -> None:
    from hydra.core.utils import JobReturn, JobStatus

    from lightning_clipprune.app.hydra_callbacks import ResultsObjective

    config = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(tmp_path)}}})
    for content in ('{"val_acc": "0.9", "sparsity": 0.5}', "[]", '{"val_acc": 0.9}'):
        (tmp_path / "results.json").write_text(content)
        ret = JobReturn(status=JobStatus.COMPLETED, _return_value=None)
        ResultsObjective().on_job_end(config, ret)
        assert ret.status == JobStatus.FAILED and isinstance(ret._return_value, ValueError)
        assert "results.json" in str(ret._return_value)


# ---------------------------------------------------------------------------------------------------------
# the command lines, as a user runs them
# ---------------------------------------------------------------------------------------------------------


def test_search_and_report_cli_exit_1_with_one_line(run: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    write_record(run, [*RUN_OVERRIDES, evil_model_yaml(run, marker)])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "lightning_clipprune.search", str(run)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "model=" in proc.stderr and "is not one of the suite's model configs" in proc.stderr
    assert not marker.exists()
    root = tmp_path / "sweep"
    good_job(root, "0", 0.5)
    (root / "0" / "results.json").write_text("[" * 100_000)
    proc = subprocess.run([sys.executable, "-m", "lightning_clipprune.report", str(root)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "results.json" in proc.stderr and "Traceback" not in proc.stderr
    assert not [p.name for p in root.iterdir() if "tmp" in p.name]


def test_a_planted_lock_file_is_refused_in_one_line_and_never_read_through(tmp_path: Path) -> None:
    """A FIFO would hang the run and a link to /dev/zero fill its memory: both are refused without reading."""
    from lightning_clipprune.app.checks import ConfigError
    from lightning_clipprune.app.rundir import LOCK_NAME, claim_output_dir, release_output_dir

    lock = tmp_path / LOCK_NAME
    for content in ("FIFO", Path("/dev/zero")):
        plant(lock, content)
        with pytest.raises(ConfigError, match=re.escape(str(lock)) + ".*not a lock file of the suite; remove it"):
            claim_output_dir(tmp_path)
        lock.unlink()
    lock.write_text("4194304999\n")  # a dead run's lock: taken over
    assert claim_output_dir(tmp_path) == lock
    release_output_dir(tmp_path)
    assert not lock.exists()


def test_a_crafted_optuna_file_is_one_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "sweep"
    good_job(root, "0", 0.5)
    for content in ("- a\n- b\n", "solutions: 3\n", "solutions: [1, 2]\n", "{", "DIR"):
        target = root / "optimization_results.yaml"
        if target.is_dir():
            target.rmdir()
        target.unlink(missing_ok=True)
        plant(target, content)
        assert report_main([str(root), "--quiet"]) == 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Optuna Pareto front is not shown" in err and str(target) in err, err
    good = {"solutions": [{"params": {"x": "a|b\nc"}, "values": [0.9, 0.5]}]}
    (root / "optimization_results.yaml").rmdir()
    (root / "optimization_results.yaml").write_text(yaml.safe_dump(good))
    assert report_main([str(root), "--quiet"]) == 0
    md = (root / "summary.md").read_text()
    assert '| {"x": "a\\|b\\nc"} | [0.9, 0.5] |' in md


def guard_config(run_dir: Path, ckpt_path: str | None = None):
    return OmegaConf.create({"ckpt_path": ckpt_path, "hydra": {"run": {"dir": str(run_dir)}, "job": {"name": "run"}}})


def test_run_folder_guard_refuses_before_hydra_writes(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """At on_run_start (before Hydra writes .hydra/ and the log): a held or finished folder, planted links."""
    from lightning_clipprune.app.hydra_callbacks import RunFolderGuard

    guard = RunFolderGuard()
    guard.on_run_start(guard_config(tmp_path / "fresh"))  # a new folder: nothing to refuse, nothing created
    assert not (tmp_path / "fresh").exists()
    guard.on_run_start(guard_config(run, str(run / "checkpoints" / "final.ckpt")))  # resuming in its own folder
    with pytest.raises(SystemExit) as exit_info:
        guard.on_run_start(guard_config(run))
    assert exit_info.value.code == 1 and "already holds a run" in one_error_line(capsys)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for planted in (run / "run.log", run / ".hydra"):
        plant(planted, victim)
        with pytest.raises(SystemExit):
            guard.on_run_start(guard_config(run, str(run / "checkpoints" / "final.ckpt")))
        assert str(planted) in one_error_line(capsys) and victim.read_text() == "precious"
        planted.unlink()


@pytest.mark.slow
def test_a_refused_second_cli_run_leaves_the_first_runs_hydra_files(tmp_path: Path) -> None:
    """End to end: with the guard, Hydra never rewrites the first run's .hydra/overrides.yaml."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run_dir = tmp_path / "run"
    first = subprocess.run([sys.executable, "-m", "lightning_clipprune.run", "debug=smoke", f"hydra.run.dir={run_dir}"],
                           capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    before = (run_dir / ".hydra" / "overrides.yaml").read_bytes()
    second = subprocess.run(
        [sys.executable, "-m", "lightning_clipprune.run", "debug=smoke", "model=lenet300", f"hydra.run.dir={run_dir}",
         "+hydra.callbacks.run_folder_guard._target_=lightning_clipprune.app.hydra_callbacks.RunFolderGuard"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert second.returncode == 1 and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert "already holds a run" in second.stderr
    assert (run_dir / ".hydra" / "overrides.yaml").read_bytes() == before
    assert json.loads((run_dir / RUN_RECORD).read_text())["overrides"] == ["debug=smoke"]
