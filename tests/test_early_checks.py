"""A wrong value on the command line is answered before torch and Lightning load (issue 26: start-up).

``app.checks.check_config(cfg, optimizer=False)`` imports neither; every case here must be refused by it,
with the words the component itself uses when it is built (the two are compared with the early check
switched off; the values handed to Lightning, torch and the app's networks, ``COMPONENTS``, in the app's words
naming the key), and the torch-free names it checks against must be the library's (and Lightning's).
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import lightning_clipprune.posttrain.criterion  # noqa: F401  (registers "obs": the callback's message names it)
from lightning_clipprune import _choices
from lightning_clipprune.app import checks
from lightning_clipprune.run import ConfigError, config_dir, train

pytestmark = pytest.mark.usefixtures("offline")

# (overrides, whether the component's own message at build time is the same line)
EARLY: list[tuple[tuple[str, ...], bool]] = [
    (("clip.algorithm=median",), True),
    (("clip.clip_val=0",), True),
    (("clip.clip_val=null",), True),
    (("clip=zclip", "clip.clip_val=-2"), True),
    (("clip=autoclip", "clip.clip_val=0"), True),
    (("clip=agc", "clip.clip_val=-1"), True),
    (("prune.scope=everywhere",), True),
    (("prune.ranking=snip",), True),
    (("prune.pattern=3:2",), True),
    (("prune.pattern=2:5",), True),
    (("prune.pattern=2:4", "prune.threshold=0.1", "prune.sparsity=null"), True),
    (("prune=threshold", "prune.max_layer_sparsity=0.9"), True),  # a ceiling a threshold never applies
    (("prune.criterion=random",), False),  # the build lists every registered criterion, tests register more
    (("prune.max_layer_sparsity=off",), True),
    (("prune.max_layer_sparsity=2",), True),
    (("prune.ranking=raw", "prune.max_layer_sparsity=0.5"), True),
    (("prune.sparsity=null",), True),
    (("prune.start=0.6", "prune.end=0.5"), True),
    (("prune=regrow", "prune.regrow.fraction=2"), True),
    (("prune=regrow", "prune.regrow.method=grasp"), True),
    (("prune=regrow", "prune.regrow.interval=0"), True),
    (("model.lr_schedule=exponential",), True),
    (("model.warmup_fraction=1",), True),
    (("model.label_smoothing=-0.1",), True),
    (("data.batch_size=0",), False),
    (("data.eval_batch_size=0",), False),
    (("data.val_fraction=1.5",), False),
    (("trainer.precision=17",), False),
    (("+experiment=fashion_mnist", "data.root=/nonexistent/folder"), False),
    (("callbacks.sparsity.inference_latency=maybe",), True),
    (("callbacks.sparsity.print_table=3",), True),
    (("callbacks.sparsity.per_layer=maybe",), True),
    (("+callbacks.sparsity.latency_batch_size=0",), True),
    (("callbacks.sparsity.log_every_n_steps=-1",), True),
]

# Valid settings the early check must let through.
ACCEPTED: list[tuple[str, ...]] = [
    ("prune=nm24",),
    ("prune=channel",),
    ("prune=regrow",),
    ("prune=threshold", "prune.threshold=0.01"),
    ("clip=autoclip",),
    ("clip=zclip", "clip.clip_val=null"),
    ("clip=agc",),
    ("clip=value",),
    ("trainer.precision=bf16-mixed",),
    ("trainer.precision=32",),
    ("prune.ranking=raw", "prune.max_layer_sparsity=0.95"),
    ("prune.criterion=taylor",),
    ("model.lr_schedule=constant",),
    ("callbacks.sparsity.inference_latency=true",),
    ("callbacks.sparsity.inference_latency=false",),
    ("+callbacks.sparsity.latency_batch_size=256",),
    ("~callbacks.sparsity",),
    ("callbacks.checkpoint.save_top_k=3", "+callbacks.checkpoint.mode=max", "callbacks.checkpoint.monitor=val/acc"),
    ("callbacks.checkpoint.save_last=link", "+callbacks.checkpoint.every_n_epochs=2"),
    ("~callbacks.checkpoint",),
    ("trainer.devices=auto", "trainer.accelerator=cpu", "trainer.deterministic=warn"),
    ("trainer.devices=-1",),
    ("+trainer.fast_dev_run=true", "+trainer.gradient_clip_algorithm=norm"),
    ("trainer.devices=[0,1]", "trainer.accelerator=gpu"),
    ("trainer.devices='0,1'",),
    ("+model.optimizer.betas=[0.9,0.999]", "model.optimizer.nesterov=true"),
    ("model.net.hidden=[]",),
    ("+experiment=cifar", "model.net.depth=32", "model.net.shortcut=B"),
    ("+experiment=fashion_cnn", "model.net.image_size=12"),
]

# Values handed to Lightning, torch and the app's networks (app.component_checks): refused early in the app's
# words. Built, some failed in words naming neither key nor value (a string `save_top_k` or `lr`: "'<' not
# supported between instances of 'str' and ..."), and some trained as if `true` (`deterministic=maybe`,
# `nesterov=maybe`).
COMPONENTS: list[str] = [
    "callbacks.checkpoint.save_top_k=abc",
    "callbacks.checkpoint.save_top_k=-5",
    "callbacks.checkpoint.save_top_k=true",
    "+callbacks.checkpoint.every_n_epochs=-3",
    "+callbacks.checkpoint.every_n_train_steps=1.5",
    "+callbacks.checkpoint.mode=foo",
    "callbacks.checkpoint.monitor=3",
    "callbacks.checkpoint.save_last=maybe",
    "+callbacks.checkpoint.save_weights_only=maybe",
    "trainer.deterministic=maybe",
    "+trainer.foo=1",
    "+trainer.max_epoch=3",
    "trainer.accelerator=tpux",
    "trainer.devices=abc",
    "trainer.devices=0",
    "trainer.devices=1.5",
    "model.optimizer.lr=abc",
    "model.optimizer.momentum=-0.5",
    "model.optimizer.nesterov=maybe",
    "+model.optimizer.betas=[0.9,1.5]",
    "model.net.hidden=[0]",
    "model.net.hidden=[64.5]",
    "model.net.in_features=abc",
    "model.net.dropout=1",
    "ckpt_path=/nonexistent/last.ckpt",
    # the app's data modules: a flag such as `maybe` was read as true; a seed `abc` failed in torch's words
    "data.on_device=maybe",
    "+data.augment=maybe",
    "data.split_seed=abc",
    "data.seed=abc",
    "data.test_fraction=2",
    "name=[a,b]",  # trained, then results.json could not be written
]

def _compose(tmp_path: Path, overrides: tuple[str, ...]) -> typing.Any:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=[f"output_dir={tmp_path}", "debug=smoke", *overrides])


def _early(cfg: typing.Any) -> str:
    with pytest.raises((ConfigError, checks.DataNotFoundError)) as info:
        checks.check_config(cfg, optimizer=False)
    return str(info.value)


@pytest.mark.parametrize(("overrides", "same"), EARLY, ids=[" ".join(o) for o, _ in EARLY])
def test_refused_before_the_heavy_imports_in_the_components_words(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, overrides: tuple[str, ...], same: bool
) -> None:
    cfg = _compose(tmp_path, overrides)
    early = _early(cfg)
    values = [o.split("=", 1)[1] for o in overrides if "=" in o and not o.startswith(("prune=", "clip="))]
    assert "\n" not in early and any(v in early or (v == "null" and "None" in early) for v in values), early
    # the same config with the early check off: the component refuses it when it is built
    monkeypatch.setattr("lightning_clipprune.run.check_config", lambda *a, **k: None)
    with pytest.raises(ConfigError if same else Exception) as info:
        train(cfg, list(overrides))
    if same:
        assert str(info.value) == early
    else:
        assert any(v in str(info.value) for v in values), info.value
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("override", COMPONENTS)
def test_a_bad_value_for_lightning_torch_or_a_network_is_refused_early_naming_it(tmp_path: Path, override: str) -> None:
    early = _early(_compose(tmp_path, (override,)))
    key, value = override.lstrip("+").split("=", 1)
    assert "\n" not in early and early.startswith(f"{key}=") and value in early.replace(", ", ","), early


def test_the_trainers_arguments_are_read_from_lightnings_source_without_importing_it() -> None:
    import inspect

    from lightning.pytorch import Trainer

    from lightning_clipprune.app.component_checks import trainer_arguments

    assert trainer_arguments() == frozenset(inspect.signature(Trainer.__init__).parameters) - {"self"}


def test_a_misspelled_trainer_argument_names_the_nearest_one(tmp_path: Path) -> None:
    assert "did you mean trainer.max_epochs?" in _early(_compose(tmp_path, ("+trainer.max_epoch=3",)))


@pytest.mark.parametrize("overrides", ACCEPTED, ids=[" ".join(o) for o in ACCEPTED])
def test_valid_settings_pass_the_early_check(tmp_path: Path, overrides: tuple[str, ...]) -> None:
    checks.check_config(_compose(tmp_path, overrides), optimizer=False)


def test_the_torch_free_names_are_the_librarys() -> None:
    import lightning.fabric.connector as connector

    from lightning_clipprune import GradientClipCallback
    from lightning_clipprune.app.models import classifier
    from lightning_clipprune.clipping import CLIPPERS
    from lightning_clipprune.pruning import criteria, masks, ranking, regrow

    assert (_choices.SCOPES, _choices.PATTERNS) == (masks.SCOPES, masks.PATTERNS)
    assert (_choices.RANKINGS, _choices.BUDGET_RANKINGS) == (ranking.RANKINGS, ranking.BUDGET_RANKINGS)
    assert (_choices.CEILING, _choices.DEFAULT_RANKING) == (ranking.CEILING, ranking.DEFAULT_RANKING)
    assert _choices.CRITERIA == criteria.CRITERIA and set(checks._CRITERION_NAMES) <= set(criteria.criterion_names())
    assert _choices.REGROW_METHODS == regrow.REGROW_METHODS
    assert checks.LR_SCHEDULES == classifier.LR_SCHEDULES
    assert {name: cls.clip_val_option for name, cls in CLIPPERS.items()} == _choices.CLIP_BOUNDS
    for name in _choices.CLIP_ALGORITHMS:  # None is a valid bound exactly for the uncapped ones
        try:
            GradientClipCallback(clip_val=None, algorithm=name)
            uncapped = True
        except ValueError:
            uncapped = False
        assert uncapped == (name in _choices.UNCAPPED_CLIP_ALGORITHMS), name
    lightning_precisions = {a for part in typing.get_args(connector._PRECISION_INPUT) for a in typing.get_args(part)}
    assert lightning_precisions <= set(checks.PRECISIONS)  # none refused early
    assert not any(checks._maybe_precision(p) for p in (13, "13", "17-mixed", "fp8", True, 1.5, None))


def test_a_missing_option_names_the_override_typed_and_only_real_presets() -> None:
    from hydra.errors import MissingConfigException

    from lightning_clipprune.app.cli import hydra_error_line

    line = hydra_error_line(MissingConfigException("...", "clip/nope", ["_base", "agc", "norm"]), ["clip=nope"])
    assert line == "clip=nope: no such option in the 'clip' group; choose one of: agc, norm"
    err = MissingConfigException("...", "experiment/nope", ["cifar", "fashion_mnist"])
    assert hydra_error_line(err, ["+experiment=fashion_mnist", "+experiment=nope"]).startswith("+experiment=nope: ")


_SEARCH_PROBE = """
import atexit, runpy, sys
atexit.register(lambda: print("MODULES", "torch" in sys.modules, "lightning" in sys.modules, file=sys.stderr))
sys.argv = ["lightning_clipprune.search", *sys.argv[1:]]
runpy.run_module("lightning_clipprune.search", run_name="__main__")
"""


@pytest.mark.parametrize(
    ("args", "status", "words"),
    [
        (["--help"], 0, "usage: python -m lightning_clipprune.search"),
        (["NOWHERE"], 1, "error: no such run folder or checkpoint: "),
        (["."], 1, "error: no checkpoints/final.ckpt or checkpoints/last.ckpt in ."),
        ([".", "--method", "prune"], 1, "error: --method 'prune' is not one of magnitude, sparsegpt, obs"),
        ([".", "--tolerance", "abc"], 2, "argument --tolerance: invalid float value: 'abc'"),
        # numbers out of range: answered in the command's words, not after the imports in the library's
        ([".", "--tolerance", "-1"], 1, "error: --tolerance must be a number >= 0"),
        ([".", "--grid", "0.5,1.5"], 1, "error: --grid must be sparsities in (0, 1)"),
        ([".", "--resolution", "0"], 1, "error: --resolution must be a sparsity width in (0, 1)"),
        ([".", "--sensitivity", "--layer-grid", "0,0.5"], 1, "error: --layer-grid must be sparsities in (0, 1)"),
        ([".", "--sensitivity", "--target", "1.2"], 1, "error: --target must be a global sparsity in (0, 1), got 1.2"),
        ([".", "--finetune-epochs", "-1"], 1, "error: --finetune-epochs must be >= 0"),
        ([".", "--finetune-lr", "0"], 1, "error: --finetune-lr must be a number > 0"),
        # a setting that could never take effect: --target only sets the --sensitivity allocation (it was ignored)
        ([".", "--target", "0.8"], 1, "error: --target sets the sparsity of the per-layer allocation, which only --sensitivity"),
    ],
)
def test_the_search_command_answers_before_torch_is_imported(
    tmp_path: Path, args: list[str], status: int, words: str
) -> None:
    args = [str(tmp_path / "missing") if a == "NOWHERE" else a for a in args]
    _answers_before_torch(_SEARCH_PROBE, args, status, words, tmp_path)


def _answers_before_torch(probe: str, args: list[str], status: int, words: str, cwd: Path) -> None:
    """Run ``probe`` (a command's ``__main__``) with ``args``: its exit status and words, neither torch nor Lightning
    imported to answer."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)
    assert proc.returncode == status, proc.stderr
    assert words in proc.stdout + proc.stderr
    assert "MODULES False False" in proc.stderr  # neither torch nor Lightning was imported to answer


_EXPORT_PROBE = _SEARCH_PROBE.replace("lightning_clipprune.search", "lightning_clipprune.export")


@pytest.mark.parametrize(
    ("args", "status", "words"),
    [
        (["--help"], 0, "usage: python -m lightning_clipprune.export"),
        (["NOWHERE", "out.lcps"], 1, "error: cannot read checkpoint "),
        (["NOWHERE"], 2, "the following arguments are required: out"),
        (["NOWHERE", "out.lcps", "--inference-batch-size", "0"], 1, "--inference-batch-size must be a positive"),
    ],
)
def test_the_export_command_answers_before_torch_is_imported(
    tmp_path: Path, args: list[str], status: int, words: str
) -> None:
    args = [str(tmp_path / "missing.ckpt") if a == "NOWHERE" else a for a in args]
    _answers_before_torch(_EXPORT_PROBE, args, status, words, tmp_path)


def test_the_export_commands_early_missing_file_line_is_the_readers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_clipprune.export.__main__ import main

    missing = str(tmp_path / "missing.ckpt")
    assert main([missing, str(tmp_path / "o.lcps")]) == 1
    early = capsys.readouterr().err
    monkeypatch.setattr("os.path.lexists", lambda path: True)  # past the early check: the checkpoint reader says it
    assert main([missing, str(tmp_path / "o.lcps")]) == 1
    assert capsys.readouterr().err == early


@pytest.mark.parametrize(("model", "said", "keys"), [
    ("lenet300", "mat1 and mat2 shapes", "model.net.in_features"),  # 784 inputs, digits has 64
    # 5x5 kernels after pooling 8x8 images: the network's own input arguments, not an `in_features` it lacks
    ("lenet5", "Kernel size can't be greater than actual input size", "model.net.in_channels and model.net.image_size"),
])
def test_a_model_that_does_not_take_the_datas_inputs_is_one_line_and_frees_the_folder(
    tmp_path: Path, model: str, said: str, keys: str
) -> None:
    with pytest.raises(ConfigError, match=rf"the model does not take the data's inputs \(.*{said}.*\)"
                       rf".*pick a model for this data set \(or set the network's input size: {keys}\)") as info:
        train(_compose(tmp_path, (f"model={model}",)), [f"model={model}"])
    assert "\n" not in str(info.value)
    assert not (tmp_path / "csv").exists()  # nothing trained: the same folder takes the corrected command
    results = train(_compose(tmp_path, ()), [])
    assert results["status"] == "completed"
