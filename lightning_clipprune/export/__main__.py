"""``python -m lightning_clipprune.export CHECKPOINT OUT``: write a checkpoint's weights in the sparse format.

The checkpoint is read without running code from it and within bounds
(:func:`lightning_clipprune.checkpoint.read_state_dict`); ``--unsafe-load`` unpickles it fully, for a trusted
checkpoint holding objects outside the allowed list. Every failure, to read or to write, is one ``error:``
line and exit status 1.

``--inference-batch-size N`` also writes the inference recipe into the file (JSON metadata, no pickle): each
``Linear`` weight is timed dense against CSR at batch ``N`` on this machine, and
:func:`~lightning_clipprune.export.load_inference` rebuilds that inference model from the file.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["main"]

_UNSAFE_WARNING = (
    "WARNING: --unsafe-load unpickles {path} with the full unpickler: a malicious checkpoint runs any code it "
    "contains, with your permissions. Only use it on a file you made yourself or fully trust.\n"
)


def _read_state_dict(path: str, unsafe: bool) -> dict[str, Tensor]:
    from lightning_clipprune.checkpoint import read_state_dict
    from lightning_clipprune.export._reparam import fold_pruning_masks

    if unsafe:
        sys.stderr.write(_UNSAFE_WARNING.format(path=path))
    # a checkpoint of torch.nn.utils.prune (Lightning's ModelPruning before it makes pruning permanent) holds
    # <name>_orig and <name>_mask: the pruned <name> is what is stored and timed
    return fold_pruning_masks(read_state_dict(path, unsafe=unsafe))


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _inference_recipe(state: dict[str, Tensor], batch_size: int) -> dict[str, object]:
    """Time the Linear weights at ``batch_size`` and print one line per layer: what CSR buys there."""
    from lightning_clipprune.export.recipes import recipe_for_state_dict

    recipe = recipe_for_state_dict(state, batch_size, progress=sys.stdout.isatty())
    for layer in recipe["layers"]:
        if layer["dense_s"] is None:
            timing = layer["reason"]
        else:
            timing = (f"dense {layer['dense_s'] * 1e6:.0f} us, CSR {layer['sparse_s'] * 1e6:.0f} us "
                      f"({layer['dense_s'] / layer['sparse_s']:.2f}x)")
        fmt = layer["format"] + (f", {layer['kernel']} kernel" if layer.get("kernel") else "")
        sys.stdout.write(f"inference    {layer['name']}: {layer['sparsity']:.1%} zeros -> {fmt} ({timing})\n")
    return recipe


#: The first bytes of a file in the sparse format (``export.format``'s magic, read here without torch).
_SPARSE_MAGIC = b"LCPSPARS"


def _refused_destination(checkpoint: str, out: str) -> str | None:
    """Why ``out`` must not be written, or None: it is the checkpoint itself, or an existing file in another
    format (a checkpoint given as OUT by mistake would be lost; an earlier sparse file is replaced)."""
    if not os.path.isfile(out):
        return None  # absent, or a folder (the writer refuses that in its own words)
    if os.path.exists(checkpoint) and os.path.samefile(checkpoint, out):
        return "it is the checkpoint being read: choose another file name, such as model.lcps"
    try:
        with open(out, "rb") as f:
            head = f.read(len(_SPARSE_MAGIC))
    except OSError:
        return None  # the writer reports what it cannot do
    if head and head != _SPARSE_MAGIC:  # (an empty file holds nothing to lose)
        return (f"it exists and is not a file of this sparse format ({os.path.getsize(out):,} bytes): refusing to "
                "replace it; remove it first or choose another file name")
    return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_clipprune.export",
        description="Write the weights of a Lightning checkpoint (or a torch.save'd state dict) in the compact "
        "sparse format of lightning_clipprune.export, and print the sizes before and after. The checkpoint is "
        "read with torch.load(weights_only=True): no code in it runs.",
    )
    parser.add_argument("checkpoint", help="a Lightning .ckpt file, or a torch.save(state_dict) file")
    parser.add_argument("out", help="the sparse file to write")
    parser.add_argument(
        "--drop-zero-signs",
        action="store_true",
        help="store -0.0 as +0.0 (smaller when the pruning left negative zeros; equal in value, not in bits)",
    )
    parser.add_argument(
        "--inference-batch-size",
        type=int,
        metavar="N",
        help="also store the CPU inference recipe: time every Linear weight dense vs CSR (sparse) at batch N here, "
        "keep CSR where faster; load it with lightning_clipprune.export.load_inference(model, OUT, ...)",
    )
    parser.add_argument(
        "--unsafe-load",
        action="store_true",
        help="DANGEROUS: unpickle the checkpoint fully (runs any code it holds); only for files you trust that "
        "hold objects the safe loader refuses",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Write the weights of a checkpoint in the sparse format and print the sizes before and after.

    Args:
        argv: the arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        The exit status: 0 on success, 1 when the checkpoint cannot or must not be read, or the output cannot
        be written (one ``error:`` line on stderr).

    Example::

        python -m lightning_clipprune.export outputs/2026-01-01/12-00-00/checkpoints/final.ckpt model.lcps
    """
    args = _parser().parse_args(argv)  # --help and a usage error answer here, before torch loads
    if args.inference_batch_size is not None and args.inference_batch_size < 1:
        sys.stderr.write(f"error: --inference-batch-size must be a positive integer, got {args.inference_batch_size}\n")
        return 1
    if not os.path.lexists(args.checkpoint):  # the reader's own words for it, without importing torch first
        sys.stderr.write(f"error: cannot read checkpoint {args.checkpoint}: no such file\n")
        return 1
    if os.path.isfile(os.path.join(args.checkpoint, ".metadata")):  # torch.distributed.checkpoint's index
        sys.stderr.write(
            f"error: cannot read checkpoint {args.checkpoint}: a distributed checkpoint folder (one shard per rank,"
            " as ModelParallelStrategy saves); consolidate it into one file first with `python -m"
            f" lightning.fabric.utilities.consolidate_checkpoint {args.checkpoint}` and export"
            f" {args.checkpoint}.consolidated\n"
        )
        return 1
    refused = _refused_destination(args.checkpoint, args.out)
    if refused is not None:
        sys.stderr.write(f"error: cannot write {args.out}: {refused}\n")
        return 1

    import torch

    from lightning_clipprune.checkpoint import CheckpointError
    from lightning_clipprune.export.format import save_sparse
    from lightning_clipprune.sparsity import format_bytes

    try:
        state = _read_state_dict(args.checkpoint, args.unsafe_load)
        ckpt_size = os.path.getsize(args.checkpoint)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        dense = buffer.getbuffer().nbytes
        del buffer
    except CheckpointError as err:
        sys.stderr.write(f"error: cannot read {_one_line(err)}\n")
        return 1
    except Exception as err:  # a CLI reports any failure to read as one line, not a traceback
        sys.stderr.write(f"error: cannot read checkpoint {args.checkpoint}: {_one_line(err)}\n")
        return 1
    metadata: dict[str, object] = {"source": os.path.basename(args.checkpoint)}
    if args.inference_batch_size is not None:
        metadata["inference_recipe"] = _inference_recipe(state, args.inference_batch_size)
    try:
        compact = save_sparse(
            state, args.out, keep_zero_signs=not args.drop_zero_signs, metadata=metadata,
        )
    except Exception as err:  # disk full, a refused destination, an unsupported dtype: one line each
        sys.stderr.write(f"error: cannot write {args.out}: {_one_line(err)}\n")
        return 1
    sys.stdout.write(
        f"checkpoint   {args.checkpoint}: {format_bytes(ckpt_size)} ({ckpt_size:,} bytes), {len(state)} tensors\n"
        f"dense        torch.save(state_dict): {format_bytes(dense)} ({dense:,} bytes)\n"
        f"compact      {args.out}: {format_bytes(compact)} ({compact:,} bytes)\n"
        f"ratio        {compact / dense:.3f}x of the dense state dict\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
