"""Threshold search and layer sensitivity on a small model trained on the digits data; the search CLI on an app run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_clipprune.app.data import DigitsDataModule
from lightning_clipprune.app.models import MLP
from lightning_clipprune.search import (
    Ranking,
    compare_allocation,
    evaluate,
    layer_sensitivity,
    layer_sparsity_snippets,
    search_threshold,
    suggest_layer_sparsity,
    taylor_gradients,
)


class Counting:
    """A loader that counts how often it was iterated."""

    def __init__(self, loader) -> None:
        self.loader, self.iterations = loader, 0

    def __iter__(self):
        self.iterations += 1
        return iter(self.loader)


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, DigitsDataModule]:
    """An MLP trained for a few hundred plain-torch steps on digits (~97 % val accuracy), and its data."""
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64, on_device=False, seed=0)
    dm.setup("fit")
    net = MLP(64, [128, 64], 10)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(12):
        for x, y in dm.train_dataloader():
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    return net.eval(), dm


def weights(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_search_result_is_within_tolerance_and_the_next_point_is_not(trained) -> None:
    net, dm = trained
    before = weights(net)
    result = search_threshold(net, dm.val_dataloader(), tolerance=0.5, grid=(0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99))
    assert result.dense_val_acc > 0.9
    chosen, nxt = result.chosen, result.next_point()
    assert 0.2 <= chosen.sparsity < 0.99
    assert result.dense_val_acc - chosen.val_acc <= 0.005 + 1e-9 and chosen.within_tolerance
    assert nxt is not None and result.dense_val_acc - nxt.val_acc > 0.005 and not nxt.within_tolerance
    # every evaluated point above the chosen one is over tolerance; the bisection narrowed the bracket
    above = [p for p in result.points if p.sparsity > chosen.sparsity]
    assert above and not any(p.within_tolerance for p in above)
    assert any(p.stage == "bisect" for p in result.points)
    assert nxt.sparsity - chosen.sparsity <= 0.01
    assert result.points[0].stage == "dense" and result.points[0].sparsity == 0.0
    # the dense weights are back, bit for bit
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_chosen_threshold_reproduces_the_chosen_sparsity(trained) -> None:
    net, dm = trained
    dense = weights(net)
    names = [n for n, p in net.named_parameters() if n.endswith("weight")]
    result = search_threshold(net, dm.val_dataloader(), tolerance=1.0, grid=(0.3, 0.6, 0.9), apply=True)
    try:
        pruned = dict(net.named_parameters())
        total = sum(pruned[n].numel() for n in names)
        assert sum(int((pruned[n] == 0).sum()) for n in names) / total == pytest.approx(result.chosen.sparsity, abs=1e-6)
        assert evaluate(net, dm.val_dataloader())[0] == pytest.approx(result.chosen.val_acc)
        # the threshold rule |w| <= eps on the dense weights prunes the same weights
        by_rule = sum(int((dense[n].abs() <= result.chosen.threshold).sum()) for n in names)
        assert by_rule / total == pytest.approx(result.chosen.sparsity, abs=1e-6)
    finally:
        net.load_state_dict(dense)


def test_threshold_is_the_quantile_of_the_magnitudes() -> None:
    net = nn.Sequential(nn.Linear(10, 10, bias=False), nn.Linear(10, 10, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.arange(100, dtype=torch.float32).view(10, 10) / 100)
        net[1].weight.copy_(-torch.arange(100, 200, dtype=torch.float32).view(10, 10) / 100)
    data = [(torch.randn(16, 10), torch.randint(0, 10, (16,)))]
    result = search_threshold(net, data, tolerance=100.0, grid=(0.25, 0.5))
    by_s = {round(p.sparsity, 3): p.threshold for p in result.points}
    assert by_s[0.25] == pytest.approx(0.49) and by_s[0.5] == pytest.approx(0.99)
    assert result.chosen.sparsity == 0.5  # tolerance 100 points: the largest grid point, nothing above it to bisect
    # once after training, as measured (the threshold rule during training pruned far more: 88 % for 64 % chosen)
    assert result.overrides()[0] == "prune=threshold_after prune.threshold=0.99"


def test_test_split_is_read_once_after_the_search(trained) -> None:
    net, dm = trained
    val = Counting(dm.val_dataloader())
    seen_at_call: list[int] = []

    def test_loader():
        seen_at_call.append(val.iterations)
        return dm.test_dataloader()

    result = search_threshold(net, val, tolerance=0.5, grid=(0.5, 0.9), test_loader=test_loader)
    assert seen_at_call == [len(result.points)]  # once, after every validation evaluation
    assert result.test_acc is not None and result.dense_test_acc is not None
    assert "test acc at the chosen point (evaluated once, after the search)" in str(result.to_table().caption)


def test_search_without_test_loader_never_builds_one(trained, monkeypatch: pytest.MonkeyPatch) -> None:
    net, dm = trained

    def forbidden(self):
        raise AssertionError("the test split was read")

    monkeypatch.setattr(DigitsDataModule, "test_dataloader", forbidden)
    result = search_threshold(net, dm.val_dataloader(), grid=(0.5,))
    assert result.test_acc is None


def test_taylor_criterion_ranks_by_weight_times_clipped_gradient(trained) -> None:
    net, dm = trained
    before = weights(net)
    grads = taylor_gradients(net, dm.train_dataloader(), batches=3, clip_val=1e-3)
    assert set(grads) == {n for n, p in net.named_parameters() if n.endswith("weight")}
    # clipped to norm 1e-3 per batch: the average of three such gradients has norm <= 1e-3
    total = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads.values()]))
    assert total <= 1e-3 + 1e-9
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    result = search_threshold(net, dm.val_dataloader(), grid=(0.5, 0.9), criterion="taylor", grads=grads)
    assert result.criterion == "taylor" and result.overrides() == [f"prune.sparsity={result.chosen.sparsity:.4f} prune.threshold=null prune.criterion=taylor"]
    magnitude = Ranking(net)
    taylor = Ranking(net, scores={n: (p.detach() * grads[n]).abs() for n, p in net.named_parameters() if n in grads})
    assert not torch.equal(magnitude.order, taylor.order)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tolerance": -1.0}, r"`search_threshold\(tolerance=...\)` must be a finite number >= 0, got -1.0"),
        ({"grid": (0.5, 1.0)}, r"`search_threshold\(grid=...\)` must be a non-empty sequence"),
        ({"criterion": "random"}, r"`search_threshold\(criterion=...\)` must be one of"),
        ({"criterion": "taylor"}, "needs `grads`"),
        ({"resolution": 0.0}, r"`search_threshold\(resolution=...\)`"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        search_threshold(nn.Linear(2, 2), [(torch.randn(2, 2), torch.tensor([0, 1]))], **kwargs)


def test_layer_sensitivity_has_one_row_per_layer_and_a_plot(trained, tmp_path: Path) -> None:
    net, dm = trained
    before = weights(net)
    sens = layer_sensitivity(net, dm.val_dataloader(), sparsities=(0.5, 0.9, 0.99))
    names = [n for n, p in net.named_parameters() if n.endswith("weight")]
    assert list(sens.accuracy) == names and [r["layer"] for r in sens.rows()] == names
    assert all(len(v) == 3 for v in sens.accuracy.values())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    # pruning a layer to 99 % costs more than to 50 %, on average over the layers
    assert sum(v[2] for v in sens.accuracy.values()) < sum(v[0] for v in sens.accuracy.values())
    sens.write_csv(tmp_path / "s.csv")
    sens.plot(tmp_path / "s.png")
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 1 + len(names)
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_suggested_allocation_meets_the_budget_and_prunes_tolerant_layers_most(trained) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    net, dm = trained
    sens = layer_sensitivity(net, dm.val_dataloader(), sparsities=(0.5, 0.7, 0.9, 0.95, 0.99))
    target = 0.8
    allocation = suggest_layer_sparsity(sens, target)
    total = sum(sens.numel.values())
    assert sum(allocation[n] * sens.numel[n] for n in allocation) / total == pytest.approx(target, abs=2e-3)
    # the layer whose accuracy holds best at 90 % gets at least the sparsity of the one that holds worst
    at90 = {n: a[2] for n, a in sens.accuracy.items()}
    assert allocation[max(at90, key=at90.get)] >= allocation[min(at90, key=at90.get)]
    comparison = compare_allocation(net, dm.val_dataloader(), allocation)
    assert comparison["sparsity"] == pytest.approx(target, abs=2e-3)
    assert 0.0 <= comparison["layerwise_val_acc"] <= 1.0 and 0.0 <= comparison["global_val_acc"] <= 1.0
    python, hydra_overrides = layer_sparsity_snippets(allocation)
    assert python.startswith('MagnitudePruneCallback(scope="local", layer_sparsity={')
    assert eval(python.split("layer_sparsity=", 1)[1][:-1]) == allocation
    parsed = OverridesParser.create().parse_overrides([o.strip("'") for o in hydra_overrides.split(" ")])
    assert {k: float(v) for k, v in parsed[1].value().items()} == allocation
    with pytest.raises(ValueError, match="`target`"):
        suggest_layer_sparsity(sens, 0.995)


def test_search_cli_on_an_app_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A smoke run of the app, then the CLI on its folder: files written, the test split read exactly once."""
    from hydra import compose, initialize_config_dir

    from lightning_clipprune.export import load_sparse
    from lightning_clipprune.run import config_dir, train
    from lightning_clipprune.search import main

    run_dir = tmp_path / "run"
    overrides = ["~prune", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                 "callbacks.sparsity.print_table=false", "logger=csv"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={run_dir}", *overrides])
    train(cfg, overrides)
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o!r}\n" for o in overrides))

    calls = []
    original = DigitsDataModule.test_dataloader
    monkeypatch.setattr(DigitsDataModule, "test_dataloader", lambda self: calls.append(1) or original(self))
    assert main([str(run_dir / "checkpoints" / "final.ckpt"), "--grid", "0.5,0.9", "--resolution", "0.05"]) == 0
    assert calls == [1]
    out = run_dir / "search"
    summary = json.loads((out / "search.json").read_text())
    assert {"search.csv", "search.png", "pruned.ckpt", "pruned.lcps"} <= {p.name for p in out.iterdir()}
    assert summary["commands"][0].startswith("python -m lightning_clipprune.run ")
    assert "~prune" not in summary["commands"][0] and f"prune.threshold={summary['threshold']:.6g}" in summary["commands"][0]
    state = torch.load(out / "pruned.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    sparse = load_sparse(out / "pruned.lcps")
    assert all(torch.equal(state[k], sparse[k]) for k in state)
    rows = (out / "search.csv").read_text().splitlines()
    assert len(rows) == 1 + summary["evaluations"] and sum(r.endswith(",1") for r in rows[1:]) == 1
    printed = capsys.readouterr().out
    assert "evaluated once, after the search" in " ".join(printed.split()) and "prune.sparsity=" in printed


def test_search_cli_names_a_missing_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lightning_clipprune.search import main

    assert main([str(tmp_path / "nope")]) == 1
    assert "no such run folder or checkpoint" in capsys.readouterr().err


def test_reconstruction_search_goes_at_least_as_far_and_calibrates_on_train_only(trained) -> None:
    from lightning_clipprune.posttrain import ReconstructionOptions
    from lightning_clipprune.search import search_reconstruction

    net, dm = trained
    before = weights(net)
    grid = (0.5, 0.7, 0.8, 0.9, 0.95)
    magnitude = search_threshold(net, dm.val_dataloader(), tolerance=0.5, grid=grid, resolution=0.01)
    val, train = Counting(dm.val_dataloader()), Counting(dm.train_dataloader())
    result = search_reconstruction(
        net, val, train, tolerance=0.5, grid=grid, resolution=0.01, options=ReconstructionOptions(num_samples=512)
    )
    assert train.iterations == 1 and val.iterations == len(result.points)  # calibration drawn once, from train
    assert result.extra["calibration_samples"] == 512
    chosen, nxt = result.chosen, result.next_point()
    assert result.dense_val_acc - chosen.val_acc <= 0.005 + 1e-9
    assert nxt is None or not nxt.within_tolerance
    assert chosen.sparsity >= magnitude.chosen.sparsity  # the reconstruction prunes at least as far, no retraining
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # dense weights (and biases) back
    assert result.overrides() == [
        f"prune=oneshot prune.start=1.0 prune.sparsity={chosen.sparsity:.4f} prune.threshold=null prune.criterion=obs"
    ]
    assert "-" in [c for c in result.to_table().columns[1].cells]  # no magnitude threshold for reconstructed weights


def test_the_threshold_command_is_offered_for_a_dense_start_only() -> None:
    net = nn.Sequential(nn.Linear(10, 10, bias=False), nn.Linear(10, 10, bias=False))
    with torch.no_grad():
        net[0].weight[:, :5] = 0.0  # a run pruned a quarter of the weights: a threshold read off it cuts only the rest
    data = [(torch.randn(16, 10), torch.randint(0, 10, (16,)))]
    result = search_threshold(net, data, tolerance=100.0, grid=(0.5,))
    assert [o.split()[0] for o in result.overrides()] == ["prune.sparsity=0.5000"]
