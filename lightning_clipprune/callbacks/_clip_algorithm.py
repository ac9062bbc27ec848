"""How ``GradientClipCallback(clip_val, algorithm, algorithm_options, **old keywords)`` becomes one clipper.

The algorithms themselves, their options, defaults and checks live in :mod:`lightning_clipprune.clipping`;
this module only resolves the callback's arguments onto a clipper class, names the argument the user
typed in an error, and maps the keywords of the previous release (``zclip_alpha=...``) onto the options
they became, with a ``FutureWarning``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from lightning_clipprune._validation import bad_value
from lightning_clipprune.clipping import CLIPPERS, Clipper, clipper_name, option_defaults, option_names

__all__ = ["DEFAULT_CLIP_VAL", "OWNER", "UNSET", "Unset", "resolve_clipper"]

OWNER = "GradientClipCallback"


class Unset:
    """The sentinel of ``clip_val`` left out: the algorithm class's own default bound."""

    def __repr__(self) -> str:
        return "<the algorithm's default>"


UNSET: Any = Unset()

#: The callback keywords of the previous release -> (algorithm name, option of its class). One release only.
DEPRECATED_KEYWORDS: dict[str, tuple[str, str]] = {
    "agc_eps": ("agc", "eps"),
    "autoclip_percentile": ("autoclip", "percentile"),
    "history_size": ("autoclip", "history_size"),
    "autoclip_per_parameter": ("autoclip", "per_parameter"),
    "zclip_alpha": ("zclip", "alpha"),
    "zclip_z_thresh": ("zclip", "z_thresh"),
    "zclip_warmup_steps": ("zclip", "warmup_steps"),
    "zclip_mode": ("zclip", "mode"),
    "zclip_clip_option": ("zclip", "clip_option"),
    "zclip_clip_factor": ("zclip", "clip_factor"),
    "zclip_skip_update_on_spike": ("zclip", "skip_update_on_spike"),
    "zclip_eps": ("zclip", "eps"),
}
_PREFIX = re.compile(r"^`(\w+)\((\w+)=\.\.\.\)`")


class _DefaultClipVal(Mapping[str, Any]):
    """``clip_val`` when it is left out, per registered algorithm: its class's default bound (read-only)."""

    def __getitem__(self, name: str) -> Any:
        cls = CLIPPERS[name]
        option = getattr(cls, "clip_val_option", None)
        return None if option is None else option_defaults(cls).get(option)

    def __iter__(self) -> Iterator[str]:
        return iter(CLIPPERS)

    def __len__(self) -> int:
        return len(CLIPPERS)


#: ``clip_val`` left out, per algorithm name: the default of the option ``clip_val`` sets on its class.
DEFAULT_CLIP_VAL: Mapping[str, Any] = _DefaultClipVal()


def resolve_clipper(clip_val: Any, algorithm: Any, options: Any, deprecated: dict[str, Any]) -> Any:
    """The clipper the callback's arguments describe; every option checked once, by its class.

    Raises:
        ValueError: one line naming the argument the user typed, the allowed values and the value received.
        TypeError: an unknown keyword argument.
    """
    if isinstance(algorithm, str | type):
        cls = _clipper_class(algorithm)
        kwargs, typed = _options(cls, options, deprecated)
        return _construct(cls, clip_val, kwargs, typed)
    if isinstance(algorithm, Clipper):
        _check_keywords(deprecated)
        given = [("clip_val", clip_val, clip_val is not UNSET), ("algorithm_options", options, options is not None)]
        given += [(key, value, value is not None) for key, value in deprecated.items()]
        for name, value, is_given in given:
            if is_given:
                raise bad_value(
                    OWNER, name, f"left out when algorithm is a clipper object: set it on the object "
                    f"({type(algorithm).__name__}(...))", value,
                )
        return algorithm
    raise bad_value(OWNER, "algorithm", _allowed_algorithms(), algorithm)


def _allowed_algorithms() -> str:
    names = ", ".join(repr(n) for n in CLIPPERS)
    return f"one of {names} (lightning_clipprune.clipping.CLIPPERS) or a clipper object (clipping.Clipper)"


def _clipper_class(algorithm: str | type) -> type:
    if isinstance(algorithm, type):
        if not all(callable(getattr(algorithm, m, None)) for m in ("clip", "state_dict", "load_state_dict")):
            raise bad_value(OWNER, "algorithm", _allowed_algorithms(), algorithm)
        return algorithm
    cls = CLIPPERS.get(algorithm)
    if cls is None:
        raise bad_value(OWNER, "algorithm", _allowed_algorithms(), algorithm)
    return cls


def _check_keywords(deprecated: dict[str, Any]) -> None:
    unknown = [k for k in deprecated if k not in DEPRECATED_KEYWORDS]
    if unknown:
        raise TypeError(f"{OWNER}.__init__() got an unexpected keyword argument {unknown[0]!r}")


def _options(cls: type, options: Any, deprecated: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(keyword arguments of ``cls``, option -> the argument the user typed), old keywords mapped with a warning."""
    if options is not None and not (isinstance(options, Mapping) and all(isinstance(k, str) for k in options)):
        raise bad_value(OWNER, "algorithm_options", "a dict of option name -> value, or None", options)
    kwargs = dict(options or {})
    _check_keywords(deprecated)
    name = clipper_name(cls)
    typed: dict[str, str] = {}
    for key, value in deprecated.items():
        owner, option = DEPRECATED_KEYWORDS[key]
        if value is None:  # not given (the Hydra presets list the old names as null for one release)
            continue
        if owner != name:
            raise bad_value(OWNER, key, f"left out: it is an option of algorithm {owner!r}, algorithm is {name!r}", value)
        kwargs[option], typed[option] = value, key
    if typed:
        mapped = {o: kwargs[o] for o in typed}
        rank_zero_warn(
            f"`{OWNER}({', '.join(f'{typed[o]}=...' for o in mapped)})` is deprecated and will be removed in the "
            f"next release: pass `algorithm_options={mapped!r}` or `algorithm={cls.__name__}(...)` "
            f"(Hydra: `clip.algorithm_options.{next(iter(mapped))}=...`).",
            category=FutureWarning,
            stacklevel=7,  # the line that built the callback: past rank_zero_warn, _options, resolve_clipper, __init__
        )
    return kwargs, typed


def _construct(cls: type, clip_val: Any, kwargs: dict[str, Any], typed: dict[str, str]) -> Any:
    bound = getattr(cls, "clip_val_option", None)
    if clip_val is not UNSET:
        if bound is None:
            raise bad_value(OWNER, "clip_val", f"left out: {cls.__name__} has no bound that clip_val sets", clip_val)
        if bound in kwargs:
            raise bad_value(
                OWNER, "algorithm_options", f"without {bound!r} when clip_val is given (clip_val sets "
                f"{cls.__name__}'s {bound}): give one of the two", dict(kwargs),
            )
        kwargs[bound], typed[bound] = clip_val, "clip_val"
    allowed = option_names(cls)
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        raise bad_value(
            OWNER, "algorithm_options", f"a dict of options of {cls.__name__} ({', '.join(allowed)})",
            {k: kwargs[k] for k in unknown},
        )
    try:
        return cls(**kwargs)
    except ValueError as err:
        match = _PREFIX.match(str(err))
        if match is None or match.group(1) != cls.__name__ or match.group(2) not in typed:
            raise
        raise ValueError(f"`{OWNER}({typed[match.group(2)]}=...)`" + str(err)[match.end() :]) from None
