"""Hugging Face models the way users bring them: Llama and GPT-2 through coupling, compaction, regrowth, the
threshold search and the inference report. Tiny configurations, no download; the tests that need
``transformers`` or Torch-Pruning skip without them (``.ci/run`` installs both).
"""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clipprune import MagnitudePruneCallback, to_inference
from lightning_clipprune.pruning import Layout
from lightning_clipprune.pruning.regrow import clipped_pruned_scores, drop_and_grow
from lightning_clipprune.search import evaluate, search_threshold
from tests.helpers import tiny_trainer

VOCAB, SEQ = 200, 16


def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg)


class _Logits(L.LightningModule):
    """A causal LM whose forward returns the logits tensor, trained on its own next-token loss."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, input_ids):
        return self.net(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        return self.net(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _tokens(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randint(0, VOCAB, (n, SEQ), generator=g)), batch_size=4)


def _zero_half_the_rows(net: nn.Module) -> None:
    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, nn.Linear) and not name.endswith("lm_head"):
                m.weight[: m.weight.shape[0] // 2] = 0


def test_compacting_a_llama_whose_channels_cannot_be_traced_returns_with_one_line():
    """Torch-Pruning's dependency walk loops on Llama's attention: it is stopped, and the model stays uncompacted."""
    pytest.importorskip("torch_pruning")
    net = _Logits(_llama()).eval()
    _zero_half_the_rows(net)
    x = torch.randint(0, VOCAB, (2, SEQ))
    with pytest.warns(UserWarning, match=r"zero output channels are kept: compact: cannot trace .* does not end") as got:
        fast = to_inference(net, example_input=x[:1], min_sparsity=1.0)
    assert fast.clipprune_inference.compacted == {} and all("\n" not in str(w.message) for w in got)
    with pytest.raises(ValueError, match=r"cannot trace this model's channels .*; pass compact=False"):
        to_inference(net, example_input=x[:1], compact=True)


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_coupling_a_model_torch_pruning_cannot_trace_warns_and_prunes_layer_by_layer(tmp_path, model):
    """Llama: the walk does not end; GPT-2: Torch-Pruning raises a TypeError. Either way the fit goes on."""
    pytest.importorskip("torch_pruning")
    net = _Logits(_llama() if model == "llama" else _gpt2())
    prune = MagnitudePruneCallback(
        sparsity=0.5, pattern="channel", scope="local", couple_channels=True, exclude=["*lm_head*"], end=0.5
    )
    trainer = tiny_trainer(tmp_path, max_steps=4, max_epochs=None, callbacks=[prune])
    with pytest.warns(UserWarning, match=r"coupled channels cannot be traced \(.*\): every layer is pruned on its own"):
        trainer.fit(net, _tokens())
    assert trainer.global_step == 4 and prune.current_target == pytest.approx(0.5)


def test_gpt2_compaction_says_its_conv1d_channels_are_kept():
    net = _Logits(_gpt2()).eval()
    with torch.no_grad():
        for block in net.net.transformer.h:
            block.mlp.c_fc.weight[:, :128] = 0  # Conv1D (in, out): half the output columns
    x = torch.randint(0, VOCAB, (2, SEQ))
    with pytest.raises(ValueError, match=r"Hugging Face Conv1D layers \(net.transformer.h.0.mlp.c_fc, .*\) are kept"):
        to_inference(net, example_input=x[:1], compact=True)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        to_inference(net, example_input=x[:1], min_sparsity=1.0)
    assert any("Conv1D layers" in str(w.message) for w in got)


def test_compacting_a_model_that_returns_a_model_output_names_the_fix():
    pytest.importorskip("torch_pruning")
    net = _llama().eval()
    with torch.no_grad():
        net.lm_head.weight[:10] = 0
    with pytest.raises(ValueError, match=r"returns a CausalLMOutputWithPast, not a tensor, .* or pass compact=False"):
        to_inference(net, example_input=torch.randint(0, VOCAB, (1, SEQ)), compact=True)


def test_regrowth_keeps_a_live_weight_in_every_output_column_of_a_conv1d():
    """A Conv1D stores (in, out): its output channels are columns, and regrowth protects one weight in each."""
    torch.manual_seed(0)
    w = torch.randn(8, 3)  # 8 inputs, 3 output channels
    mask = torch.zeros(8, 3, dtype=torch.bool)
    mask[0, :] = True  # one live weight per output column
    score = torch.rand(8, 3) * ~mask
    new, _ = drop_and_grow(w, mask, score, 1.0, Layout(transposed=True))
    assert bool(new.any(dim=0).all()) and int(new.sum()) == 3
    # the same weight read as (out, in) would protect rows, and a column could end with none
    raw = torch.randn(8, 3)
    clipped = raw * mask * 0.5  # the clip halved every column's live gradient
    scores = clipped_pruned_scores(raw, clipped, mask, Layout(transposed=True))
    assert torch.allclose(scores, raw.abs() * 0.5 * ~mask)


def test_regrowth_on_gpt2_never_empties_an_output_channel(tmp_path):
    net = _Logits(_gpt2())
    prune = MagnitudePruneCallback(
        sparsity=0.97, ranking="raw", start=1, end=4, frequency=1,
        regrow={"method": "set", "fraction": 0.5, "interval": 1, "end": 1.0},
    )
    tiny_trainer(tmp_path, max_steps=16, max_epochs=None, callbacks=[prune]).fit(net, _tokens(64))
    conv1d = {n: m for n, m in prune.masks.items() if "attn" in n or "mlp" in n}
    assert conv1d and all(bool(m.any(dim=0).all()) for m in conv1d.values())  # every output column keeps one


class _TokenClassifier(nn.Module):
    """Per-token logits in F.cross_entropy's layout (N, C, T), or (N, T, C) with `channels_last`."""

    def __init__(self, channels_last: bool = False) -> None:
        super().__init__()
        self.emb, self.head, self.channels_last = nn.Embedding(20, 8), nn.Linear(8, 5), channels_last

    def forward(self, x):
        logits = self.head(self.emb(x))  # (N, T, C)
        return logits if self.channels_last else logits.transpose(1, 2)


def test_evaluate_counts_every_token_of_per_token_logits():
    torch.manual_seed(0)
    net = _TokenClassifier()
    x = torch.randint(0, 20, (6, 7))
    with torch.no_grad():
        y = net(x).argmax(1)
    y[:, 0] = (y[:, 0] + 1) % 5  # one token in 7 wrong
    acc, loss = evaluate(net, [(x, y)])
    assert acc == pytest.approx(6 / 7)
    assert loss == pytest.approx(float(nn.functional.cross_entropy(net(x), y)), rel=1e-5)
    with pytest.raises(ValueError, match=r"logits \(6, 7, 5\) do not fit the labels \(6, 7\).*transpose\(1, 2\)"):
        evaluate(_TokenClassifier(channels_last=True), [(x, y)])


def test_the_search_reads_the_logits_of_a_model_output():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=SEQ, num_labels=3,
    )
    net = transformers.BertForSequenceClassification(cfg).eval()
    x = torch.randint(0, VOCAB, (16, SEQ))
    with torch.no_grad():
        y = net(x).logits.argmax(1)
    result = search_threshold(net, [(x, y)], grid=(0.5, 0.9))
    assert result.dense_val_acc == 1.0 and result.chosen is not None


def test_the_search_takes_a_tied_weight_by_either_name_and_prunes_it_once():
    from lightning_clipprune.search.ranking import prunable_parameters

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    assert list(prunable_parameters(model, ["head.weight"])) == ["head.weight"]
    assert list(prunable_parameters(model, ["emb.weight", "head.weight"])) == ["emb.weight"]
