"""Every wrong value a user can type is one clear line naming it, before any training (issue: hardening).

The app composes the config, checks its own values (``app.checks``), builds every component (their
constructors check their arguments through ``_validation``), and refuses at ``setup`` what only the
Trainer can tell (a prune window the run never reaches). Each case must end in a one-line
:class:`ConfigError` that names the value, and nothing may have been trained.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lightning_clipprune.run import ConfigError, config_dir, train

pytestmark = pytest.mark.usefixtures("offline")

# (overrides, text the message must contain: the value as the user wrote it or as Python prints it)
CASES: list[tuple[tuple[str, ...], str]] = [
    (("trainer.max_epochs=0",), "0"),
    (("trainer.max_epochs=-1",), "-1"),
    (("trainer.max_epochs=abc",), "abc"),
    (("trainer.max_epochs=2.5",), "2.5"),
    (("seed=abc",), "abc"),
    (("seed=-1",), "-1"),
    (("cpu_threads=0",), "0"),
    (("cpu_threads=-1",), "-1"),
    (("test=maybe",), "maybe"),
    (("model.optimizer.lr=-1",), "-1"),
    (("model.optimizer.momentum=-0.5",), "-0.5"),
    (("model.optimizer.weight_decay=-1",), "-1"),
    (("model.lr_schedule=exponential",), "exponential"),
    (("model.warmup_fraction=2",), "2"),
    (("model.label_smoothing=2",), "2"),
    (("data.batch_size=0",), "0"),
    (("data.val_fraction=1.5",), "1.5"),
    (("trainer.precision=17",), "17"),
    (("trainer.gradient_clip_val=1.0",), "1.0"),
    (("prune.sparsity=1.5",), "1.5"),
    (("prune.sparsity=-0.1",), "-0.1"),
    (("prune.sparsity=abc",), "abc"),
    (("prune.threshold=0.05",), "0.05"),
    (("prune=threshold", "prune.threshold=-1"), "-1"),
    (("prune=threshold", "prune.threshold=inf"), "inf"),
    (("prune.power=inf",), "inf"),
    (("prune.power=0",), "0"),
    (("prune.schedule=exponential",), "exponential"),
    (("prune.scope=everywhere",), "everywhere"),
    (("prune.max_layer_sparsity=off",), "off"),
    (("prune.ranking=snip",), "snip"),
    (("prune.pattern=3:2",), "3:2"),
    (("prune.criterion=random",), "random"),
    (("prune.unit=hour",), "hour"),
    (("prune.frequency=0",), "0"),
    (("prune.initial_sparsity=0.95",), "0.95"),
    (("prune.taylor_beta=1.0",), "1.0"),
    (("prune.start=0.5", "prune.end=3"), "3"),
    (("prune.end=1000000",), "1000000"),
    (("prune=oneshot", "prune.start=500"), "500"),
    (("clip.clip_val=-0.5",), "-0.5"),
    (("clip.clip_val=inf",), "inf"),
    (("clip.algorithm=median",), "median"),
    (("clip.norm_type=0",), "0"),
    (("clip.nonfinite=ignore",), "ignore"),
    (("clip.exclude=null",), "None"),
    (("callbacks.sparsity.log_every_n_steps=-1",), "-1"),
    (("callbacks.sparsity.per_layer=maybe",), "maybe"),
]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DATA_DIR", raising=False)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_the_table_is_large() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize(("overrides", "value"), CASES, ids=[" ".join(o) for o, _ in CASES])
def test_a_wrong_value_is_one_line_naming_it(tmp_path: Path, overrides: tuple[str, ...], value: str) -> None:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={tmp_path}", "debug=smoke", "trainer.max_epochs=2", *overrides])
    with pytest.raises(ConfigError) as info:
        train(cfg, list(overrides))
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert value in message, message
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "checkpoints").exists()  # nothing trained
