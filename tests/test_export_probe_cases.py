"""Export and inference cases found by probing: recipes that named a fused parameter, compiled submodules.

- ``python -m lightning_clipprune.export --inference-batch-size`` timed every 2-D key ending in ``weight`` as a
  ``Linear``, so ``MultiheadAttention.in_proj_weight`` (a parameter, not a module) could be named in the recipe
  and ``load_inference`` then refused the file of the very model it came from.
- ``to_inference`` reported the layers inside a ``torch.compile``'d module as "not run by the example input":
  the input hooks do not fire inside dynamo's graph.

The timing is injected (``timer=``) wherever a test asserts a choice, so no assertion depends on the machine's speed.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_clipprune.export import (
    SparseLinear,
    inference_report,
    load_inference,
    read_sparse_metadata,
    save_inference,
    save_sparse,
    to_inference,
)
from lightning_clipprune.export.__main__ import main as export_main
from lightning_clipprune.export._reparam import inference_copy
from lightning_clipprune.export.recipes import recipe_for_state_dict

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def sparse_wins(module: nn.Module, x: torch.Tensor) -> float:
    """An injected timer: every CSR layer takes 1 s, every dense one 10 s."""
    return 1.0 if isinstance(module, SparseLinear) else 10.0


def _prune_(model: nn.Module, sparsity: float = 0.9, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.rand(p.shape, generator=g) >= sparsity)
    return model


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.att(x, x, x)[0].mean(1))


def _attention() -> _Attention:
    torch.manual_seed(0)
    return _prune_(_Attention(), 0.95).eval()


def _layers(recipe: dict) -> dict[str, dict]:
    return {layer["name"]: layer for layer in recipe["layers"]}


# --- recipes of a bare state dict name only real layers -------------------------------------------------------


def test_a_state_dict_recipe_leaves_fused_attention_weights_dense_and_untimed() -> None:
    timed: set[int] = set()

    def timer(module: nn.Module, x: torch.Tensor) -> float:
        if isinstance(module, nn.Linear):
            timed.add(module.out_features)
        return sparse_wins(module, x)

    state = {f"net.{k}": v for k, v in _attention().state_dict().items()}
    recipe = recipe_for_state_dict(state, 8, rounds=1, timer=timer)
    assert recipe["csr"] == ["net.fc"] and set(recipe["kernels"]) == {"net.fc"}
    layers = _layers(recipe)
    in_proj = layers["net.att.in_proj_weight"]
    assert in_proj["format"] == "dense" and in_proj["dense_s"] is None and in_proj["kind"] == "parameter"
    assert "not a layer's weight" in in_proj["reason"] and in_proj["sparsity"] > 0.9
    out_proj = layers["net.att.out_proj"]
    assert out_proj["format"] == "dense" and out_proj["dense_s"] is None
    assert "inside MultiheadAttention net.att" in out_proj["reason"]
    assert timed == {4}  # only net.fc (32 -> 4) was timed, not in_proj (32 -> 96) nor out_proj (32 -> 32)


def test_a_state_dict_recipe_keeps_encoder_layers_dense_but_times_decoder_feed_forwards() -> None:
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    dec = nn.TransformerDecoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    state = {**{f"enc.{k}": v for k, v in _prune_(enc).state_dict().items()},
             **{f"dec.{k}": v for k, v in _prune_(dec).state_dict().items()}}
    recipe = recipe_for_state_dict(state, 4, rounds=1, timer=sparse_wins)
    assert sorted(recipe["csr"]) == ["dec.linear1", "dec.linear2"]
    layers = _layers(recipe)
    assert "inside TransformerEncoderLayer enc" in layers["enc.linear1"]["reason"]
    assert "inside MultiheadAttention dec.multihead_attn" in layers["dec.multihead_attn.out_proj"]["reason"]


def test_the_command_line_recipe_of_an_attention_model_loads_into_that_model(tmp_path, capsys) -> None:
    net = _attention()
    ckpt, out = tmp_path / "m.ckpt", tmp_path / "m.lcps"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, ckpt)
    assert export_main([str(ckpt), str(out), "--inference-batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "inference    net.att.in_proj_weight: " in printed and "-> dense (a parameter" in printed
    recipe = read_sparse_metadata(str(out))["user"]["inference_recipe"]
    assert not [n for n in recipe["csr"] if n.startswith("net.att")]
    x = torch.randn(3, 5, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a recipe of this version replays without a warning
        fast = load_inference(_Attention(), str(out), example_input=x, prefix="net.")
    with torch.inference_mode():
        assert torch.allclose(fast(x), net(x), atol=1e-5)


def test_an_older_recipe_naming_a_parameter_replays_with_a_warning(tmp_path) -> None:
    net = _attention()
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    old = {"device": "cpu", "batch_size": 8, "compact": False, "csr": ["net.att.in_proj_weight", "net.fc"],
           "kernels": {"net.att.in_proj_weight": "embedding_bag", "net.fc": "mm"}, "layers": []}
    path = tmp_path / "old.lcps"
    save_sparse(state, str(path), metadata={"inference_recipe": old})
    x = torch.randn(3, 5, 32)
    with pytest.warns(UserWarning, match=r"names \['att.in_proj_weight'\], parameter\(s\) of _Attention"):
        fast = load_inference(_Attention(), str(path), example_input=x, prefix="net.")
    report = inference_report(fast)
    assert report.sparse_names() == ["fc"] and isinstance(fast.fc, SparseLinear)
    (param,) = [c for c in report.layers if c.name == "att.in_proj_weight"]
    assert param.format == "dense" and param.kind == "parameter"
    with torch.inference_mode():
        assert torch.allclose(fast(x), net(x), atol=1e-5)
    old["csr"] = ["net.att.no_such_weight"]
    save_sparse(state, str(path), metadata={"inference_recipe": old})
    with pytest.raises(ValueError, match=r"'att.no_such_weight', which is not a module of _Attention"):
        load_inference(_Attention(), str(path), example_input=x, prefix="net.")


# --- torch.compile'd models and submodules --------------------------------------------------------------------


class _CompiledEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.compile(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)), backend="eager")
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.enc(x)))


def _compiled_encoder() -> _CompiledEncoder:
    torch.manual_seed(0)
    return _prune_(_CompiledEncoder())


def test_layers_inside_a_compiled_submodule_are_timed_and_converted() -> None:
    net = _compiled_encoder()
    x = torch.randn(6, 32)
    net(x)  # compiled before the conversion, as after training
    fast = to_inference(net, example_input=x, rounds=1, timer=sparse_wins)
    report = inference_report(fast)
    assert sorted(report.sparse_names()) == ["enc.0", "enc.2", "head"], str(report)
    assert not [c for c in report.layers if "not run" in c.reason]
    assert isinstance(fast.enc[0], SparseLinear) and type(net.enc).__name__ == "OptimizedModule"  # net untouched
    with torch.inference_mode():
        assert torch.allclose(fast(x), net(x), atol=1e-5)


def test_a_compiled_model_is_converted_as_the_model_it_wraps() -> None:
    torch.manual_seed(0)
    plain = _prune_(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)))
    net = torch.compile(plain, backend="eager")
    x = torch.randn(6, 32)
    fast = to_inference(net, example_input=x, rounds=1, timer=sparse_wins)
    assert isinstance(fast, nn.Sequential) and sorted(inference_report(fast).sparse_names()) == ["0", "2"]
    with torch.inference_mode():
        assert torch.allclose(fast(x), net(x), atol=1e-5)


def test_a_compiled_model_round_trips_and_a_state_dict_recipe_with_orig_mod_replays(tmp_path) -> None:
    net = _compiled_encoder()
    x = torch.randn(6, 32)
    fast = to_inference(net, example_input=x, rounds=1, timer=sparse_wins)
    path = tmp_path / "c.lcps"
    save_inference(net, fast, str(path))
    again = load_inference(_CompiledEncoder(), str(path), example_input=x)
    assert sorted(inference_report(again).sparse_names()) == ["enc.0", "enc.2", "head"]
    # what the command line writes for it: the state dict's keys, `_orig_mod.` included
    recipe = recipe_for_state_dict(net.state_dict(), 6, rounds=1, timer=sparse_wins)
    assert sorted(recipe["csr"]) == ["enc._orig_mod.0", "enc._orig_mod.2", "head"]
    save_sparse(net.state_dict(), str(path), metadata={"inference_recipe": recipe})
    replayed = load_inference(_CompiledEncoder(), str(path), example_input=x)
    assert sorted(inference_report(replayed).sparse_names()) == ["enc.0", "enc.2", "head"]
    with torch.inference_mode():
        assert torch.allclose(replayed(x), net(x), atol=1e-5)


def test_the_inference_copy_unwraps_compiled_modules_and_leaves_the_original() -> None:
    net = _compiled_encoder()
    names = [n for n, _ in inference_copy(net).named_modules()]
    assert names == ["", "enc", "enc.0", "enc.1", "enc.2", "head"]
    assert type(net.enc).__name__ == "OptimizedModule"
