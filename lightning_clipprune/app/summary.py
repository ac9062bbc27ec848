"""The run's report: ``results.json`` (written atomically), the console summary, the resume command."""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_clipprune.app.build import Components
from lightning_clipprune.app.fit import Outcome

__all__ = ["clip_record", "collect_results", "print_summary", "resume_command", "write_results"]

_NOT_REPEATED = ("ckpt_path", "hydra.run.dir")  # replaced in the resume command


def resume_command(overrides: Sequence[str], output_dir: Path, config: Sequence[str] = ()) -> str | None:
    """The command that resumes a run in ``output_dir`` from its ``last.ckpt``, or None when there is none yet.

    The resumed run writes into the same folder, so its metrics stay in one place. ``config``: the run's
    ``--config-dir`` / ``--config-name`` options (:func:`~lightning_clipprune.app.sweep_plan.config_arguments`).

    Example::

        >>> import tempfile; d = Path(tempfile.mkdtemp()); (d / "checkpoints").mkdir(); (d / "checkpoints/last.ckpt").touch()
        >>> resume_command(["prune.sparsity=0.5"], d).split()[3]
        'prune.sparsity=0.5'
    """
    ckpt = output_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        return None
    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in _NOT_REPEATED]
    args = [*config, *kept, f"hydra.run.dir={output_dir}", f"ckpt_path={ckpt}"]
    return "python -m lightning_clipprune.run " + " ".join(shlex.quote(a) for a in args)


def _config_arguments() -> list[str]:
    """This run's ``--config-dir`` / ``--config-name`` (none outside a Hydra app: ``train`` called directly)."""
    from hydra.core.hydra_config import HydraConfig

    from lightning_clipprune.app.sweep_plan import config_arguments

    return config_arguments(HydraConfig.get()) if HydraConfig.initialized() else []


def collect_results(
    cfg: Any,
    parts: Components,
    outcome: Outcome,
    *,
    overrides: Sequence[str],
    output_dir: Path,
    wall_time_s: float,
    resumed_from: Path | None = None,
) -> dict[str, Any]:
    """The dict written to ``results.json``: accuracies, sparsity, parameter counts, clipping, timing.

    Keys: ``experiment``, ``status`` ("completed" | "interrupted"), ``val_acc``, ``test_acc`` (when
    measured), ``val_acc_before_prune`` (after post-training pruning), ``sparsity`` (of the prunable
    weights), ``params_total``, ``params_nonzero``, ``prunable_total``, ``prunable_nonzero``,
    ``compressed_bytes`` (what the sparse export writes for all parameters), ``clip``
    (who clipped the gradients and how, see :func:`clip_record`; None: not clipped), ``epochs``, ``steps``, ``seed``, ``wall_time_s``, ``overrides``,
    ``output_dir``; ``resume_command`` for an interrupted run; ``resumed_from`` for a resumed one;
    ``inference_latency`` (CPU, dense vs :func:`~lightning_clipprune.to_inference`'s model, see
    :func:`~lightning_clipprune.export.latency.measure_inference`) when the ``SparsityLogger`` measured it.
    """
    from lightning_clipprune.callbacks.contract import PruneState
    from lightning_clipprune.sparsity import parameter_counts, prunable_names, sparsity_report

    model, trainer = parts.model, parts.trainer
    if isinstance(parts.prune, PruneState) and parts.prune.parameter_names:
        prunable = list(parts.prune.parameter_names)
    else:
        prunable = prunable_names(model)  # what SparsityLogger reports without a prune callback
    params_total, params_nonzero = parameter_counts(model)
    prunable_total, prunable_nonzero = parameter_counts(model, prunable)
    results: dict[str, Any] = {
        "experiment": experiment_name(cfg),
        "status": outcome.status,
        "val_acc": outcome.val_acc,
        "val_acc_before_prune": outcome.val_acc_before_prune,
        "test_acc": outcome.test_acc,
        "sparsity": 1.0 - prunable_nonzero / prunable_total if prunable_total else 0.0,
        "params_total": params_total,
        "params_nonzero": params_nonzero,
        "prunable_total": prunable_total,
        "prunable_nonzero": prunable_nonzero,
        "compressed_bytes": sparsity_report(model).compressed_bytes,  # the sweep report's "compressed B"
        "clip": clip_record(parts),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "seed": cfg.get("seed"),
        "wall_time_s": wall_time_s,
        "overrides": list(overrides),
        "output_dir": str(output_dir),
    }
    for key in ("val_acc_before_prune", "test_acc"):
        if results[key] is None:
            del results[key]
    if outcome.status == "interrupted":
        results["signal"] = outcome.signal
        results["resume_command"] = resume_command(overrides, output_dir, _config_arguments())
    if resumed_from is not None:
        results["resumed_from"] = str(resumed_from)
    latency = next((getattr(cb, "inference_latency", None) for cb in trainer.callbacks
                    if getattr(cb, "inference_latency", None)), None)
    if latency:
        results["inference_latency"] = dict(latency)
    return results


def clip_record(parts: Components) -> dict[str, Any] | None:
    """``results.json``'s ``clip``: who clipped the gradients, with which algorithm and bound; None when nothing did.

    ``by`` is ``"callback"`` for the clip group's :class:`~lightning_clipprune.GradientClipCallback` (its
    ``algorithm`` and ``clip_val``, then its statistics: ``steps``, ``clipped_fraction``, ``clipped_steps``,
    ``mean_norm``, ``max_norm``, ``nonfinite_skipped``), and ``"trainer"`` for Lightning's own clipping
    (``~clip trainer.gradient_clip_val=0.5``: ``algorithm`` is the Trainer's ``gradient_clip_algorithm``,
    ``"norm"`` by default; Lightning keeps no statistics).
    """
    summary = getattr(parts.clip, "summary", None)
    if callable(summary):
        return {"by": "callback", "algorithm": getattr(parts.clip, "algorithm", None),
                "clip_val": getattr(parts.clip, "clip_val", None), **summary()}
    clip_val = getattr(parts.trainer, "gradient_clip_val", None)
    if not clip_val:  # None or 0: Lightning does not clip
        return None
    algorithm = getattr(parts.trainer, "gradient_clip_algorithm", None)  # a GradClipAlgorithmType, None: "norm"
    return {"by": "trainer", "algorithm": str(getattr(algorithm, "value", algorithm) or "norm"), "clip_val": float(clip_val)}


def experiment_name(cfg: Any) -> str:
    """``cfg.name``; the default experiment's name ("digits") only while its model and data are chosen, else
    "MODEL on DATA" from Hydra's choices (``model=lenet5 data=fashion_mnist`` is no "digits" run)."""
    name = cfg.get("name") or "run"
    try:
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices
    except (ImportError, ValueError):  # not under Hydra's runtime (a config composed by hand)
        return name
    model, data = choices.get("model"), choices.get("data")
    if name == "digits" and choices.get("experiment") is None and (model, data) != ("mlp", "digits"):
        return f"{model} on {data}"
    return name


def write_results(output_dir: Path, results: dict[str, Any]) -> Path:
    """Write ``results.json`` into ``output_dir`` through a temporary file and a rename (never half a file)."""
    from lightning_clipprune._io import atomic_write_text

    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "results.json"
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    return path


def print_summary(results: dict[str, Any], job: str | None = None) -> None:
    """The run's summary table on the console (rich).

    Args:
        results: what :func:`collect_results` returned.
        job: which run this is, e.g. the sweep job's overrides; shown in the title.
    """
    from rich.console import Console
    from rich.table import Table

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f} %"

    title = f"lightning-clipprune: {results['experiment']}" + (f" [{job}]" if job else "")
    if results.get("status") == "interrupted":
        title += f" (interrupted by {results.get('signal') or 'a signal'})"
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("val accuracy", pct(results["val_acc"]))
    if "val_acc_before_prune" in results:
        table.add_row("val accuracy before pruning", pct(results["val_acc_before_prune"]))
    if "test_acc" in results:
        table.add_row("test accuracy", pct(results["test_acc"]))
    table.add_row("sparsity (prunable weights)", pct(results["sparsity"]))
    kept = results["params_nonzero"] / max(results["params_total"], 1)
    table.add_row("parameters kept", f"{results['params_nonzero']:,} / {results['params_total']:,} ({pct(kept)})")
    clip = results.get("clip")
    if clip and clip.get("by") == "trainer":
        table.add_row("gradient clipping", f"Lightning's gradient_clip_val={clip['clip_val']:g} ({clip['algorithm']})")
    elif clip:
        skipped = int(clip["nonfinite_skipped"])
        table.add_row(
            "gradient clipping",
            f"{pct(clip['clipped_fraction'])} of {int(clip['steps'])} steps; "
            f"norm mean {clip['mean_norm']:.3g}, max {clip['max_norm']:.3g}"
            + (f"; {skipped} non-finite skipped" if skipped else ""),
        )
    else:
        table.add_row("gradient clipping", "off")
    if results.get("inference_latency"):
        from lightning_clipprune.export.latency import format_latency

        table.add_row("inference latency (CPU)", format_latency(results["inference_latency"]))
    table.add_row("epochs / steps", f"{results['epochs']} / {results['steps']}")
    table.add_row("wall time", f"{results['wall_time_s']:.1f} s")
    if results.get("resumed_from"):
        table.add_row("resumed from", results["resumed_from"])
    Console().print(table)
    if results.get("status") == "interrupted":  # one line on stderr: what happened and what to do
        command = results.get("resume_command")
        which = results.get("signal") or "a signal"
        Console(stderr=True).print(
            f"interrupted by {which}; resume with: {command}" if command else
            f"interrupted by {which} before the first checkpoint (none before the first epoch ended); nothing to "
            "resume: run the command again (given a fixed hydra.run.dir or output_dir, remove that folder first)",
            soft_wrap=True, highlight=False, markup=False,
        )
