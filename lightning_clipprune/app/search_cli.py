"""``python -m lightning_clipprune.search RUN``: the threshold search on a run folder of the app.

::

    python -m lightning_clipprune.search outputs/2026-11-29/01-00-00            # a run folder of the app
    python -m lightning_clipprune.search outputs/.../checkpoints/final.ckpt --tolerance 0.5 --sensitivity
    python -m lightning_clipprune.search RUN_DIR --criterion taylor --finetune-epochs 2
    python -m lightning_clipprune.search RUN_DIR --method sparsegpt --calibration-samples 2048   # reconstruction

The search itself is the library's (:mod:`lightning_clipprune.search`); this module is the app side:
rebuilding the run's model and data from its folder, loading its weights, an optional short fine-tune, and
the files written.

A run folder is a file from somewhere else, and the command line treats it so: the model is rebuilt only from
the suite's own config groups, with the overrides of the run's own record (``run_config.json``; older folders:
``.hydra/overrides.yaml``, else ``results.json``), each read bounded and checked, and every ``_target_`` of
the composed config must be one of the suite's own classes (:mod:`lightning_clipprune.app.targets`). The
checkpoint is read by :func:`lightning_clipprune.checkpoint.load_checkpoint` (nothing outside an allowed list
is unpickled) and checked key by key against the model. Outputs go into ``RUN/search`` (a real folder, never a
link) through temporary files and renames; a folder that already holds a search is refused unless
``--overwrite``, which first removes the files of the earlier search (and only those). Every refusal is one line
and exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import open_dict
from rich.console import Console
from torch import Tensor, nn

from lightning_clipprune._io import atomic_path, atomic_write_text
from lightning_clipprune.app.build import instantiate
from lightning_clipprune.app.checks import ConfigError, one_line
from lightning_clipprune.app.rundir import read_run_overrides, run_status
from lightning_clipprune.app.search_args import build_parser, check_args, error_line, run_dir_of
from lightning_clipprune.app.targets import check_targets
from lightning_clipprune.app.untrusted import make_output_dir
from lightning_clipprune.callbacks.gradient_clip import GradientClipCallback
from lightning_clipprune.callbacks.magnitude_prune import MagnitudePruneCallback
from lightning_clipprune.checkpoint import CheckpointError, load_checkpoint
from lightning_clipprune.export import save_sparse
from lightning_clipprune.posttrain import DEFAULT_NUM_SAMPLES, ReconstructionOptions
from lightning_clipprune.run import config_dir
from lightning_clipprune.search import (
    SearchResult,
    compare_allocation,
    layer_sensitivity,
    layer_sparsity_snippets,
    search_reconstruction,
    search_threshold,
    suggest_layer_sparsity,
    taylor_gradients,
)

__all__ = ["OUTPUT_NAMES", "compose_run_config", "finetune", "load_weights", "main", "run_overrides", "save_pruned"]

#: The files and folder a search writes into its output folder: what ``--overwrite`` removes, and nothing else.
OUTPUT_NAMES: tuple[str, ...] = (
    "search.csv", "search.png", "search.json", "pruned.ckpt", "pruned.lcps",
    "sensitivity.csv", "sensitivity.png", "finetuned",
)


def run_overrides(run_dir: Path) -> list[str]:
    """The overrides the run was made with, read and checked as untrusted input.

    From the run's own ``run_config.json``, else (older folders) ``.hydra/overrides.yaml``, else
    ``results.json``'s ``overrides`` (:func:`lightning_clipprune.app.rundir.read_run_overrides`).

    Raises:
        ValueError: a record that cannot be read, or an override that would build anything but the suite's
            own classes (one line naming the file and the override).
    """
    return read_run_overrides(run_dir)[0]


def compose_run_config(overrides: Sequence[str], output_dir: Path) -> Any:
    """The app's config composed with ``overrides`` (as ``python -m lightning_clipprune.run`` would), checked.

    Only the suite's own config groups are used, and the composed config goes through
    :func:`lightning_clipprune.app.targets.check_targets`: every ``_target_`` in it is one of the suite's
    own classes. The returned config is resolved (no interpolation left): build from it.

    Raises:
        ConfigError: (a ``ValueError``) an override Hydra cannot apply, or a refused ``_target_`` (one line).
    """
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides))
    except HydraException as err:  # an unknown key or group option: Hydra's first line names it
        raise ConfigError(one_line(str(err).split("\n")[0]) + " (in the run's overrides or the extra ones given)") from None
    finally:
        GlobalHydra.instance().clear()
    # set after composing, not as an override: a folder name may hold what the override grammar parses (",", "'")
    if "${" in str(output_dir):
        raise ConfigError(f"output folder {str(output_dir)!r}: a name holding '${{' would be read as an interpolation; rename it")
    cfg.output_dir = str(output_dir)
    return check_targets(cfg)


def _check_state(checkpoint: Path, key: str, value: Any, ref: Tensor) -> None:
    """One entry of a checkpoint's state dict against the model's: a tensor of its shape, finite, its kind."""
    if not isinstance(value, Tensor) or value.shape != ref.shape:
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise CheckpointError(checkpoint, f"{key} is {got}, the model's is {tuple(ref.shape)}; not this run's model")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise CheckpointError(checkpoint, f"{key} holds NaN or infinite values; nothing to search on")
    if value.is_complex() or (ref.is_floating_point() and not value.is_floating_point()):
        raise CheckpointError(checkpoint, f"{key} is {value.dtype}, the model's is {ref.dtype}")


def load_weights(model: nn.Module, checkpoint: Path) -> None:
    """Load a Lightning checkpoint's ``state_dict`` (or a bare state dict) into ``model``, running no code.

    The file is read with :func:`lightning_clipprune.checkpoint.load_checkpoint` (no global outside its
    allowed list is unpickled, reads are bounded); every key, shape and value is checked against ``model``
    before any weight is written.

    Raises:
        CheckpointError: (a ``ValueError``) the file is unsafe, broken, or not this model's; one line naming it.
    """
    ckpt = load_checkpoint(checkpoint)
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, Mapping):
        raise CheckpointError(checkpoint, f"its 'state_dict' is a {type(state).__name__}, not a dict of tensors")
    own = model.state_dict()
    missing, unexpected = [k for k in own if k not in state], [str(k) for k in state if k not in own]
    if missing or unexpected:
        what = "its state_dict" if "state_dict" in ckpt else "it has no 'state_dict' entry, and as a bare state dict it"
        raise CheckpointError(
            checkpoint, f"{what} does not match this run's model ({len(missing)} keys missing, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}); is it the checkpoint of this run folder?"
        )
    for key, ref in own.items():
        _check_state(checkpoint, key, state[key], ref)
    model.load_state_dict(state, strict=True)


def save_pruned(model: nn.Module, out_dir: Path, metadata: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``pruned.ckpt`` (``{"state_dict": ...}``, Lightning's shape) and ``pruned.lcps`` into ``out_dir``."""
    make_output_dir(out_dir)
    ckpt, lcps = out_dir / "pruned.ckpt", out_dir / "pruned.lcps"
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    hparams = dict(getattr(model, "hparams", {}) or {})
    with atomic_path(ckpt) as tmp:
        torch.save({"state_dict": state, "hyper_parameters": hparams, "search": dict(metadata)}, tmp)
    save_sparse(state, lcps, metadata=dict(metadata))
    return ckpt, lcps


def _clip_settings(cfg: Any) -> tuple[float | None, str]:
    """The run's clip bound and kind ("norm" or "value"): its clip group's, else Lightning's own
    (``~clip trainer.gradient_clip_val=0.5``), else None."""
    clip = cfg.get("clip")
    if clip is None:
        trainer = cfg.get("trainer") or {}
        value = trainer.get("gradient_clip_val")
        kind = "value" if str(trainer.get("gradient_clip_algorithm") or "norm") == "value" else "norm"
        return (float(value) if value else None), kind
    algorithm = clip.get("algorithm", "norm")
    # agc/autoclip/zclip have no single fixed bound on a one-off gradient; their clip_val is the cap (or None)
    return (None if clip.get("clip_val") is None else float(clip.clip_val)), ("value" if algorithm == "value" else "norm")


def finetune(cfg: Any, model: nn.Module, datamodule: Any, sparsity: float, epochs: int, lr: float | None) -> dict[str, float]:
    """Fine-tune ``model`` (already pruned) for ``epochs`` at ``sparsity`` with the run's clip; masks kept fixed.

    Returns ``{"val_acc": ..., "test_acc": ...}`` after fine-tuning.
    """
    model_cfg = cfg.model.copy()
    if lr is not None and model_cfg.get("optimizer") is not None:
        with open_dict(model_cfg):
            model_cfg.optimizer.lr = lr
    tuned = hydra.utils.instantiate(model_cfg, _convert_="all")
    tuned.load_state_dict(model.state_dict())
    # threshold=0: the zeros the search left are the mask, entry for entry (a sparsity target would rank again,
    # and its per-row ceiling keeps one weight of a row the search emptied)
    callbacks: list[Any] = [MagnitudePruneCallback(threshold=0.0, schedule="oneshot", start=0.0, verbose=False)]
    clip_val, kind = _clip_settings(cfg)
    if cfg.get("clip") is not None:
        callbacks.insert(0, hydra.utils.instantiate(cfg.clip))
    elif clip_val is not None:  # the run clipped with Lightning's gradient_clip_val: the same bound
        callbacks.insert(0, GradientClipCallback(clip_val=clip_val, algorithm=kind))
    with _quiet_lightning():
        return _fit_and_score(model, tuned, datamodule, callbacks, epochs)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's info lines ("GPU available: ...", "`Trainer.fit` stopped: ...") hidden; warnings still shown."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _fit_and_score(model: nn.Module, tuned: Any, datamodule: Any, callbacks: list[Any], epochs: int) -> dict[str, float]:
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu" if not torch.cuda.is_available() else "auto", devices=1,
        callbacks=callbacks, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=True, num_sanity_val_steps=0,
    )
    trainer.fit(tuned, datamodule=datamodule)
    val = trainer.validate(tuned, datamodule=datamodule, verbose=False)[0]["val/acc"]
    test = trainer.test(tuned, datamodule=datamodule, verbose=False)[0]["test/acc"] if datamodule.has_test else None
    model.load_state_dict(tuned.state_dict())
    return {"val_acc": float(val), "test_acc": None if test is None else float(test)}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_clipprune.search RUN_DIR_OR_CKPT [options] [overrides]``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except (OSError, ValueError) as err:  # FileNotFoundError, CheckpointError, ConfigError, UntrustedFileError...
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(error_line(err), file=sys.stderr)
        return 1


#: The run's prune flags that decide, with ``include``/``exclude``, which weights it prunes.
_SELECTION_FLAGS = ("keep_first_and_last", "prune_bias", "include_tied")


def _selection(prune: Any) -> dict[str, Any] | None:
    """``select_prunable_parameters``'s arguments from the run's composed prune config; None for a dense run."""
    if prune is None or prune.get("_target_") is None:
        return None
    return {
        "include": list(prune.get("include") or ()) or None,
        "exclude": list(prune.get("exclude") or ()),
        **{key: bool(prune.get(key)) for key in _SELECTION_FLAGS},
    }


def run_prunable(cfg: Any, model: nn.Module) -> list[str] | None:
    """The weights the run's prune config prunes (its ``include``/``exclude``/``keep_first_and_last``...), so the
    search's sparsities are the run's and its ``prune.sparsity=`` command trains at the chosen point; None for
    a dense run (``~prune``: every Linear/Conv weight)."""
    from lightning_clipprune.pruning import select_prunable_parameters

    selection = _selection(cfg.get("prune"))
    if selection is None:
        return None
    params = select_prunable_parameters(model, **selection, include_frozen=True)
    return [n for n, p in params.items() if p.dim() > 1] or None  # (biases: the search ranks weights)


def _search(args: argparse.Namespace, cfg: Any, model: nn.Module, datamodule: Any) -> SearchResult:
    """The search of the command line, over the weights the run prunes; the model is left pruned to the point found."""
    test = None if args.no_test or not datamodule.has_test else datamodule.test_dataloader
    names = run_prunable(cfg, model)
    if args.method == "sparsegpt":
        options = ReconstructionOptions(num_samples=args.calibration_samples, seed=args.seed,
                                        max_hessian_bytes=max(1, int(args.max_hessian_mib * 2**20)))
        try:
            return search_reconstruction(
                model, datamodule.val_dataloader(), datamodule.train_dataloader(), tolerance=args.tolerance,
                grid=args.grid, resolution=args.resolution, options=options, test_loader=test, apply=True, progress=True,
                names=names,
            )
        except ValueError as err:
            if "max_hessian_bytes" not in str(err):
                raise
            raise ValueError(f"{err} (on the command line: --max-hessian-mib)") from None
    grads = None
    if args.criterion == "taylor":
        clip_val, algorithm = _clip_settings(cfg)
        grads = taylor_gradients(
            model, datamodule.train_dataloader(), batches=args.taylor_batches, clip_val=clip_val, clip_algorithm=algorithm,
            names=names,
        )
    return search_threshold(
        model, datamodule.val_dataloader(), tolerance=args.tolerance, grid=args.grid, resolution=args.resolution,
        criterion=args.criterion, grads=grads, progress=True, test_loader=test, apply=True, names=names,
    )


def _commands(overrides: Sequence[str], result: SearchResult, prune: Any = None) -> list[str]:
    """The ``python -m lightning_clipprune.run`` commands that train at the point found.

    The run's own prune choice is replaced by the one found, but its selection (``prune``: the run's composed
    prune config) is kept, so the sparsity counts the weights the search measured (:func:`run_prunable`).
    """
    # a fresh run resumes nothing, in a folder of its own
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    kept = [
        o for o, key in zip(overrides, keys, strict=True)
        if key.split(".")[0] not in ("prune", "ckpt_path", "output_dir") and not key.startswith(("hydra.run.", "hydra.sweep."))
    ]
    base = " ".join(shlex.quote(o) for o in [*kept, *_selection_overrides(prune)])  # pasted into a shell: quoted
    return [f"python -m lightning_clipprune.run {base} {o}".replace("  ", " ") for o in result.overrides()]


def _selection_overrides(prune: Any) -> list[str]:
    """The overrides that give a fresh run the run's prunable set (:func:`_selection`)."""
    selection = _selection(prune)
    if selection is None:
        return []
    out = [f"prune.{key}=true" for key in _SELECTION_FLAGS if selection[key]]
    for key in ("include", "exclude"):
        if selection[key]:
            out.append(f"prune.{key}=[{','.join(json.dumps(str(p)) for p in selection[key])}]")
    return out


def _summary(checkpoint: Path, result: SearchResult, commands: list[str]) -> dict[str, Any]:
    threshold = None if result.criterion == "sparsegpt" else result.chosen.threshold  # NaN is not JSON
    return {
        "checkpoint": str(checkpoint), "method": "sparsegpt" if result.criterion == "sparsegpt" else "magnitude",
        "criterion": result.criterion, "tolerance_points": result.tolerance, **result.extra,
        "dense_val_acc": result.dense_val_acc, "sparsity": result.chosen.sparsity, "threshold": threshold,
        "val_acc": result.chosen.val_acc, "val_loss": result.chosen.val_loss,
        "test_acc_at_chosen_point": result.test_acc, "dense_test_acc": result.dense_test_acc,
        "evaluations": len(result.points), "commands": commands,
    }


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Create ``out`` (a real folder); refuse one holding an earlier search unless ``overwrite``, which removes
    the earlier search's files (:data:`OUTPUT_NAMES`, nothing else) so no stale file stays beside the new ones.

    Raises:
        ValueError: ``out`` holds an earlier search and ``overwrite`` is False (one line naming the way out).
    """
    make_output_dir(out)  # before the work: a planted `search` link or file is refused at once
    earlier = [n for n in OUTPUT_NAMES if os.path.lexists(out / n)]
    if earlier and not overwrite:
        raise ValueError(f"{out} already holds a search ({', '.join(earlier)}): pass --overwrite to replace it, "
                         "or --out NEW_FOLDER to keep it")
    for name in earlier:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            for inner in ("pruned.ckpt", "pruned.lcps"):
                with contextlib.suppress(FileNotFoundError):
                    (path / inner).unlink()
            with contextlib.suppress(OSError):  # a folder holding files of the user's own is left as it is
                path.rmdir()
        else:
            path.unlink()  # a link is removed itself, never followed


def _main(args: argparse.Namespace) -> int:
    check_args(args)
    console = Console(width=None if sys.stdout.isatty() else 120)
    run_dir, checkpoint = run_dir_of(Path(args.run))
    out = args.out or run_dir / "search"
    overrides = [*run_overrides(run_dir), *args.overrides]
    cfg = compose_run_config(overrides, out)
    prepare_output_dir(out, args.overwrite)
    if checkpoint.parent.parent == run_dir and run_status(run_dir) == "interrupted":
        console.print("warning: this run was interrupted (results.json: status 'interrupted'): its checkpoint is from"
                      " mid-training, before the end of its pruning schedule; resume it first (its resume_command in"
                      " results.json) to search the trained model", highlight=False)
    model = instantiate(cfg.model, "model")
    load_weights(model, checkpoint)
    datamodule = instantiate(cfg.data, "data")
    datamodule.prepare_data()
    datamodule.setup("fit")
    result = _search(args, cfg, model, datamodule)
    start = result.sorted_points()[0].sparsity
    if start > 0:
        console.print(f"the run's model is {100 * start:.2f} % sparse already: the search starts there (row"
                      " 'start'), and no sparsity below it is searched", highlight=False)
    console.print(result.to_table())  # its caption holds the test accuracy, read once
    result.plot(out / "search.png")
    written = [result.write_csv(out / "search.csv"), out / "search.png"]
    commands = _commands(overrides, result, cfg.get("prune"))
    summary = _summary(checkpoint, result, commands)
    ckpt, lcps = save_pruned(model, out, {"sparsity": result.chosen.sparsity, "threshold": summary["threshold"]})
    summary["pruned_checkpoint"], summary["pruned_lcps"] = str(ckpt), str(lcps)
    written += [ckpt, lcps]
    console.print("train at this point with:")
    for c in commands:
        console.print(f"  {c}", soft_wrap=True, highlight=False)
    if args.method == "sparsegpt" and args.calibration_samples != DEFAULT_NUM_SAMPLES:
        console.print(f"  (the run's prune.criterion=obs calibrates on {DEFAULT_NUM_SAMPLES} training samples; "
                      f"this search used {args.calibration_samples})", highlight=False)
    if args.sensitivity:
        summary["allocation"] = _sensitivity_step(args, cfg, checkpoint, datamodule, result, out, console)
        written += [out / "sensitivity.csv", out / "sensitivity.png"]
    if args.finetune_epochs > 0:
        summary["finetune"] = _finetune_step(args, cfg, model, datamodule, result, out, console)
        written.append(Path(summary["finetune"]["checkpoint"]).parent)
    atomic_write_text(out / "search.json", json.dumps(summary, indent=2) + "\n")
    written.append(out / "search.json")
    console.print(f"written in {out}: " + ", ".join(_relative(p, out) for p in written), soft_wrap=True, highlight=False)
    return 0


def _relative(path: Path, out: Path) -> str:
    """``path`` relative to ``out`` (a folder with a trailing ``/``)."""
    rel = Path(path).relative_to(out).as_posix()
    return rel + "/" if Path(path).is_dir() else rel


def _sensitivity_step(
    args: argparse.Namespace, cfg: Any, checkpoint: Path, datamodule: Any, result: SearchResult, out: Path, console: Any
) -> dict[str, Any]:
    """``--sensitivity``: one layer at a time, the suggested per-layer allocation and its comparison."""
    model_dense = instantiate(cfg.model, "model")
    load_weights(model_dense, checkpoint)
    val = datamodule.val_dataloader()
    sens = layer_sensitivity(model_dense, val, sparsities=args.layer_grid, names=result.names, progress=True)
    console.print(sens.to_table())
    sens.write_csv(out / "sensitivity.csv")
    sens.plot(out / "sensitivity.png")
    target = args.target if args.target is not None else result.chosen.sparsity
    top = max(args.layer_grid)
    if target > top:  # the sparsity found, not a --target (refused before any work): allocate at the grid's top
        console.print(f"warning: the sparsity found ({100 * target:.2f} %) is above the largest --layer-grid point "
                      f"({top:g}): the per-layer allocation is for {100 * top:.2f} % (add a larger --layer-grid point)",
                      highlight=False)
        target = top
    allocation = suggest_layer_sparsity(sens, target)
    comparison = compare_allocation(model_dense, datamodule.val_dataloader(), allocation)
    python, hydra_overrides = layer_sparsity_snippets(allocation)
    console.print(f"per-layer sparsities for {100 * target:.2f} % global: val acc {100 * comparison['layerwise_val_acc']:.2f} % "
                  f"vs global ranking {100 * comparison['global_val_acc']:.2f} % (no retraining)")
    console.print(f"  {python}", soft_wrap=True, highlight=False, markup=False)
    console.print(f"  {hydra_overrides}", soft_wrap=True, highlight=False, markup=False)
    return {"target": target, "layer_sparsity": allocation, **comparison, "callback": python, "overrides": hydra_overrides}


def _finetune_step(
    args: argparse.Namespace, cfg: Any, model: Any, datamodule: Any, result: SearchResult, out: Path, console: Any
) -> dict[str, Any]:
    """``--finetune-epochs N``: a short run at the sparsity found, masks fixed; before/after accuracy."""
    lr = args.finetune_lr
    if lr is None and cfg.model.get("optimizer") is not None and cfg.model.optimizer.get("lr") is not None:
        lr = float(cfg.model.optimizer.lr) / 10
    tuned = finetune(cfg, model, datamodule, result.chosen.sparsity, args.finetune_epochs, lr)
    console.print(
        f"fine-tuned {args.finetune_epochs} epoch(s) at {100 * result.chosen.sparsity:.2f} %: val acc "
        f"{100 * result.chosen.val_acc:.2f} % -> {100 * tuned['val_acc']:.2f} %"
        + (f", test acc {100 * tuned['test_acc']:.2f} %" if tuned["test_acc"] is not None else "")
    )
    summary = {"epochs": args.finetune_epochs, "lr": lr, "val_acc_before": result.chosen.val_acc, **tuned}
    ckpt, _ = save_pruned(model, out / "finetuned", {"sparsity": result.chosen.sparsity, "finetune_epochs": args.finetune_epochs})
    summary["checkpoint"] = str(ckpt)
    return summary


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
