"""``MagnitudePruneCallback(couple_channels=...)``: which output channels are pruned together, and its input.

The groups (:func:`~lightning_clipprune.pruning.channel_groups`) depend on the module's structure only, not
on its weights: they are traced once per fit, at the first event, on one sample of the first training batch
(or the module's ``example_input_array``), and never stored. The trace leaves the module as it was (eval mode
during the pass, the random state restored), so a resumed run, which traces afresh, equals one that was not
interrupted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_clipprune._validation import bad_value
from lightning_clipprune.callbacks._prune_plan import OWNER
from lightning_clipprune.pruning import (
    COUPLE_INSTALL,
    TraceError,
    channel_groups,
    check_channel_groups,
    torch_pruning_available,
)
from lightning_clipprune.pruning.coupling import as_it_was, forward_example
from lightning_clipprune.pruning.selection import matches_any

if TYPE_CHECKING:
    import lightning.pytorch as pl

#: Values of ``couple_channels``.
COUPLE_CHOICES = (True, False, "auto")


def resolve_coupling(cb: Any, kind: str) -> bool:
    """Whether ``cb`` couples channels: ``couple_channels`` checked against the pattern and the install.

    Raises:
        ValueError: a value not in (True, False, "auto"), or True with a pattern other than "channel",
            ``layer_sparsity`` or a post-training criterion.
        ImportError: True without Torch-Pruning (one line with the install command).
    """
    value = cb.couple_channels
    if not any(value is c for c in COUPLE_CHOICES) and value != "auto":
        raise bad_value(OWNER, "couple_channels", "True, False or 'auto'", value)
    if value is False:
        return False
    fits = kind == "channel" and not cb.layer_sparsity and cb._criterion.needs != "calibration"
    if value == "auto":
        return fits and torch_pruning_available()
    if not fits:
        raise bad_value(
            OWNER, "couple_channels", "False unless pattern='channel' (without layer_sparsity or a calibration criterion)", value
        )
    if not torch_pruning_available():
        raise ImportError(f"{OWNER}(couple_channels=True) needs Torch-Pruning to trace coupled channels: {COUPLE_INSTALL}")
    return True


def example_input(pl_module: pl.LightningModule, batch: Any) -> Any:
    """What the module's forward takes, for the trace: ``example_input_array``, else the batch's input, one sample.

    Raises:
        ValueError: neither gives an input (a batch that is not a tensor or a tuple starting with one).
    """
    x = getattr(pl_module, "example_input_array", None)
    if x is None:
        if isinstance(batch, Tensor):
            x = batch
        elif isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
            x = batch[0]
        else:
            raise ValueError(
                f"{OWNER}(couple_channels=...) traces the model on an example input but cannot tell it from a batch"
                f" of type {type(batch).__name__}: set `example_input_array` on the LightningModule."
            )
        x = x[:1].detach()
    return move_data_to_device(x, pl_module.device)


def with_followers(
    cb: Any, pl_module: pl.LightningModule, params: dict[str, nn.Parameter]
) -> tuple[dict[str, nn.Parameter], frozenset[str]]:
    """``params`` and the parameters that follow a coupled channel, in ``named_parameters`` order; their names.

    A follower is pruned only as a member of a traced channel group, never ranked on its own: the ``weight``
    and ``bias`` of every ``BatchNorm`` and the ``bias`` of every selected layer, unless already selected,
    named in ``exclude`` or frozen (without ``prune_frozen``). Pruned with its channel it leaves the channel
    exactly zero after training, which compaction needs: a trained BatchNorm's ``beta`` keeps a channel
    whose weights are all zero alive. None without ``couple_channels``.
    """
    if not cb._couple:
        return params, frozenset()
    layers = {n.rpartition(".")[0] for n in params}
    taken = {id(p) for p in params.values()}
    extra: dict[str, nn.Parameter] = {}
    for name, module in pl_module.named_modules():
        attrs = ("weight", "bias") if isinstance(module, _BatchNorm) else ("bias",) if name in layers else ()
        for attr in attrs:
            p, full = getattr(module, attr, None), f"{name}.{attr}" if name else attr
            if not isinstance(p, nn.Parameter) or id(p) in taken or matches_any(full, cb.exclude):
                continue
            if p.requires_grad or cb.prune_frozen:
                extra[full] = p
                taken.add(id(p))
    order = {n: i for i, (n, _) in reversed(list(enumerate(pl_module.named_parameters(remove_duplicate=False))))}
    merged = sorted({**params, **extra}.items(), key=lambda item: order.get(item[0], len(order)))
    return dict(merged), frozenset(extra)


def warn_outputs(names: list[str]) -> None:
    """One warning naming the pruned weights whose output channels are the model's outputs, and the fix."""
    if names:
        rank_zero_warn(
            f"{OWNER}(pattern='channel'): no layer reads the output channels of {', '.join(names)}: they are the"
            " model's outputs (a classifier's logits), and pruning them removes outputs. Leave them dense:"
            f" exclude={[n.rpartition('.')[0] + '.*' for n in names]} (or keep_first_and_last=True)."
        )


def take_example(cb: Any, pl_module: pl.LightningModule, batch: Any) -> None:
    """Keep one sample of the fit's first batch on ``cb``: what the coupled channels are traced on and, for
    any "channel" pattern, what the model's outputs are checked on (:func:`check_outputs`)."""
    if cb._example is not None or not (cb._couple or cb.pattern == "channel"):
        return
    try:
        cb._example = example_input(pl_module, batch)
    except ValueError:
        if cb._couple:  # the trace needs it; the output check does without
            raise


def check_outputs(cb: Any, pl_module: pl.LightningModule) -> None:
    """Once per fit, uncoupled "channel" pattern: warn when a pruned layer's output is returned by the module
    itself (the same tensor): its channels are the model's outputs. (Coupled, the trace finds them.) Not under
    sharding: a forward there gathers every full parameter, which the sharded event never does."""
    if cb._outputs_checked or cb._couple or cb.pattern != "channel" or cb._example is None or cb._sharding is not None:
        return
    cb._outputs_checked = True
    modules = dict(pl_module.named_modules())
    layers = {n: modules.get(n.rpartition(".")[0]) for n in cb._params if n not in cb._followers}
    made: dict[int, tuple[Tensor, str]] = {}

    def seen(name: str) -> Any:
        def hook(_module: nn.Module, _args: Any, out: Any) -> None:  # returns None: the output stays as it is
            made.setdefault(id(out), (out, name))

        return hook

    hooks = [m.register_forward_hook(seen(n)) for n, m in layers.items() if m is not None]
    try:
        with as_it_was(pl_module), torch.no_grad():
            returned = forward_example(pl_module.eval(), cb._example)
    except Exception:  # a module that cannot run on one sample: nothing is said
        returned = None
    finally:
        for h in hooks:
            h.remove()
    leaves = returned if isinstance(returned, (tuple, list)) else [returned]
    warn_outputs([made[id(t)][1] for t in leaves if isinstance(t, Tensor) and id(t) in made])


def trace_groups(cb: Any, pl_module: pl.LightningModule, layouts: dict[str, Any]) -> list[dict[str, Tensor]]:
    """The channel groups of ``cb``'s parameters in ``pl_module`` (one warning naming the layers left uncoupled)."""
    x = cb._example if cb._example is not None else getattr(pl_module, "example_input_array", None)
    if x is None:
        raise ValueError(
            f"{OWNER}(couple_channels=...) has no example input to trace the model on: set `example_input_array`"
            " on the LightningModule."
        )
    outputs: list[str] = []
    try:
        groups, unmapped = channel_groups(
            pl_module, x, cb._params, layouts, owner=OWNER, followers=cb._followers, outputs=outputs
        )
    except TraceError as err:
        rank_zero_warn(
            f"{OWNER}(couple_channels=...): the model's coupled channels cannot be traced ({err}): every layer is"
            " pruned on its own, and channels shared through a residual stream will not compact."
            " couple_channels=False says so without tracing."
        )
        return check_channel_groups([], cb._params, layouts)
    warn_outputs(outputs)
    unmapped = [n for n in unmapped if n not in cb._followers]  # a follower alone is simply kept
    if unmapped:
        named = ", ".join(unmapped[:4]) + (f" and {len(unmapped) - 4} more" if len(unmapped) > 4 else "")
        rank_zero_warn(
            f"{OWNER}(couple_channels=...): Torch-Pruning could not map the coupled channels of {named} (a channel"
            " padding, such as a parameter-free 'option A' shortcut, or an operation it does not trace): they are"
            " pruned layer by layer, and their channels will not compact."
        )
    return groups


def event_groups(cb: Any, pl_module: pl.LightningModule, layouts: dict[str, Any]) -> list[dict[str, Tensor]] | None:
    """The coupled channels of ``cb``'s event (``couple_channels``), traced once per fit and parameter set;
    None when off. Kept on ``cb`` (``_groups``, and ``_groups_key``: the parameters they were traced for)."""
    if not cb._couple:
        return None
    key = tuple(id(p) for p in cb._params.values())
    if cb._groups is None or cb._groups_key != key:
        cb._groups = trace_groups(cb, pl_module, layouts)
        cb._groups_key = key
        layers = [[n for n in g if n not in cb._followers] for g in cb._groups]
        coupled = [g for g in layers if len(g) > 1]
        followed = sum(1 for g in cb._groups for n in g if n in cb._followers and len(g) > 1)
        cb._say(
            f"{OWNER}: couple_channels: {len(coupled)} group(s) of coupled layers"
            f" ({sum(len(g) for g in coupled)} of {len(cb._params) - len(cb._followers)} layers), pruned together;"
            f" {followed} BatchNorm/bias tensor(s) pruned with their channels"
        )
    return cb._groups
