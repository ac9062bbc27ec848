"""Every ``Example::`` in the library's and the app's docstrings runs and prints what it says.

The examples are the first code a user copies; a renamed argument or a changed message would leave them
stale without this test.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lightning_clipprune


def _module_names() -> list[str]:
    names = [info.name for info in pkgutil.walk_packages(lightning_clipprune.__path__, "lightning_clipprune.")]
    return sorted(n for n in names if not n.endswith("__main__"))  # importing a __main__ runs its command


def test_the_modules_are_found() -> None:
    names = _module_names()
    assert "lightning_clipprune.pruning.ranking" in names and "lightning_clipprune.app.checks" in names
    assert len(names) > 60


@pytest.mark.parametrize("name", _module_names())
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    if module.__name__ != name:  # an old import path that is the other module itself: tested under its name
        pytest.skip(f"{name} is {module.__name__}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name} (run it with -s)"
