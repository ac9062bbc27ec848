"""Coupled output channels: the layers whose channels must be removed together, traced by Torch-Pruning.

A residual network adds the outputs of several layers (the stem, every block's last conv, a projection
shortcut) into one stream: channel ``c`` of the stream is dead only when it is zero in every one of them.
Pruning each layer's channels independently leaves almost no stream channel dead, so nothing of the stream
can be removed physically (:func:`~lightning_clipprune.export.compact.compact_channels`). A *channel group*
lists those layers with, for each, which of its output channels sits at each position of the group; pruning
"channel" with groups (:func:`~lightning_clipprune.pruning.compute_masks` ``channel_groups=``) prunes the same
positions in every member.

The groups come from Torch-Pruning's ``DependencyGraph`` (``pip install 'lightning-clipprune[compact]'``), an
optional dependency, imported only here and only when asked. A group whose index mapping Torch-Pruning
cannot give exactly (a channel *padding*, such as the parameter-free "option A" shortcut of the CIFAR
ResNets, which it traces as an element-wise op) is not coupled: its layers are returned in ``unmapped`` and
pruned one by one, as without coupling.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_clipprune.pruning.selection import STANDARD_LAYOUT, Layout, output_rows

__all__ = [
    "COUPLE_INSTALL",
    "ChannelGroup",
    "TraceError",
    "all_groups",
    "channel_groups",
    "check_channel_groups",
    "torch_pruning_available",
]

#: ``{weight name: LongTensor}``: position ``i`` of the group is output channel ``tensor[i]`` of every member.
ChannelGroup = dict[str, Tensor]
#: The command that installs the optional tracer.
COUPLE_INSTALL = "pip install 'lightning-clipprune[compact]'"
_ROOTS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class TraceError(ValueError):
    """Torch-Pruning could not trace a model's channel dependencies; the message is one line saying why."""


class _WalkTooLong(Exception):
    pass


def all_groups(graph: Any, roots: tuple[type, ...]) -> list[Any]:
    """Every pruning group of Torch-Pruning's dependency ``graph`` rooted at a layer of the types ``roots``.

    Torch-Pruning's walk of one group can loop without end on some graphs (Llama's attention: its index mapping
    keeps producing new index lists); a group that grows past 16 items per traced node (ResNets and BERT stay
    under 2) stops it.

    Raises:
        TraceError: Torch-Pruning raised (its message's first line), or a walk did not end.
    """
    limit = 16 * len(getattr(graph, "module2node", ())) + 256
    try:
        group_class = importlib.import_module("torch_pruning.dependency.group").Group
        original = group_class.add_dep
    except (ImportError, AttributeError):  # pragma: no cover (another Torch-Pruning layout: unbounded)
        group_class = original = None

    def add_dep(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        if len(getattr(self, "_group", ())) > limit:
            raise _WalkTooLong
        return out

    try:
        if group_class is not None:
            group_class.add_dep = add_dep
        return list(graph.get_all_groups(root_module_types=roots))
    except _WalkTooLong:
        raise TraceError(
            f"Torch-Pruning's dependency walk does not end on this model (a group grew past {limit} items)"
        ) from None
    except Exception as err:
        raise TraceError(f"Torch-Pruning failed: {type(err).__name__}: {_first_line(err)}") from None
    finally:
        if group_class is not None:
            group_class.add_dep = original


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else ""


def torch_pruning_available() -> bool:
    """Whether Torch-Pruning (``torch_pruning``) can be imported."""
    try:
        return importlib.util.find_spec("torch_pruning") is not None
    except (ImportError, ValueError):  # pragma: no cover
        return False


def _torch_pruning(owner: str) -> Any:
    try:
        return importlib.import_module("torch_pruning")
    except ImportError:
        raise ImportError(
            f"{owner}: coupling channels needs Torch-Pruning to trace the model: {COUPLE_INSTALL}"
        ) from None


def forward_example(module: nn.Module, x: Any) -> Any:
    """Call ``module`` as Lightning calls it with ``example_input_array``: a tuple is unpacked, a dict passed by name."""
    if isinstance(x, Mapping):
        return module(**x)
    if isinstance(x, (tuple, list)):
        return module(*x)
    return module(x)


def _trace(module: nn.Module, example_input: Any, tp: Any) -> Any:
    """Torch-Pruning's dependency graph of ``module``, leaving the module as it was.

    The trace runs one forward pass in ``eval()`` mode (no BatchNorm statistics move, no dropout draws), with
    the CPU random state restored afterwards and every module's ``training`` flag put back (Torch-Pruning
    leaves the model in ``eval()``), so tracing never changes what a training run computes.
    """
    with as_it_was(module), torch.enable_grad():
        try:
            return tp.DependencyGraph().build_dependency(
                module, example_inputs=example_input, forward_fn=forward_example, verbose=False
            )
        except Exception as err:
            raise TraceError(f"Torch-Pruning could not trace it: {type(err).__name__}: {_first_line(err)}") from None


@contextlib.contextmanager
def as_it_was(module: nn.Module) -> Iterator[None]:
    """Run a look at ``module`` (a trace, a check in ``eval()`` mode) leaving it as it was: the CPU random state
    is restored and every submodule's ``training`` flag put back on exit, so a training run computes the same."""
    flags = {m: m.training for m in module.modules()}
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def channel_groups(
    module: nn.Module,
    example_input: Any,
    weights: Mapping[str, Tensor],
    layouts: Mapping[str, Layout] | None = None,
    owner: str = "channel_groups",
    followers: Collection[str] = (),
    outputs: list[str] | None = None,
) -> tuple[list[ChannelGroup], list[str]]:
    """The channel groups of the weights ``weights`` of ``module``, and the weights left uncoupled.

    Args:
        module: the network (traced once on ``example_input``; it is left as it was).
        example_input: one input batch: a tensor (``module(x)``), a tuple (``module(*x)``) or a dict
            (``module(**x)``), as Lightning reads ``example_input_array``.
        weights: ``{parameter name: parameter}`` of the weights to group (the prunable ones), matched to the
            layers by identity. A bias, or the ``weight`` and ``bias`` of a ``BatchNorm`` writing a coupled channel,
            joins the group when it is among them (``include``): pruned with the channel, it leaves the channel
            exactly zero after training, which compaction needs (a BatchNorm's ``beta`` otherwise keeps training).
        layouts: ``{name: Layout}`` of the weights not stored ``(out, in, *k)``.
        owner: who asks, named in the error message.
        followers: names of ``weights`` that join a group only to be pruned with it (a BatchNorm's ``weight``
            and ``bias``): left out of a group into which a layer outside ``weights`` also writes (that layer
            is kept dense, so its channels must stay alive).
        outputs: when given, the names of the ``weights`` whose output channels no traced layer reads (the
            model's outputs, such as a classifier's logits) are appended to it.

    Returns:
        ``(groups, unmapped)``: every name of ``weights`` is in exactly one group (a layer coupled with no
        other is a group of one, its channels in order); ``unmapped`` names the weights whose coupling
        Torch-Pruning could not map exactly, each in a group of its own.

    Raises:
        ImportError: Torch-Pruning is not installed (one line with the pip command).
        TraceError: Torch-Pruning cannot trace the model (one line: why).

    Example::

        net = resnet20(shortcut="B")
        groups, unmapped = channel_groups(net, torch.zeros(1, 3, 32, 32), select_prunable_parameters(net))
    """
    tp = _torch_pruning(owner)
    layouts = dict(layouts or {})
    by_id = {id(p): name for name, p in weights.items()}
    widths = {n: output_rows(w.detach(), layouts.get(n, STANDARD_LAYOUT)).shape[0] for n, w in weights.items()}
    graph = _trace(module, example_input, tp)
    found: list[dict[str, list[int]]] = []
    unmapped: set[str] = set()
    for group in all_groups(graph, _ROOTS):
        members: dict[str, list[int]] = {}
        exact = True
        size = len(group.items[0].root_idxs) if group.items else 0
        out_items = [item for item in group.items if graph.is_out_channel_pruning_fn(item.dep.handler)]
        foreign = _written_from_outside(out_items, by_id)
        if outputs is not None and len(out_items) == len(group.items):  # nothing reads these channels
            outputs.extend(n for i in out_items if (n := by_id.get(id(i.dep.target.module.weight))) and n not in followers)
        for item in out_items:
            dep = item.dep
            # the layer's weight and bias (a BatchNorm's too, when they are among `weights`) lose the same channels
            for attr in ("weight", "bias"):
                name = by_id.get(id(getattr(dep.target.module, attr, None)))
                if name is None or (foreign and name in followers):
                    continue
                channels = _positions(list(item.idxs), list(item.root_idxs), widths[name], size)
                # Torch-Pruning's mapping must give one channel of each member per position, else no coupling
                exact = exact and channels is not None and members.get(name, channels) == channels
                members[name] = channels or []
        if exact:
            found.append(members)
        else:
            unmapped.update(members)
    seen: dict[str, int] = {}
    for i, members in enumerate(found):
        for name in members:
            if name in seen:  # one layer in two groups: neither mapping can be trusted
                unmapped.update(found[seen[name]])
                unmapped.update(members)
            seen[name] = i
    grown = True
    while grown:  # a group sharing a layer with an unmapped one is not coupled either
        grown = False
        for members in found:
            if unmapped.intersection(members) and not unmapped.issuperset(members):
                unmapped.update(members)
                grown = True
    order = {n: i for i, n in enumerate(weights)}
    groups: list[ChannelGroup] = []
    placed: set[str] = set()
    for members in found:
        if not members or unmapped.intersection(members):
            continue
        names = sorted(members, key=order.__getitem__)
        first = torch.tensor(members[names[0]])
        canon = first.argsort()  # positions ordered by the first member's channels: ties do not depend on Torch-Pruning
        groups.append({n: torch.tensor(members[n])[canon] for n in names})
        placed.update(names)
    for name in weights:
        if name not in placed:
            groups.append({name: torch.arange(widths[name])})
    groups.sort(key=lambda g: order[next(iter(g))])
    return groups, [n for n in weights if n in unmapped]


def _written_from_outside(out_items: list[Any], by_id: Mapping[int, str]) -> bool:
    """Whether a layer whose weight is not pruned (not in ``by_id``) writes the group's channels."""
    return any(isinstance(i.dep.target.module, _ROOTS) and id(i.dep.target.module.weight) not in by_id for i in out_items)


def _positions(idxs: list[int], root_idxs: list[int], width: int, size: int) -> list[int] | None:
    """Channel of each group position, or None when the mapping is not a bijection onto the layer's channels."""
    if len(idxs) != width or size != width or sorted(idxs) != list(range(width)):
        return None
    if sorted(root_idxs) != list(range(size)):
        return None
    channels = [0] * size
    for i, r in zip(idxs, root_idxs, strict=True):
        channels[r] = int(i)
    return channels


def check_channel_groups(
    groups: Sequence[Mapping[str, Tensor]], weights: Mapping[str, Tensor], layouts: Mapping[str, Layout]
) -> list[dict[str, Tensor]]:
    """``groups`` completed so that every weight is in exactly one group (the others alone, channels in order).

    Raises:
        ValueError: a group names a weight not in ``weights`` or one already grouped, its members have
            different widths, or a member's channels are not a permutation of its output channels.
    """
    out: list[dict[str, Tensor]] = []
    placed: set[str] = set()
    for group in groups:
        size = None
        for name, channels in group.items():
            if name not in weights:
                raise ValueError(f"`channel_groups` names `{name}`, which is not among the weights pruned")
            if name in placed:
                raise ValueError(f"`channel_groups` puts `{name}` in two groups")
            width = output_rows(weights[name], layouts.get(name, STANDARD_LAYOUT)).shape[0]
            ch = torch.as_tensor(channels, dtype=torch.long).reshape(-1)
            if size is not None and ch.numel() != size:
                raise ValueError(f"`channel_groups`: the members of the group of `{name}` have different widths")
            if ch.numel() != width or not torch.equal(ch.sort().values, torch.arange(width, device=ch.device)):
                raise ValueError(f"`channel_groups`: the channels of `{name}` are not a permutation of its {width} rows")
            size = ch.numel()
            placed.add(name)
        out.append({n: torch.as_tensor(c, dtype=torch.long).reshape(-1) for n, c in group.items()})
    out.extend({n: torch.arange(output_rows(w, layouts.get(n, STANDARD_LAYOUT)).shape[0])} for n, w in weights.items() if n not in placed)
    return [g for g in out if g]
