"""App-level checks of the composed config, before anything is built or trained.

Everything here runs before torch and Lightning are imported (about a second, where the heavy imports take
several), except the optimizer's check, which comes last: what only the app knows about (the Trainer's
length, logging and precision, the batch sizes, the seed, thread counts, NaN anywhere, settings that
contradict each other) and the scalar arguments of the prune and clip groups, the Classifier, the app's
data modules and the ``SparsityLogger`` under ``callbacks``, in the words those components use when they are
built (they still check them then); :mod:`~lightning_clipprune.app.component_checks` checks the values handed
to Lightning, torch and the app's networks. Once the model is built, :func:`check_against_model`
checks that the data set's classes and the parameter-name patterns fit the model. Every failure is one
:class:`ConfigError` line naming the config key, the value and the fix.
"""

from __future__ import annotations

import math
import os
import re
from typing import TYPE_CHECKING, Any

from lightning_clipprune._choices import (
    CLIP_ALGORITHMS,
    CLIP_BOUNDS,
    CRITERIA,
    DEFAULT_RANKING,
    RANKINGS,
    SCOPES,
    UNCAPPED_CLIP_ALGORITHMS,
    check_regrow_fields,
    check_sparsity_logger_fields,
    check_threshold_ceiling,
    parse_pattern,
    resolve_max_layer_sparsity,
    uses_budgets,
)
from lightning_clipprune._validation import _is_int, _is_real
from lightning_clipprune.app.component_checks import check_components
from lightning_clipprune.app.component_checks import shown as _shown

if TYPE_CHECKING:  # omegaconf only when a config is checked: the data modules import this file without Hydra
    from omegaconf import DictConfig

__all__ = ["ConfigError", "DataNotFoundError", "check_against_model", "check_buildable", "check_config", "check_group_values",
           "one_line", "root_cause"]


class ConfigError(ValueError):
    """A bad value in the composed config, raised before training starts; the message is one line."""


class DataNotFoundError(FileNotFoundError):
    """The data set is not on disk where we looked, and could not be downloaded (or ``data.root`` is no folder).

    Defined here, without torch, so the app can raise it before the heavy imports and name it without them.
    """


def root_cause(err: BaseException) -> BaseException:
    """The error behind Hydra's ``InstantiationException`` wrappers (the one that names the bad value)."""
    from hydra.errors import InstantiationException

    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


def one_line(err: BaseException) -> str:
    """The error's message on one line (the exception's type name when it has no message)."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _int_or_none(
    cfg: DictConfig, key: str, value: Any, *, low: int, allow_none: bool, what: str, high: int | None = None
) -> None:
    ok = (value is None and allow_none) or (
        isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    )
    if not ok:
        raise ConfigError(f"{key}={_shown(value)}: must be {what}")


#: numpy's and torch's seeds are 32-bit: a larger one fails inside seed_everything
_MAX_SEED = 2**32 - 1


def _check_trainer(cfg: DictConfig, trainer: Any) -> None:
    """The Trainer's counts: Lightning divides by some of them and silently accepts others (bools, 0, -1)."""
    for key, what in (
        ("accumulate_grad_batches", "an integer >= 1 (an optimizer step every N batches)"),
        ("log_every_n_steps", "an integer >= 1 (log every N optimizer steps)"),
    ):
        if key in trainer:
            _int_or_none(cfg, f"trainer.{key}", trainer.get(key), low=1, allow_none=False, what=what)
    if "check_val_every_n_epoch" in trainer:
        _int_or_none(cfg, "trainer.check_val_every_n_epoch", trainer.get("check_val_every_n_epoch"), low=1,
                     allow_none=True, what="an integer >= 1 (validate every N epochs)")
    if "precision" in trainer and not _maybe_precision(trainer.get("precision")):
        allowed = ", ".join(str(p) for p in PRECISIONS if isinstance(p, str))
        raise ConfigError(f"trainer.precision={_shown(trainer.get('precision'))}: must be one of {allowed} (Lightning's precisions)")
    limit = trainer.get("limit_train_batches")
    fraction = isinstance(limit, float) and 0.0 < limit <= 1.0
    count = isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1
    if limit is not None and not (fraction or count):
        raise ConfigError(
            f"trainer.limit_train_batches={_shown(limit)}: must be a fraction in (0, 1], a number of batches >= 1, "
            "or null (every batch); 0 would train nothing"
        )


#: Flags of the app's data modules.
_DATA_FLAGS = ("on_device", "augment", "download", "drop_last")


def _check_data(cfg: DictConfig) -> None:
    """The batch sizes (``true`` trained at batch size 1, 1.5 failed late), and for the app's data modules the
    validation and test shares, the flags (``maybe`` was read as true), the seeds and the ``root`` folder."""
    data = cfg.get("data")
    if data is None or not hasattr(data, "get"):
        return
    for key, what in (("batch_size", "an integer >= 1 (samples per training batch)"),
                      ("eval_batch_size", "an integer >= 1, or null (4 x data.batch_size)")):
        value = data.get(key)
        if key in data and value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"data.{key}={_shown(value)}: must be {what}")
    if not str(data.get("_target_", "")).startswith("lightning_clipprune.app.data."):
        return  # a data module of the user's: its own checks
    fraction = data.get("val_fraction")
    if "val_fraction" in data and not (_is_real(fraction) and 0.0 < fraction < 1.0):
        raise ConfigError(f"data.val_fraction={_shown(fraction)}: must be a number in (0, 1) (the share held out for validation)")
    share = data.get("test_fraction")
    if "test_fraction" in data and not (_is_real(share) and 0.0 < share < 1.0):
        raise ConfigError(f"data.test_fraction={_shown(share)}: must be a number in (0, 1) (the share held out for testing)")
    for key in _DATA_FLAGS:  # `maybe` used to be read as true
        if key in data and data.get(key) not in (True, False):
            raise ConfigError(f"data.{key}={_shown(data.get(key))}: must be true or false")
    for key in ("seed", "split_seed", "crop_padding"):
        value = data.get(key)
        if key in data and not (value is None and key == "seed") and not (_is_int(value) and value >= 0):
            what = {"seed": " or null", "crop_padding": " (pixels)"}.get(key, "")
            raise ConfigError(f"data.{key}={_shown(value)}: must be a whole number >= 0{what}")
    root = data.get("root")
    if isinstance(root, str) and root and not os.path.isdir(os.path.expanduser(root)):
        raise DataNotFoundError(
            f"data.root={root!r} is not a folder: create it and put the data set's files there, "
            "or drop data.root to search $DATA_DIR and the default locations"
        )


#: What ``Trainer(precision=...)`` accepts (Lightning 2.6's ``_PRECISION_INPUT``), as the early error lists it.
PRECISIONS: tuple[Any, ...] = (
    "transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true", "bf16-mixed", "32-true",
    "64-true", 64, 32, 16, "64", "32", "16", "bf16",
)


def _maybe_precision(value: Any) -> bool:
    """Whether ``value`` is one of :data:`PRECISIONS` or a string a later Lightning could add (``bf16-...``)."""
    if isinstance(value, bool):
        return False
    return value in PRECISIONS or (isinstance(value, str) and re.match(r"(bf16|16|32|64|transformer-engine)(-|$)", value) is not None)


#: Learning-rate schedules that ``Classifier(lr_schedule=...)`` accepts (checked here before torch loads).
LR_SCHEDULES: tuple[str, ...] = ("cosine", "constant")
_CLASSIFIER_TARGET = "lightning_clipprune.app.models.Classifier"


def _check_model(cfg: DictConfig) -> None:
    """The Classifier's own checks of its scalar arguments (``model: ...`` as a failure at build time reads)."""
    from lightning_clipprune import _validation as v

    model = cfg.get("model")
    if model is None or not hasattr(model, "get") or model.get("_target_") != _CLASSIFIER_TARGET:
        return
    owner = "Classifier"
    try:
        if "lr_schedule" in model:
            v.check_choice(owner, "lr_schedule", model.get("lr_schedule"), LR_SCHEDULES)
        for key in ("warmup_fraction", "label_smoothing"):
            if key in model:
                v.check_real(owner, key, model.get(key), low=0.0, high=1.0, high_open=True)
        if "num_classes" in model:
            v.check_int(owner, "num_classes", model.get("num_classes"), low=2)
    except ValueError as err:
        raise ConfigError(f"model: {one_line(err)}") from None


def _check_not_nan(cfg: DictConfig) -> None:
    """NaN is never a meaningful setting (and passes every ``x < low`` check): refuse it anywhere."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(one_line(err)) from None

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")
        elif isinstance(node, float) and math.isnan(node):
            raise ConfigError(f"{path}=nan: not a number; give a finite value")

    walk(tree, "")


def check_config(cfg: DictConfig, optimizer: bool = True) -> None:
    """Check the app-level values of ``cfg``; the groups' own values are checked when they are built.

    ``optimizer=False`` leaves out the one check that imports torch (building the optimizer).

    Raises:
        ConfigError: naming the first bad key, its value and what is allowed.

    Example::

        >>> from omegaconf import OmegaConf
        >>> check_config(OmegaConf.create({"trainer": {"max_epochs": 0}}))
        Traceback (most recent call last):
        ...
        lightning_clipprune.app.checks.ConfigError: trainer.max_epochs=0: must be an integer >= 1 ...
    """
    trainer = cfg.get("trainer") or {}
    _int_or_none(cfg, "trainer.max_epochs", trainer.get("max_epochs"), low=1, allow_none=True,
                 what="an integer >= 1 (the app trains for a fixed number of epochs; -1, 'infinite', is not supported)")
    max_steps = trainer.get("max_steps", -1)
    if max_steps != -1:
        _int_or_none(cfg, "trainer.max_steps", max_steps, low=1, allow_none=True, what="-1 (no limit) or an integer >= 1")
    if trainer.get("max_epochs") is None and max_steps in (-1, None):
        raise ConfigError("trainer.max_epochs=null and trainer.max_steps=-1: the run would never end; set one of them")
    _check_trainer(cfg, trainer)
    _int_or_none(cfg, "seed", cfg.get("seed"), low=0, high=_MAX_SEED, allow_none=True,
                 what=f"an integer in [0, {_MAX_SEED}] (2**32 - 1) or null (unseeded)")
    _check_data(cfg)
    _check_model(cfg)
    _int_or_none(cfg, "cpu_threads", cfg.get("cpu_threads"), low=1, allow_none=True,
                 what="an integer >= 1 or null (torch's default: one thread per core)")
    for key in ("test", "verbose"):
        if key in cfg and not isinstance(cfg.get(key), bool):
            raise ConfigError(f"{key}={cfg.get(key)!r}: must be true or false")
    if trainer.get("gradient_clip_val") and cfg.get("clip") is not None:
        raise ConfigError(
            f"trainer.gradient_clip_val={trainer.get('gradient_clip_val')!r} and the clip group both clip gradients: "
            "drop one (`trainer.gradient_clip_val=null`, or `~clip` to use Lightning's clipping)"
        )
    prune = cfg.get("prune")
    if prune is not None and prune.get("sparsity") is not None and prune.get("threshold") is not None:
        raise ConfigError(
            f"prune.sparsity={prune.sparsity!r} and prune.threshold={prune.threshold!r} are both set: for the threshold "
            f"rule use `prune=threshold prune.threshold={prune.threshold}` (or add `prune.sparsity=null`); "
            "for a sparsity target, leave prune.threshold out"
        )
    _check_not_nan(cfg)
    for key in _BUILT:
        if cfg.get(key) is None and key not in _OPTIONAL:  # (a run has no use for `~data`, `~model`, `~trainer`)
            raise ConfigError(f"{key} is missing (~{key} removes it): a run needs one; choose one of the {key} "
                              f"group's options ({key}=NAME; --help lists them)")
        check_buildable(key, cfg.get(key))
    callbacks = cfg.get("callbacks")
    for key, node in (callbacks.items() if hasattr(callbacks, "items") else ()):
        check_buildable(f"callbacks.{key}", node)
    try:
        check_components(cfg)  # Lightning's, torch's and the networks' values, in the app's words
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_group_values(cfg)
    if optimizer:
        _check_optimizer(cfg)  # the only check that imports torch: last, so every other bad value answers in a second


#: The config groups the app builds with ``hydra.utils.instantiate`` (and each entry of ``callbacks``).
_BUILT = ("data", "model", "clip", "prune", "trainer", "logger")
#: The groups a run can do without (``~clip``, ``~prune``, ``~logger``).
_OPTIONAL = ("clip", "prune", "logger")


def check_buildable(key: str, node: Any) -> None:
    """Refuse a node the app builds (``key``: ``prune``, ``callbacks.extra``, ...) that has no ``_target_``.

    Hydra's ``instantiate`` returns such a node as a plain dict, which Lightning then fails on in a traceback
    (``'dict' object has no attribute 'on_exception'``); it comes from a key added to a group that is not
    there (``+callbacks.extra.patience=3``, or ``+prune.sparsity=0.5`` beside ``~prune``). None (a group turned
    off) passes, and so does ``logger: false`` (Lightning's "no logger").

    Raises:
        ConfigError: one line naming the key, what it holds and the fix.

    Example::

        >>> from omegaconf import OmegaConf
        >>> check_buildable("callbacks.extra", OmegaConf.create({"patience": 3}))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_clipprune.app.checks.ConfigError: callbacks.extra has no _target_ (it holds patience=3), so ...
    """
    if node is None or (key == "logger" and isinstance(node, bool)):
        return
    if hasattr(node, "keys") and hasattr(node, "get"):
        if node.get("_target_"):
            return
        held = ", ".join(f"{k}={_shown(node.get(k))}" if not hasattr(node.get(k), "keys") else f"{k}.*" for k in node)
        what = f"{key} has no _target_ (it holds {held or 'nothing'}), so there is nothing to build"
    else:
        what = f"{key}={_shown(node)}: not a config node with a _target_, so there is nothing to build"
    if key.startswith("callbacks."):
        fix = (f"set +{key}._target_=<the callback's class>" if hasattr(node, "keys") else
               f"make it a node with a _target_ ('+{key}={{_target_: <the callback's class>}}')")
        fix += f", or remove it with ~{key}"
    else:
        fix = f"choose one of the {key} group's options ({key}=NAME; --help lists them)"
        fix += f", or turn {key} off with ~{key} and no {key}.* key" if key in _OPTIONAL else ""
    raise ConfigError(f"{what}: {fix}")


_PRUNE_TARGET = "lightning_clipprune.MagnitudePruneCallback"
#: Criterion names the app can name: the built-in ones and the post-training "obs" (registered by posttrain).
_CRITERION_NAMES = (*CRITERIA, "obs")
_CLIP_TARGET = "lightning_clipprune.GradientClipCallback"
_LOGGER_TARGET = "lightning_clipprune.SparsityLogger"


def _group_arguments(node: Any, target: str) -> dict[str, Any] | None:
    """The arguments of a node that builds ``target`` (None for anything else)."""
    if node is None or not hasattr(node, "get") or node.get("_target_") != target:
        return None
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(node, resolve=True)
    return {k: v for k, v in values.items() if not k.startswith("_")}


def check_group_values(cfg: DictConfig) -> None:
    """The scalar arguments of the ``prune`` and ``clip`` groups and of a ``SparsityLogger`` under ``callbacks``,
    checked before torch and Lightning load.

    The same checks (:mod:`lightning_clipprune._validation`, same ranges, same words) as the callbacks'
    ``__init__``, which still run at build time for everything else (choices that live beside torch
    code, such as ``pattern``, ``ranking`` or the clip algorithm's own bound): a bad number on the command
    line is one line in about a second instead of after importing Lightning (``benchmarks/startup.md``).

    Raises:
        ConfigError: ``"<group>: <the callback's message>"``, as a failure at build time reads.

    Example::

        >>> from omegaconf import OmegaConf
        >>> check_group_values(OmegaConf.create({"prune": {"_target_": _PRUNE_TARGET, "sparsity": 1.5}}))
        Traceback (most recent call last):
        ...
        lightning_clipprune.app.checks.ConfigError: prune: `MagnitudePruneCallback(sparsity=...)` must be ...
    """
    from lightning_clipprune import _validation as v
    from lightning_clipprune.schedules import SCHEDULES

    prune = _group_arguments(cfg.get("prune"), _PRUNE_TARGET)
    clip = _group_arguments(cfg.get("clip"), _CLIP_TARGET)
    try:
        if prune is not None:
            _check_prune_values(v, prune, SCHEDULES)
    except ValueError as err:
        raise ConfigError(f"prune: {one_line(err)}") from None
    try:
        if clip is not None:
            _check_clip_values(v, clip)
    except ValueError as err:
        raise ConfigError(f"clip: {one_line(err)}") from None
    callbacks = cfg.get("callbacks")
    for key, node in (callbacks.items() if hasattr(callbacks, "items") else ()):
        args = _group_arguments(node, _LOGGER_TARGET)
        try:
            if args is not None:
                check_sparsity_logger_fields(args)
        except ValueError as err:
            raise ConfigError(f"callbacks.{key}: {one_line(err)}") from None


def _check_clip_values(v: Any, args: dict[str, Any]) -> None:
    """``GradientClipCallback.__init__``'s checks of its scalar arguments and of a built-in algorithm's bound."""
    owner = "GradientClipCallback"
    if "norm_type" in args:
        v.check_real(owner, "norm_type", args["norm_type"], low=0, low_open=True, allow_inf=True)
    if "nonfinite" in args:
        v.check_choice(owner, "nonfinite", args["nonfinite"], ("skip", "error"))
    if "log_every_n_steps" in args:
        v.check_int(owner, "log_every_n_steps", args["log_every_n_steps"], low=1, allow_none=True)
    algorithm = args.get("algorithm", "norm")
    if not isinstance(algorithm, str):  # a clipper built by Hydra (`_target_`): checked when it is built
        return
    if algorithm not in CLIP_ALGORITHMS:
        allowed = f"one of {', '.join(map(repr, CLIP_ALGORITHMS))} (lightning_clipprune.clipping.CLIPPERS) or a clipper object (clipping.Clipper)"
        raise v.bad_value(owner, "algorithm", allowed, algorithm)
    options = args.get("algorithm_options") or {}
    if "clip_val" in args and not (isinstance(options, dict) and CLIP_BOUNDS[algorithm] in options):
        uncapped = algorithm in UNCAPPED_CLIP_ALGORITHMS
        v.check_real(owner, "clip_val", args["clip_val"], low=0, low_open=True, allow_none=uncapped)


def _check_prune_values(v: Any, args: dict[str, Any], schedules: tuple[str, ...]) -> None:
    """``MagnitudePruneCallback.__init__``'s checks of single scalar arguments (``v``: the validation module)."""
    owner = "MagnitudePruneCallback"
    get = args.get
    v.check_real(owner, "sparsity", get("sparsity"), low=0, high=1, high_open=True, allow_none=True)
    v.check_real(owner, "threshold", get("threshold"), low=0, allow_none=True)
    if "schedule" in args:
        v.check_choice(owner, "schedule", args["schedule"], schedules)
    for key in ("start", "end"):
        if get(key) is not None:
            v.check_position(owner, key, args[key])
    if "unit" in args:
        v.check_choice(owner, "unit", args["unit"], ("step", "epoch"))
    v.check_int(owner, "frequency", get("frequency"), low=1, allow_none=True)
    if "power" in args:
        v.check_real(owner, "power", args["power"], low=0, low_open=True)
    if "initial_sparsity" in args and get("sparsity") is not None:  # (N:M derives `sparsity` at build time)
        v.check_real(owner, "initial_sparsity", args["initial_sparsity"], low=0, high=get("sparsity") or 0.0)
    if "taylor_beta" in args:
        v.check_real(owner, "taylor_beta", args["taylor_beta"], low=0, high=1, high_open=True)
    v.check_real(owner, "lr_rewind", get("lr_rewind"), low=0, low_open=True, allow_none=True)
    for key in ("prune_bias", "keep_first_and_last", "prune_frozen", "verbose", "include_tied"):
        if key in args:
            v.check_bool(owner, key, args[key])
    for key, names in (("scope", SCOPES), ("ranking", RANKINGS)):
        if key in args:
            v.check_choice(owner, key, args[key], names)
    criterion = get("criterion")
    if isinstance(criterion, str) and criterion not in _CRITERION_NAMES:  # (a Criterion built by Hydra is checked at build)
        raise v.bad_value(owner, "criterion", f"one of {', '.join(map(repr, _CRITERION_NAMES))} or a Criterion", criterion)
    _check_prune_combination(v, owner, args)
    if isinstance(get("regrow"), dict):
        check_regrow_fields(get("regrow"))  # RegrowConfig's own checks (unknown keys: the callback's message)


def _check_prune_combination(v: Any, owner: str, args: dict[str, Any]) -> None:
    """The checks of ``MagnitudePruneCallback`` that involve two arguments, in its order: the ceiling (resolved by
    the callback's own function), pattern and sparsity, start and end."""
    get = args.get
    kind, n, m = parse_pattern(get("pattern", "unstructured"), owner=owner)
    sparsity, threshold = get("sparsity"), get("threshold")
    budgets = uses_budgets(get("ranking", DEFAULT_RANKING), get("scope", "global"), kind, threshold)
    ceiling = resolve_max_layer_sparsity(get("max_layer_sparsity", "auto"), budgets, owner=owner)  # (its own check)
    if threshold is not None and kind != "unstructured":
        raise ValueError(f"`{owner}(threshold=...)` works with pattern 'unstructured' only, got pattern={get('pattern')!r}.")
    check_threshold_ceiling(owner, threshold, get("max_layer_sparsity", "auto"))
    if kind == "nm" and sparsity is not None and not math.isclose(sparsity, 1.0 - n / m, abs_tol=1e-9):
        raise ValueError(
            f"`{owner}(pattern={get('pattern')!r})` keeps {n} of every {m} weights, so `sparsity` must be {1.0 - n / m:.6g}"
            f" (or left out), got sparsity={sparsity!r}."
        )
    if "sparsity" in args and "threshold" in args and sparsity is None and threshold is None and kind != "nm":
        raise ValueError(f"`{owner}` needs exactly one of `sparsity` and `threshold`, got sparsity=None, threshold=None.")
    if ceiling is not None and get("scope", "global") == "global" and (sparsity or 0.0) > ceiling:
        raise v.bad_value(owner, "max_layer_sparsity", f">= sparsity={sparsity} or None", ceiling)
    start, end = get("start"), get("end")
    if get("schedule") != "oneshot" and start is not None and end is not None and type(start) is type(end) and start > end:
        raise ValueError(f"`{owner}`: `start` must be <= `end`, got start={start!r}, end={end!r}.")


def _check_optimizer(cfg: DictConfig) -> None:
    """Build the model's optimizer on a dummy parameter: torch checks lr, momentum, betas, ... there."""
    model = cfg.get("model")
    node = model.get("optimizer") if model is not None and hasattr(model, "get") else None
    if node is None or not hasattr(node, "get") or node.get("_target_") is None:
        return
    import hydra
    import torch
    from hydra.errors import InstantiationException

    for key, value in node.items():  # torch checks `lr < 0` and the like: inf passes
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"model.optimizer.{key}={value!r}: must be a finite number")
    try:
        factory = hydra.utils.instantiate(node, _convert_="all")
        factory([torch.nn.Parameter(torch.zeros(1))])
    except (InstantiationException, ValueError, TypeError) as err:
        raise ConfigError(f"model.optimizer: {one_line(root_cause(err))}") from None


def _patterns(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def check_against_model(cfg: DictConfig, model: Any, datamodule: Any) -> None:
    """What fits only once the model is built: the data set's classes, and the parameter-name patterns.

    A pattern in ``prune.include``/``prune.exclude``/``clip.exclude`` that matches no parameter of the
    model is a typo: the run would go on pruning (or clipping) what the user meant to keep out.

    Raises:
        ConfigError: naming the key, the value and the fix (for a pattern: a few of the model's names).
    """
    import fnmatch

    classes = getattr(datamodule, "num_classes", None)
    model_cfg = cfg.get("model")
    num_classes = model_cfg.get("num_classes") if model_cfg is not None and hasattr(model_cfg, "get") else None
    if isinstance(classes, int) and isinstance(num_classes, int) and num_classes < classes:
        raise ConfigError(
            f"model.num_classes={num_classes}: the data set ({type(datamodule).__name__}) has {classes} classes; "
            f"set model.num_classes={classes}"
        )
    names = [name for name, _ in model.named_parameters()]
    for group, key in (("prune", "include"), ("prune", "exclude"), ("clip", "exclude")):
        node = cfg.get(group)
        if node is None or not hasattr(node, "get"):
            continue
        for pattern in _patterns(node.get(key)):
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
                raise ConfigError(
                    f"{group}.{key}={pattern!r} matches no parameter of the model (a typo?); its parameters are "
                    f"named like {shown}"
                )
