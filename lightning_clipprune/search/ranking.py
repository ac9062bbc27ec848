"""What the searches measure: accuracy on a loader, the prunable weights, one global ranking of them.

:class:`Ranking` sorts every prunable weight once by importance (``|w|``, or a given score such as the
Taylor ``|w * g|`` with the gradient from :func:`taylor_gradients`), so that pruning to a sparsity ``s`` is
zeroing the ``round(s * n)`` lowest-ranked weights of the original model, and putting them back is a copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_clipprune._hooks import evaluating
from lightning_clipprune.clipping import clip_grad_norm, clip_grad_value
from lightning_clipprune.pruning import (
    check_not_torch_pruned,
    check_prunable_kinds,
    select_prunable_parameters,
)

__all__ = [
    "Loader",
    "Ranking",
    "check_reiterable",
    "evaluate",
    "loader_batches",
    "prunable_parameters",
    "taylor_gradients",
]

_SEARCH = "lightning_clipprune.search"

Loader = Iterable[tuple[Tensor, Tensor]]


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _pair(batch: object) -> tuple[Tensor, Tensor]:
    """A batch as ``(inputs, labels)``.

    Raises:
        ValueError: the batch is not a pair of tensors (a dict, a triple): what it is and what is expected.
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch):
        return batch[0], batch[1]
    kind = f"a dict with keys {list(batch)}" if isinstance(batch, dict) else (
        f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__
    )
    raise ValueError(
        f"the loader gave {kind}; the search evaluates batches of (inputs, labels) tensors: wrap the loader, e.g."
        " `[(b['x'], b['y']) for b in loader]` or `[(x, y) for x, y, *_ in loader]`"
    )


def _logits(out: object, y: Tensor) -> Tensor:
    """The logits of a model's output for labels ``y``, checked to fit them.

    Raises:
        ValueError: naming the shapes and the fix.
    """
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor):
        raise ValueError(
            f"the model returned a {type(out).__name__}, not logits: evaluate a module whose forward returns the"
            " class scores (a tensor, or an output with a `logits` field)"
        )
    if logits.dim() != y.dim() + 1 or logits.shape[0] != y.shape[0] or logits.shape[2:] != y.shape[1:]:
        raise ValueError(
            f"the model's logits {tuple(logits.shape)} do not fit the labels {tuple(y.shape)}: logits must be (N, C)"
            " for labels (N,), or (N, C, d1, ...) for labels (N, d1, ...) (sequence models returning (N, T, C)"
            " logits: `.transpose(1, 2)` them in the forward you evaluate)"
        )
    return logits


#: The label ``F.cross_entropy`` ignores by default (Hugging Face's padding tokens): counted neither right nor wrong.
IGNORE_INDEX = -100


def _check_labels(y: Tensor, classes: int) -> None:
    """Labels are class indices in ``[0, classes)``: one host read per batch (its smallest and largest label).

    Raises:
        ValueError: float labels, or a label out of range: the dtype or the value, and the number of classes.
    """
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(
            f"the labels are {y.dtype}; the evaluation needs integer class indices in [0, {classes}) (the model"
            f" gives {classes} logits columns): pass `y.long()`, or class indices rather than one-hot/soft labels"
        )
    if y.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(y)).tolist()
    if low == IGNORE_INDEX:  # cross-entropy's ignored label (padding tokens): the smallest of the others decides
        kept = y[y != IGNORE_INDEX]
        low = int(kept.min()) if kept.numel() else 0
    if low < 0 or high >= classes:
        bad = low if low < 0 else high
        raise ValueError(
            f"a label is {bad}, outside [0, {classes}): the model gives {classes} logits columns, so labels must be"
            f" class indices 0 .. {classes - 1}: check the labels, or the model's number of classes"
        )


def check_reiterable(loader: object, name: str = "the loader") -> None:
    """Refuse a one-shot iterator (a generator): the searches read the loader once per evaluated point.

    Raises:
        ValueError: ``loader`` is an iterator (``iter(loader) is loader``).
    """
    if isinstance(loader, Iterator):  # not `iter(loader)`: that would start a DataLoader's workers
        raise ValueError(
            f"{name} is a one-shot iterator ({type(loader).__name__}), read once per evaluated point: the loader"
            " must be re-iterable (a DataLoader or a list of batches), e.g. `list(batches)`"
        )


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy loss)`` of ``model`` over ``loader`` (batches of ``(x, y)``), in eval mode.

    The model returns logits ``(N, C)`` for labels ``(N,)``, or ``(N, C, d1, ...)`` for labels ``(N, d1, ...)`` (per
    token or pixel, the layout of ``F.cross_entropy``: then every label counts once, and a label of -100, the
    padding ``F.cross_entropy`` ignores, not at all); an output with a ``logits`` field (a Hugging Face
    ``ModelOutput``) is read there.

    Raises:
        ValueError: the loader gave no samples, the logits do not fit the labels (one line: the shapes), or a
            label is not a class index in ``[0, C)`` (float labels, a label out of range).

    Example::

        >>> net = nn.Linear(4, 3)
        >>> acc, loss = evaluate(net, [(torch.randn(8, 4), torch.randint(0, 3, (8,)))])
        >>> 0.0 <= acc <= 1.0
        True
    """
    device = _device(model)
    correct, n = torch.zeros((), dtype=torch.long, device=device), torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    with evaluating(model):
        for batch in loader:
            x, y = _pair(batch)
            x, y = x.to(device), y.to(device)
            logits = _logits(model(x), y)
            _check_labels(y, logits.shape[1])
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum", ignore_index=IGNORE_INDEX).double()
            counted = y != IGNORE_INDEX
            correct += ((logits.argmax(1) == y) & counted).sum()
            n += counted.sum()
    if int(n) == 0:
        raise ValueError("evaluate: the loader gave no samples (or only labels of -100, which count for nothing)")
    return correct.item() / int(n), loss_sum.item() / int(n)


def prunable_parameters(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of the weights the search prunes: ``names``, or every Linear/Conv weight.

    Frozen weights (``requires_grad=False``) count: after training a model is often frozen as a whole.

    Raises:
        ValueError: a name in ``names`` is not a parameter of the model, or there is no weight to prune.
    """
    check_not_torch_pruned(model, _SEARCH)
    if names is None:
        selected = select_prunable_parameters(model, include_frozen=True)
        if not selected:
            raise ValueError(
                f"the model ({type(model).__name__}) has no prunable weight (of a Linear, Conv or attention layer):"
                " pass `names`, the parameter names to prune"
            )
        check_prunable_kinds(model, selected, f"`{_SEARCH}`", "`names` that leave out {}")
        return selected
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied tensor by any of its names
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"`names` must be parameter names of the model, got unknown {missing}")
    if not names:
        raise ValueError("`names` is empty: give the parameter names to prune, or None for every Linear/Conv weight")
    check_prunable_kinds(model, names, f"`{_SEARCH}`", "`names` that leave out {}")
    chosen: dict[int, str] = {}
    for n in names:  # two names of one tied tensor: it is pruned (and counted) once
        chosen.setdefault(id(params[n]), n)
    return {n: params[n] for n in chosen.values()}


def loader_batches(loader: Loader, n: int) -> Iterable[tuple[Tensor, Tensor]]:
    """The first ``n`` batches of ``loader``."""
    for i, batch in enumerate(loader):
        if i >= n:
            return
        yield batch


@contextmanager
def _gradients_on(params: Iterable[nn.Parameter]) -> Iterator[list[nn.Parameter]]:
    """Turn ``requires_grad`` on for the frozen ones of ``params`` (yielded), and back off after, also on error."""
    woken = [p for p in params if not p.requires_grad]
    try:
        for p in woken:
            p.requires_grad_(True)
        yield woken
    finally:
        for p in woken:
            p.requires_grad_(False)


def _clip(trained: list[nn.Parameter], woken: list[nn.Parameter], clip_val: float, algorithm: str) -> None:
    """Clip one batch's gradient as the run did: the norm of the parameters it trained (all of them for a model
    frozen as a whole after training); the frozen weights' gradients get the same factor, or the same clamp."""
    if algorithm == "value":
        clip_grad_value([p for p in trained + woken if p.grad is not None], clip_val)
        return
    counted, rest = [p for p in trained if p.grad is not None], [p for p in woken if p.grad is not None]
    if not counted:
        counted, rest = rest, []
    _, coef = clip_grad_norm(counted, clip_val)
    for p in rest:
        p.grad.mul_(coef)


def _backward(model: nn.Module, batch: object, device: torch.device, params: list[nn.Parameter]) -> None:
    """The gradient of one batch's cross-entropy in the ``.grad`` of ``params`` (cleared first)."""
    x, y = (t.to(device) for t in _pair(batch))
    for p in params:
        p.grad = None
    logits = _logits(model(x), y)
    _check_labels(y, logits.shape[1])
    F.cross_entropy(logits, y).backward()


def taylor_gradients(
    model: nn.Module,
    train_loader: Loader,
    names: Sequence[str] | None = None,
    batches: int = 10,
    clip_val: float | None = None,
    clip_algorithm: str = "norm",
) -> dict[str, Tensor]:
    """The gradient of the training loss averaged over ``batches`` training batches, clipped per batch.

    Each batch's gradient is clipped as the run clipped it (``clip_algorithm`` "norm": total norm at most
    ``clip_val``; "value": entries clamped to ``[-clip_val, clip_val]``; ``clip_val=None``: unclipped) before
    it joins the average. Frozen weights (``requires_grad=False``) count, as everywhere in the search: their
    ``requires_grad`` is turned on for the gradient pass and back off after (a norm clip scales them by the
    factor of the parameters that train, or of the whole model when it is frozen as a whole). The model's
    weights, ``.grad`` and ``requires_grad`` flags are left as they were.

    Raises:
        ValueError: for ``batches`` < 1, a ``clip_algorithm`` other than "norm" and "value", batches that are
            not ``(inputs, labels)`` pairs or labels that are not class indices, or an empty loader.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).requires_grad_(False)
        >>> grads = taylor_gradients(net, [(torch.randn(16, 4), torch.randint(0, 3, (16,)))], batches=1)
        >>> sorted(grads), bool(grads["0.weight"].any()), net[0].weight.requires_grad
        (['0.weight', '2.weight'], True, False)
    """
    if batches < 1:
        raise ValueError(f"`batches` must be >= 1, got {batches!r}")
    if clip_algorithm not in ("norm", "value"):
        raise ValueError(f"`clip_algorithm` must be one of ('norm', 'value'), got {clip_algorithm!r}")
    params = prunable_parameters(model, names)
    trained = [p for p in model.parameters() if p.requires_grad]
    with _gradients_on(params.values()) as woken:
        everything = trained + woken
        saved_grads = [None if p.grad is None else p.grad.clone() for p in everything]
        sums = {n: torch.zeros_like(p) for n, p in params.items()}
        device, seen = _device(model), 0
        try:
            with evaluating(model):  # no dropout or batch-norm statistics update: the gradient of the model as evaluated
                for batch in loader_batches(train_loader, batches):
                    _backward(model, batch, device, everything)
                    if clip_val is not None:
                        _clip(trained, woken, clip_val, clip_algorithm)
                    for n, p in params.items():
                        if p.grad is not None:
                            sums[n] += p.grad
                    seen += 1
        finally:
            for p, g in zip(everything, saved_grads, strict=True):
                p.grad = g
    if seen == 0:
        raise ValueError("taylor_gradients: the training loader gave no batches")
    return {n: s / seen for n, s in sums.items()}


class Ranking:
    """All prunable weights ranked once by importance: a sparsity is a quantile, its threshold the score there.

    Args:
        model: the network; the weights are read now (a copy is kept to restore them).
        names: the parameters to rank (``None``: every Linear/Conv weight).
        scores: ``{name: importance}``; ``None`` ranks by magnitude ``|w|``.

    Raises:
        ValueError: the model has no prunable parameters.
    """

    def __init__(
        self, model: nn.Module, names: Sequence[str] | None = None, scores: Mapping[str, Tensor] | None = None
    ) -> None:
        self.params = prunable_parameters(model, names)
        self.names = list(self.params)
        self.original = {n: p.detach().clone() for n, p in self.params.items()}
        flat = torch.cat(
            [(scores[n] if scores is not None else p.detach().abs()).flatten().float() for n, p in self.params.items()]
        )
        zero = torch.cat([p.flatten() == 0 for p in self.original.values()])
        flat[zero] = -1.0  # weights that are zero already rank first, whatever the scores say
        self.sorted_scores, self.order = torch.sort(flat, stable=True)  # the only sort
        self.sizes = [p.numel() for p in self.params.values()]
        self.numel = int(flat.numel())
        #: weights that are zero before any pruning (a model pruned already): no point prunes fewer
        self.already = int(zero.sum())

    def count(self, sparsity: float) -> int:
        """The number of weights pruned at ``sparsity``, never fewer than the zeros the model has already."""
        return min(self.numel, max(self.already, round(sparsity * self.numel)))

    def threshold(self, k: int) -> float:
        """The score of the k-th smallest weight: pruning ``score <= threshold`` prunes (at least) these k."""
        return 0.0 if k == 0 else max(0.0, float(self.sorted_scores[k - 1]))

    def masks(self, k: int) -> dict[str, Tensor]:
        """``{name: keep mask}`` pruning the ``k`` lowest-ranked weights."""
        keep = torch.ones(self.numel, dtype=torch.bool, device=self.order.device)
        keep[self.order[:k]] = False
        return {n: m.view_as(self.params[n]) for n, m in zip(self.names, keep.split(self.sizes), strict=True)}

    @torch.no_grad()
    def apply(self, k: int) -> None:
        """Set the weights to the original ones with the ``k`` lowest-ranked weights zeroed (in place)."""
        for n, m in self.masks(k).items():
            self.params[n].copy_(self.original[n] * m)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the original (dense) weights back."""
        for n, p in self.params.items():
            p.copy_(self.original[n])
