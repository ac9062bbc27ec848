"""What :class:`~lightning_clipprune.callbacks.GradientClipCallback` needs to know beyond its own hook.

- Which ``on_before_optimizer_step`` calls are new optimizer steps. Lightning calls the hook after each
  evaluation of the closure, and LBFGS evaluates it up to ``max_iter`` times inside one ``step()``: a call
  is a new step when Lightning's own count of the optimizer steps it started has moved since the
  optimizer's previous call. That count does not depend on torch's step hooks, which never fire for an
  optimizer whose ``step`` torch has not wrapped (a subclass that skips ``Optimizer.__init__``, such as
  timm's ``Lookahead``).
- Steps the hook never saw: an optimizer stepped around Lightning
  (``self.optimizers(use_pl_optimizer=False).step()``) is neither clipped nor checked. torch's step
  post-hook notices it, where the optimizer has torch's hook dicts; one warning.
- Clipping the callback does not do: a module that overrides ``configure_gradient_clipping``, or clips
  with ``self.clip_gradients(opt, gradient_clip_val=...)``, clips every step a second time; one warning.
  A warning, not an error: an override that passes the Trainer's ``gradient_clip_val`` on (Lightning's
  documented pattern) clips nothing when the Trainer has none, and it is refused when it has one.
- A spike clipper (ZClip) that clipped most steps of a fit: which of its rules did it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

__all__ = ["ClipCallGuard", "StepGuard", "mostly_clipped_message"]

_MOSTLY_CLIPPED_MIN_STEPS = 20  # fewer steps say nothing about how often a spike clipper clips


def _lightning_steps(trainer: pl.Trainer, pl_module: pl.LightningModule) -> int | None:
    """Optimizer steps Lightning has started in this fit (its progress counter); None outside a training loop (a
    hook called by hand) or where Lightning keeps no such count."""
    try:
        if not trainer.training:
            return None
        loop = trainer.fit_loop.epoch_loop
        if pl_module.automatic_optimization:
            return int(loop.automatic_optimization.optim_progress.optimizer.step.total.ready)
        return int(loop.manual_optimization.optim_step_progress.total.ready)
    except AttributeError:
        return None


class StepGuard:
    """Tells a new optimizer step from a closure's re-evaluation, and warns once about a step the hook missed."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._handles: list[RemovableHandle] = []
        self._last: dict[int, int | None] = {}  # id(optimizer) -> Lightning's step count at its last new step
        self._seen: dict[int, bool] = {}  # id(optimizer) -> the hook ran since its last step
        self._names: dict[int, str] = {}
        self._warned = False

    def attach(self, optimizers: Sequence[Optimizer]) -> None:
        """Start a fit (forgetting the previous one's) watching ``optimizers`` for missed steps: a post-hook on
        each that has torch's hook dicts. Step counting needs no attaching: it reads Lightning's count."""
        self.detach()
        self._warned = False
        for index, optimizer in enumerate(optimizers):
            optimizer = getattr(optimizer, "_optimizer", optimizer)
            self._names[id(optimizer)] = f"optimizer {index} ({type(optimizer).__name__})"
            self._seen[id(optimizer)] = False
            if hasattr(optimizer, "_optimizer_step_post_hooks"):  # a subclass that skips Optimizer.__init__ may lack it
                self._handles.append(optimizer.register_step_post_hook(self._stepped))

    def detach(self) -> None:
        """Remove the hooks and forget the optimizers."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._last, self._seen, self._names = [], {}, {}, {}

    def is_new_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer) -> bool:
        """Whether this hook call for ``optimizer`` is a new optimizer step (else a re-evaluation of the closure)."""
        key = id(optimizer)
        self._seen[key] = True
        count = _lightning_steps(trainer, pl_module)
        if count is not None and key in self._last and self._last[key] == count:
            return False
        self._last[key] = count
        return True

    def _stepped(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        key = id(optimizer)
        if not self._seen.get(key, True) and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"{self._owner}: {self._names.get(key, type(optimizer).__name__)} took a step that Lightning's"
                " `on_before_optimizer_step` did not precede, so its gradients were not clipped, checked for inf/NaN"
                " nor logged: it was stepped directly, not through Lightning (e.g."
                " `self.optimizers(use_pl_optimizer=False).step()`). Step the `LightningOptimizer` that"
                " `self.optimizers()` returns (`opt = self.optimizers(); ...; opt.step()`). Further such steps are"
                " not reported."
            )
        self._seen[key] = False


class ClipCallGuard:
    """Warns once per fit when the module clips gradients too (through Lightning's API, or its own override)."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._plugin: Any = None
        self._wrapper: Callable[..., Any] | None = None
        self._warned = False

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule, remedy: str) -> None:
        """Warn now if ``pl_module`` overrides ``configure_gradient_clipping`` under automatic optimization, and
        watch the precision plugin's ``clip_gradients`` for a clip value until :meth:`detach`.

        ``remedy``: how to clip with the callback instead (its arguments), quoted in the warnings.
        """
        self.detach()
        self._warned = False
        cls = type(pl_module)
        overridden = cls.configure_gradient_clipping is not pl.LightningModule.configure_gradient_clipping
        if overridden and pl_module.automatic_optimization:
            self._warn(
                f"`{cls.__qualname__}.configure_gradient_clipping` is overridden and `{self._owner}` clips too:"
                " Lightning calls the override after the callback at every optimizer step, so if it clips, gradients"
                " are clipped twice. Drop one: remove the override (or the clipping in it) to clip with the callback"
                f" ({remedy}), or remove the callback."
            )
        plugin = trainer.precision_plugin
        original = plugin.clip_gradients

        def clip_gradients(optimizer: Optimizer, *args: Any, **kwargs: Any) -> Any:
            clip_val = args[0] if args else kwargs.get("clip_val", 0.0)
            if clip_val and clip_val > 0:
                algorithm = args[1] if len(args) > 1 else kwargs.get("gradient_clip_algorithm", "norm")
                self._warn(
                    f"`clip_gradients(gradient_clip_val={clip_val!r}, gradient_clip_algorithm="
                    f"{str(getattr(algorithm, 'value', algorithm))!r})` and `{self._owner}` both clip gradients,"
                    " which clips twice (in manual optimization the module clips first, so `grad/norm` logs the norm"
                    " after its clipping). Drop one: remove the `self.clip_gradients` call to clip with the callback"
                    f" ({remedy}; it clips manual optimization's `opt.step()` too), or remove the callback."
                )
            return original(optimizer, *args, **kwargs)

        plugin.clip_gradients = clip_gradients
        self._plugin, self._wrapper = plugin, clip_gradients

    def detach(self) -> None:
        """Give the precision plugin its own ``clip_gradients`` back."""
        if self._plugin is not None and vars(self._plugin).get("clip_gradients") is self._wrapper:
            del self._plugin.clip_gradients
        self._plugin = self._wrapper = None

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            rank_zero_warn(message)


def mostly_clipped_message(
    owner: str, algorithm: str, clipper: Any, clip_val: float | None, summary: dict[str, float]
) -> str | None:
    """The end-of-fit warning of a spike clipper (``clips_spikes``) that clipped more than half of the steps,
    naming the rule that did (its hard cap, or its spike rule); None when there is nothing to say."""
    if summary["steps"] < _MOSTLY_CLIPPED_MIN_STEPS or summary["clipped_fraction"] <= 0.5:
        return None
    mean = summary["mean_norm"]
    if clip_val is not None and mean > clip_val:
        cause = (
            f"its hard cap clip_val={clip_val!r} is below the usual gradient norm (mean {mean:.3g}), so the cap"
            " clipped them. Raise clip_val above it, or clip_val=None to clip spikes only."
        )
    else:
        cap = (
            f"not a hard cap (clip_val=None, mean norm {mean:.3g})" if clip_val is None
            else f"not its hard cap (clip_val={clip_val!r} is above the mean norm {mean:.3g})"
        )
        cause = (
            f"its spike rule took most norms for spikes, {cap}. The norm kept rising faster than its running"
            f" statistics, or the spike threshold is too tight ({clipper!r}): loosen it (e.g. a higher z_thresh),"
            " or find why the norm keeps growing."
        )
    return (
        f"{owner}: {algorithm!r} clipped {summary['clipped_fraction']:.0%} of {int(summary['steps'])} steps,"
        f" not only spikes: {cause}"
    )
