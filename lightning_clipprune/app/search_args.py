"""The command line of ``python -m lightning_clipprune.search``: options, their checks and the run folder.

Torch-free (argparse, :mod:`lightning_clipprune._choices`, the file system): ``--help``, a mistyped option
and a run folder that is not there are answered before torch, Lightning and Hydra load (about a second,
where importing them takes several). The search itself is :mod:`lightning_clipprune.app.search_cli`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_clipprune._choices import (
    DEFAULT_GRID,
    DEFAULT_LAYER_GRID,
    DEFAULT_MAX_HESSIAN_BYTES,
    DEFAULT_NUM_SAMPLES,
    SEARCH_METHODS,
)

__all__ = ["build_parser", "check_args", "early_exit", "error_line", "parse_floats", "run_dir_of"]


def parse_floats(text: str) -> list[float]:
    """``"0.5, 0.9,"`` -> ``[0.5, 0.9]`` (a comma-separated grid of sparsities)."""
    return [float(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m lightning_clipprune.search``."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_clipprune.search",
        description="Find the largest global sparsity whose validation accuracy, without retraining, stays within "
        "a tolerance of the dense model; optionally the per-layer sensitivity and a short fine-tune.",
    )
    add = parser.add_argument
    add("run", help="a run folder of `python -m lightning_clipprune.run` or a checkpoint inside it")
    # a default: argparse would otherwise call it required when `run` is missing
    add("overrides", nargs="*", default=[], metavar="OVERRIDE",
        help="extra Hydra overrides (such as data.root=...) after the run's own")
    add("--tolerance", type=float, default=0.5, help="allowed val accuracy drop, percentage points (0.5)")
    add("--grid", type=parse_floats, default=list(DEFAULT_GRID), help="coarse sparsity grid, comma-separated")
    add("--resolution", type=float, default=0.001, help="bisection stops at this sparsity width (0.001)")
    add("--method", default="magnitude", help="magnitude (one global threshold, default) or sparsegpt (layer-wise "
        "reconstruction on training samples, no retraining; 'obs' is another name)")
    add("--calibration-samples", type=int, default=DEFAULT_NUM_SAMPLES,
        help=f"sparsegpt: training samples of the calibration ({DEFAULT_NUM_SAMPLES})")
    add("--seed", type=int, default=0, help="sparsegpt: random state while the calibration samples are drawn (0)")
    add("--max-hessian-mib", type=float, default=DEFAULT_MAX_HESSIAN_BYTES / 2**20,
        help="sparsegpt: refuse a layer whose float32 Hessian is larger (MiB; 2048); the run needs several times it")
    add("--criterion", choices=("magnitude", "taylor"), default="magnitude", help="ranking of --method magnitude")
    add("--taylor-batches", type=int, default=20, help="training batches averaged for the taylor gradient")
    add("--sensitivity", action="store_true", help="also the per-layer sensitivity and an allocation")
    add("--layer-grid", type=parse_floats, default=list(DEFAULT_LAYER_GRID),
        help="--sensitivity: the sparsities each layer is pruned to alone, comma-separated "
        f"({','.join(f'{x:g}' for x in DEFAULT_LAYER_GRID)})")
    add("--target", type=float, default=None, help="global sparsity of the per-layer allocation (default: the one found)")
    add("--finetune-epochs", type=int, default=0, help="fine-tune at the sparsity found for N epochs")
    add("--finetune-lr", type=float, default=None, help="peak learning rate of the fine-tune (default: run's / 10)")
    add("--no-test", action="store_true", help="do not evaluate the test split at all")
    add("--out", type=Path, default=None, help="output folder (default: RUN/search)")
    add("--overwrite", action="store_true", help="replace an earlier search in the output folder (default: refuse)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """The options argparse cannot check in one line; ``--method`` resolved to its canonical name.

    Raises:
        ValueError: naming the option, the value and what is allowed.
    """
    if args.method not in SEARCH_METHODS:
        raise ValueError(f"--method {args.method!r} is not one of {', '.join(SEARCH_METHODS)}")
    args.method = SEARCH_METHODS[args.method]
    if args.method == "sparsegpt" and args.criterion != "magnitude":
        raise ValueError(f"--criterion {args.criterion} ranks the magnitude search; drop it with --method sparsegpt")
    if args.calibration_samples < 1:
        raise ValueError(f"--calibration-samples must be >= 1, got {args.calibration_samples}")
    _check_numbers(args)


def _in_unit(x: float) -> bool:
    return math.isfinite(x) and 0.0 < x < 1.0


def _check_numbers(args: argparse.Namespace) -> None:
    """The numeric options, in the words of the command line (the library's functions name their own arguments)."""
    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        raise ValueError(f"--tolerance must be a number >= 0 (points of validation accuracy), got {args.tolerance:g}")
    for option, grid in (("--grid", args.grid), ("--layer-grid", args.layer_grid)):
        if not grid or not all(_in_unit(x) for x in grid):
            raise ValueError(f"{option} must be sparsities in (0, 1), comma-separated, such as 0.5,0.9; got "
                             f"{','.join(f'{x:g}' for x in grid) or 'nothing'}")
    if not _in_unit(args.resolution):
        raise ValueError(f"--resolution must be a sparsity width in (0, 1), such as 0.001; got {args.resolution:g}")
    if args.target is not None and not _in_unit(args.target):
        raise ValueError(f"--target must be a global sparsity in (0, 1), got {args.target:g}")
    if args.target is not None and not args.sensitivity:
        raise ValueError("--target sets the sparsity of the per-layer allocation, which only --sensitivity computes: "
                         "add --sensitivity, or drop --target")
    if args.target is not None and args.target > max(args.layer_grid) + 1e-9:
        raise ValueError(f"--target {args.target:g} is above the largest --layer-grid sparsity "
                         f"({max(args.layer_grid):g}): nothing is measured there; add a --layer-grid point >= "
                         f"{args.target:g}, or lower --target")
    if args.finetune_epochs < 0:
        raise ValueError(f"--finetune-epochs must be >= 0 (0: no fine-tune), got {args.finetune_epochs}")
    if args.finetune_lr is not None and not (math.isfinite(args.finetune_lr) and args.finetune_lr > 0):
        raise ValueError(f"--finetune-lr must be a number > 0, got {args.finetune_lr:g}")
    if args.taylor_batches < 1:
        raise ValueError(f"--taylor-batches must be >= 1, got {args.taylor_batches}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if not (math.isfinite(args.max_hessian_mib) and args.max_hessian_mib > 0):
        raise ValueError(f"--max-hessian-mib must be a number > 0, got {args.max_hessian_mib:g}")


def run_dir_of(path: Path) -> tuple[Path, Path]:
    """``(run folder, checkpoint)`` from a run folder or a checkpoint inside one.

    Raises:
        FileNotFoundError: no such folder or file, a folder without a checkpoint, or not a regular file.
    """
    if path.is_dir() and path.suffix in (".ckpt", ".pt", ".pth"):
        raise FileNotFoundError(f"{path} is a folder, not a checkpoint file")
    if os.path.lexists(path) and not path.is_dir() and not path.is_file():
        raise FileNotFoundError(f"{path} is not a regular file (a device, a pipe, or a broken or special link)")
    if path.is_dir():
        for name in ("final.ckpt", "last.ckpt"):
            if (path / "checkpoints" / name).is_file():
                return path, path / "checkpoints" / name
        raise FileNotFoundError(f"no checkpoints/final.ckpt or checkpoints/last.ckpt in {path}")
    if not path.is_file():
        raise FileNotFoundError(f"no such run folder or checkpoint: {path}")
    return (path.parent.parent if path.parent.name == "checkpoints" else path.parent), path


def error_line(err: BaseException) -> str:
    """The one line the command prints for ``err`` (its file name added when the message lacks it)."""
    text = " ".join(str(err).split())
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return f"error: {text}"


def early_exit(argv: Sequence[str] | None = None) -> int | None:
    """Parse and check the command line before the heavy imports: the exit status when it already fails (1, after
    one ``error:`` line on stderr; argparse itself exits for ``--help`` and for a usage error), else None."""
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        run_dir_of(Path(args.run))
    except (OSError, ValueError) as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(error_line(err), file=sys.stderr)
        return 1
    return None
