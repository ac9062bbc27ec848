"""Post-training tools: the cases a probe found (silent wrong results and unclear refusals), one test each."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_clipprune.export import load_inference, save_sparse, to_inference
from lightning_clipprune.export.recipes import save_inference
from lightning_clipprune.posttrain import reconstruct_prune
from lightning_clipprune.search import (
    SensitivityResult,
    layer_sensitivity,
    search_threshold,
    suggest_layer_sparsity,
    taylor_gradients,
)
from lightning_clipprune.search.threshold import sparsity_text


def _mlp(seed: int = 0, hidden: int = 32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 4))


def _data(n: int = 64, batches: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g)) for _ in range(batches)]


# 1. taylor gradients of frozen weights


def test_taylor_gradients_of_a_frozen_layer_are_its_real_gradients_and_the_flags_come_back() -> None:
    data = _data()
    free = _mlp()
    frozen = _mlp()
    frozen[0].requires_grad_(False)
    expected = taylor_gradients(free, data, batches=2)
    got = taylor_gradients(frozen, data, batches=2)
    assert got["0.weight"].abs().sum() > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    assert not frozen[0].weight.requires_grad and not frozen[0].bias.requires_grad
    assert frozen[2].weight.requires_grad and frozen[0].weight.grad is None


def test_taylor_search_does_not_prune_a_frozen_layer_first() -> None:
    net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    torch.manual_seed(0)
    net[0].requires_grad_(False)
    data = _data(batches=4)
    grads = taylor_gradients(net, data, batches=4, clip_val=0.5)
    search_threshold(net, data, tolerance=100, grid=(0.2,), criterion="taylor", grads=grads, apply=True)
    assert float((net[0].weight == 0).float().mean()) < 0.5


def test_taylor_gradients_on_a_model_frozen_as_a_whole() -> None:
    net = _mlp().requires_grad_(False)
    grads = taylor_gradients(net, _data(), batches=1, clip_val=1.0)
    assert all(bool(g.any()) for g in grads.values())
    assert not any(p.requires_grad for p in net.parameters())


def test_taylor_gradients_restore_the_frozen_flags_after_an_error() -> None:
    net = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="integer class indices"):
        taylor_gradients(net, [(torch.randn(8, 16), torch.rand(8))], batches=1)
    assert not any(p.requires_grad for p in net.parameters())


# 2. include / exclude patterns that match nothing


@pytest.mark.parametrize("key", ["include", "exclude"])
def test_reconstruct_prune_refuses_a_pattern_that_matches_no_parameter(key: str) -> None:
    net = _mlp()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=rf"{key} pattern\(s\) \['head\.\*'\] match no parameter name.*'0\.weight'"):
        reconstruct_prune(net, [torch.randn(64, 16)], 0.5, progress=False, **{key: ["head.*"]})
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_reconstruct_prune_takes_a_single_exclude_string_as_one_pattern() -> None:
    net = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = reconstruct_prune(net, [torch.randn(64, 16)], 0.5, progress=False, exclude="2.*")
    assert [layer.name for layer in report.layers] == ["0.weight"]


# 3. the dict-batch hint works as written


def test_the_inputs_hint_for_a_dict_batch_works_as_written() -> None:
    class DictModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 4)

        def forward(self, batch: dict) -> torch.Tensor:
            return self.lin(batch["img"])

    loader = [{"img": torch.randn(32, 16), "y": torch.zeros(32)}]
    with pytest.raises(ValueError, match="got dict") as err:
        reconstruct_prune(DictModel(), loader, 0.5, num_samples=32, progress=False)
    text = str(err.value)
    inputs_hint = text.split("e.g. `", 1)[1].split("`", 1)[0]
    forward_hint = text.split("e.g. `", 2)[2].split("`", 1)[0]
    assert inputs_hint == "lambda b: b['img']"
    model = DictModel()
    _, report = reconstruct_prune(
        model, loader, 0.5, num_samples=32, progress=False, inputs=eval(inputs_hint), forward=eval(forward_hint)
    )
    assert report.pruned == 32


# 4. load_inference keywords


def test_load_inference_strict_false_is_a_real_way_out(tmp_path) -> None:
    path = tmp_path / "small.lcps"
    save_sparse(_mlp(), path)
    bigger = nn.Sequential(*_mlp(), nn.Linear(4, 4))
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"`strict=False` \(of load_sparse_into / load_inference\)"):
        load_inference(bigger, str(path), example_input=x)
    fast = load_inference(bigger, str(path), example_input=x, strict=False)
    assert fast(x).shape == (4, 4)


def test_load_inference_refuses_unknown_and_ignored_keywords(tmp_path) -> None:
    net, x = _mlp(), torch.randn(4, 16)
    path = tmp_path / "recipe.lcps"
    save_inference(net, to_inference(net, example_input=x), str(path))
    fresh = _mlp(seed=5)
    before = fresh[0].weight.detach().clone()
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['batch_sise'\].*'batch_size'"):
        load_inference(fresh, str(path), example_input=x, batch_sise=256)
    with pytest.raises(ValueError, match=r"inference recipe .* so \['compact', 'device'\] would be ignored"):
        load_inference(fresh, str(path), example_input=x, compact=False, device="cuda")
    assert torch.equal(fresh[0].weight, before)  # nothing loaded on a refusal
    assert load_inference(fresh, str(path), example_input=x, batch_size=4, progress=False) is not None


# 5. NaN / inf in calibration data


def test_nan_in_calibration_data_is_named_not_blamed_on_damping() -> None:
    net = _mlp()
    before = net[0].weight.detach().clone()
    x = torch.randn(64, 16)
    x[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"calibration batch 0 .* NaN or inf") as err:
        reconstruct_prune(net, [x], 0.5, progress=False)
    assert "damp" not in str(err.value)
    assert torch.equal(net[0].weight, before)


def test_a_layer_whose_inputs_turn_non_finite_is_named() -> None:
    net = _mlp()
    with torch.no_grad():
        net[0].weight[0, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"the inputs of `2\.weight` .* NaN or inf"):
            reconstruct_prune(net, [torch.randn(64, 16)], 0.5, progress=False)


# 6. one-shot iterators


@pytest.mark.parametrize("search", [search_threshold, layer_sensitivity])
def test_a_generator_loader_is_refused_up_front(search) -> None:
    data = _data()
    with pytest.raises(ValueError, match=r"must be re-iterable \(a DataLoader or a list of batches\)"):
        search(_mlp(), (b for b in data))


# 7. labels


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (torch.rand(32), r"labels are torch.float32.*4 logits columns"),
        (torch.full((32,), 7), r"a label is 7, outside \[0, 4\).*4 logits columns"),
        (torch.full((32,), -1), r"a label is -1, outside \[0, 4\)"),
    ],
)
def test_bad_labels_are_one_line_not_torch_errors(labels: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        search_threshold(_mlp(), [(torch.randn(32, 16), labels)])


def test_labels_of_minus_100_count_for_nothing_as_in_cross_entropy() -> None:
    from lightning_clipprune.search import evaluate

    net, x = nn.Linear(16, 4), torch.randn(32, 16)
    y = net(x).argmax(1)
    padded = y.clone()
    padded[::2] = -100  # Hugging Face's padding tokens: ignored by F.cross_entropy
    acc, loss = evaluate(net, [(x, padded)])
    assert acc == 1.0 and loss == pytest.approx(float(nn.functional.cross_entropy(net(x)[1::2], y[1::2])), rel=1e-5)
    with pytest.raises(ValueError, match=r"a label is -1, outside \[0, 4\)"):
        evaluate(net, [(x, torch.full((32,), -1))])


# 8. a target above the sensitivity grid


def test_suggest_layer_sparsity_clamps_a_target_above_the_grid_with_a_warning() -> None:
    sens = SensitivityResult([0.5, 0.6], 0.9, {"a": [0.9, 0.9], "b": [0.9, 0.8]}, {"a": 100, "b": 100})
    with pytest.raises(ValueError, match=r"above the largest sparsity of the sensitivity grid \(0\.6\).*add a grid"):
        suggest_layer_sparsity(sens, 0.909)
    with pytest.warns(UserWarning, match=r"0\.909 is above the largest sparsity .* \(0\.6\)"):
        allocation = suggest_layer_sparsity(sens, 0.909, clamp=True)
    assert sum(allocation.values()) / 2 == pytest.approx(0.6, abs=1e-3)


# 9. a grid point that rounds to every weight


def test_a_grid_point_rounding_to_every_weight_is_searched_one_short() -> None:
    net = _mlp()  # 640 weights
    val = [(torch.randn(64, 16), torch.randint(0, 4, (64,)))]
    with pytest.warns(UserWarning, match=r"0\.9999 would prune every one of the 640 weights"):
        result = search_threshold(net, val, tolerance=100.0, grid=(0.5, 0.9999))
    assert result.chosen.sparsity == 639 / 640
    assert all(p.sparsity < 1.0 for p in result.points)
    assert not any("1.0000" in o for o in result.overrides())


def test_sparsity_text_never_rounds_a_sparsity_below_one_up_to_one() -> None:
    assert sparsity_text(0.5) == "0.5000"
    assert sparsity_text(0.99999) == "0.99999"
    assert float(sparsity_text(1 - 1e-9)) < 1.0


# 10. a model pruned already (its run's N:M zeros) keeps every zero through the reconstruction


def test_reconstruction_never_revives_the_zeros_a_run_left() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        for layer in (net[2], net[4]):  # 2:4 along the inputs, as the run's nm24 left them; the first layer dense
            w = layer.weight.view(-1, 4)
            w.scatter_(1, w.abs().argsort(1)[:, :2], 0.0)
    zeros = {n: p.detach() == 0 for n, p in net.named_parameters() if n.endswith("weight")}
    reconstruct_prune(net, [torch.randn(256, 16)], 0.7, progress=False, num_samples=256)
    for name, p in net.named_parameters():
        if name in zeros:
            assert not bool((zeros[name] & (p.detach() != 0)).any()), name
            assert int((p.detach().view(p.shape[0], -1, 4) != 0).sum(-1).max()) <= 2 or name == "0.weight"
