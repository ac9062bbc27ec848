"""The clip algorithm protocol (issue 22): a new algorithm is one class outside the package, no callback edit.

``RunningMeanClip`` below is what a user writes in their own code: a plain class with ``clip``,
``state_dict`` and ``load_state_dict`` (no base class, no registration), built from the public helpers of
``lightning_clipprune.clipping``. It trains in a Trainer through ``GradientClipCallback(algorithm=...)``,
by object or by a registered name, and resumes from a checkpoint bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback

from lightning_clipprune import GradientClipCallback
from lightning_clipprune.clipping import (
    CLIPPERS,
    ClipAlgorithm,
    Clipper,
    clip_coefficient,
    clipper_name,
    register_clipper,
    scale_grads_,
    total_norm,
)
from tests.helpers import MemoryLogger, TinyClassifier, random_loader, tiny_trainer

STEPS_PER_EPOCH = 8  # 128 samples, batch 16


class RunningMeanClip:
    """A user's algorithm: clip the total norm to ``factor`` times the mean of all earlier norms.

    Its state (a float64 running sum and a count) decides every threshold, so a resume that lost it
    would clip differently.
    """

    def __init__(self, factor: float = 1.0) -> None:
        if not factor > 0:
            raise ValueError(f"`RunningMeanClip(factor=...)` must be > 0, got {factor!r}.")
        self.factor = factor
        self.total: torch.Tensor | None = None  # sum of the norms so far, on the gradients' device
        self.count = 0

    @torch.no_grad()
    def clip(self, parameters: Any, norm_type: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
        grads = [p.grad for p in parameters if p.grad is not None]
        norm = total_norm(grads, norm_type)
        if self.total is None:
            self.total = torch.zeros((), dtype=torch.float64, device=norm.device)
        bound = self.factor * self.total / self.count if self.count else torch.tensor(math.inf)
        coef = clip_coefficient(bound.to(norm.dtype), norm)
        scale_grads_(grads, coef)
        self.total += norm.double()
        self.count += 1
        return norm, coef

    def state_dict(self) -> dict[str, Any]:
        return {"total": None if self.total is None else self.total.cpu().clone(), "count": self.count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total = None if state_dict["total"] is None else state_dict["total"].clone()
        self.count = state_dict["count"]


class GradNorms(Callback):
    """The total gradient norm at every `on_before_optimizer_step`, before or after the clip callback."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad.flatten() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.cat(grads)).item())


class GradChanged(Callback):
    """Pairs with a snapshot taken before the clip callback: was any gradient entry changed by it?"""

    def __init__(self) -> None:
        self.saved: list[torch.Tensor] = []
        self.changed: list[bool] = []

    def before(self) -> Callback:
        outer = self

        class _Before(Callback):
            def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
                outer.saved = [p.grad.clone() for p in pl_module.parameters()]

        return _Before()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters()]
        self.changed.append(any(not torch.equal(a, b) for a, b in zip(self.saved, grads, strict=True)))


@pytest.fixture
def registry() -> Iterator[dict[str, type]]:
    """The registry, restored after the test (a registered name must not leak into other tests)."""
    saved = dict(CLIPPERS)
    yield CLIPPERS
    CLIPPERS.clear()
    CLIPPERS.update(saved)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------- the protocol


def test_the_users_class_follows_the_protocol_without_a_base_class():
    assert isinstance(RunningMeanClip(), Clipper)
    assert clipper_name(RunningMeanClip()) == "RunningMeanClip"  # not registered: its class name
    for name, cls in CLIPPERS.items():
        assert issubclass(cls, ClipAlgorithm) and isinstance(cls(), Clipper), name


def test_a_users_clipper_trains_in_a_trainer(tmp_path):
    before, after, logger = GradNorms(), GradNorms(), MemoryLogger()
    clipper = RunningMeanClip(factor=0.9)
    cb = GradientClipCallback(algorithm=clipper, log_every_n_steps=1)
    assert cb.clipper is clipper and cb.algorithm == "RunningMeanClip" and cb.clip_val is None
    tiny_trainer(tmp_path, callbacks=[before, cb, after], logger=logger, max_epochs=2).fit(
        TinyClassifier(), random_loader()
    )
    steps = 2 * STEPS_PER_EPOCH
    assert clipper.count == steps  # the object given is the one that clipped
    clipped = 0
    for k in range(steps):
        bound = 0.9 * sum(before.norms[:k]) / k if k else math.inf
        assert after.norms[k] == pytest.approx(min(before.norms[k], bound), rel=1e-5)
        clipped += before.norms[k] > bound
    assert 0 < clipped < steps  # the rule both clipped and let steps through
    assert cb.summary()["clipped_fraction"] == clipped / steps
    logged = [m["grad/norm"] for _, m in logger.rows_with("grad/norm")]
    assert logged == pytest.approx(before.norms, rel=1e-5)


def test_a_registered_name_works_like_a_built_in_one(tmp_path, registry):
    register_clipper("running_mean", RunningMeanClip)
    cb = GradientClipCallback(algorithm="running_mean", algorithm_options={"factor": 0.5})
    assert isinstance(cb.clipper, RunningMeanClip) and cb.clipper.factor == 0.5
    assert cb.algorithm == "running_mean" == clipper_name(cb.clipper)
    tiny_trainer(tmp_path, callbacks=[cb], max_epochs=1).fit(TinyClassifier(), random_loader())
    assert cb.clipper.count == STEPS_PER_EPOCH and cb.summary()["clipped_fraction"] > 0
    # its own options are checked by the class; unknown ones are named with the class's options
    with pytest.raises(ValueError, match=r"`RunningMeanClip\(factor=...\)` must be > 0"):
        GradientClipCallback(algorithm="running_mean", algorithm_options={"factor": -1.0})
    with pytest.raises(ValueError, match=r"options of RunningMeanClip \(factor\), got \{'alpha': 0.9\}"):
        GradientClipCallback(algorithm="running_mean", algorithm_options={"alpha": 0.9})
    # no clip_val option: the callback's clip_val is refused rather than ignored
    with pytest.raises(ValueError, match=r"`GradientClipCallback\(clip_val=...\)` must be left out"):
        GradientClipCallback(1.0, "running_mean")


def test_register_clipper_refuses_what_it_cannot_use(registry):
    with pytest.raises(ValueError, match="'zclip' is taken by ZClip.*replace=True"):
        register_clipper("zclip", RunningMeanClip)
    with pytest.raises(TypeError, match="must be a class with clip, state_dict, load_state_dict"):
        register_clipper("mine", RunningMeanClip())
    with pytest.raises(TypeError, match="must be a class with clip"):
        register_clipper("mine", torch.nn.Linear)
    with pytest.raises(ValueError, match="non-empty string without spaces"):
        register_clipper("my clip", RunningMeanClip)
    assert register_clipper("mine")(RunningMeanClip) is RunningMeanClip  # as a decorator
    assert register_clipper("zclip", RunningMeanClip, replace=True) is RunningMeanClip
    assert CLIPPERS["mine"] is CLIPPERS["zclip"] is RunningMeanClip


# ---------------------------------------------------------------------------------------- resume


class AmnesiacClip(GradientClipCallback):
    """Ignores the state in the checkpoint: the control of the resume test."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def run(tmp_path, epochs: int, ckpt_path=None, cls: type = GradientClipCallback):
    torch.manual_seed(0)
    module = TinyClassifier()
    cb = cls(algorithm=RunningMeanClip(factor=0.9))
    trainer = tiny_trainer(tmp_path, callbacks=[cb], max_epochs=epochs)
    trainer.fit(module, random_loader(), ckpt_path=ckpt_path)
    return module, cb, trainer


def test_a_users_clipper_resumes_from_a_checkpoint_bit_identical(tmp_path):
    full, full_cb, _ = run(tmp_path, epochs=4)
    _, _, half = run(tmp_path, epochs=2)
    ckpt = tmp_path / "mid.ckpt"
    half.save_checkpoint(ckpt)
    stored = torch.load(ckpt, weights_only=True)["callbacks"]["GradientClipCallback"]["clippers"][0]
    assert stored["count"] == 2 * STEPS_PER_EPOCH  # the clipper's own state is in the checkpoint
    resumed, resumed_cb, _ = run(tmp_path, epochs=4, ckpt_path=ckpt)
    for k, v in weights(full).items():
        assert torch.equal(v, weights(resumed)[k]), k
    assert resumed_cb.clipper.count == full_cb.clipper.count == 4 * STEPS_PER_EPOCH
    assert torch.equal(resumed_cb.clipper.total, full_cb.clipper.total)
    assert resumed_cb.summary() == full_cb.summary()
    # control: the same resume without the clipper's state ends elsewhere
    amnesiac, _, _ = run(tmp_path, epochs=4, ckpt_path=ckpt, cls=AmnesiacClip)
    assert any(not torch.equal(v, weights(amnesiac)[k]) for k, v in weights(full).items())


# ---------------------------------------------------------------------------------------- summary, one callback


# Settings under which each built-in algorithm clips some steps of this problem and not others.
PARTIAL = {
    "norm": (0.8, None),
    "value": (0.2, None),
    "agc": (1.0, None),
    "autoclip": (None, {"percentile": 50.0}),
    "zclip": (None, {"warmup_steps": 3, "z_thresh": 0.5}),
}


@pytest.mark.parametrize("algorithm", list(PARTIAL))
def test_clipped_fraction_counts_the_steps_the_algorithm_changed(tmp_path, algorithm):
    clip_val, options = PARTIAL[algorithm]
    changed = GradChanged()
    cb = GradientClipCallback(clip_val, algorithm, algorithm_options=options)
    tiny_trainer(tmp_path, callbacks=[changed.before(), cb, changed], max_epochs=2).fit(
        TinyClassifier(), random_loader()
    )
    assert len(changed.changed) == 2 * STEPS_PER_EPOCH
    fraction = sum(changed.changed) / len(changed.changed)
    assert 0.0 < fraction < 1.0, fraction  # the setting is informative: some steps clipped, some not
    assert cb.summary()["clipped_fraction"] == fraction


def test_a_second_clip_callback_is_a_misconfiguration(tmp_path):
    class OtherClip(GradientClipCallback):  # a subclass passes Lightning's one-per-type check
        pass

    trainer = tiny_trainer(tmp_path, callbacks=[GradientClipCallback(1.0), OtherClip(algorithm=RunningMeanClip())])
    with pytest.raises(MisconfigurationException, match=r"2 `GradientClipCallback`s.*keep one.*'RunningMeanClip'"):
        trainer.fit(TinyClassifier(), random_loader())


# ---------------------------------------------------------------------------------------- packaging, LightningCLI


def test_the_clipping_package_is_pure_torch():
    import subprocess
    import sys

    code = (
        "import sys, lightning_clipprune.clipping as c; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'hydra'));"
        "assert not bad, bad; print(sorted(c.CLIPPERS))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['agc', 'autoclip', 'norm', 'value', 'zclip']"


CLI_CONFIG = """
trainer:
  max_epochs: 1
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  callbacks:
    - class_path: lightning_clipprune.GradientClipCallback
      init_args:
        algorithm:
          class_path: lightning_clipprune.clipping.ZClip
          init_args:
            alpha: 0.9
            max_norm: null
"""


def test_a_clipper_object_from_lightning_cli_yaml(tmp_path, monkeypatch):
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    from lightning_clipprune.clipping import ZClip

    class RandomData(L.LightningDataModule):
        def train_dataloader(self) -> torch.utils.data.DataLoader:
            return random_loader()

    config = tmp_path / "config.yaml"
    config.write_text(CLI_CONFIG.format(root=tmp_path))
    monkeypatch.setattr("sys.argv", ["train.py"])
    cli = LightningCLI(TinyClassifier, RandomData, args=["fit", "--config", str(config)], save_config_callback=None)
    (cb,) = (c for c in cli.trainer.callbacks if isinstance(c, GradientClipCallback))
    assert repr(cb.clipper) == repr(ZClip(alpha=0.9, max_norm=None))
    assert cb.summary()["steps"] == cli.trainer.global_step == STEPS_PER_EPOCH
