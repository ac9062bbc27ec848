"""Pruning criteria are objects (issue 22, point 2): built-ins, a registry, and a criterion written by a user.

The user criterion below lives here, outside the package, and reaches the callback without any edit to
it: by name after ``register_criterion``, as a class, or as an instance. It trains end to end and a run
resumed from a checkpoint ends bit-identical to one that was not stopped (masks, weights, its own state).
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Mapping
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from lightning_clipprune import MagnitudePruneCallback
from lightning_clipprune.callbacks import magnitude_prune
from lightning_clipprune.pruning import (
    Criterion,
    CriterionProtocol,
    Magnitude,
    Taylor,
    compute_masks,
    criterion_names,
    importance,
    make_criterion,
    register_criterion,
)
from tests.helpers import TinyClassifier, random_loader, tiny_trainer

# random_loader(): 128 samples, batch 16 -> 8 optimizer steps per epoch


class AccumulatedSaliency(Criterion):
    """A user's criterion: ``|w| * sum over steps of |g|`` (no decay), with a step count in its state."""

    name = "accumulated_saliency"
    needs = "gradients"

    def __init__(self) -> None:
        self.total: dict[str, Tensor] = {}
        self.steps = 0

    def score(self, name: str, weight: Tensor) -> Tensor:
        return weight.detach().abs() * self.total[name]

    def prepare(self, params: Mapping[str, Tensor]) -> None:
        for n, p in params.items():
            self.total[n] = torch.zeros_like(p) if n not in self.total else self.total[n].to(p.device)

    def observe(self, grads: Mapping[str, Tensor]) -> None:
        names = [n for n in grads if n in self.total]
        torch._foreach_add_([self.total[n] for n in names], torch._foreach_abs([grads[n] for n in names]))
        self.steps += 1

    def ready(self) -> bool:
        return self.steps > 0

    def masked(self, masks: Mapping[str, Tensor]) -> None:
        for n, t in self.total.items():
            t.mul_(masks[n])

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total = dict(state.get("total", {}))
        self.steps = int(state.get("steps", 0))


register_criterion("accumulated_saliency", AccumulatedSaliency)


def test_builtins_follow_the_protocol_and_are_registered() -> None:
    assert criterion_names()[:2] == ("magnitude", "taylor")
    assert "accumulated_saliency" in criterion_names()
    for obj in (Magnitude(), Taylor(), AccumulatedSaliency()):
        assert isinstance(obj, CriterionProtocol)
    assert (Magnitude.needs, Taylor.needs, AccumulatedSaliency.needs) == ("nothing", "gradients", "gradients")
    assert make_criterion("taylor", beta=0.5).beta == 0.5
    assert isinstance(make_criterion(AccumulatedSaliency), AccumulatedSaliency)
    w, g = torch.tensor([-2.0, 1.0]), torch.tensor([0.5, -3.0])
    assert torch.equal(importance(w, "taylor", g), Taylor(grad_avgs={"x": g}).score("x", w))


def test_compute_masks_takes_a_criterion_object() -> None:
    w = {"a": torch.tensor([1.0, 1.0, 0.1, 0.1])}
    crit = AccumulatedSaliency()
    crit.total = {"a": torch.tensor([0.0, 1.0, 10.0, 0.0])}
    by_object = compute_masks(w, sparsity=0.5, criterion=crit)
    by_name = compute_masks(w, sparsity=0.5, criterion="taylor", grad_avgs=crit.total)
    assert by_object["a"].tolist() == by_name["a"].tolist() == [False, True, True, False]


@pytest.mark.parametrize(
    ("criterion", "match"),
    [
        ("hessian", r"`MagnitudePruneCallback\(criterion=...\)` must be one of 'magnitude', 'taylor'"),
        (object(), r"missing \['score'"),
    ],
)
def test_bad_criteria_are_one_line(criterion, match) -> None:
    with pytest.raises(ValueError, match=match) as err:
        MagnitudePruneCallback(sparsity=0.5, criterion=criterion)
    assert "\n" not in str(err.value)


def test_a_criterion_that_needs_a_calibration_pass_is_refused_by_the_callback() -> None:
    class Calibrated(Criterion):
        needs = "calibration"

    with pytest.raises(ValueError, match="needs a calibration pass"):
        MagnitudePruneCallback(sparsity=0.5, criterion=Calibrated())


def test_the_callback_has_no_criterion_specific_branch() -> None:
    tree = ast.parse(inspect.getsource(magnitude_prune))
    names = set(criterion_names())
    compared = [
        c.value for node in ast.walk(tree) if isinstance(node, ast.Compare)
        for c in [node.left, *node.comparators] if isinstance(c, ast.Constant) and c.value in names
    ]
    assert compared == []


def _fit(root, criterion: Any, max_epochs: int = 4, ckpt_path=None, checkpoint: bool = False):
    prune = MagnitudePruneCallback(
        sparsity=0.75, schedule="cubic", start=0.1, end=0.75, frequency=3, criterion=criterion, verbose=False
    )
    callbacks: list[Any] = [prune]
    if checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}"))
    L.seed_everything(0, verbose=False)
    model = TinyClassifier(optimizer="adamw", lr=0.01)
    trainer = tiny_trainer(root / "run", callbacks=callbacks, max_epochs=max_epochs, enable_checkpointing=checkpoint)
    trainer.fit(model, random_loader(), ckpt_path=ckpt_path)
    return prune, model


@pytest.mark.parametrize("how", ["name", "class", "instance"])
def test_user_criterion_trains_end_to_end_and_resumes_bit_identical(tmp_path, how: str) -> None:
    make = {"name": lambda: "accumulated_saliency", "class": lambda: AccumulatedSaliency, "instance": AccumulatedSaliency}[how]
    full_cb, full = _fit(tmp_path / "full", make(), checkpoint=True)
    assert isinstance(full_cb._criterion, AccumulatedSaliency) and full_cb._criterion.steps == 32
    total = sum(m.numel() for m in full_cb.masks.values())
    assert sum(int((~m).sum()) for m in full_cb.masks.values()) == round(0.75 * total)
    # its scores decided the masks: magnitude alone would have pruned other entries
    mag_cb, _ = _fit(tmp_path / "magnitude", "magnitude")
    assert any(not torch.equal(full_cb.masks[n], mag_cb.masks[n]) for n in full_cb.masks)

    ckpt = tmp_path / "full" / "ckpt" / "epoch=1.ckpt"
    state = torch.load(ckpt, weights_only=False)["callbacks"][full_cb.state_key]
    assert state["active"] and 0 < state["current_target"] < 0.75 and state["criterion"]["steps"] == 16
    resumed_cb, resumed = _fit(tmp_path / "resumed", make(), ckpt_path=ckpt)
    for n in full_cb.masks:
        assert torch.equal(full_cb.masks[n], resumed_cb.masks[n]), n
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed_cb._criterion.steps == 32
    for n, t in full_cb._criterion.total.items():
        assert torch.equal(t, resumed_cb._criterion.total[n]), n
