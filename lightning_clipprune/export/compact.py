"""Physical compaction of channel pruning: :func:`compact_channels` removes dead channels and gives a smaller dense model.

``MagnitudePruneCallback(pattern="channel")`` zeroes whole output rows; the layers keep their size. Here a
channel is removed from its producers (the ``Linear``/``Conv`` rows and their ``BatchNorm`` entries) and
from every consumer (the matching input columns), through residual additions, concatenations, splits and
reshapes. The dependencies are traced by Torch-Pruning's ``DependencyGraph`` (``pip install torch-pruning``,
the ``compact`` extra), a maintained tracer, rather than one written here.

A channel is removed only when it is *dead*: the weight rows of every layer writing it are zero, and what
reaches every consumer is exactly zero on the example input (a zeroed conv followed by a ``BatchNorm``
carries the constant ``beta - gamma * mean / sqrt(var + eps)``; after a ``ReLU`` it is zero when that
constant is not positive). A zero-weight channel that still carries a constant is kept, so the compacted
model computes what the masked one does. The outputs are compared on the example input before the
compacted model is returned.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_clipprune._hooks import forward_pre_hooks
from lightning_clipprune.export._reparam import inference_copy
from lightning_clipprune.pruning.coupling import TraceError, all_groups
from lightning_clipprune.pruning.wrappers import is_hf_conv1d

__all__ = ["compact_channels", "has_zero_channels", "maybe_compact", "output_tensors", "torch_pruning_missing"]

_INSTALL = "pip install 'lightning-clipprune[compact]' (or: pip install torch-pruning)"
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Modules a removed channel may pass through: per-channel ones. LayerNorm/GroupNorm mix channels.
_PASSABLE = (*_LAYERS, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def torch_pruning_missing() -> bool:
    """Whether Torch-Pruning (``torch_pruning``) cannot be imported."""
    return importlib.util.find_spec("torch_pruning") is None


def _torch_pruning() -> Any:
    try:
        return importlib.import_module("torch_pruning")
    except ImportError:
        raise ImportError(f"compacting pruned channels needs Torch-Pruning: {_INSTALL}") from None


def has_zero_channels(model: nn.Module) -> bool:
    """Whether some ``Linear``/``Conv`` layer has a whole output channel (weight row) of zeros.

    Example::

        >>> lin = nn.Linear(3, 2); _ = lin.weight.data[0].zero_()
        >>> has_zero_channels(lin)
        True
    """
    return any(
        bool((m.weight.detach().flatten(1) == 0).all(dim=1).any())
        for m in model.modules() if isinstance(m, _LAYERS) and not isinstance(m, nn.modules.conv._ConvTransposeNd)
    )


def _consumer_inputs(model: nn.Module, x: Tensor) -> dict[nn.Module, Tensor]:
    """Per layer, which input channels are non-zero anywhere on ``x`` (channel dim: last for Linear, 1 for Conv)."""
    live: dict[nn.Module, Tensor] = {}

    def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        inp = args[0]
        dim = inp.dim() - 1 if isinstance(module, nn.Linear) else 1
        nonzero = (inp != 0).movedim(dim, 0).reshape(inp.shape[dim], -1).any(dim=1)
        live[module] = live[module] | nonzero if module in live else nonzero

    with forward_pre_hooks((m, hook) for m in model.modules() if isinstance(m, _LAYERS)), torch.no_grad():
        model(x)
    return live


def _check_passable(module: nn.Module, names: dict[nn.Module, str], tp_ops: Any) -> None:
    if type(module).__module__ == tp_ops.__name__:  # Torch-Pruning's own nodes: add, cat, split, reshape, ...
        return
    name = names.get(module, "?")
    if not isinstance(module, _PASSABLE):
        raise ValueError(
            f"compact: cannot remove channels through {type(module).__name__} {name!r} (it mixes channels or is "
            "not supported); exclude its producer from channel pruning, or pass compact=False"
        )
    if isinstance(module, _LAYERS[1:]) and module.groups not in (1, module.in_channels):
        raise ValueError(
            f"compact: cannot remove channels of grouped convolution {name!r} (groups={module.groups}); exclude it "
            "from channel pruning, or pass compact=False"
        )


def _dead_channels(group: Any, live: dict[nn.Module, Tensor], is_out: Callable[[Any], bool]) -> tuple[list[int], int]:
    """The root indices of ``group`` whose every producer row is zero and every consumer input is zero, and how
    many channels have zero producer rows but reach a consumer as something else (a constant: kept)."""
    dead: set[int] | None = None
    zero_rows: set[int] | None = None
    consumers = 0
    for item in group.items:
        module, out = item.dep.target.module, is_out(item.dep.handler)
        if not isinstance(module, _LAYERS):
            continue
        if out:
            rows = module.weight.detach().flatten(1)
            ok = {r for i, r in zip(item.idxs, item.root_idxs, strict=True) if not bool(rows[i].any())}
        else:
            consumers += 1
            seen = live.get(module)
            ok = {r for i, r in zip(item.idxs, item.root_idxs, strict=True) if seen is not None and not bool(seen[i])}
        # A root index any item maps twice must fail in every mapping: the intersection does that.
        bad = {r for i, r in zip(item.idxs, item.root_idxs, strict=True) if r not in ok}
        dead = (ok if dead is None else dead & ok) - bad
        if out:
            zero_rows = (ok if zero_rows is None else zero_rows & ok) - bad
    if not consumers:
        return [], 0
    dead = dead or set()
    return sorted(dead), len((zero_rows or set()) - dead)


def _more_than_chance(module: nn.Module, zero_rows: int) -> bool:
    """Whether ``zero_rows`` all-zero output rows are more than unstructured pruning leaves by chance.

    A row of ``fan_in`` weights, each zero with the layer's sparsity ``s``, is all zero with probability
    ``s ** fan_in``: often in a narrow layer pruned far, never in a wide one. Channel pruning zeroes rows by design.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() < 2 or not weight.numel():
        return False
    rows, fan_in = weight.shape[0], weight[0].numel()
    sparsity = 1.0 - int(torch.count_nonzero(weight)) / weight.numel()
    return zero_rows >= 2 and zero_rows / rows > 2.0 * sparsity**fan_in + 0.1


def _widths(model: nn.Module) -> dict[str, int]:
    return {
        n: (m.out_channels if hasattr(m, "out_channels") else m.out_features if hasattr(m, "out_features")
            else m.num_features)
        for n, m in model.named_modules() if isinstance(m, _PASSABLE)
    }


def compact_channels(
    model: nn.Module, example_input: Tensor, *, atol: float = 1e-5, rtol: float = 1e-4
) -> tuple[nn.Module, dict[str, tuple[int, int]]]:
    """A smaller dense copy of ``model`` without its dead channels, and ``{layer: (width before, after)}``.

    Args:
        model: a model pruned with ``pattern="channel"`` (rows of zeros); it is not changed.
        example_input: a real input batch: traced (its first sample) and used to check the outputs.
        atol: absolute tolerance of the output check.
        rtol: relative tolerance of the output check.

    Returns:
        The compacted model (in ``eval()`` mode) and, per layer whose width changed, the widths.

    Raises:
        ImportError: Torch-Pruning is not installed (one line with the pip command).
        ValueError: a dead channel runs through a layer that cannot lose channels (``LayerNorm``,
            ``GroupNorm``, a grouped convolution, an attention or recurrent layer ...), or the compacted
            outputs would differ from the masked model's.

    Warns:
        UserWarning: channels with zero weights (more than unstructured pruning leaves by chance) were kept
            because they carry a constant (a trained BatchNorm's bias, a bias): one line naming the layers and
            the fix.

    Example::

        small, widths = compact_channels(net, x[:8])
    """
    tp = _torch_pruning()
    out = inference_copy(model)
    names = {m: n for n, m in out.named_modules()}
    with torch.no_grad():
        reference = out(example_input)
    if not isinstance(reference, Tensor):
        raise ValueError(
            f"compact: the model returns a {type(reference).__name__}, not a tensor, and compaction traces and checks"
            " one output tensor: compact a module whose forward returns the logits (a LightningModule's forward"
            " usually does), or pass compact=False"
        )
    _check_traceable(out, example_input)
    live = _consumer_inputs(out, example_input)
    before = _widths(out)
    try:
        graph = tp.DependencyGraph().build_dependency(out, example_inputs=example_input[:1], verbose=False)
        groups = all_groups(graph, _LAYERS)
    except Exception as err:  # a TraceError says why in one line; anything else is Torch-Pruning's
        said = str(err) if isinstance(err, TraceError) else f"{type(err).__name__}: {_first_line(err)}"
        raise ValueError(f"compact: cannot trace this model's channels ({said}); pass compact=False") from None
    plans = []
    carrying: dict[str, int] = {}  # zero-weight channels kept because they carry a constant, per root layer
    for group in groups:
        dead, kept = _dead_channels(group, live, graph.is_out_channel_pruning_fn)
        root_module = group.items[0].dep.target.module
        if kept and _more_than_chance(root_module, kept):
            carrying[names.get(root_module, "?")] = kept
        if dead:
            for item in group.items:
                _check_passable(item.dep.target.module, names, tp.ops)
            root = group.items[0].dep
            plans.append((root.target.module, root.handler, dead))
    for module, handler, dead in plans:
        graph.get_pruning_group(module, handler, idxs=dead).prune()
    _check_equal(out, example_input, reference, atol, rtol)
    if carrying:
        _warn_constant_channels(carrying)
    after = _widths(out)
    return out, {n: (before[n], after[n]) for n in before if before[n] != after.get(n, before[n])}


def _warn_constant_channels(carrying: dict[str, int]) -> None:
    layers = sorted(carrying, key=carrying.get, reverse=True)
    named = ", ".join(f"{n} ({carrying[n]})" for n in layers[:4]) + (f" and {len(layers) - 4} more" if len(layers) > 4 else "")
    warnings.warn(
        f"compact_channels: {sum(carrying.values())} output channels whose weights are all zero were kept because they"
        f" still carry a constant (a trained BatchNorm's bias, or the layer's own bias): {named}. The model compacts"
        " less than its channel sparsity says. Prune those parameters with their channels:"
        " MagnitudePruneCallback(pattern='channel', couple_channels=True), without `exclude` naming them"
        " (docs/inference.md, 'After training').",
        stacklevel=3,
    )


def _check_equal(model: nn.Module, x: Tensor, reference: Tensor, atol: float, rtol: float) -> None:
    try:
        with torch.no_grad():
            got = model(x)
    except (RuntimeError, ValueError, IndexError) as err:  # e.g. a depthwise conv fed the model's own input
        raise ValueError(
            f"compact: the model no longer runs with its dead channels removed ({type(err).__name__}: {_first_line(err)[:160]}); "
            "a layer the tracer does not understand uses them: pass compact=False"
        ) from None
    if not isinstance(got, Tensor) or got.shape != reference.shape:
        shape = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
        raise ValueError(
            f"compact: removing the dead channels changed the output shape ({tuple(reference.shape)} -> {shape}); "
            "pass compact=False"
        )
    if not torch.allclose(got, reference, atol=atol, rtol=rtol):
        diff = float((got - reference).abs().max())
        raise ValueError(
            f"compact: the compacted model's outputs differ from the masked model's (max |diff| {diff:.3g}); "
            "a layer the tracer does not understand mixes channels: pass compact=False"
        )


def _check_traceable(model: nn.Module, x: Tensor) -> None:
    """Refuse, before Torch-Pruning traces it, a model that writes into slices of a tensor in its forward (circular
    padding, ``y[..., i] = ...``): Torch-Pruning's group search does not end on such a graph."""
    with torch.enable_grad():
        outputs = model(x[:1])
    stack = [t.grad_fn for t in output_tensors(outputs) if t.grad_fn is not None]
    seen: set[Any] = set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "CopySlices":
            circular = [n for n, m in model.named_modules() if getattr(m, "padding_mode", None) == "circular"]
            where = f"{circular[0]!r} pads circularly" if circular else "the forward writes into a slice of a tensor"
            raise ValueError(
                f"compact: cannot trace this model's channels ({where}, and Torch-Pruning's tracer does not finish "
                "on that); pass compact=False, or use padding_mode='zeros'/'reflect'"
            )
        stack.extend(f for f, _ in fn.next_functions)


def output_tensors(value: Any) -> list[Tensor]:
    """The tensors of a model's output, in order: a tensor, or tuples, lists and dicts (a ``ModelOutput``) of them."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in output_tensors(v)]
    return []


def maybe_compact(model: nn.Module, x: Tensor, compact: bool | str) -> tuple[nn.Module, dict[str, tuple[int, int]]]:
    """What ``to_inference(compact=...)`` does: :func:`compact_channels` when some output channel is zero.

    ``compact=True`` raises what :func:`compact_channels` raises; ``"auto"`` warns in one line and keeps the
    channels when Torch-Pruning is missing or the model cannot be compacted, whatever Torch-Pruning raised
    (unstructured pruning leaves zero rows by chance in narrow layers: the CSR conversion then goes on);
    ``False`` does nothing.
    """
    if compact is not False:
        _say_conv1d_kept(model, compact)
    if compact is False or not has_zero_channels(model):
        return model, {}
    if compact == "auto" and torch_pruning_missing():
        warnings.warn(
            "to_inference: whole output channels are zero but Torch-Pruning is not installed, so they are kept; "
            "pip install 'lightning-clipprune[compact]' (torch-pruning) to remove them physically",
            stacklevel=3,
        )
        return model, {}
    if compact is True:
        return compact_channels(model, x)
    try:
        return compact_channels(model, x)
    except Exception as err:  # an optional step: a tracer failing inside Torch-Pruning must not stop the CSR conversion
        said = _first_line(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {_first_line(err)}"
        warnings.warn(f"to_inference: the zero output channels are kept: {said} (compact=True makes this an error)", stacklevel=3)
        return model, {}


def _say_conv1d_kept(model: nn.Module, compact: bool | str) -> None:
    """Hugging Face ``Conv1D`` layers (GPT-2) are not compacted: say so when one has a zero output column.

    Raises:
        ValueError: with ``compact=True``.
    """
    layers = [
        n for n, m in model.named_modules() if is_hf_conv1d(m) and bool((m.weight.detach() == 0).all(dim=0).any())
    ]
    if not layers:
        return
    named = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
    said = (
        f"the zero output channels of Hugging Face Conv1D layers ({named}) are kept: compaction removes channels of"
        " nn.Linear and nn.Conv layers only"
    )
    if compact is True:
        raise ValueError(f"compact: {said}; pass compact='auto' to keep them and go on, or compact=False")
    warnings.warn(f"to_inference: {said} (the CSR step still converts them)", stacklevel=4)


def _first_line(err: BaseException) -> str:
    """The first line of ``err``'s message ("" for none): torch's and Torch-Pruning's messages run to many."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""
