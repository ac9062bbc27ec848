"""Torch-free checks of the values the app hands to components whose checks are not ours.

Lightning's ``Trainer`` and ``ModelCheckpoint``, torch's optimizer, the app's networks and the checkpoint to
resume from check their arguments only once they are built, after torch and Lightning load (7-10 s on a
small machine), some in words that name neither the key nor the value (a string learning rate: ``'<' not
supported between instances of 'str' and 'float'``), and some not at all (``trainer.deterministic=maybe`` and
``model.optimizer.nesterov=maybe`` trained as if ``true``). :func:`check_components` refuses such values in
about a second, one line naming the config key, the value and what it accepts. The components still check
everything else themselves when they are built.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import math
import os
from typing import TYPE_CHECKING, Any

from lightning_clipprune._validation import _is_int, _is_real

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = ["check_components", "shown", "trainer_arguments"]

#: ``Trainer(accelerator=...)`` names (Lightning's registry, its aliases, and Habana's external one).
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps", "tpu", "hpu")

#: Optimizer arguments that are numbers >= 0 in torch's optimizers (torch refuses a negative one, and a string
#: fails inside its comparison).
_NON_NEGATIVE = ("lr", "momentum", "weight_decay", "eps", "dampening", "alpha", "lr_decay",
                 "initial_accumulator_value", "momentum_decay")
#: Optimizer flags: torch takes any value for them as a truth value (``nesterov="maybe"`` is on).
_FLAGS = ("nesterov", "amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused", "centered",
          "decoupled_weight_decay")

#: Where Lightning's ``ModelCheckpoint`` is imported from in a ``_target_``.
_CHECKPOINT_TARGETS = (
    "lightning.pytorch.callbacks.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.ModelCheckpoint",
)

#: The smallest ``image_size`` each of the app's CNNs can take (LeNet5: two 5x5 convs and two 2x2 pools).
_MIN_IMAGE = {"LeNet5": 12, "SeedCNN": 6}


def shown(value: Any) -> str:
    """A value as the user typed it on the command line (YAML's true/false/null), else as Python prints it."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value)


def _is_count(value: Any, low: int) -> bool:
    return _is_int(value) and value >= low


def _is_number(value: Any) -> bool:
    return _is_real(value) and math.isfinite(value)


def check_components(cfg: DictConfig) -> None:
    """Refuse a bad value for the Trainer, the optimizer, one of the app's networks, a ``ModelCheckpoint`` or
    ``ckpt_path``, before anything is built.

    Raises:
        ValueError: one line, ``"<key>=<value>: must be ..."`` (``check_config`` turns it into a ``ConfigError``).

    Example::

        >>> from omegaconf import OmegaConf
        >>> check_components(OmegaConf.create({"trainer": {"deterministic": "maybe"}}))
        Traceback (most recent call last):
        ...
        ValueError: trainer.deterministic='maybe': must be true, false, warn or null ...
    """
    _check_trainer(cfg.get("trainer") or {})
    name = cfg.get("name")
    if "name" in cfg and not isinstance(name, (str, int, float)):
        typed = "[" + ",".join(map(str, name)) + "]" if hasattr(name, "__len__") else shown(name)
        raise ValueError(f"name={typed}: must be one word or text (the run's name in its summary), not a list")
    model = cfg.get("model")
    if model is not None and hasattr(model, "get"):
        _check_optimizer(model.get("optimizer"))
        _check_network(model.get("net"))
    callbacks = cfg.get("callbacks")
    for name, node in (callbacks.items() if hasattr(callbacks, "items") else ()):
        if node is not None and hasattr(node, "get") and node.get("_target_") in _CHECKPOINT_TARGETS:
            _check_checkpoint(f"callbacks.{name}", node)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and not os.path.isfile(os.path.expanduser(str(ckpt_path))):
        raise ValueError(f"ckpt_path={str(ckpt_path)!r}: no such checkpoint file")


@functools.lru_cache(maxsize=1)
def trainer_arguments() -> frozenset[str] | None:
    """The argument names of the installed Lightning's ``Trainer.__init__``, read from its source without importing
    it (about 20 ms, where ``import lightning`` takes seconds); None when the source cannot be read or parsed.

    Example::

        >>> {"max_epochs", "devices"} <= trainer_arguments()
        True
    """
    spec = importlib.util.find_spec("lightning")  # a top-level package: found, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), "pytorch", "trainer", "trainer.py")
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Trainer":
            for fn in node.body:
                if isinstance(fn, ast.FunctionDef) and fn.name == "__init__" and fn.args.kwarg is None:
                    return frozenset(a.arg for a in [*fn.args.args, *fn.args.kwonlyargs][1:])
    return None


def _check_trainer(trainer: Any) -> None:
    """The Trainer's argument names, device choice and determinism flag (the counts are ``checks._check_trainer``'s)."""
    known = trainer_arguments() if trainer.get("_target_") == "lightning.pytorch.Trainer" else None
    for key in trainer.keys() if known else ():
        if not str(key).startswith("_") and key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"did you mean trainer.{close[0]}?" if close else "see `lightning.pytorch.Trainer`'s arguments"
            raise ValueError(f"trainer.{key}={shown(trainer.get(key))}: not an argument of Lightning's Trainer; {hint}")
    if "deterministic" in trainer and trainer.get("deterministic") not in (True, False, None, "warn"):
        raise ValueError(f"trainer.deterministic={shown(trainer.get('deterministic'))}: must be true, false, warn or null "
                         "(warn: deterministic algorithms where torch has them, a warning elsewhere)")
    accelerator = trainer.get("accelerator")
    if isinstance(accelerator, str) and accelerator not in ACCELERATORS:
        raise ValueError(f"trainer.accelerator={accelerator!r}: must be one of {', '.join(ACCELERATORS)} (Lightning's accelerators)")
    if "devices" in trainer and not _devices_ok(trainer.get("devices")):
        raise ValueError(f"trainer.devices={shown(trainer.get('devices'))}: must be auto, -1 (every device), a number of "
                         "devices >= 1, or a list of device indices such as [0,1]")


def _devices_ok(devices: Any) -> bool:
    if isinstance(devices, str):
        text = devices.strip()
        return text == "auto" or text == "-1" or (bool(text) and all(p.strip().isdigit() for p in text.split(",")))
    if isinstance(devices, int) and not isinstance(devices, bool):
        return devices == -1 or devices >= 1
    if hasattr(devices, "__len__") and not isinstance(devices, dict | bytes):
        return len(devices) > 0 and all(_is_count(d, 0) for d in devices)
    return False


def _check_optimizer(node: Any) -> None:
    """Numbers and flags of ``model.optimizer`` (torch still checks the rest when it is built)."""
    if node is None or not hasattr(node, "get") or node.get("_target_") is None:
        return
    for key in _NON_NEGATIVE:
        if key in node and node.get(key) is not None and not (_is_number(node.get(key)) and node.get(key) >= 0):
            raise ValueError(f"model.optimizer.{key}={shown(node.get(key))}: must be a finite number >= 0")
    for key in _FLAGS:
        if key in node and node.get(key) not in (True, False, None):
            raise ValueError(f"model.optimizer.{key}={shown(node.get(key))}: must be true or false")
    betas = node.get("betas")
    if "betas" in node and not (
        hasattr(betas, "__len__") and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)
    ):
        raise ValueError(f"model.optimizer.betas={shown(betas)}: must be two numbers in [0, 1), such as [0.9,0.999]")


def _check_network(node: Any) -> None:
    """The sizes of the app's own networks (``lightning_clipprune.app.models``): whole numbers >= 1."""
    target = str(node.get("_target_", "")) if node is not None and hasattr(node, "get") else ""
    if not target.startswith("lightning_clipprune.app.models."):
        return  # a network of the user's: its own checks
    kind = target.rsplit(".", 1)[1]
    for key in ("in_features", "num_classes", "in_channels", "image_size", "hidden", "channels"):
        if key not in node:
            continue
        value = node.get(key)
        widths = list(value) if hasattr(value, "__len__") and not isinstance(value, str) else [value]
        if not widths and key == "hidden" and kind == "MLP":
            continue  # an MLP without hidden layers: one linear layer
        if not widths or not all(_is_count(w, 1) for w in widths):
            raise ValueError(f"model.net.{key}={shown(value)}: must be a whole number >= 1" + (" or a list of them" if key in ("hidden", "channels") else ""))
    if kind == "LeNet5" and "channels" in node and len(node.get("channels")) != 2:
        raise ValueError(f"model.net.channels={shown(node.get('channels'))}: must be two numbers (the two convolutions' channels)")
    if kind in _MIN_IMAGE and _is_count(node.get("image_size"), 1) and node.get("image_size") < _MIN_IMAGE[kind]:
        raise ValueError(f"model.net.image_size={node.get('image_size')!r}: must be >= {_MIN_IMAGE[kind]} for {kind}")
    if "dropout" in node and not (_is_number(node.get("dropout")) and 0 <= node.get("dropout") < 1):
        raise ValueError(f"model.net.dropout={shown(node.get('dropout'))}: must be a number in [0, 1)")
    if kind == "CifarResNet":
        depth, shortcut = node.get("depth", 20), node.get("shortcut", "A")
        if not (_is_count(depth, 8) and (depth - 2) % 6 == 0):
            raise ValueError(f"model.net.depth={shown(depth)}: must be 6n+2 (20, 32, 44, 56, 110)")
        if shortcut not in ("A", "B"):
            raise ValueError(f"model.net.shortcut={shown(shortcut)}: must be A or B")


def _check_checkpoint(key: str, node: Any) -> None:
    """The scalar arguments of a ``ModelCheckpoint``: a string count failed inside Lightning (``'<' not
    supported between instances of 'str' and 'int'``), naming neither the key nor the value."""
    if "save_top_k" in node and not _is_count(node.get("save_top_k"), -1):
        raise ValueError(f"{key}.save_top_k={shown(node.get('save_top_k'))}: must be an integer >= -1 "
                         "(-1: keep every checkpoint, 0: none, k: the k best by `monitor`)")
    for count in ("every_n_epochs", "every_n_train_steps"):
        if node.get(count) is not None and not _is_count(node.get(count), 0):
            raise ValueError(f"{key}.{count}={shown(node.get(count))}: must be an integer >= 0 or null (0: never by this count)")
    if "mode" in node and node.get("mode") not in ("min", "max"):
        raise ValueError(f"{key}.mode={shown(node.get('mode'))}: must be min or max (whether a lower or a higher `monitor` is better)")
    for flag in ("verbose", "save_weights_only", "auto_insert_metric_name"):
        if flag in node and not isinstance(node.get(flag), bool):
            raise ValueError(f"{key}.{flag}={shown(node.get(flag))}: must be true or false")
    if "save_last" in node and not (node.get("save_last") in (None, "link") or isinstance(node.get("save_last"), bool)):
        raise ValueError(f"{key}.save_last={shown(node.get('save_last'))}: must be true, false, link or null")
    for text in ("monitor", "filename", "dirpath"):
        if node.get(text) is not None and not isinstance(node.get(text), str):
            raise ValueError(f"{key}.{text}={shown(node.get(text))}: must be a string or null")
