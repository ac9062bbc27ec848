"""Forward pre-hooks held for one block of code: :func:`forward_pre_hooks` (no Lightning import here)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

__all__ = ["evaluating", "forward_pre_hooks"]


@contextmanager
def forward_pre_hooks(hooks: Iterable[tuple[nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """Register each ``(module, hook)`` as a forward pre-hook for the ``with`` block; removed however it ends.

    Example::

        >>> import torch
        >>> seen = []
        >>> lin = nn.Linear(2, 2)
        >>> with forward_pre_hooks([(lin, lambda _m, args: seen.append(args[0].shape))]):
        ...     _ = lin(torch.zeros(3, 2))
        >>> _ = lin(torch.zeros(1, 2))  # the hook is gone
        >>> seen
        [torch.Size([3, 2])]
    """
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in ``eval()`` mode for the ``with`` block; every submodule's own ``training`` flag is put back.

    ``module.train(was_training)`` would set every submodule alike and unfreeze a BatchNorm the user had left
    in ``eval()`` inside a model in ``train()`` (fine-tuning): its running statistics would move again.

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)); _ = net[1].eval()
        >>> with evaluating(net):
        ...     net[0].training
        False
        >>> net.training, net[1].training
        (True, False)
    """
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag
