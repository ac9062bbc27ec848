"""Inference models stored and replayed: :func:`save_inference`, :func:`load_inference`, and the recipe of a bare
state dict (:func:`recipe_for_state_dict`, the command line's ``--inference-batch-size``).

The ``.lcps`` file holds the pruned weights and a JSON recipe (which layers compute in CSR, whether the model
was compacted): replaying it times nothing and unpickles nothing.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_clipprune.export._reparam import inference_copy
from lightning_clipprune.export._timing import Timer
from lightning_clipprune.export.compact import maybe_compact
from lightning_clipprune.export.format import load_sparse_into, read_sparse_metadata, save_sparse
from lightning_clipprune.export.inference import (
    _NO_CSR,
    _REPORT_ATTR,
    CSR_DTYPES,
    InferenceReport,
    LayerChoice,
    _batch_of,
    _candidates,
    _choose,
    _keep_layout,
    _layer_inputs,
    _set_module,
    _sparse_module,
    _sparsity,
    inference_report,
    to_inference,
)
from lightning_clipprune.export.sparse_linear import KERNELS

__all__ = ["load_inference", "recipe_for_state_dict", "save_inference"]

_RECIPE_KEY = "inference_recipe"


def save_inference(
    pruned: nn.Module, inference_model: nn.Module, path: str, *, metadata: Mapping[str, Any] | None = None
) -> int:
    """Write the pruned weights and the inference recipe (JSON) to a ``.lcps`` file; returns its size.

    The file holds the weights of ``pruned`` (as :func:`~lightning_clipprune.export.save_sparse` does)
    and, in its metadata, which layers ``inference_model`` computes in CSR and whether it was compacted,
    so :func:`load_inference` rebuilds the same inference model without timing and without unpickling.

    Example::

        fast = to_inference(net, example_input=x[:1], batch_size=256)
        save_inference(net, fast, "net.lcps")
    """
    recipe = inference_report(inference_model).recipe()
    return save_sparse(pruned, path, metadata={**dict(metadata or {}), _RECIPE_KEY: recipe})


def _to_inference_keywords() -> tuple[str, ...]:
    """The keywords :func:`to_inference` takes beyond the model and ``example_input``."""
    params = inspect.signature(to_inference).parameters
    return tuple(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n != "example_input")


def _check_keywords(kwargs: Mapping[str, Any], recipe: Any, path: str) -> None:
    """Refuse a keyword :func:`to_inference` does not take, and (with a recipe) one the recipe would ignore.

    Raises:
        TypeError: an unknown keyword (a typo): the accepted ones.
        ValueError: the file's recipe decides what the keyword asks (a batch size or device other than the
            recorded one, ``compact``, ...): how to decide afresh instead.
    """
    accepted = _to_inference_keywords()
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"load_inference() got unknown keyword(s) {unknown}: it takes prefix=, strict= and, for a file without a"
            f" recipe, to_inference's {list(accepted)}"
        )
    if not isinstance(recipe, dict):
        return
    recorded = {"batch_size": recipe.get("batch_size"), "device": recipe.get("device", "cpu")}
    ignored = sorted(k for k, v in kwargs.items() if k != "progress" and not (k in recorded and v == recorded[k]))
    if ignored:
        raise ValueError(
            f"{path}: the file holds an inference recipe (batch size {recorded['batch_size']}, device"
            f" {recorded['device']!r}) that decides every layer, so {ignored} would be ignored: drop them, or decide"
            " afresh with `load_sparse_into(module, path)` then `to_inference(module, example_input=..., ...)`"
        )


def load_inference(
    module: nn.Module, path: str, *, example_input: Tensor, prefix: str = "", strict: bool = True,
    **to_inference_kwargs: Any,
) -> nn.Module:
    """Load a ``.lcps`` file into ``module`` and return its inference model.

    With a recipe in the file (:func:`save_inference`, or ``python -m lightning_clipprune.export
    --inference-batch-size``), the recorded layers are converted without timing; without one,
    :func:`to_inference` decides (pass ``batch_size=`` then). ``module`` itself receives the pruned weights.

    Args:
        module: an instance of the saved model's class.
        path: the ``.lcps`` file.
        example_input: one real input batch (needed to trace compaction and check outputs).
        prefix: only the file's keys (and recipe names) under this prefix, with it removed: ``prefix="net."``
            loads a LightningModule's checkpoint into its bare network.
        strict: as :func:`~lightning_clipprune.export.load_sparse_into`: ``False`` loads only the keys both the
            file and ``module`` have (the others keep ``module``'s values).
        **to_inference_kwargs: passed to :func:`to_inference` when the file holds no recipe. With a recipe,
            only ``progress`` and the recorded ``batch_size``/``device`` are accepted (the recipe decides).

    Raises:
        SparseFormatError: the file is not a sparse export or does not fit ``module``.
        TypeError: a keyword :func:`to_inference` does not take.
        ValueError: the recipe names something that is neither a module nor a parameter of ``module``, or a
            keyword the recipe would ignore; nothing is loaded into ``module`` then.

    Warns:
        UserWarning: the recipe names a parameter, not a layer (such as ``MultiheadAttention.in_proj_weight``,
            which earlier versions of the command line timed as a ``Linear``): it stays dense.

    Example::

        fast = load_inference(Net(), "net.lcps", example_input=x[:1])
    """
    recipe = read_sparse_metadata(path).get("user", {}).get(_RECIPE_KEY)
    _check_keywords(to_inference_kwargs, recipe, path)
    load_sparse_into(module, path, prefix=prefix, strict=strict)
    if not isinstance(recipe, dict):
        return to_inference(module, example_input=example_input, **to_inference_kwargs)
    if prefix and isinstance(recipe.get("csr"), list):
        dotted = prefix.rstrip(".") + "."
        recipe = {**recipe, "csr": [n[len(dotted):] for n in recipe["csr"] if isinstance(n, str) and n.startswith(dotted)]}
        if isinstance(recipe.get("kernels"), dict):
            recipe["kernels"] = {n[len(dotted):]: k for n, k in recipe["kernels"].items() if n.startswith(dotted)}
    return _replay(module, recipe, example_input, path)


def _replay(module: nn.Module, recipe: dict[str, Any], example_input: Tensor, path: str) -> nn.Module:
    names, kernels = recipe.get("csr", []), recipe.get("kernels", {})  # files before kernels: MKL's product
    batch_size = recipe.get("batch_size")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not isinstance(batch_size, int):
        raise ValueError(f"{path}: the inference recipe is malformed (expected layer names and a batch size)")
    if not isinstance(kernels, dict) or not set(kernels.values()) <= set(KERNELS):
        raise ValueError(f"{path}: the inference recipe's kernels are malformed (expected names among {KERNELS})")
    out = inference_copy(module)
    x = _batch_of(example_input, None)
    out, compacted = maybe_compact(out, x, True) if recipe.get("compact") else (out, {})
    candidates, every = _candidates(out), dict(out.named_modules())
    # the inference copy holds no torch.compile wrapper: a state dict's `_orig_mod.` is not in its names
    plain = {n: n if n in every else _uncompiled_name(n) for n in [*names, *kernels]}
    names, kernels = [plain[n] for n in names], {plain[n]: k for n, k in kernels.items()}
    unknown = [n for n in names if n not in every]
    parameters = {n: t for n in unknown if (t := _own_tensor(out, n)) is not None}
    if len(parameters) < len(unknown):
        name = next(n for n in unknown if n not in parameters)
        raise ValueError(
            f"{path}: the inference recipe names {name!r}, which is not a module of {type(module).__name__}; "
            "the file was written for another model (or pass prefix= to strip a wrapper's name)"
        )
    if parameters:
        warnings.warn(
            f"{path}: the inference recipe names {sorted(parameters)}, parameter(s) of {type(module).__name__} and"
            " not layers (an earlier version timed them as Linear layers): they stay dense; export the checkpoint"
            " again for a recipe without them",
            stacklevel=3,
        )
        names = [n for n in names if n not in parameters]
    choices = [LayerChoice(n, "parameter", _sparsity(t), None, None, "dense", _NOT_A_LAYER) for n, t in parameters.items()]
    for name, m in candidates.items():
        fmt = "csr" if name in names and m.weight.dtype in CSR_DTYPES else "dense"
        why = _NO_CSR.format(dtype=m.weight.dtype) if name in names and fmt == "dense" else "from the recipe"
        kernel = kernels.get(name, KERNELS[0]) if fmt == "csr" else None
        choices.append(LayerChoice(name, type(m).__name__, _sparsity(m.weight), None, None, fmt, why, kernel))
        if kernel:
            _set_module(out, name, _sparse_module(m, kernel))
    for name in _layer_inputs(out, [n for n in candidates if n not in names], x) if names else ():
        _keep_layout(out, name, candidates[name], _layer_inputs(out, [name], x).get(name), x)
    # A 2-D weight the command line timed as a Linear may be another layer (an Embedding): it stays as it is.
    choices += [
        LayerChoice(n, type(every[n]).__name__, _weight_sparsity(every[n]), None, None, "dense", "not a Linear or Conv2d (groups=1)")
        for n in names if n not in candidates
    ]
    setattr(out, _REPORT_ATTR, InferenceReport(str(recipe.get("device", "cpu")), batch_size, choices, compacted))
    return out


def _uncompiled_name(name: str) -> str:
    """``name`` without the ``_orig_mod`` parts a ``torch.compile`` wrapper puts in state-dict keys."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def _own_tensor(model: nn.Module, name: str) -> Tensor | None:
    """The parameter or buffer ``name`` (``"att.in_proj_weight"``) of ``model``, or None when it has none."""
    owner, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return None
    tensors = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
    return tensors.get(attr)


def _weight_sparsity(module: nn.Module) -> float:
    """The fraction of zeros of ``module``'s ``weight`` (0.0 when it has none)."""
    weight = getattr(module, "weight", None)
    return _sparsity(weight) if isinstance(weight, Tensor) else 0.0


def recipe_for_state_dict(
    state: Mapping[str, Tensor], batch_size: int, *, min_sparsity: float = 0.5, margin: float = 1.05,
    rounds: int = 7, timer: Timer | None = None, progress: bool = False,
) -> dict[str, Any]:
    """The inference recipe of a bare state dict: each 2-D ``<name>.weight`` timed as a ``Linear`` at ``batch_size``.

    What ``python -m lightning_clipprune.export --inference-batch-size N`` stores, with no model class at hand:
    convolutions stay dense (their input size is unknown), and a 2-D weight that is not a ``Linear`` (an
    ``Embedding``) is left dense when :func:`load_inference` replays the recipe on the real model. A 2-D
    parameter named ``...weight`` that is not a layer's ``weight`` (``MultiheadAttention``'s ``in_proj_weight``)
    and the layers inside a ``MultiheadAttention`` or ``TransformerEncoderLayer`` (recognised by their keys) are
    listed dense and untimed, as :func:`to_inference` keeps them: their module's fused kernel reads the weights.

    Example::

        >>> lin = nn.Linear(8, 4)
        >>> recipe_for_state_dict({"fc.weight": lin.weight, "fc.bias": lin.bias}, 2, rounds=1)["csr"]
        []
    """
    keys = [k for k, w in state.items() if k.endswith("weight") and w.dim() == 2 and w.is_floating_point()]
    fused = _fused_parents(state)
    untimed = {k: _why_untimed(k, fused) for k in keys}
    choices = {
        k: LayerChoice(k, "parameter", _sparsity(state[k]), None, None, "dense", why) if why == _NOT_A_LAYER
        else LayerChoice(k[: -len(".weight")], "Linear", _sparsity(state[k]), None, None, "dense", why)
        for k, why in untimed.items() if why is not None
    }
    timed = [k for k in keys if k not in choices]
    from lightning_clipprune.search.plots import progress_bar  # lazy, as in to_inference

    with progress_bar(progress) as bar:
        task = bar.add_task("timing dense vs CSR", total=len(timed))
        for key in timed:
            choices[key] = _time_state_weight(state, key, batch_size, min_sparsity, margin, rounds, timer)
            bar.advance(task)
    return InferenceReport("cpu", batch_size, [choices[k] for k in keys], {}).recipe()


#: Why a recipe leaves a parameter that is not a layer's weight dense.
_NOT_A_LAYER = "a parameter its module's fused kernel reads, not a layer's weight: stays dense"
#: The 2-D parameters a ``MultiheadAttention`` holds itself (``q_proj_weight`` when keys differ from queries).
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight")


def _fused_parents(keys: Iterable[str]) -> dict[str, str]:
    """``{module name: class name}`` of the ``MultiheadAttention`` and ``TransformerEncoderLayer`` modules whose
    keys are in ``keys``: the fused parents :func:`to_inference` keeps dense, recognised by their parameters'
    names (an encoder layer: ``self_attn`` an attention, ``linear1`` and ``linear2``, no ``multihead_attn``)."""
    keys = set(keys)
    attention = {k.rpartition(".")[0] for k in keys if k.rpartition(".")[2] in _ATTENTION_WEIGHTS}
    fused = dict.fromkeys(attention, "MultiheadAttention")
    for owner, _, child in (a.rpartition(".") for a in attention):
        dot = f"{owner}." if owner else ""
        if child == "self_attn" and {f"{dot}linear1.weight", f"{dot}linear2.weight"} <= keys and not any(
            f"{dot}multihead_attn.{w}" in keys for w in _ATTENTION_WEIGHTS
        ):
            fused[owner] = "TransformerEncoderLayer"
    return fused


def _why_untimed(key: str, fused: Mapping[str, str]) -> str | None:
    """Why the 2-D ``key`` is not timed as a ``Linear`` (None: it is): not a ``<layer>.weight``, or inside a
    fused parent (``fused``: :func:`_fused_parents`)."""
    name, _, attr = key.rpartition(".")
    if attr != "weight" or not name:
        return _NOT_A_LAYER
    parts = name.split(".")
    parent = next((p for i in range(len(parts)) if (p := ".".join(parts[:i])) in fused), None)
    if parent is None:
        return None
    return f"inside {fused[parent]} {parent or '(the model)'}: its fused kernel reads the weight, stays dense"


def _time_state_weight(
    state: Mapping[str, Tensor], key: str, batch_size: int, min_sparsity: float, margin: float, rounds: int,
    timer: Timer | None,
) -> LayerChoice:
    weight = state[key]
    name = key[: -len(".weight")]
    bias = state.get(f"{name}.bias")
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None and bias.shape == weight.shape[:1])
    with torch.no_grad():
        lin.weight.copy_(weight.to(lin.weight.dtype))
        if lin.bias is not None:
            lin.bias.copy_(bias)
    x = torch.randn(batch_size, weight.shape[1])
    return _choose(name, lin, x, min_sparsity=min_sparsity, margin=margin, rounds=rounds, timer=timer)
