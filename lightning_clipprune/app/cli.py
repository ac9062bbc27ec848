"""The command line before the run: Hydra's own errors as one line, and overrides refused before Hydra acts.

Hydra reports a bad override (an unknown key, an unknown group option, a value its grammar does not
accept) in several lines, some of them a search path, before the app's code runs. The entry point lets
those errors reach it (:func:`hydra_errors_raised`) and prints :func:`hydra_error_line` instead: one line
naming the override as typed and the fix (for a group option: the valid choices).

:func:`check_overrides` refuses, before Hydra opens any file, what would write outside the run's folder
(``hydra.job.name`` names the run's log file, ``<output_dir>/<job name>.log``).
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from lightning_clipprune.app.checks import ConfigError

__all__ = ["check_overrides", "hydra_error_line", "hydra_errors_raised", "hydra_task_started", "is_reported",
           "mark_reported"]

_FULL_ERROR = "HYDRA_FULL_ERROR"
_GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic"
_saved: dict[str, str | None] = {}


def _overrides(argv: Sequence[str]) -> list[str]:
    """The overrides among the arguments (what is neither an option nor an option's value)."""
    takes_value = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                   "--config-dir", "-cd", "--info", "-i", "--shell-completion", "-sc"}
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in takes_value:
            skip = True
        elif not arg.startswith("-"):
            out.append(arg)
    return out


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def check_overrides(argv: Sequence[str]) -> None:
    """Refuse, before Hydra runs, an override that would write outside the run's folder.

    Raises:
        ConfigError: ``hydra.job.name`` with a path separator or ``..`` (it names ``<output_dir>/<name>.log``).

    Example::

        >>> check_overrides(["hydra.job.name=../../x"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_clipprune.app.checks.ConfigError: hydra.job.name='../../x': ...
    """
    for override in _overrides(argv):
        if _key(override) != "hydra.job.name" or "=" not in override:
            continue
        name = override.split("=", 1)[1].strip().strip("'\"")
        if not name or "/" in name or "\\" in name or ".." in name or "\x00" in name:
            raise ConfigError(
                f"hydra.job.name={name!r}: must be a plain name (no '/', '\\' or '..'): it names the run's log file "
                "<output_dir>/<name>.log, which must stay in the run's folder"
            )


@contextmanager
def hydra_errors_raised() -> Iterator[None]:
    """Let Hydra's errors before the run (and between sweep jobs) reach the caller instead of being printed.

    Hydra raises them when ``HYDRA_FULL_ERROR=1`` (it prints them in several lines otherwise): it is set for
    the duration, unless the user set it (then the user gets Hydra's full tracebacks, as asked), and put back
    to the user's value while a job runs (:func:`hydra_task_started`).
    """
    if os.environ.get(_FULL_ERROR) == "1":
        yield
        return
    _saved["value"] = os.environ.get(_FULL_ERROR)
    os.environ[_FULL_ERROR] = "1"
    try:
        yield
    finally:
        _restore()
        _saved.clear()


def _restore() -> None:
    if "value" not in _saved:
        return
    if _saved["value"] is None:
        os.environ.pop(_FULL_ERROR, None)
    else:
        os.environ[_FULL_ERROR] = _saved["value"]


_HELP_FLAGS = ("--help", "-h", "--hydra-help")


@contextmanager
def fast_help(argv: Sequence[str]) -> Iterator[None]:
    """With ``--help`` (or ``--hydra-help``) in ``argv``: list Hydra's config groups from one copy of its config
    repository instead of one copy per group.

    Hydra 1.3's help screen asks ``ConfigLoaderImpl.get_group_options`` for every group, and each call deep-copies
    the whole repository (the search path and every config registered in the ConfigStore): about 1 s of this
    app's 1.4-2.0 s ``--help`` (``benchmarks/startup.md``). Listing does not change the repository, so one copy
    per (config name, overrides) serves all; the screen is Hydra's, less the ``_base``-style building blocks of
    the presets (``clip: _base``), which are not choices. Anything else, or a Hydra without that method, runs
    untouched.
    """
    if not any(arg in _HELP_FLAGS for arg in argv):
        yield
        return
    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra.core.object_type import ObjectType
    except ImportError:
        yield
        return
    original = getattr(ConfigLoaderImpl, "get_group_options", None)
    if original is None or not hasattr(ConfigLoaderImpl, "_parse_overrides_and_create_caching_repo"):
        yield
        return
    repos: dict[tuple[object, ...], Any] = {}

    def get_group_options(
        self: Any, group_name: str, results_filter: Any = ObjectType.CONFIG, config_name: str | None = None,
        overrides: Sequence[str] | None = None,
    ) -> list[str]:
        key = (id(self), config_name, tuple(overrides or ()))
        if key not in repos:  # what the original does on every call: parse the overrides, copy the repository
            repos[key] = self._parse_overrides_and_create_caching_repo(config_name, list(overrides or ()))[1]
        # `_base`-style files are building blocks of the presets, not choices (as in the missing-option line)
        return [o for o in repos[key].get_group_options(group_name, results_filter) if not o.startswith("_")]

    ConfigLoaderImpl.get_group_options = get_group_options
    try:
        yield
    finally:
        ConfigLoaderImpl.get_group_options = original


@contextmanager
def hydra_task_started() -> Iterator[None]:
    """Inside the run: ``HYDRA_FULL_ERROR`` as the user set it (the app's ``_fail`` reads it).

    An unexpected error in the run leaves it so: Hydra then reports that error its own way (a traceback).
    A sweep job's error the app already reported in one line (:func:`mark_reported`) comes back to the
    entry point, which ends with exit status 1 without printing it again.
    """
    _restore()
    try:
        yield
    except BaseException as err:
        if "value" in _saved and is_reported(err):
            os.environ[_FULL_ERROR] = "1"
        raise
    if "value" in _saved:  # the run ended normally: errors composing the next sweep job come back to us
        os.environ[_FULL_ERROR] = "1"


def mark_reported(err: BaseException) -> BaseException:
    """Mark ``err`` as reported to the user already (its one line is on stderr); returns ``err``."""
    err.__dict__["_clipprune_reported"] = True
    return err


def is_reported(err: BaseException) -> bool:
    """Whether :func:`mark_reported` marked ``err``."""
    return bool(getattr(err, "_clipprune_reported", False))


def _bad_grammar(override: str) -> str | None:
    """Why Hydra's parser refuses ``override``, or None when it parses."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        OverridesParser.create().parse_override(override)
    except HydraException as err:  # OverrideParseException, or the lexer's own HydraException
        return str(err).splitlines()[0]
    return None


def _grammar_line(overrides: Sequence[str], err: BaseException) -> str:
    for override in overrides:
        reason = _bad_grammar(override)
        if reason is None:
            continue
        if any(ord(c) > 127 for c in override):
            ascii_form = unicodedata.normalize("NFKC", override)
            if ascii_form != override and ascii_form.isascii() and _bad_grammar(ascii_form) is None:
                return f"{override}: has non-ASCII characters (full-width digits or signs?); type {ascii_form}"
            return f"{override}: has non-ASCII characters Hydra's grammar refuses; quote a text value: {_key(override)}='...'"
        return f"{override}: not a valid override ({reason}); see {_GRAMMAR}"
    return f"{_first_lines(err)}; see {_GRAMMAR}"


def _first_lines(err: BaseException) -> str:
    """The message's lines before Hydra's search-path listing and links, on one line."""
    kept = []
    for line in str(err).splitlines():
        if line.startswith(("Config search path", "See https://")):
            break
        if line.strip():
            kept.append(line.strip())
    return " ".join(kept) or type(err).__name__


def _missing_option_line(err: BaseException, overrides: Sequence[str]) -> str | None:
    missing = getattr(err, "missing_cfg_file", None) or ""
    options = getattr(err, "options", None)
    if "/" not in missing or not options:
        return None
    group, value = missing.rsplit("/", 1)
    same_key = [o for o in overrides if _key(o) == group.replace("/", ".")]
    typed = next((o for o in same_key if o.split("=", 1)[-1] == value), same_key[0] if same_key else f"{group}={value}")
    shown = [o for o in options if not o.startswith("_")]  # `_base`-style files are building blocks, not presets
    return f"{typed}: no such option in the '{group}' group; choose one of: {', '.join(shown)}"


def hydra_error_line(err: BaseException, argv: Sequence[str]) -> str:
    """One line for an error Hydra raised before the run: the override as typed, what is wrong, the fix.

    Example::

        >>> from hydra.errors import MissingConfigException
        >>> err = MissingConfigException("...", "logger/foo", ["csv", "tensorboard"])
        >>> hydra_error_line(err, ["logger=foo"])
        "logger=foo: no such option in the 'logger' group; choose one of: csv, tensorboard"
    """
    from hydra.errors import MissingConfigException, OverrideParseException

    overrides = _overrides(argv)
    if isinstance(err, OverrideParseException):
        return _grammar_line(overrides, err)
    if isinstance(err, MissingConfigException):
        line = _missing_option_line(err, overrides)
        if line:
            return line
    text = str(err)
    match = re.match(r"Could not override '([^']+)'", text)
    if match:
        typed = next((o for o in overrides if _key(o) == match.group(1)), match.group(1))
        return (f"{typed}: no such key in the config (`--cfg job` prints every key); to add a new key, "
                f"write +{typed.lstrip('+')}")
    match = re.match(r"Ambiguous value for argument '([^']+)'", text)
    if match:
        typed = match.group(1)
        value = typed.split("=", 1)[1]
        number = re.fullmatch(r"-?\d+,\d+", value)
        return (f"{typed}: a comma separates sweep values (add -m to run one job per value); "
                + (f"for a decimal number write a point: {_key(typed)}={value.replace(',', '.')}" if number else
                   f"for a list write {_key(typed)}=[{value}], for text with a comma quote it: {_key(typed)}='{value}'"))
    return _first_lines(err)
