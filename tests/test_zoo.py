"""Models nobody here wrote (issue 25): Hugging Face and timm models trained with the three callbacks.

Tiny configurations built from configuration, no download. Each model trains a few steps with
``GradientClipCallback``, ``MagnitudePruneCallback(sparsity=0.8)`` and ``SparsityLogger``, and the test
asserts: the global target is reached over the intended layers, no layer is emptied, pruned weights stay
exactly zero, the export round-trips; GPT-2 also resumes bit-identically from a checkpoint and prunes 2:4
along the input dimension of its ``Conv1D`` weights. The libraries are optional (``pip install -e .[zoo]``, with a constraint that keeps the installed
torch: ``.ci/run``); a test whose library is absent is skipped. timm imports torchvision, and PyPI's
torchvision wheels are pinned to one torch: beside a CPU torch with no matching torchvision the timm and
torchvision tests skip, so ``.ci/run`` runs this file a second time in a venv with the matching pair
torch 2.14.1 + torchvision 0.29.1.

The wrappers that no library is needed for (Conv1D by duck type, weight norm, other parametrisations,
``torch.ao`` QAT, LoRA, timm's standardised convolutions) are tested with stand-in modules at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clipprune import GradientClipCallback, MagnitudePruneCallback, SparsityLogger
from lightning_clipprune.export import load_sparse, save_sparse
from lightning_clipprune.pruning import (
    Layout,
    compute_masks,
    dense_modules,
    select_prunable_parameters,
    tied_names,
    weight_layouts,
)

VOCAB, SEQ, BATCH, STEPS = 64, 16, 4, 8


class Wrap(L.LightningModule):
    """A LightningModule around a library model: ``loss_fn(net, batch)`` gives the loss."""

    def __init__(self, net: nn.Module, loss_fn: Callable[[nn.Module, tuple], torch.Tensor]) -> None:
        super().__init__()
        self.net, self.loss_fn = net, loss_fn

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        return self.loss_fn(self.net, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _tokens() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH * STEPS // 2, SEQ), generator=g)
    return DataLoader(TensorDataset(ids), batch_size=BATCH)  # 4 batches an epoch


def _images(size: int = 32, classes: int = 10) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * STEPS // 2, 3, size, size, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, classes, (len(x),), generator=g)), batch_size=BATCH)


def _lm_loss(net: nn.Module, batch: tuple) -> torch.Tensor:
    return net(input_ids=batch[0], labels=batch[0]).loss


def _cls_loss(net: nn.Module, batch: tuple) -> torch.Tensor:
    out = net(batch[0])
    logits = out.logits if hasattr(out, "logits") else out
    return nn.functional.cross_entropy(logits, batch[1])


def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(cfg)


def _llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ)
    return transformers.LlamaForCausalLM(cfg)


def _vit() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=10,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.ViTForImageClassification(cfg)


def _timm(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        timm = pytest.importorskip("timm")  # skips too when its torchvision import fails (no matching wheel)
        kwargs = {"dims": (8, 16, 24, 32), "depths": (1, 1, 1, 1)} if "convnext" in name else {}
        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    return make


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        models = pytest.importorskip("torchvision.models")
        return getattr(models, name)(num_classes=10)
    return make


ZOO = {
    "gpt2": (_gpt2, _tokens, _lm_loss),
    "bert": (_bert, _tokens, _lm_loss),
    "llama": (_llama, _tokens, _lm_loss),
    "vit": (_vit, _images, _cls_loss),
    "timm-resnet18": (_timm("resnet18"), _images, _cls_loss),
    "timm-convnext": (_timm("convnext_atto"), _images, _cls_loss),
    "torchvision-resnet18": (_torchvision("resnet18"), _images, _cls_loss),
    "torchvision-mobilenet": (_torchvision("mobilenet_v3_small"), _images, _cls_loss),
}


def _fit(net: nn.Module, loader: DataLoader, loss_fn: Callable, tmp_path: Path, **prune_kw) -> tuple:
    prune = MagnitudePruneCallback(**{"sparsity": 0.8, "start": 2, "end": 6, "frequency": 2, **prune_kw})
    model = Wrap(net, loss_fn)
    trainer = L.Trainer(
        max_steps=STEPS, callbacks=[GradientClipCallback(1.0), prune, SparsityLogger(print_table=False)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, deterministic=True,
    )
    trainer.fit(model, loader)
    return model, prune


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_trains_to_target_and_exports(name: str, tmp_path: Path) -> None:
    make, data, loss_fn = ZOO[name]
    L.seed_everything(0)
    net = make()
    model, prune = _fit(net, data(), loss_fn, tmp_path)
    params = dict(model.named_parameters())
    pruned = sum(int((params[n] == 0).sum()) for n in prune.parameter_names)
    total = sum(params[n].numel() for n in prune.parameter_names)
    assert pruned / total == pytest.approx(0.8, abs=1e-3), name  # global target over the pruned weights
    for n in prune.parameter_names:
        assert bool((params[n][~prune.masks[n]] == 0).all()), f"{name}: {n} has pruned weights that moved"
        assert int(prune.masks[n].sum()) > 0, f"{name}: layer {n} collapsed"
    path = tmp_path / "model.lcps"
    save_sparse(model, path)
    back = load_sparse(path)
    for key, value in model.state_dict().items():
        assert torch.equal(back[key], value), key


def test_gpt2_prunes_conv1d_leaves_tied_wte_dense_and_names_it(tmp_path: Path, caplog) -> None:
    L.seed_everything(0)
    net = _gpt2()
    conv1d = [n for n, m in net.named_modules() if type(m).__name__ == "Conv1D"]
    with caplog.at_level(logging.INFO):
        model, prune = _fit(net, _tokens(), _lm_loss, tmp_path)
    assert prune.parameter_names == [f"net.{n}.weight" for n in conv1d]  # all eight, and nothing else
    wte = model.net.transformer.wte.weight
    assert int((wte == 0).sum()) == 0  # the tied embedding stays dense
    assert "`net.lm_head.weight` (the same tensor as `net.transformer.wte.weight`)" in caplog.text
    assert "include_tied=True" in caplog.text
    assert tied_names(net) == {"lm_head.weight": ["transformer.wte.weight"]}
    assert all(layout.transposed for layout in weight_layouts(net, [f"{n}.weight" for n in conv1d]).values())


def test_gpt2_include_tied_prunes_the_head(tmp_path: Path) -> None:
    L.seed_everything(0)
    model, prune = _fit(_gpt2(), _tokens(), _lm_loss, tmp_path, include_tied=True)
    assert "net.lm_head.weight" in prune.parameter_names or "net.transformer.wte.weight" in prune.parameter_names


def test_gpt2_two_four_runs_along_the_conv1d_input_dim(tmp_path: Path) -> None:
    L.seed_everything(0)
    model, prune = _fit(_gpt2(), _tokens(), _lm_loss, tmp_path, pattern="2:4", sparsity=None)
    for n in prune.parameter_names:
        mask = prune.masks[n]  # (in, out): groups of 4 consecutive inputs at each output column keep exactly 2
        assert bool((mask.reshape(mask.shape[0] // 4, 4, mask.shape[1]).sum(1) == 2).all()), n


def test_gpt2_resume_is_bit_identical(tmp_path: Path) -> None:
    # max_epochs, not max_steps: resumed from an end-of-epoch checkpoint under max_steps, Lightning 2.6 replays
    # the first batch of the next epoch (it restarts "mid-epoch" at batch 4 of 4), with or without callbacks.
    def run(ckpt: str | None) -> tuple[dict, dict]:
        L.seed_everything(0)
        model = Wrap(_gpt2(), _lm_loss)
        prune = MagnitudePruneCallback(sparsity=0.8, start=2, end=6, frequency=2)
        saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
        trainer = L.Trainer(max_epochs=2, callbacks=[GradientClipCallback(1.0), prune, saver], logger=False,
                            enable_progress_bar=False, enable_model_summary=False, deterministic=True)
        trainer.fit(model, _tokens(), ckpt_path=ckpt)
        assert trainer.global_step == STEPS
        return {k: v.clone() for k, v in model.state_dict().items()}, dict(prune.masks)

    straight, straight_masks = run(None)
    first = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]  # after step 4, between two pruning events
    resumed, resumed_masks = run(str(first))
    assert straight_masks.keys() == resumed_masks.keys()
    for k, mask in straight_masks.items():
        assert torch.equal(mask, resumed_masks[k]), k
    for k, w in straight.items():
        assert torch.equal(w, resumed[k]), k


def test_gpt2_warns_when_little_is_prunable(tmp_path: Path) -> None:
    net = _gpt2()  # the embeddings hold most of its parameters at this size
    selected = list(select_prunable_parameters(net))
    largest = dense_modules(net, selected)[0]
    assert largest.name == "transformer.wte" and "tied to `lm_head.weight`" in largest.reason
    with pytest.warns(UserWarning, match=r"only .* of the model's .* parameters.*`net.0` \(16,000 parameters: Embedding"):
        _fit(nn.Sequential(nn.Embedding(500, 32), nn.Linear(32, 4)), _tokens(), lambda n, b: n(b[0]).mean(), tmp_path)


# ------------------------------------------------------------------------------------ stand-ins, no library


class Conv1D(nn.Module):
    """Hugging Face's Conv1D: ``y = x @ W + b`` with ``W`` stored ``(nx, nf)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def test_register_layout_for_a_user_layer_type() -> None:
    from lightning_clipprune.pruning import register_layout
    from lightning_clipprune.pruning.selection import _EXTRA_PRUNABLE, _LAYOUTS

    class RowsIn(nn.Module):  # the docs/pruning.md example: y = x @ W, W stored (in, out)
        def __init__(self, n_in: int, n_out: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n_in, n_out))

    register_layout(RowsIn, Layout(transposed=True), prunable=True)
    try:
        net = nn.Sequential(RowsIn(8, 4))
        assert list(select_prunable_parameters(net)) == ["0.weight"]
        assert weight_layouts(net) == {"0.weight": Layout(transposed=True)}
        mask = compute_masks(dict(net.named_parameters()), sparsity=0.5, pattern="2:4", layouts=weight_layouts(net))
        assert bool((mask["0.weight"].reshape(2, 4, 4).sum(1) == 2).all())  # groups along its input dim 0
    finally:
        del _LAYOUTS[RowsIn]
        _EXTRA_PRUNABLE.remove(RowsIn)


def test_conv1d_by_duck_type_layout_for_nm_channel_and_selection() -> None:
    net = nn.Sequential(Conv1D(8, 12), nn.ReLU(), nn.Linear(8, 4))
    assert list(select_prunable_parameters(net)) == ["0.weight", "2.weight"]
    layouts = weight_layouts(net)
    assert layouts == {"0.weight": Layout(transposed=True)}
    w = {"0.weight": net[0].weight.detach()}
    nm = compute_masks(w, sparsity=0.5, pattern="2:4", scope="local", layouts=layouts)["0.weight"]
    assert bool((nm.reshape(3, 4, 8).sum(1) == 2).all())  # along the input dim 0
    ch = compute_masks(w, sparsity=0.25, pattern="channel", scope="local", layouts=layouts)["0.weight"]
    kept_cols = ch.all(0)
    assert int(kept_cols.sum()) == 6 and bool((ch == kept_cols.expand_as(ch)).all())  # whole output columns


def test_weight_norm_prunes_v_and_the_weight_stays_sparse() -> None:
    lin = nn.utils.parametrizations.weight_norm(nn.Linear(8, 4))
    names = list(select_prunable_parameters(nn.Sequential(lin)))
    assert names == ["0.parametrizations.weight.original1"]
    with torch.no_grad():
        lin.parametrizations.weight.original1[:, :4] = 0
    assert bool((lin.weight[:, :4] == 0).all())  # w = g * v / ||v||: zeros of v are zeros of w


def test_other_parametrizations_are_left_dense_with_the_reason() -> None:
    class Symmetric(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.triu() + x.triu(1).T

    lin = nn.Linear(4, 4)
    nn.utils.parametrize.register_parametrization(lin, "weight", Symmetric())
    net = nn.Sequential(lin, nn.Linear(4, 2))
    selected = list(select_prunable_parameters(net))
    assert selected == ["1.weight"]
    reason = next(d.reason for d in dense_modules(net, selected) if d.name.startswith("0"))
    assert "parametrisation" in reason


def test_qat_fake_quant_linear_is_pruned_and_zeros_survive_fake_quant() -> None:
    qat = pytest.importorskip("torch.ao.nn.qat")
    lin = qat.Linear(8, 4, qconfig=torch.ao.quantization.get_default_qat_qconfig("fbgemm"))
    assert list(select_prunable_parameters(nn.Sequential(lin))) == ["0.weight"]
    with torch.no_grad():
        lin.weight[:, :4] = 0
    assert bool((lin.weight_fake_quant(lin.weight)[:, :4] == 0).all())


def test_lora_adapters_are_never_pruned_the_base_weight_is() -> None:
    class LoraLinear(nn.Module):  # peft's lora.Linear: base_layer plus lora_A / lora_B ModuleDicts
        def __init__(self) -> None:
            super().__init__()
            self.base_layer = nn.Linear(8, 8)
            self.lora_A = nn.ModuleDict({"default": nn.Linear(8, 2, bias=False)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(2, 8, bias=False)})

    net = nn.Sequential(LoraLinear())
    assert list(select_prunable_parameters(net)) == ["0.base_layer.weight"]
    net[0].base_layer.weight.requires_grad_(False)  # as peft freezes it: left dense unless prune_frozen
    assert list(select_prunable_parameters(net)) == []
    assert list(select_prunable_parameters(net, include_frozen=True)) == ["0.base_layer.weight"]
    reasons = {d.name: d.reason for d in dense_modules(net, [])}
    assert "LoRA adapter" in reasons["0.lora_A.default"]


def test_timm_standardised_conv_is_left_dense_with_the_reason() -> None:
    class StdConv2d(nn.Conv2d):  # timm: the weight is standardised in forward
        pass

    net = nn.Sequential(StdConv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    selected = list(select_prunable_parameters(net))
    assert selected == ["1.weight"]
    assert "standardises its weight" in dense_modules(net, selected)[0].reason
