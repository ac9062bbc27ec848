"""Library and app are two things: the library never imports the app, and the old import paths still work.

The library is every module of ``lightning_clipprune`` outside :data:`APP` and :data:`OLD_PATHS`, so a new
module is held to the library's rule unless it is put into the app on purpose.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_clipprune"

#: The app: the Hydra stages, its models, data, report, Hydra callbacks and the search's command line.
APP = ("app/", "run.py")
#: Old import paths of app modules, kept as aliases (they import the app, by design).
OLD_PATHS = ("models/__init__.py", "data/__init__.py", "report.py", "hydra_callbacks.py")
#: The two places where the library names the app, each only when asked: the command line of the search
#: (``python -m lightning_clipprune.search``) and the lookup of its older names (``search.main``, ...).
ENTRY_POINTS = ("search/__main__.py", "search/__init__.py")
#: What no library module may import, at the top or inside a function.
FORBIDDEN = re.compile(r"^(lightning_clipprune\.(app|run|models|data|report|hydra_callbacks)|hydra|omegaconf)(\.|$)")
#: A string naming an app module (``importlib.import_module(...)``); hydra or omegaconf class names may appear
#: as strings (the checkpoint reader's allowed list names what it may unpickle, importing nothing).
FORBIDDEN_STRING = re.compile(r"^lightning_clipprune\.(app|run|models|data|report|hydra_callbacks)(\.\w+)*$")


def _relative(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def library_modules() -> list[Path]:
    """Every ``.py`` of the package on the library side."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = _relative(path)
        if not rel.startswith(APP) and rel not in OLD_PATHS:
            out.append(path)
    return out


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``path`` (relative ones resolved), and every string constant
    that is a whole dotted module name (``importlib.import_module("lightning_clipprune.app.x")``).

    ``source``: parse this text as if it were the module ``path``."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names] or [(node.lineno, base)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and FORBIDDEN_STRING.match(node.value):
            out.append((node.lineno, node.value))
    return out


def test_the_split_covers_the_package() -> None:
    library = {_relative(p) for p in library_modules()}
    assert {"search/threshold.py", "pruning/__init__.py", "callbacks/magnitude_prune.py", "loggers.py"} <= library
    assert not any(name.startswith(APP) for name in library)
    for rel in (*APP, *OLD_PATHS):
        assert (PACKAGE / rel).exists(), rel  # a moved or renamed module must be moved here too


def test_the_library_never_imports_the_app_hydra_or_omegaconf() -> None:
    offences = []
    for path in library_modules():
        if _relative(path) in ENTRY_POINTS:
            continue
        offences += [f"{_relative(path)}:{line}: {name}" for line, name in imported_names(path) if FORBIDDEN.match(name)]
    assert not offences, "library modules import the app side:\n" + "\n".join(offences)


def test_the_entry_points_name_only_the_search_command_line() -> None:
    """The two allowed places name the app's search command line (its torch-free parser, its main) and nothing else."""
    command_line = ("lightning_clipprune.app.search_cli", "lightning_clipprune.app.search_args")
    for rel in ENTRY_POINTS:
        names = {name for _, name in imported_names(PACKAGE / rel) if FORBIDDEN.match(name)}
        assert names and all(n.startswith(command_line) for n in names), (rel, names)


def test_the_checker_sees_an_upward_import() -> None:
    """Control: the AST walk finds top-level, in-function, relative and string imports of the app."""
    source = textwrap.dedent(
        """
        import hydra
        def f():
            from ..app import checks
            from omegaconf import OmegaConf
            importlib.import_module("lightning_clipprune.run")
        """
    )
    names = [n for _, n in imported_names(PACKAGE / "search" / "probe.py", source) if FORBIDDEN.match(n)]
    assert names == ["hydra", "lightning_clipprune.app.checks", "omegaconf.OmegaConf", "lightning_clipprune.run"]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_importing_the_library_and_the_apps_models_and_data_loads_no_hydra_omegaconf_or_sklearn() -> None:
    """Every library module, and the app's models and data (which ``benchmarks/gpu_check.py`` needs without
    Hydra). matplotlib is not checked: Lightning itself imports it when it is installed."""
    modules = [_module_name(p) for p in library_modules() if _relative(p) != "search/__main__.py"]
    modules += ["lightning_clipprune.app.models", "lightning_clipprune.app.data", "lightning_clipprune.models",
                "lightning_clipprune.data"]
    code = textwrap.dedent(
        f"""
        import importlib, sys
        for name in {modules!r}:
            importlib.import_module(name)
        print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"hydra", "omegaconf", "sklearn"}}))
        """
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_old_import_paths_are_the_app_modules() -> None:
    import lightning_clipprune.data.locate as old_locate
    from lightning_clipprune.models.networks import MLP

    import lightning_clipprune.app.data.locate as new_locate
    import lightning_clipprune.app.hydra_callbacks as new_callbacks
    import lightning_clipprune.app.models as new_models
    import lightning_clipprune.app.report as new_report
    import lightning_clipprune.app.search_cli as search_cli
    import lightning_clipprune.hydra_callbacks as old_callbacks
    import lightning_clipprune.models as old_models
    import lightning_clipprune.report as old_report
    import lightning_clipprune.search as search
    from lightning_clipprune.data import DigitsDataModule

    assert old_locate is new_locate and old_report is new_report and old_callbacks is new_callbacks
    assert MLP is new_models.MLP and old_models.Classifier is new_models.Classifier
    assert DigitsDataModule.__module__ == "lightning_clipprune.app.data.digits"
    for name in ("main", "compose_run_config", "run_overrides", "load_weights", "save_pruned", "finetune"):
        assert getattr(search, name) is getattr(search_cli, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        search.nope  # noqa: B018


def test_configs_name_the_app_paths_and_old_run_folders_stay_allowed() -> None:
    from lightning_clipprune.app.targets import ALLOWED_TARGETS

    targets = set()
    for path in (ROOT / "conf").rglob("*.yaml"):
        targets |= set(re.findall(r"^\s*_target_:\s*([\w.]+)", path.read_text(), flags=re.MULTILINE))
    app_targets = {t for t in targets if t.startswith("lightning_clipprune.app.")}
    assert {t.rsplit(".", 1)[0] for t in app_targets} == {
        "lightning_clipprune.app.models", "lightning_clipprune.app.data", "lightning_clipprune.app.hydra_callbacks"
    }
    assert not any(re.match(r"lightning_clipprune\.(models|data|hydra_callbacks)\.", t) for t in targets)
    old = {t.replace("lightning_clipprune.app.", "lightning_clipprune.", 1) for t in app_targets}
    assert old <= ALLOWED_TARGETS, old - ALLOWED_TARGETS


@pytest.mark.parametrize("module", ["lightning_clipprune.search", "lightning_clipprune.report"])
def test_old_command_lines_still_run(module: str) -> None:
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"usage: python -m {module}" in proc.stdout
