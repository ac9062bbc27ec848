"""Layer-wise reconstruction by optimal brain surgeon, the SparseGPT algorithm, on one weight matrix.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (ICML 2023),
after Hassibi & Stork's optimal brain surgeon (1993) and Frantar et al.'s OBC (2022). For a layer
``y = x W^T`` seen on calibration inputs ``X`` (``n`` rows), the squared output error of a changed ``W'``
is ``tr((W - W') H (W - W')^T) / 2`` with ``H = 2 X^T X / n``. Columns are pruned left to right in blocks:

1. ``H`` is damped (``H + damp * mean(diag H) * I``), inverted, and ``U`` is the upper Cholesky factor of
   ``H^-1``: row ``j`` of ``U`` is, up to scale, the inverse Hessian of the columns ``j..`` still free.
2. At the start of each block of ``block_size`` columns the mask of the block is chosen by the OBS
   saliency ``w^2 / U_jj^2`` (adaptive mask selection: the weights have already absorbed the updates of
   the earlier blocks); under ``N:M`` the ``M - N`` lowest of every ``M`` consecutive columns of a row.
3. Column by column, the pruned entries are set to 0 and the error ``(w - q) / U_jj`` is spread over the
   columns to its right (``W[:, j:] -= err U[j, j:]``): the kept weights compensate.

Everything here is pure tensor code, tested on hand-built matrices (``tests/test_posttrain.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["block_counts", "damped_inverse_cholesky", "reconstruct_matrix_", "refit_to_reference"]


def block_counts(n_prune: int, cols: int, block_size: int, prunable: int | None = None) -> list[int]:
    """How many of ``n_prune`` entries each column block prunes, in proportion to its prunable columns
    (the first ``prunable`` of ``cols``; all by default): exactly ``n_prune`` in all.

    Example::

        >>> block_counts(10, 5, 2)  # blocks of 2, 2 and 1 columns
        [4, 4, 2]
        >>> block_counts(10, 5, 2, prunable=4)  # the last column is never pruned
        [5, 5, 0]
    """
    prunable = cols if prunable is None else prunable
    edges = [min(e, prunable) for e in range(0, cols, block_size)] + [prunable]
    cum = [round(n_prune * e / prunable) if prunable else 0 for e in edges]
    return [b - a for a, b in zip(cum[:-1], cum[1:], strict=True)]


def floor_counts(counts: list[int], floors: list[int]) -> list[int]:
    """``counts`` (per block) raised to ``floors`` (the entries each block pruned before), what that adds taken
    back from the blocks with the most room above their floors: the same total. ``counts`` as given when their
    total is under the floors' (fewer pruned than were zero before: not every earlier zero can stay).

    Example::

        >>> floor_counts([4, 4, 2], [6, 0, 0])
        [6, 2, 2]
    """
    if sum(floors) > sum(counts):
        return counts
    out = [max(c, f) for c, f in zip(counts, floors, strict=True)]
    excess = sum(out) - sum(counts)
    for b in sorted(range(len(out)), key=lambda b: out[b] - floors[b], reverse=True):
        take = min(excess, out[b] - floors[b])
        out[b] -= take
        excess -= take
    return out


def refit_to_reference(weight: Tensor, hessian: Tensor, cross: Tensor, damp: float) -> Tensor:
    """The weight whose outputs on the current inputs ``X`` best match ``W``'s on the reference inputs ``X_ref``.

    ``argmin_V ||X_ref W^T - X V^T||^2 = W G H^-1 = W + W (G - H) H^-1`` with ``H = 2 X^T X / n`` and
    ``G = 2 X_ref^T X / n``: when earlier layers were pruned, ``X`` drifted from the dense model's
    ``X_ref``, and reconstructing towards this target also repairs that drift. The damping (as in
    :func:`damped_inverse_cholesky`) only touches the correction, so ``X == X_ref`` gives ``W`` back exactly.

    Example::

        >>> x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
        >>> h = 2 * x.T @ x / 64
        >>> torch.equal(refit_to_reference(torch.ones(2, 3), h, h, 0.01), torch.ones(2, 3))
        True
    """
    h = hessian.clone()
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    diag.add_(damp * diag.mean())
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        return weight.clone()
    delta = weight @ (cross - hessian)
    if not bool(delta.any()):
        return weight.clone()
    return weight + torch.cholesky_solve(delta.T, chol).T


def damped_inverse_cholesky(hessian: Tensor, damp: float, name: str = "the layer") -> tuple[Tensor, Tensor]:
    """``(U, dead)``: the upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` and the dead columns.

    A dead column (``H_jj == 0``: an input that is 0 on every calibration sample) gets ``H_jj = 1`` so the
    matrix stays invertible; its weight changes nothing on the calibration data. When the damped matrix is
    still not positive definite (rounding on a nearly singular ``H``), the damping is raised tenfold, up
    to three times.

    Raises:
        ValueError: when no damping up to ``1000 * damp`` makes it positive definite.
    """
    h = hessian.clone()
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    mean = diag.mean()
    for factor in (1.0, 10.0, 100.0, 1000.0):
        trial = h.clone()
        trial.diagonal().add_(damp * factor * mean)
        chol, info = torch.linalg.cholesky_ex(trial)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper, dead
    raise ValueError(
        f"the Hessian of {name} is not positive definite even with damp={damp * 1000:g}: raise `damp` "
        "or use more calibration samples (`num_samples`)."
    )


def _nm_prune_(pruned: Tensor, w1: Tensor, d: Tensor, dead: Tensor, start: int, nm: tuple[int, int]) -> None:
    """Mark the ``M - N`` lowest-saliency entries of columns ``start:start+M`` of every row as pruned."""
    n, m = nm
    saliency = w1[:, start : start + m].square() / d[start : start + m].square().unsqueeze(0)
    saliency[:, dead[start : start + m]] = -1.0
    low = saliency.topk(m - n, dim=1, largest=False).indices
    pruned.scatter_(1, start + low, True)


def _block_mask(w1: Tensor, d: Tensor, dead: Tensor, count: int, prior: Tensor | None) -> Tensor:
    """The pruned entries (True) of one block: the ``count`` lowest saliencies ``w^2 / d^2``; dead columns and
    ``prior`` (entries pruned before) first."""
    saliency = w1.square() / d.square().unsqueeze(0)
    saliency[:, dead] = -1.0
    if prior is not None:
        saliency.masked_fill_(prior, -2.0)
    pruned = torch.zeros_like(w1, dtype=torch.bool)
    if count > 0:
        flat = saliency.reshape(-1)
        # stable ordering: ties by flat index, so the mask does not depend on the sort algorithm
        order = torch.sort(flat, stable=True).indices[:count]
        pruned.view(-1)[order] = True
    return pruned


def reconstruct_matrix_(
    weight: Tensor,
    hessian: Tensor,
    *,
    n_prune: int | None = None,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    name: str = "the layer",
    on_block: Callable[[], None] | None = None,
    frozen: int = 0,
    prior: Tensor | None = None,
) -> tuple[Tensor, float]:
    """Prune the float32 ``(rows, cols)`` matrix ``weight`` in place and update its kept entries (SparseGPT).

    Args:
        weight: the layer's weights as ``(outputs, inputs)``, float32; changed in place (pruned entries 0.0).
        hessian: ``(cols, cols)`` float32, ``2 X^T X / n`` of the layer's calibration inputs.
        n_prune: unstructured: exactly this many entries are pruned (spread over the blocks by width).
        nm: ``(N, M)``: keep ``N`` of every ``M`` consecutive columns of each row (``cols % M == 0``).
        block_size: columns per block (a multiple of ``M`` under ``nm``).
        damp: relative damping ``lambda``: ``H + lambda * mean(diag H) * I``.
        name: named in error messages.
        on_block: called after each block (a progress bar's update).
        frozen: the last ``frozen`` columns are never pruned (a bias column): they only take updates.
        prior: bool, True where entries were pruned before: pruned first (unstructured; counted in ``n_prune``).

    Returns:
        ``(keep, loss)``: the bool keep-mask (True = kept) and the OBS estimate of the output error added,
        ``sum (w - q)^2 / (2 U_jj^2)``.

    Raises:
        ValueError: when the damped Hessian cannot be factorised (:func:`damped_inverse_cholesky`).

    Example::

        >>> x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
        >>> w = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
        >>> keep, loss = reconstruct_matrix_(w, 2 * x.T @ x / 256, n_prune=16)
        >>> int((~keep).sum()), int((w == 0).sum())
        (16, 16)
    """
    rows, cols = weight.shape
    u, dead = damped_inverse_cholesky(hessian, damp, name)
    counts = block_counts(n_prune or 0, cols, block_size, cols - frozen) if nm is None else None
    if counts is not None and prior is not None:  # a block holding more earlier zeros than its share keeps them all
        edges = list(range(0, cols, block_size))
        counts = floor_counts(counts, [int(prior[:, i : max(i, min(i + block_size, cols - frozen))].sum()) for i in edges])
    if frozen:
        dead = dead.clone()
        dead[cols - frozen :] = False
    pruned_all = torch.zeros_like(weight, dtype=torch.bool)
    loss = torch.zeros((), dtype=torch.float64, device=weight.device)
    for b, i1 in enumerate(range(0, cols, block_size)):
        i2 = min(i1 + block_size, cols)
        w1, u1 = weight[:, i1:i2].clone(), u[i1:i2, i1:i2]
        d = u1.diagonal()
        live = max(0, min(i2, cols - frozen) - i1)  # columns of this block that may be pruned
        pruned = torch.zeros_like(w1, dtype=torch.bool)
        if counts is not None:
            pruned[:, :live] = _block_mask(
                w1[:, :live],
                d[:live],
                dead[i1 : i1 + live],
                counts[b],
                None if prior is None else prior[:, i1 : i1 + live],
            )
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0 and i < live:
                _nm_prune_(pruned, w1, d, dead[i1:i2], i, nm)
            w = w1[:, i]
            q = torch.where(pruned[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]
            loss += err.double().square().sum() / 2
            w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = err
        weight[:, i1:i2] = w1
        weight[:, i2:] -= err1 @ u[i1:i2, i2:]
        pruned_all[:, i1:i2] = pruned
        if on_block is not None:
            on_block()
    weight.masked_fill_(pruned_all, 0.0)
    return ~pruned_all, float(loss)


def refit_rows_(weight: Tensor, target: Tensor, hessian: Tensor, keep: Tensor, damp: float) -> None:
    """Given the mask, the exact least-squares kept weights of every row, in place: ``H_KK w_K = (H t)_K``.

    SparseGPT's updates flow only to the columns right of each pruned one, so the kept weights are not
    the best ones for the final mask; this solves, for each row with kept columns ``K``, the damped
    normal equations of ``min ||X (t - w)||^2`` over ``w`` supported on ``K`` (``t``: the target row),
    written as ``w_K = t_K + H_KK^-1 H_KP t_P`` (``P``: the pruned columns) with the damping on the
    correction only, as in :func:`refit_to_reference`: a row with nothing pruned keeps ``t`` exactly.
    Pruned entries stay exactly 0.

    Example::

        >>> x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
        >>> w, keep = torch.zeros(1, 4), torch.tensor([[True, False, True, False]])
        >>> refit_rows_(w, torch.ones(1, 4), 2 * x.T @ x / 256, keep, 1e-6)
        >>> int((w == 0).sum())
        2
    """
    h = hessian.clone()
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    diag.add_(damp * diag.mean())
    # (H_{., P} t_P)^T for every row: H symmetric, and a dead column's row of H is 0
    pull = (target * ~keep) @ hessian
    for r in range(weight.shape[0]):
        # a dead column (input always 0) has no say in the fit: its kept weight stays as it is, not 0
        cols = (keep[r] & ~dead).nonzero().squeeze(1)
        if cols.numel() == 0:
            continue
        sub = h.index_select(0, cols).index_select(1, cols)
        chol, info = torch.linalg.cholesky_ex(sub)
        if int(info) != 0:
            continue  # keep SparseGPT's weights for this row
        correction = torch.cholesky_solve(pull[r, cols].unsqueeze(1), chol).squeeze(1)
        weight[r, cols] = target[r, cols] + correction
