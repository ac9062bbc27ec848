"""The command line before the run: Hydra's own errors as one line, and overrides refused before Hydra acts.

Hydra reports a bad override (an unknown key, an unknown group option, a value its grammar does not
accept) in several lines, some of them a search path, before the app's code runs. The entry point lets
those errors reach it (:func:`hydra_errors_raised`) and prints :func:`hydra_error_line` instead: one line
naming the override as typed and the fix (for a group option: the valid choices).

:func:`check_overrides` refuses, before Hydra opens any file, what would write outside the run's folder
(``hydra.job.name`` names the run's log file, ``<output_dir>/<job name>.log``), and a key of a node the same
command line removes (``~prune prune.sparsity=0.5``: Hydra would refuse the key, or, given ``+``, build a
``prune`` holding only that key). :func:`fast_help` serves ``--help`` quickly, and ends the print-only options
(``--help``, ``--cfg``, ``--info``) quietly when their reader has gone (``| head -1``).
"""

from __future__ import annotations

import os
import re
import sys
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


def removed_node(key: str, overrides: Sequence[str]) -> str | None:
    """The node a ``~node`` override of ``overrides`` removes and ``key`` lies under (None: no such node).

    A key under the removed node that a ``..._target_`` override rebuilds (``~prune +prune._target_=...``) is no
    key of a removed node: the command line builds a new one there.

    Example::

        >>> removed_node("prune.sparsity", ["~prune", "+prune.sparsity=0.5"])
        'prune'
        >>> removed_node("clip.clip_val", ["~prune"]) is None
        True
    """
    dotted = key.replace("/", ".")
    targets = {_key(o).replace("/", ".")[: -len("._target_")] for o in overrides if _key(o).endswith("._target_")}
    for override in overrides:
        if not override.startswith("~"):
            continue
        node = _key(override).replace("/", ".")
        if node and dotted.startswith(node + "."):
            parts = dotted.split(".")
            # the nodes from the removed one down to the key's parent: one of them given a _target_ is rebuilt
            prefixes = {".".join(parts[:i]) for i in range(node.count(".") + 1, len(parts))}
            if not prefixes & targets:
                return node
    return None


def removed_node_line(typed: str, node: str) -> str:
    """The refusal of ``typed``, a key of ``node`` that the command line removes with ``~node``."""
    return f"{typed}: {node} was removed by ~{node}: drop ~{node} to set {node}.*"


def check_overrides(argv: Sequence[str]) -> None:
    """Refuse, before Hydra runs, an override that would write outside the run's folder, and a key of a node that
    the same command line removes.

    Raises:
        ConfigError: ``hydra.job.name`` with a path separator or ``..`` (it names ``<output_dir>/<name>.log``);
            ``prune.sparsity=0.5`` (or ``+prune.sparsity=0.5``) beside ``~prune``: Hydra would refuse the key, or,
            given ``+``, compose a ``prune`` that holds only that key and builds nothing.

    Example::

        >>> check_overrides(["hydra.job.name=../../x"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_clipprune.app.checks.ConfigError: hydra.job.name='../../x': ...
    """
    overrides = _overrides(argv)
    for override in overrides:
        node = removed_node(_key(override), overrides) if not override.startswith("~") else None
        if node is not None:
            raise ConfigError(removed_node_line(override, node))
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
#: Hydra's options that print something and exit, running nothing (``--cfg job``, ``--info config``).
_PRINT_FLAGS = (*_HELP_FLAGS, "--cfg", "-c", "--info", "-i")
#: The shell's exit status of a command ended by SIGPIPE (128 + 13), as ``cat file | head -1`` leaves ``cat``.
SIGPIPE_STATUS = 141


@contextmanager
def fast_help(argv: Sequence[str]) -> Iterator[None]:
    """Serve Hydra's print-only options: ``--help`` quickly, and all of them quietly when their reader has gone.

    With ``--help``, ``--hydra-help``, ``--cfg`` or ``--info`` in ``argv``, a reader that closes the pipe early
    (``python -m lightning_clipprune.run --help | head -1``) ends the command quietly with exit status 141, as
    SIGPIPE ends other command-line tools (:func:`_reader_may_leave`), not with an error line and status 1.
    With ``--help`` (or ``--hydra-help``), the config groups are listed from one copy of Hydra's config
    repository (:func:`_one_repository_copy`). Anything else runs untouched.
    """
    if not any(arg in _PRINT_FLAGS or arg.startswith(("--cfg=", "--info=")) for arg in argv):
        yield
        return
    with _reader_may_leave():
        if any(arg in _HELP_FLAGS for arg in argv):
            with _one_repository_copy():
                yield
        else:
            yield


@contextmanager
def _reader_may_leave() -> Iterator[None]:
    """End with exit status 141 and no message when stdout's reader has closed the pipe.

    The standard way (Python's documentation of :mod:`signal`, "Note on SIGPIPE"): stdout is pointed at
    ``os.devnull``, so that the interpreter's last flush at exit does not fail a second time. Hydra prints
    ``--info`` through :mod:`logging`, whose handlers report a failed write on stderr unless
    :data:`logging.raiseExceptions` is off: it is off for the duration.
    """
    import logging

    raise_exceptions = logging.raiseExceptions
    logging.raiseExceptions = False
    try:
        try:
            yield
        finally:
            sys.stdout.flush()  # what is still buffered: a reader gone is seen here, not at the interpreter's exit
    except BrokenPipeError:
        try:
            fd = sys.stdout.fileno()
        except (OSError, ValueError, AttributeError):  # stdout replaced by an object without a file (a test's)
            fd = None
        if fd is not None:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)
        sys.exit(SIGPIPE_STATUS)
    finally:
        logging.raiseExceptions = raise_exceptions


@contextmanager
def _one_repository_copy() -> Iterator[None]:
    """List Hydra's config groups from one copy of its config repository instead of one copy per group.

    Hydra 1.3's help screen asks ``ConfigLoaderImpl.get_group_options`` for every group, and each call deep-copies
    the whole repository (the search path and every config registered in the ConfigStore): about 1 s of this
    app's 1.4-2.0 s ``--help`` (``benchmarks/startup.md``). Listing does not change the repository, so one copy
    per (config name, overrides) serves all; the screen is Hydra's, less the ``_base``-style building blocks of
    the presets (``clip: _base``), which are not choices. Anything else, or a Hydra without that method, runs
    untouched.
    """
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
        node = removed_node(_key(typed), overrides)
        if node is not None:  # adding it with `+` would compose a node that builds nothing
            return removed_node_line(typed, node)
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
