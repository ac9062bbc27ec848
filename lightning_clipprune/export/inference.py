"""The fastest inference model for a device, in one call: :func:`to_inference`.

What it does to a copy of the pruned model, by device:

- ``"cpu"``: layers whose whole output channels are zero (``pattern="channel"``) are removed physically
  (:func:`~lightning_clipprune.export.compact.compact_channels`, through Torch-Pruning when installed); then
  every ``Linear`` (Hugging Face ``Conv1D`` too, and ``Conv1d``/``Conv2d`` with ``groups=1``) at least ``min_sparsity``
  sparse is timed at the batch size asked, dense against CSR (:class:`~lightning_clipprune.export.sparse_linear.SparseLinear`,
  :class:`~lightning_clipprune.export.sparse_linear.SparseConv2d`) with each sparse kernel
  (:data:`~lightning_clipprune.export.sparse_linear.KERNELS`: MKL's product, ``embedding_bag``), and
  converted, with the faster kernel, only where CSR is faster by ``margin``. A layer below ``min_sparsity``
  stays dense untimed: CSR never won there in our measurements (benchmarks/bench_inference.md).
- ``"cuda"``: 2:4 sparse ``Linear`` weights in half precision go to
  :func:`~lightning_clipprune.export.semi_structured.to_semi_structured` (sparse tensor cores); the rest
  stays dense.

The choices are recorded on the returned model (:func:`inference_report`) and can be stored with the
weights in a ``.lcps`` file and replayed without timing (:mod:`~lightning_clipprune.export.recipes`): the
file holds tensors and a JSON recipe of layer names, never a pickle.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_clipprune._hooks import evaluating, forward_pre_hooks
from lightning_clipprune.export._reparam import inference_copy
from lightning_clipprune.export._timing import Timer, compare_latencies, compare_latency, compare_swapped
from lightning_clipprune.export.compact import maybe_compact, output_tensors
from lightning_clipprune.export.sparse_linear import (
    KERNELS,
    FeatureMajorLinear,
    SparseConv1d,
    SparseConv2d,
    SparseLinear,
    feature_major,
)
from lightning_clipprune.pruning.wrappers import is_hf_conv1d

__all__ = [
    "InferenceReport",
    "LayerChoice",
    "compare_latency",
    "inference_report",
    "to_inference",
]

_REPORT_ATTR = "clipprune_inference"


@dataclass
class LayerChoice:
    """What :func:`to_inference` did with one layer.

    Attributes:
        name: the module's name in the model.
        kind: the layer's class name (``"Linear"``, ``"Conv2d"``, ...); ``"parameter"`` for a weight a recipe
            lists that is no layer's (``MultiheadAttention``'s ``in_proj_weight``).
        sparsity: fraction of zeros in its weight.
        dense_s: median time of the dense layer at the batch size (None: not timed).
        sparse_s: median time of the CSR layer (None: not timed).
        format: ``"csr"``, ``"dense"`` or ``"semi_structured"``.
        reason: why, in words.
        kernel: the sparse product of a ``"csr"`` layer, one of
            :data:`~lightning_clipprune.export.sparse_linear.KERNELS` (None otherwise).
    """

    name: str
    kind: str
    sparsity: float
    dense_s: float | None
    sparse_s: float | None
    format: str
    reason: str
    kernel: str | None = None


@dataclass
class InferenceReport:
    """The choices of :func:`to_inference`: per layer, plus what compaction removed.

    Attributes:
        device: the device asked for.
        batch_size: the batch size the layers were timed at.
        layers: one :class:`LayerChoice` per candidate layer.
        compacted: ``{layer name: (channels before, channels after)}`` for the layers compaction shrank.
        end_to_end: ``(seconds before CSR, seconds with it)`` per call of the whole model, from the end-to-end
            check, when its first comparison kept every CSR layer (None: not measured, or layers went back).
    """

    device: str
    batch_size: int
    layers: list[LayerChoice]
    compacted: dict[str, tuple[int, int]]
    end_to_end: tuple[float, float] | None = None

    def __str__(self) -> str:
        """One line per layer (sparsity, timings, format, why) and what compaction removed: what ``print`` shows."""
        ms = lambda t: "-" if t is None else f"{1e3 * t:.3f}"  # noqa: E731
        width = max([len("layer"), *(len(c.name) for c in self.layers)])
        lines = [f"to_inference on {self.device}, batch {self.batch_size}",
                 f"{'layer':<{width}}  {'sparsity':>8}  {'dense ms':>9}  {'sparse ms':>9}  format  why"]
        lines += [f"{c.name:<{width}}  {100 * c.sparsity:>7.1f}%  {ms(c.dense_s):>9}  {ms(c.sparse_s):>9}  {c.format:<6}"
                  f"  {c.reason}" for c in self.layers]
        lines += [f"compacted {name}: {a} -> {b} channels" for name, (a, b) in self.compacted.items()]
        if self.end_to_end is not None:
            lines.append(f"whole model: {ms(self.end_to_end[0])} ms dense, {ms(self.end_to_end[1])} ms with CSR")
        return "\n".join(lines)

    def sparse_names(self) -> list[str]:
        """The layers converted to a sparse format."""
        return [c.name for c in self.layers if c.format != "dense"]

    def recipe(self) -> dict[str, Any]:
        """The JSON recipe :func:`load_inference` replays: the layer names and formats, no code."""
        return {
            "device": self.device,
            "batch_size": self.batch_size,
            "compact": bool(self.compacted),
            "csr": [c.name for c in self.layers if c.format == "csr"],
            "kernels": {c.name: c.kernel for c in self.layers if c.format == "csr" and c.kernel},
            "layers": [asdict(c) for c in self.layers],
        }


def _batch_of(example_input: Tensor, batch_size: int | None) -> Tensor:
    if not isinstance(example_input, Tensor) or example_input.dim() == 0:
        raise ValueError(
            f"to_inference: `example_input` must be a batch tensor (first dimension the batch), got "
            f"{type(example_input).__name__}; pass one real input, e.g. example_input=x[:1]"
        )
    if batch_size is None or batch_size == example_input.shape[0]:
        return example_input
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"to_inference: `batch_size` must be a positive int, got {batch_size!r}")
    reps = -(-batch_size // example_input.shape[0])
    return example_input.repeat(reps, *([1] * (example_input.dim() - 1)))[:batch_size]


def _check_runs(model: nn.Module, x: Tensor, example_input: Tensor) -> None:
    """One forward on ``x`` before any work: an input the model refuses is named in one line."""
    try:
        with torch.inference_mode():
            model(x)
    except Exception as e:  # whatever the model raises: torch's shape errors, a user's own checks
        shape = tuple(example_input.shape)
        repeated = "" if tuple(x.shape) == shape else f" (repeated to {tuple(x.shape)})"
        raise ValueError(
            f"to_inference: the model does not run on `example_input` of shape {shape}{repeated}:"
            f" {type(e).__name__}: {e}. Pass one real input batch, first dimension the batch, e.g."
            " example_input=x[:1]"
        ) from e


#: Parents whose fused kernels read their layers' weights directly (encoder fast path, attention): kept dense.
_FUSED_PARENTS = (nn.TransformerEncoderLayer, nn.MultiheadAttention)


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    fused = {
        f"{p}.{c}" if p else c for p, parent in model.named_modules() if isinstance(parent, _FUSED_PARENTS)
        for c, _ in parent.named_modules() if c
    }
    return {
        n: m for n, m in model.named_modules()
        if n not in fused and (type(m) is nn.Linear or is_hf_conv1d(m) or (
            type(m) in (nn.Conv1d, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(m.padding, str)))
    }


def _layer_inputs(model: nn.Module, names: Sequence[str], x: Tensor) -> dict[str, Tensor]:
    """The input each named layer sees when ``model(x)`` runs (the first call, when a layer runs twice)."""
    seen: dict[str, Tensor] = {}
    modules = dict(model.named_modules())

    def hook(name: str) -> Callable[..., None]:
        return lambda _m, args: seen.setdefault(name, args[0])

    with forward_pre_hooks((modules[n], hook(n)) for n in names), torch.inference_mode():
        model(x)
    return seen


def _sparsity(weight: Tensor) -> float:
    return 1.0 - int(torch.count_nonzero(weight.detach())) / max(weight.numel(), 1)


def _sparse_module(module: nn.Module, kernel: str = "mm") -> nn.Module:
    if is_hf_conv1d(module):
        return SparseLinear.from_hf_conv1d(module, kernel)
    if isinstance(module, nn.Conv1d):
        return SparseConv1d(module, kernel)
    return SparseLinear(module, kernel) if isinstance(module, nn.Linear) else SparseConv2d(module, kernel)


#: Weight dtypes torch's CPU CSR product (MKL) computes in; a float16/bfloat16 layer stays dense.
CSR_DTYPES = (torch.float32, torch.float64)
_NO_CSR = "torch has no CPU CSR product in {dtype} (float32/float64 only): convert the model with .float() for CSR"


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


#: A sparse kernel slower than this many times dense in the first timing round is not timed further.
_SCREEN = 2.0


def _choose(
    name: str, module: nn.Module, x: Tensor | None, *, min_sparsity: float, margin: float, rounds: int,
    timer: Timer | None,
) -> LayerChoice:
    """Time one layer dense against CSR (each kernel) on its real input and say which to keep."""
    sparsity = _sparsity(module.weight)
    kind = type(module).__name__
    if sparsity < min_sparsity:
        return LayerChoice(name, kind, sparsity, None, None, "dense", f"sparsity below min_sparsity={min_sparsity}")
    if x is None:
        return LayerChoice(name, kind, sparsity, None, None, "dense", "not run by the example input")
    if module.weight.dtype not in CSR_DTYPES:
        return LayerChoice(name, kind, sparsity, None, None, "dense", _NO_CSR.format(dtype=module.weight.dtype))
    dense = FeatureMajorLinear(module) if type(module) is nn.Linear and feature_major(x) else module  # as it would run
    sparse = dict(zip(KERNELS, (_sparse_module(module, k) for k in KERNELS), strict=True))
    # A first round screens out the kernels far slower than dense (a convolution's unfolded input often is):
    # they are not timed `rounds` times more.
    dense_s, *first = compare_latencies([dense, *sparse.values()], x, rounds=1, timer=timer)
    alive = [k for k, s in zip(KERNELS, first, strict=True) if s < _SCREEN * dense_s]
    if alive:
        dense_s, *kernel_s = compare_latencies(
            [dense, *(sparse[k] for k in alive)], x, rounds=rounds, timer=timer, warmup=False
        )
    else:
        alive, kernel_s = list(KERNELS), first
    best = min(range(len(alive)), key=kernel_s.__getitem__)  # a tie: the first, MKL's
    sparse_s, kernel = kernel_s[best], alive[best]
    if sparse_s * margin < dense_s:
        why = f"CSR {dense_s / sparse_s:.2f}x faster ({kernel} kernel)"
        return LayerChoice(name, kind, sparsity, dense_s, sparse_s, "csr", why, kernel)
    return LayerChoice(name, kind, sparsity, dense_s, sparse_s, "dense", "CSR not faster at this batch size")


def _check_options(device: str, compact: bool | str, min_sparsity: float, margin: float, rounds: int) -> None:
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ValueError(f"to_inference: `device` must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}")
    if compact not in (True, False, "auto"):
        raise ValueError(f"to_inference: `compact` must be True, False or 'auto', got {compact!r}")
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"to_inference: `min_sparsity` must be in [0, 1], got {min_sparsity!r}")
    if not margin >= 1.0:
        raise ValueError(f"to_inference: `margin` must be >= 1 (how much faster CSR must be), got {margin!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"to_inference: `rounds` must be a positive int, got {rounds!r}")


def to_inference(
    model: nn.Module,
    *,
    example_input: Tensor,
    batch_size: int | None = None,
    device: str = "cpu",
    compact: bool | str = "auto",
    min_sparsity: float = 0.5,
    margin: float = 1.05,
    rounds: int = 7,
    timer: Timer | None = None,
    progress: bool = False,
) -> nn.Module:
    """The fastest inference model for ``device``: a pruned model's copy, compacted and/or sparse where it pays.

    The model given is not changed. Outputs equal the pruned model's within float rounding (compaction is
    checked on ``example_input`` and refused when they would differ). The copy is in ``eval()`` mode, its
    sparse layers hold buffers, not parameters (inference only, under ``torch.inference_mode`` or
    ``torch.no_grad``). What was chosen and why: :func:`inference_report`.

    ``torch.jit.script`` and ``torch.jit.trace`` work on the result; ``torch.compile`` works with its default
    ``fullgraph=False`` (torch breaks the graph around the sparse products); ``fullgraph=True`` is refused by
    torch for any model with a CSR layer (sparse tensors cannot be traced). See ``docs/inference.md``. A
    ``torch.compile``'d model or submodule is converted as the module it wraps (``_orig_mod``): the result is not
    compiled, and its layer names lack ``_orig_mod.``.

    Args:
        model: the pruned network (an ``nn.Module``; a ``LightningModule`` is copied without its Trainer).
        example_input: one real input batch (any batch size); it is repeated or cut to ``batch_size``.
        batch_size: the batch size to decide for: CSR wins at large batches and loses on small layers at
            batch 1. ``None``: the batch size of ``example_input``.
        device: ``"cpu"`` (compaction + CSR) or ``"cuda"`` (2:4 semi-structured on sparse tensor cores).
        compact: remove whole zero output channels physically: ``"auto"`` when Torch-Pruning is installed and
            the model can be compacted (warns in one line otherwise and keeps them), ``True`` (raises instead),
            ``False`` never.
        min_sparsity: layers less sparse than this stay dense without timing.
        margin: CSR is kept only where it is at least this many times faster than dense.
        rounds: interleaved timing rounds per layer (median of each).
        timer: ``timer(module, x) -> seconds`` for one call, replacing the wall clock (for tests).
        progress: show a progress bar over the layers' timing (seconds per layer on large models).

    Returns:
        The inference model; ``inference_report(model)`` says what was done per layer.

    Raises:
        ValueError: a bad argument, or with ``compact=True`` a model that cannot be compacted (one line).
        ImportError: ``compact=True`` without Torch-Pruning (one line with the pip command).
        RuntimeError: ``device="cuda"`` without a suitable GPU (from ``to_semi_structured``).

    Example::

        fast = to_inference(net, example_input=x[:1], batch_size=256)
        with torch.inference_mode():
            y = fast(x)
    """
    _check_options(str(device), compact, min_sparsity, margin, rounds)
    if not isinstance(progress, bool):
        raise ValueError(f"to_inference: `progress` must be True or False, got {progress!r}")
    x = _batch_of(example_input, batch_size)
    out = inference_copy(model)
    _check_runs(out, x, example_input)
    if str(device).startswith("cuda"):
        return _to_cuda(out, str(device), x.shape[0])
    out, compacted = maybe_compact(out, x, compact)
    before_csr = copy.deepcopy(out)
    order = list(_layer_inputs(out, list(_candidates(out)), x))  # the candidates in the order they run
    originals: dict[str, nn.Module] = {}
    choices = [
        LayerChoice(n, type(m).__name__, _sparsity(m.weight), None, None, "dense", "not run by the example input")
        for n, m in _candidates(out).items() if n not in order
    ]
    from lightning_clipprune.search.plots import progress_bar  # lazy: the search package is not needed before

    with progress_bar(progress) as bar:
        task = bar.add_task("to_inference: timing dense vs CSR", total=len(order))
        inp = None  # the input of the layer to convert, when the previous step's forward captured it
        # `order` is empty for a model without candidate layers (or one converted already)
        for name, following in zip(order, [*order[1:], None][: len(order)], strict=True):
            inp = _convert_one(out, name, following, inp, x, originals, choices, (min_sparsity, margin, rounds), timer)
            bar.advance(task)
    _verify(model, out, x, originals, choices)
    end_to_end = _keep_if_faster(before_csr, out, x, originals, choices, rounds, timer)
    setattr(out, _REPORT_ATTR, InferenceReport("cpu", int(x.shape[0]), choices, compacted, end_to_end))
    return out


def _convert_one(
    out: nn.Module, name: str, following: str | None, inp: Tensor | None, x: Tensor, originals: dict[str, nn.Module],
    choices: list[LayerChoice], options: tuple[float, float, int], timer: Timer | None,
) -> Tensor | None:
    """Time layer ``name`` of ``out`` on the input it now receives (``inp`` when already captured) and put CSR
    in where it wins; returns the input ``following`` receives in the model as it is left, when the last
    forward run captured it (each whole-model forward serves twice: a conversion's check and the next capture)."""
    min_sparsity, margin, rounds = options
    module = out.get_submodule(name)
    wanted = [following] if following else []
    seen: dict[str, Tensor] = {}
    # Re-captured after each conversion: a CSR layer hands the next one its input in the (features, batch)
    # layout, which changes what the next one costs (a dense Linear then multiplies in that layout).
    if inp is None and (originals or _sparsity(module.weight) >= min_sparsity):
        seen = _layer_inputs(out, [name, *wanted], x)
        inp = seen.get(name)
    choice = _choose(name, module, inp, min_sparsity=min_sparsity, margin=margin, rounds=rounds, timer=timer)
    make = lambda m: _sparse_module(m, choice.kernel or KERNELS[0])  # noqa: E731
    if choice.format == "csr" and not _swap_runs(out, name, module, x, make, seen, wanted):
        choice.format, choice.reason, choice.kernel = "dense", "the model's forward fails with a CSR weight there", None
    if choice.format == "dense" and _keep_layout(out, name, module, inp, x, seen, wanted):
        choice.reason += "; multiplied in the (features, batch) layout of the CSR layer before it"
    if out.get_submodule(name) is not module:
        originals[name] = module
    choices.append(choice)
    return seen.get(following) if following else None


def _keep_layout(
    model: nn.Module, name: str, module: nn.Module, inp: Tensor | None, x: Tensor,
    seen: dict[str, Tensor] | None = None, capture: Sequence[str] = (),
) -> bool:
    """A dense ``Linear`` fed by a CSR layer becomes a :class:`FeatureMajorLinear` (when the model still runs)."""
    fed = type(module) is nn.Linear and inp is not None and feature_major(inp)
    return fed and _swap_runs(model, name, module, x, FeatureMajorLinear, seen, capture)


def _swap_runs(
    model: nn.Module, name: str, module: nn.Module, x: Tensor, make: Callable[[Any], nn.Module],
    seen: dict[str, Tensor] | None = None, capture: Sequence[str] = (),
) -> bool:
    """Put ``make(module)`` in; keep it when the model still runs, else put the dense one back. The inputs of
    the layers named in ``capture`` in that forward replace ``seen``'s when it ran."""
    _set_module(model, name, make(module))
    try:
        got = _layer_inputs(model, capture, x)
    except (RuntimeError, NotImplementedError, TypeError):  # a kernel that reads the weight directly
        _set_module(model, name, module)
        return False
    if seen is not None:
        seen.clear()
        seen.update(got)
    return True


def _restore(out: nn.Module, originals: dict[str, nn.Module], choices: list[LayerChoice], reason: str) -> None:
    for name, module in originals.items():
        _set_module(out, name, module)
    for choice in (c for c in choices if c.name in originals):
        choice.format, choice.reason, choice.kernel = "dense", reason, None
    originals.clear()


def _keep_if_faster(
    dense: nn.Module, out: nn.Module, x: Tensor, originals: dict[str, nn.Module], choices: list[LayerChoice],
    rounds: int, timer: Timer | None,
) -> tuple[float, float] | None:
    """The end-to-end guard: layer timings that each said "faster" must add up to a faster model. When they do not,
    the CSR layers go back in one at a time, the largest per-layer gain first, each kept only where the whole
    model is faster with it (a CSR layer whose ``(features, batch)`` output slows what follows it, such as a
    ``LayerNorm``, stays dense): never slower than the model without them.

    Returns the first comparison's ``(dense seconds, sparse seconds)`` when it kept every CSR layer, else None.
    """
    if not originals:
        return None
    dense_s, sparse_s = compare_latency(dense, out, x, rounds=rounds, timer=timer)
    if sparse_s <= dense_s:
        return dense_s, sparse_s
    reasons, kernels, swapped = {c.name: c.reason for c in choices}, {c.name: c.kernel for c in choices}, dict(originals)
    csr = sorted((c for c in choices if c.format == "csr"), key=lambda c: c.sparse_s - c.dense_s)
    sparse = {c.name: out.get_submodule(c.name) for c in csr}
    _restore(out, originals, choices, "")
    for choice in csr:
        name, module = choice.name, swapped[choice.name]
        put = lambda m, n=name: _set_module(out, n, m)  # noqa: E731
        without_s, with_s = compare_swapped(out, put, module, sparse[name], x, rounds=rounds, timer=timer)
        if with_s < without_s:
            originals[name] = module
            choice.format, choice.kernel = "csr", kernels[name]
            choice.reason = f"{reasons[name]}; end to end {without_s / with_s:.2f}x faster with it"
        else:
            put(module)
            choice.reason = f"end to end {without_s / with_s:.2f}x with CSR there (all CSR: {dense_s / sparse_s:.2f}x): not faster"
    for choice in (c for c in choices if c.name in swapped and c.name not in sparse):  # dense, fed by a CSR layer
        module = swapped[choice.name]
        if _keep_layout(out, choice.name, module, _layer_inputs(out, [choice.name], x).get(choice.name), x):
            originals[choice.name], choice.reason = module, reasons[choice.name]
        else:
            choice.reason = reasons[choice.name].split("; multiplied in")[0]
    return None


def _same_outputs(ref: Any, got: Any) -> bool:
    """Whether every tensor of ``got`` (a tensor, or tuples, lists, dicts of them: a ``ModelOutput``) matches
    ``ref``'s within float rounding."""
    a, b = output_tensors(ref), output_tensors(got)

    def close(r: Tensor, g: Tensor) -> bool:
        if r.shape != g.shape or r.dtype != g.dtype:
            return False
        if not r.is_floating_point() or not r.numel():
            return torch.equal(r, g)
        return torch.allclose(g, r, atol=1e-4 * (1.0 + float(r.abs().max())), rtol=1e-3)

    return bool(a) and len(a) == len(b) and all(close(r, g) for r, g in zip(a, b, strict=True))


def _verify(model: nn.Module, out: nn.Module, x: Tensor, originals: dict[str, nn.Module], choices: list[LayerChoice]) -> None:
    """Compare the outputs; when CSR changed them (a weight also read outside its layer's forward, such as a
    fused attention fast path or a tied weight), put the dense layers back and warn."""
    if not originals:
        return
    with torch.inference_mode(), evaluating(model):
        ref = model(x)
        try:
            got = out(x)
        except Exception:  # a CSR weight where a dense one is read directly: put the dense layers back
            got = None
    if got is not None and _same_outputs(ref, got):
        return
    count = len(originals)
    _restore(out, originals, choices, "CSR changed the model's outputs (weight used outside forward)")
    warnings.warn(
        f"to_inference: with CSR layers the outputs of {type(model).__name__} differ from the dense model's (a "
        f"weight is read outside its layer's forward: tied, or a fused fast path), so {count} layer(s) "
        "stay dense",
        stacklevel=3,
    )


def _to_cuda(model: nn.Module, device: str, batch_size: int) -> nn.Module:
    from lightning_clipprune.export.semi_structured import is_n_m_sparse, to_semi_structured

    if not torch.cuda.is_available():
        raise RuntimeError(
            f"to_inference: device={device!r} but CUDA is not available; use device='cpu' (CSR and compaction)"
        )
    model = model.to(device)
    half = {torch.float16, torch.bfloat16}
    names = [
        n for n, m in model.named_modules()
        if type(m) is nn.Linear and m.weight.dtype in half and is_n_m_sparse(m.weight)
    ]
    converted = to_semi_structured(model, names) if names else []
    sparsity = {n: _sparsity(m.weight) for n, m in model.named_modules() if type(m) is nn.Linear and n not in converted}
    choices = [
        LayerChoice(n, "Linear", 0.5, None, None, "semi_structured", "2:4 on sparse tensor cores") for n in converted
    ] + [
        LayerChoice(n, "Linear", s, None, None, "dense", "not 2:4 sparse in float16/bfloat16")
        for n, s in sparsity.items()
    ]
    setattr(model, _REPORT_ATTR, InferenceReport(device, batch_size, choices, {}))
    return model


def inference_report(model: nn.Module) -> InferenceReport:
    """What :func:`to_inference` or :func:`load_inference` did to ``model``.

    Raises:
        ValueError: ``model`` did not come from either.
    """
    report = getattr(model, _REPORT_ATTR, None)
    if not isinstance(report, InferenceReport):
        raise ValueError(f"{type(model).__name__} was not made by to_inference() or load_inference(): no report")
    return report
