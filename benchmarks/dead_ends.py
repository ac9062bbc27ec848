"""At the end of a default run of LeNet-300-100 at 98 %: how much of the kept budget sits on dead ends?

A kept weight into a hidden unit that has no kept output, or out of one that has no kept input, cannot change
the network's output: a share of the budget that could be given to weights that can. This prints the hidden
units left and how many kept weights are on such dead ends (issue 28: is there budget to reclaim?).

    python benchmarks/dead_ends.py --seeds 0 1     # one 10-epoch run per seed (about a minute each, one thread)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_regrow as br


def dead_ends(weights: list[torch.Tensor]) -> dict[str, object]:
    """Hidden units with a path from the input and to the output, and the kept weights on such paths only.

    ``weights`` are the three ``(out, in)`` matrices of an MLP, input first.
    """
    kept = [w != 0 for w in weights]
    has_in, has_out = kept[0].any(1), kept[1].any(0)
    alive1 = has_in & has_out
    alive2 = kept[1][:, alive1].any(1) & kept[2].any(0)
    alive1 = alive1 & kept[1][alive2].any(0)
    useful = int(kept[0][alive1].sum()) + int(kept[1][alive2][:, alive1].sum()) + int(kept[2][:, alive2].sum())
    total = sum(int(k.sum()) for k in kept)
    return {
        "kept": [int(k.sum()) for k in kept],
        "units_alive": [int(alive1.sum()), int(alive2.sum())],
        "units": [int(alive1.numel()), int(alive2.numel())],
        "on_dead_ends": total - useful,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sparsity", type=float, default=0.98)
    args = parser.parse_args()
    run_args = argparse.Namespace(experiment="fashion_mnist", epochs=None, override=[], threads=1,
                                  limit_train_batches=None)
    torch.set_num_threads(1)
    for seed in args.seeds:
        result = br.run("ours", seed, args.sparsity, run_args, "default")
        weights = [p.detach() for _, p in sorted(br._made[0]._params.items())]
        found = dead_ends(weights)
        print(f"seed {seed}: test acc {100 * result['test_acc']:.2f}, kept per layer {found['kept']}, hidden units "
              f"alive {found['units_alive']} of {found['units']}, kept weights on dead ends {found['on_dead_ends']}")


if __name__ == "__main__":
    main()
