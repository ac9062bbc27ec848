"""Which strategies the callbacks accept: replicated ones pass, sharded ones raise one clear message."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    ParallelStrategy,
    SingleDeviceXLAStrategy,
    Strategy,
    XLAStrategy,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_clipprune.callbacks._strategy import (
    _MODEL_PARALLEL_SUPPORTED,
    _TENSOR_PARALLEL_SUPPORTED,
    ROLES,
    check_strategy,
    strategy_refusal,
)

NAMES = {"clip": "GradientClipCallback", "prune": "MagnitudePruneCallback", "log": "SparsityLogger"}


def trainer_with(strategy: Any, devices: int = 2) -> L.Trainer:
    return L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=devices,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def deepspeed(stage: int | None) -> DeepSpeedStrategy:
    """The strategy object the callbacks inspect, without DeepSpeed installed (its __init__ needs it)."""
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    strategy.config = {} if stage is None else {"zero_optimization": {"stage": stage}}
    return strategy


class _Unknown(ParallelStrategy):
    """A parallel strategy the callbacks have never heard of (abstract methods are never called here)."""


_Unknown.__abstractmethods__ = frozenset()


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"])
@pytest.mark.parametrize("role", ROLES)
def test_ddp_family_is_supported(strategy: str, role: str) -> None:
    trainer = trainer_with(strategy)
    assert isinstance(trainer.strategy, DDPStrategy)
    check_strategy(trainer, NAMES[role], role)  # does not raise


@pytest.mark.parametrize("role", ROLES)
def test_single_device_is_supported(role: str) -> None:
    check_strategy(trainer_with("auto", devices=1), NAMES[role], role)


@pytest.mark.parametrize("role", ROLES)
def test_xla_replicated_strategies_are_supported(role: str) -> None:
    # torch_xla is not installed: the objects are built without __init__, as the isinstance checks only need the type
    for cls in (XLAStrategy, SingleDeviceXLAStrategy):
        assert strategy_refusal(cls.__new__(cls), NAMES[role], role) is None


@pytest.mark.parametrize("role", ROLES)
def test_model_parallel_fsdp2_is_supported_for_the_roles_in_the_set(role: str) -> None:
    # FSDP2 (DTensor shards on dim 0): norms and counts are all-reduced (2-process tests: test_fsdp2_*.py)
    trainer = trainer_with(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    if role in _MODEL_PARALLEL_SUPPORTED:
        check_strategy(trainer, NAMES[role], role)  # does not raise
    else:
        with pytest.raises(MisconfigurationException, match=rf"^{NAMES[role]} does not support ModelParallelStrategy: "):
            check_strategy(trainer, NAMES[role], role)


def test_model_parallel_supports_clip_and_log() -> None:
    assert {"clip", "log"} <= _MODEL_PARALLEL_SUPPORTED <= set(ROLES)


@pytest.mark.parametrize("role", ROLES)
def test_model_parallel_with_tensor_parallelism_only_for_the_roles_in_its_set(role: str) -> None:
    # the default tensor_parallel_size="auto" is every device of the node: 2 here
    assert {"clip", "log"} <= _TENSOR_PARALLEL_SUPPORTED <= _MODEL_PARALLEL_SUPPORTED
    for strategy in (ModelParallelStrategy(), ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)):
        message = strategy_refusal(trainer_with(strategy).strategy, NAMES[role], role)
        if role in _TENSOR_PARALLEL_SUPPORTED:
            assert message is None
            continue
        assert message is not None and "\n" not in message
        if role in _MODEL_PARALLEL_SUPPORTED:
            assert message.startswith(f"{NAMES[role]} does not support ModelParallelStrategy (tensor_parallel_size=2): ")
            assert "tensor_parallel_size=1" in message.split("Instead, ")[1]


# FSDP needs a GPU accelerator in a Trainer: the strategy object is checked, as the callbacks see it in setup()
@pytest.mark.parametrize(
    ("role", "instead"),
    [
        ("clip", r"self\.trainer\.model\.clip_grad_norm_\(max_norm\)"),
        ("prune", r"prune with strategy='ddp'"),
        ("log", r"count the consolidated checkpoint"),
    ],
)
@pytest.mark.parametrize("kwargs", [{}, {"use_orig_params": True}])
def test_fsdp_is_refused_with_what_to_use_instead(role: str, instead: str, kwargs: dict) -> None:
    trainer = SimpleNamespace(strategy=FSDPStrategy(**kwargs))
    with pytest.raises(MisconfigurationException, match=rf"^{NAMES[role]} does not support FSDPStrategy: ") as err:
        check_strategy(trainer, NAMES[role], role)
    assert re.search(instead, str(err.value)), str(err.value)  # the message says what to use instead
    assert "\n" not in str(err.value)
    if role in _MODEL_PARALLEL_SUPPORTED:  # leads with the sharded strategy that is supported
        assert "Instead, train with ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)" in str(err.value)


@pytest.mark.parametrize("stage", [None, 1, 2, 3])
@pytest.mark.parametrize("role", ["clip", "prune"])
def test_deepspeed_refuses_clip_and_prune_at_every_stage(stage: int | None, role: str) -> None:
    with pytest.raises(MisconfigurationException, match=rf"^{NAMES[role]} does not support DeepSpeedStrategy"):
        check_strategy(SimpleNamespace(strategy=deepspeed(stage)), NAMES[role], role)


def test_deepspeed_clip_refusal_points_at_the_trainer_setting() -> None:
    message = strategy_refusal(deepspeed(2), "GradientClipCallback", "clip")
    assert message is not None
    assert "(ZeRO stage 2)" in message and "Trainer(gradient_clip_val=...)" in message
    assert "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)" in message


@pytest.mark.parametrize(("stage", "refused"), [(None, False), (1, False), (2, False), (3, True)])
def test_deepspeed_logger_is_refused_only_at_stage_3(stage: int | None, refused: bool) -> None:
    message = strategy_refusal(deepspeed(stage), "SparsityLogger", "log")
    assert (message is not None) is refused
    if refused:
        assert message.startswith("SparsityLogger does not support DeepSpeedStrategy (ZeRO stage 3): ")


@pytest.mark.parametrize("role", ROLES)
def test_unknown_strategies_are_refused(role: str) -> None:
    message = strategy_refusal(_Unknown(), NAMES[role], role)
    assert message is not None and message.startswith(f"{NAMES[role]} does not support _Unknown: ")


def test_a_custom_ddp_subclass_is_supported() -> None:
    class MyDDP(DDPStrategy):
        pass

    assert all(strategy_refusal(MyDDP(), NAMES[r], r) is None for r in ROLES)


def test_unknown_role_raises_value_error() -> None:
    with pytest.raises(ValueError, match=r"`role` must be one of \('clip', 'prune', 'log'\), got 'clipping'"):
        strategy_refusal(DDPStrategy(), "GradientClipCallback", "clipping")


def test_every_refusal_names_the_strategy_and_an_alternative() -> None:
    refused: list[Strategy] = [FSDPStrategy(), deepspeed(3), _Unknown()]
    for strategy in refused:
        for role in ROLES:
            message = strategy_refusal(strategy, NAMES[role], role)
            assert message is not None
            assert type(strategy).__name__ in message and "Instead, " in message and message.endswith(".")


def test_each_callback_refuses_a_sharded_strategy_in_setup() -> None:
    from lightning.pytorch.strategies import FSDPStrategy
    from torch import nn

    from lightning_clipprune import GradientClipCallback, MagnitudePruneCallback, SparsityLogger

    module = nn.Sequential(nn.Linear(4, 4))
    trainer = SimpleNamespace(strategy=FSDPStrategy(), callbacks=[], gradient_clip_val=None)
    for cb in (GradientClipCallback(1.0), MagnitudePruneCallback(sparsity=0.5), SparsityLogger()):
        trainer.callbacks = [cb]
        with pytest.raises(MisconfigurationException, match=f"^{type(cb).__name__} does not support FSDPStrategy"):
            cb.setup(trainer, module, "fit")
