"""SIGTERM at any point of a run ends in one line (imports nothing heavy: the entry point installs it first).

A run has three phases, and SIGTERM (what cluster schedulers send) is handled in each:

- **start-up** (composing the config, building, loading data) and the start of ``trainer.fit`` before
  Lightning installs its own handler: the handler of :func:`install_sigterm_handler` raises at once
  (Lightning's ``SIGTERMException`` once Lightning is imported, else :class:`Terminated`); nothing was
  trained, there is nothing to resume.
- **training**: the signal (SIGTERM, or a first Ctrl-C) is only recorded (:func:`stop_at_batch_end`); at the end
  of the batch every process agrees to stop there and Lightning stops the loop; the app writes
  ``results.json`` marked interrupted and prints the command that resumes the run.
- **after the last training step**: stopping there would leave a checkpoint whose training is over but
  whose end (the ``on_train_end`` hooks: post-training pruning, the final sparsity row) never ran, so no
  resume could finish it. From the last step on (:func:`defer_signals`, called by
  :class:`~lightning_clipprune.app.guards.SigtermRelay` and by the app) a SIGTERM is only recorded: the
  run finishes its last validation and test (one pass each), writes ``results.json`` (``completed``), and
  the app then exits with status 143 and one line. A first Ctrl-C there is deferred the same way (status
  130); a second one stops the run at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

__all__ = [
    "Terminated",
    "begin_run",
    "defer_signals",
    "deferred_signal",
    "install_sigterm_handler",
    "is_sigterm",
    "sigterm_installed",
    "sigterm_received",
    "stop_at_batch_end",
    "stop_requested",
    "training_over",
]

_LIGHTNING_EXCEPTIONS = "lightning.pytorch.utilities.exceptions"
_state = {"installed": False, "received": False, "defer": False, "sigint": False, "stop": False}


class Terminated(SystemExit):
    """SIGTERM during start-up, before Lightning was imported (afterwards: Lightning's ``SIGTERMException``).

    Its exit status is 143 (128 + SIGTERM) should it reach the interpreter uncaught.
    """

    def __init__(self) -> None:
        super().__init__(128 + int(signal.SIGTERM))


def _on_sigterm(signum: int, frame: Any) -> None:
    _state["received"] = True
    # raise only when installed as the process's handler: called from Lightning's handler, Lightning stops
    # the loop at the end of the batch itself
    if not _state["defer"] and signal.getsignal(signal.SIGTERM) is _on_sigterm:
        module = sys.modules.get(_LIGHTNING_EXCEPTIONS)
        raise module.SIGTERMException() if module is not None else Terminated()


def _on_sigint_deferred(signum: int, frame: Any) -> None:
    _state["sigint"] = True
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops the run at once


def _on_sigint_training(signum: int, frame: Any) -> None:
    _state["stop"] = True  # the run stops at the end of this training batch (SigtermRelay), every process together
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops the run at once


def _on_sigterm_training(signum: int, frame: Any) -> None:
    _state["received"] = True  # as Ctrl-C, at the end of the batch; no collective from inside the handler


def stop_at_batch_end() -> None:
    """From now on (training) a first Ctrl-C or a SIGTERM is recorded and the run stops at the end of the current
    batch, every process at the same one (:class:`~lightning_clipprune.app.guards.SigtermRelay`), where the step
    is whole. A ``KeyboardInterrupt`` raised between a step's clip and its optimizer step left the interrupt
    checkpoint half a step ahead; Lightning's SIGTERM handler broadcasts from inside the handler, and each
    DDP process stopping on its own left one waiting in a collective. Lightning puts its handlers back at the
    end of the stage.

    Does nothing where :func:`install_sigterm_handler` did not run (library use, in-process tests).
    """
    if _state["installed"] and threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _on_sigint_training)
        signal.signal(signal.SIGTERM, _on_sigterm_training)


def stop_requested() -> str | None:
    """The signal that asked the run to stop at the end of the batch during training ("SIGINT", "SIGTERM"), or None."""
    if _state["stop"]:
        return "SIGINT"
    return "SIGTERM" if _state["received"] and not _state["defer"] else None


def install_sigterm_handler() -> None:
    """Handle SIGTERM from now on, as the module docstring says (the app's entry point calls it first)."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may install handlers (main() called from a thread: Python's default)
    _state.update(installed=True, received=False, defer=False, sigint=False, stop=False)
    signal.signal(signal.SIGTERM, _on_sigterm)


def begin_run() -> str | None:
    """Back to the start-up phase, at the start of each run (each job of a sweep runs in the same process).

    Returns:
        A signal deferred since the previous run ended ("SIGTERM", "SIGINT"), or None: the caller stops.
    """
    which = deferred_signal()
    _state.update(received=False, defer=False, sigint=False, stop=False)
    if signal.getsignal(signal.SIGINT) in (_on_sigint_deferred, _on_sigint_training):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if _state["installed"]:
        signal.signal(signal.SIGTERM, _on_sigterm)
    return which


def sigterm_installed() -> bool:
    """Whether :func:`install_sigterm_handler` ran in this process (it does in the app, not in library use)."""
    return bool(_state["installed"])


def sigterm_received() -> bool:
    """Whether a SIGTERM arrived since :func:`install_sigterm_handler`."""
    return bool(_state["received"])


def deferred_signal() -> str | None:
    """The signal that arrived after the last training step ("SIGTERM", "SIGINT"), or None."""
    if _state["defer"] and _state["received"]:
        return "SIGTERM"
    return "SIGINT" if _state["sigint"] else None


def training_over() -> bool:
    """Whether the run has passed its last training step (SIGTERM is deferred from then on)."""
    return bool(_state["defer"])


def is_sigterm(err: BaseException) -> bool:
    """Whether ``err`` is how a SIGTERM stopped the run (:class:`Terminated` or Lightning's ``SIGTERMException``)."""
    module = sys.modules.get(_LIGHTNING_EXCEPTIONS)
    return isinstance(err, Terminated) or (module is not None and isinstance(err, module.SIGTERMException))


def defer_signals(trainer: Any = None) -> None:
    """From now on a SIGTERM or a first Ctrl-C is only recorded: the run finishes, then the app exits with
    status 143 or 130 (a second Ctrl-C stops it at once).

    Does nothing where :func:`install_sigterm_handler` did not run (library use, in-process tests).

    Args:
        trainer: when given, a SIGTERM Lightning already heard is taken back from it so that its loops do
            not stop (Lightning keeps that flag on a private attribute; there is no public setter).
    """
    if not _state["installed"]:
        return
    _state["defer"] = True
    signal.signal(signal.SIGTERM, _on_sigterm)  # Lightning's own handler no longer hears it
    if _state["stop"]:  # a Ctrl-C in the last batch: the run finishes, then exits 130
        _state["sigint"] = True
    if not _state["sigint"] and signal.getsignal(signal.SIGINT) in (signal.default_int_handler, _on_sigint_training):
        signal.signal(signal.SIGINT, _on_sigint_deferred)
    connector = getattr(trainer, "_signal_connector", None)
    if connector is not None and getattr(connector, "received_sigterm", False):
        _state["received"] = True
        connector.received_sigterm = False
