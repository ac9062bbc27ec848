"""lightning-clipprune: gradient clipping and magnitude pruning callbacks for PyTorch Lightning.

Example::

    import lightning as L
    from lightning_clipprune import GradientClipCallback, MagnitudePruneCallback, SparsityLogger

    trainer = L.Trainer(callbacks=[
        GradientClipCallback(clip_val=1.0, algorithm="norm"),
        MagnitudePruneCallback(sparsity=0.9, schedule="cubic"),
        SparsityLogger(),
    ])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public names are imported lazily: `import lightning_clipprune.clipping` (pure torch) does not pay
# for importing Lightning, and each callback module only loads when it is used.
_LAZY = {
    "GradientClipCallback": "lightning_clipprune.callbacks.gradient_clip",
    "MagnitudePruneCallback": "lightning_clipprune.callbacks.magnitude_prune",
    "SparsityLogger": "lightning_clipprune.callbacks.sparsity_logger",
    "RegrowConfig": "lightning_clipprune.callbacks._regrow",
    "reconstruct_prune": "lightning_clipprune.posttrain.reconstruct",
    "to_inference": "lightning_clipprune.export.inference",
}

__all__ = [
    "GradientClipCallback",
    "MagnitudePruneCallback",
    "RegrowConfig",
    "SparsityLogger",
    "__version__",
    "reconstruct_prune",
    "to_inference",
]

if TYPE_CHECKING:
    from lightning_clipprune.callbacks._regrow import RegrowConfig
    from lightning_clipprune.callbacks.gradient_clip import GradientClipCallback
    from lightning_clipprune.callbacks.magnitude_prune import MagnitudePruneCallback
    from lightning_clipprune.callbacks.sparsity_logger import SparsityLogger
    from lightning_clipprune.export.inference import to_inference
    from lightning_clipprune.posttrain.reconstruct import reconstruct_prune


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_clipprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
