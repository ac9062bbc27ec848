"""What the searches measure: accuracy on a loader, the prunable weights, one global ranking of them.

:class:`Ranking` sorts every prunable weight once by importance (``|w|``, or a given score such as the
Taylor ``|w * g|`` with the gradient from :func:`taylor_gradients`), so that pruning to a sparsity ``s`` is
zeroing the ``round(s * n)`` lowest-ranked weights of the original model, and putting them back is a copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

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

__all__ = ["Loader", "Ranking", "evaluate", "loader_batches", "prunable_parameters", "taylor_gradients"]

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


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy loss)`` of ``model`` over ``loader`` (batches of ``(x, y)``), in eval mode.

    The model returns logits ``(N, C)`` for labels ``(N,)``, or ``(N, C, d1, ...)`` for labels ``(N, d1, ...)`` (per
    token or pixel, the layout of ``F.cross_entropy``: then every label counts once); an output with a ``logits``
    field (a Hugging Face ``ModelOutput``) is read there.

    Raises:
        ValueError: the loader gave no samples, or the logits do not fit the labels (one line: the shapes).

    Example::

        >>> net = nn.Linear(4, 3)
        >>> acc, loss = evaluate(net, [(torch.randn(8, 4), torch.randint(0, 3, (8,)))])
        >>> 0.0 <= acc <= 1.0
        True
    """
    device = _device(model)
    correct = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    with evaluating(model):
        for batch in loader:
            x, y = _pair(batch)
            x, y = x.to(device), y.to(device)
            logits = _logits(model(x), y)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            n += y.numel()
    if n == 0:
        raise ValueError("evaluate: the loader gave no samples")
    return correct.item() / n, loss_sum.item() / n


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
    it joins the average. The model's weights and ``.grad`` are left as they were.

    Raises:
        ValueError: for ``batches`` < 1 or a ``clip_algorithm`` other than "norm" and "value".
    """
    if batches < 1:
        raise ValueError(f"`batches` must be >= 1, got {batches!r}")
    if clip_algorithm not in ("norm", "value"):
        raise ValueError(f"`clip_algorithm` must be one of ('norm', 'value'), got {clip_algorithm!r}")
    params = prunable_parameters(model, names)
    everything = [p for p in model.parameters() if p.requires_grad]
    saved_grads = [None if p.grad is None else p.grad.clone() for p in everything]
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    device, seen = _device(model), 0
    try:
        with evaluating(model):  # no dropout or batch-norm statistics update: the gradient of the model as evaluated
            for x, y in loader_batches(train_loader, batches):
                for p in everything:
                    p.grad = None
                F.cross_entropy(model(x.to(device)), y.to(device)).backward()
                if clip_val is not None:
                    grads = [p for p in everything if p.grad is not None]
                    (clip_grad_norm if clip_algorithm == "norm" else clip_grad_value)(grads, clip_val)
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
