"""``ckpt_path=...``: check that a checkpoint can resume *this* run before Lightning reads it.

Lightning resumes from a checkpoint by indexing into it: a file holding only a state dict, a weights-only
checkpoint, or another model's checkpoint ends in a ``KeyError`` or a multi-line ``RuntimeError`` deep in
``trainer.fit``. :func:`outline_checkpoint` reads the file once (without running code from it, through
:func:`~lightning_clipprune.checkpoint.load_checkpoint`) and keeps only its outline (entry names, tensor
shapes, progress); :func:`check_resume` compares that outline with the built run. Each failure is one
:class:`~lightning_clipprune.app.checks.ConfigError` line naming the file and what is wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_clipprune.app.checks import ConfigError, one_line

__all__ = ["CheckpointOutline", "check_resume", "outline_checkpoint"]

#: what Lightning indexes when it resumes training (weights-only checkpoints lack the last four)
_RESUME_ENTRIES = ("pytorch-lightning_version", "global_step", "optimizer_states", "lr_schedulers", "loops")


@dataclass(frozen=True)
class CheckpointOutline:
    """What :func:`check_resume` needs from a checkpoint, without its tensors.

    Attributes:
        file: the checkpoint file.
        path: the file as the user wrote it (``ckpt_path=...`` in messages).
        entries: the names of the checkpoint's top-level entries.
        shapes: ``state_dict`` name -> tensor shape.
        epochs_done: the epochs the checkpoint's training had finished (or processed), when recorded.
        global_step: its optimizer step, when recorded.
        optimizer_options: the option names of each optimizer's first parameter group.
        optimizer_values: the plain values (numbers, flags, strings, tuples of numbers) of each optimizer's
            first parameter group.
        at_epoch_end: whether it was written after the last batch of an epoch, when recorded.
    """

    file: Path
    path: str
    entries: frozenset[str]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    epochs_done: int | None = None
    global_step: int | None = None
    optimizer_options: list[frozenset[str]] = field(default_factory=list)
    optimizer_values: list[dict[str, Any]] = field(default_factory=list)
    at_epoch_end: bool | None = None


def _get(tree: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def outline_checkpoint(path: Path, shown: str) -> CheckpointOutline:
    """Load ``path`` safely and keep its outline.

    Args:
        path: the checkpoint file.
        shown: the path as the user wrote it (``ckpt_path=...`` in messages).

    Raises:
        ConfigError: the file is not a readable, safe checkpoint, or is a bare state dict.
    """
    import torch

    from lightning_clipprune.checkpoint import CheckpointError, load_checkpoint

    try:  # read without unpickling anything but tensors and plain values: a hostile file runs no code
        ckpt = load_checkpoint(path)
    except CheckpointError as err:
        raise ConfigError(f"ckpt_path={shown!r}: {one_line(err)}") from None
    if not isinstance(ckpt, dict):
        raise ConfigError(f"ckpt_path={shown!r}: not a Lightning checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            raise ConfigError(
                f"ckpt_path={shown!r}: holds a bare state dict (parameter name -> tensor), not a Lightning checkpoint: "
                "it cannot resume training; resume from the run's checkpoints/last.ckpt"
            )
        raise ConfigError(f"ckpt_path={shown!r}: not a Lightning checkpoint (no 'state_dict' entry)")
    shapes = {str(k): tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    groups = [_get(o, "param_groups") for o in ckpt.get("optimizer_states") or [] if isinstance(o, dict)]
    fit_loop = _get(ckpt, "loops", "fit_loop", "epoch_progress", "current")
    last_batch = _get(ckpt, "loops", "fit_loop", "epoch_loop.batch_progress", "is_last_batch")
    return CheckpointOutline(
        at_epoch_end=last_batch if isinstance(last_batch, bool) else None,
        file=path,
        path=shown,
        entries=frozenset(str(k) for k in ckpt),
        shapes=shapes,
        epochs_done=_int(_get(fit_loop, "processed")),
        global_step=_int(ckpt.get("global_step")),
        optimizer_options=[
            frozenset(k for k in g[0] if k != "params") for g in groups if isinstance(g, list) and g and isinstance(g[0], dict)
        ],
        optimizer_values=[
            {str(k): v for k, v in g[0].items() if _plain(v)} for g in groups if isinstance(g, list) and g and isinstance(g[0], dict)
        ],
    )


def _plain(value: Any) -> bool:
    """A value an optimizer option can be compared by: a number, flag or string, or a tuple/list of numbers."""
    if isinstance(value, (tuple, list)):
        return all(isinstance(v, (int, float)) for v in value)
    return isinstance(value, (int, float, str))


def _listed(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_state_dict(outline: CheckpointOutline, model: Any, model_name: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in outline.shapes]
    unexpected = [k for k in outline.shapes if k not in expected]
    shapes = [
        f"{k} {list(outline.shapes[k])} in the file, {list(expected[k])} in the model"
        for k in expected if k in outline.shapes and outline.shapes[k] != expected[k]
    ]
    if not (missing or unexpected or shapes):
        return
    what = "; ".join(
        part for part in (
            f"missing {_listed(missing)}" if missing else "",
            f"unexpected {_listed(unexpected)}" if unexpected else "",
            f"shape of {_listed(shapes, 2)}" if shapes else "",
        ) if part
    )
    raise ConfigError(
        f"ckpt_path={outline.path!r}: the checkpoint is of another model than this run's ({model_name}): {what}; "
        "resume with the model options the checkpoint was trained with"
    )


def check_resume(outline: CheckpointOutline, cfg: Any, model: Any) -> None:
    """Check that the run built from ``cfg`` can resume training from the checkpoint ``outline`` describes.

    Raises:
        ConfigError: one line naming the file and what does not fit: entries a weights-only checkpoint
            lacks, state-dict keys and shapes of another model, another optimizer, or a training that is
            already over (resuming it would skip the end of training and report no accuracy).
    """
    absent = [k for k in _RESUME_ENTRIES if k not in outline.entries]
    if absent:
        raise ConfigError(
            f"ckpt_path={outline.path!r}: holds the model's weights only (no {', '.join(absent)}): it cannot resume "
            "training; resume from the run's checkpoints/last.ckpt"
        )
    model_name = str(_get_cfg(cfg, "model", "net", "_target_") or type(model).__name__).rsplit(".", 1)[-1]
    _check_state_dict(outline, model, model_name)
    group = _run_optimizer_group(cfg)
    options = frozenset(group or ())
    if options and outline.optimizer_options and not options <= outline.optimizer_options[0]:
        target = str(_get_cfg(cfg, "model", "optimizer", "_target_"))
        raise ConfigError(
            f"ckpt_path={outline.path!r}: holds the state of another optimizer than model.optimizer ({target}; the "
            f"file has no {_listed(sorted(options - outline.optimizer_options[0]))}); resume with the optimizer it was trained with"
        )
    if group and outline.optimizer_values:
        _check_optimizer_values(outline, group, outline.optimizer_values[0])
    trainer = cfg.get("trainer") or {}
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    over = (max_epochs not in (None, -1) and outline.epochs_done is not None and outline.epochs_done >= max_epochs) or (
        max_steps not in (None, -1) and outline.global_step is not None and outline.global_step >= max_steps
    )
    if over:
        raise ConfigError(
            f"ckpt_path={outline.path!r}: its training is already over ({outline.epochs_done} epochs, "
            f"{outline.global_step} steps done; trainer.max_epochs={max_epochs}, trainer.max_steps={max_steps}): "
            "raise trainer.max_epochs (or trainer.max_steps) to train on"
        )
    if max_steps not in (None, -1) and outline.at_epoch_end:
        from lightning.pytorch.utilities import rank_zero_warn

        # Lightning 2.6's step-based restart from an epoch's end replays batches of the finished epoch
        # (docs/guarantees.md): the resumed run is valid but not the run that was interrupted.
        rank_zero_warn(
            f"ckpt_path={outline.path!r} was written at the end of an epoch, and trainer.max_steps={max_steps} is "
            "set: Lightning resumes such a checkpoint by replaying batches of the finished epoch, so this run will "
            "not equal an uninterrupted one. For an exact resume stop with trainer.max_epochs and leave "
            "trainer.max_steps=-1."
        )


def _get_cfg(cfg: Any, *keys: str) -> Any:
    for key in keys:
        if cfg is None or not hasattr(cfg, "get"):
            return None
        cfg = cfg.get(key)
    return cfg


def _run_optimizer_group(cfg: Any) -> dict[str, Any] | None:
    """The options of the run's optimizer (its first parameter group as ``optimizer.state_dict()`` lists it,
    without ``params``), or None."""
    node = _get_cfg(cfg, "model", "optimizer")
    if node is None or _get_cfg(node, "_target_") is None:
        return None
    import hydra
    import torch

    try:
        optimizer = hydra.utils.instantiate(node, _convert_="all")([torch.nn.Parameter(torch.zeros(1))])
    except Exception:  # checks.check_config has reported a bad optimizer already: nothing to compare with
        return None
    return {k: v for k, v in optimizer.state_dict()["param_groups"][0].items() if k != "params"}


def _check_optimizer_values(outline: CheckpointOutline, run: dict[str, Any], saved: dict[str, Any]) -> None:
    """Refuse an optimizer option whose value differs from the checkpoint's: Lightning restores the optimizer's
    parameter groups from the checkpoint, so the run's value would never take effect (the learning rate is
    compared with the checkpoint's ``initial_lr``, the value before the schedule, when it has one)."""
    changed = []
    for key, value in run.items():
        theirs = saved.get("initial_lr", saved.get("lr")) if key == "lr" else saved.get(key)
        if key == "initial_lr" or not _plain(value) or theirs is None or _same(value, theirs):
            continue
        changed.append(f"model.optimizer.{key}={_shown(value)} (the checkpoint's: {_shown(theirs)})")
    if changed:
        raise ConfigError(
            f"ckpt_path={outline.path!r}: {_listed(changed)}: a resumed run keeps the optimizer settings of its "
            "checkpoint (Lightning restores them), so the new value would never take effect; resume without it, or "
            "start a new run from the weights (fine-tuning) to train with it"
        )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b) and all(
            _same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool) or isinstance(a, str) or isinstance(b, str):
        return a == b
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)


def _shown(value: Any) -> str:
    """An optimizer option as an override would write it (``[0.9, 0.999]``, ``0.0005``, ``true``)."""
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)
