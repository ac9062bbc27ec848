"""Every notebook in notebooks/ runs top to bottom with its fast parameters and produces what it promises.

The notebooks are executed with nbclient on the ``python3`` kernel (this interpreter: see
:func:`test_python3_kernel_is_this_interpreter`), with ``CLIPPRUNE_NB_FAST=1`` in the kernel's environment,
in a temporary working directory. Each notebook is executed once per session and its outputs inspected.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbformat import NotebookNode

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
ACCURACY_VS_SPARSITY = NOTEBOOK_DIR / "accuracy_vs_sparsity.ipynb"
CELL_TIMEOUT_S = 120

# a row of the results table: setting, seed, sparsity %, nonzero/total weights, val acc %, test acc %, clipped %, s
ROW = re.compile(
    r"^(?P<setting>\S.*?)\s+(?P<seed>-|\d+)\s+(?P<sparsity>\d+\.\d+)\s+(?P<nonzero>[\d,]+)/(?P<total>[\d,]+)"
    r"\s+(?P<val>\d+\.\d+)\s+(?P<test>-|\d+\.\d+)\s+(?P<clipped>-|\d+\.\d+)\s+(?P<time>\d+\.\d+)$"
)


def execute(nb: NotebookNode, cwd: Path) -> NotebookNode:
    """Run ``nb`` in place in ``cwd``; the kernel gets ``CLIPPRUNE_NB_FAST=1`` and its temporary files under ``cwd``."""
    tmp = cwd / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "CLIPPRUNE_NB_FAST": "1", "TMPDIR": str(tmp)}
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(cwd)}})
    return client.execute(env=env)


def tagged(nb: NotebookNode, tag: str) -> NotebookNode:
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def cell(nb: NotebookNode, cell_id: str) -> NotebookNode:
    return next(c for c in nb.cells if c.get("id") == cell_id)


def stdout(cell: NotebookNode) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def table_rows(nb: NotebookNode) -> list[dict[str, str]]:
    """The rows of the results table (the lines after the header's rule), parsed with :data:`ROW`."""
    lines = stdout(tagged(nb, "results-table")).splitlines()
    rule = next(i for i, line in enumerate(lines) if line and set(line) == {"-"})
    rows = [line for line in lines[rule + 1 :] if line.strip()]
    parsed = [ROW.match(line) for line in rows]
    assert all(parsed), f"unparsable rows: {[r for r, m in zip(rows, parsed, strict=True) if m is None]}"
    return [m.groupdict() for m in parsed]


def parameters(nb: NotebookNode, monkeypatch: pytest.MonkeyPatch) -> dict:
    """The values the parameters cell sets under CLIPPRUNE_NB_FAST=1 (the cell runs on its own)."""
    monkeypatch.setenv("CLIPPRUNE_NB_FAST", "1")
    namespace: dict = {}
    exec(tagged(nb, "parameters").source, namespace)
    return namespace


def with_parameters(nb: NotebookNode, **values: object) -> NotebookNode:
    """A copy of ``nb`` with a cell setting ``values`` after its parameters cell (papermill's convention)."""
    nb = nbformat.from_dict(nb)
    index = nb.cells.index(tagged(nb, "parameters"))
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)
    return nb


@pytest.fixture(scope="module")
def run_notebook(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], tuple[NotebookNode, Path]]:
    """``run(path) -> (executed notebook, working directory)``, each notebook executed once per module."""
    cache: dict[Path, tuple[NotebookNode, Path]] = {}

    def run(path: Path) -> tuple[NotebookNode, Path]:
        if path not in cache:
            cwd = tmp_path_factory.mktemp(path.stem)
            cache[path] = (execute(nbformat.read(path, as_version=4), cwd), cwd)
        return cache[path]

    return run


def test_python3_kernel_is_this_interpreter() -> None:
    """nbclient's ``python3`` kernel must run this interpreter, where lightning_clipprune is installed."""
    from jupyter_client.kernelspec import KernelSpecManager

    argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
    # jupyter_client launches sys.executable for these names (KernelManager.format_kernel_cmd)
    same = argv0 in {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
    assert same or Path(argv0).resolve() == Path(sys.executable).resolve(), (
        f"the 'python3' kernel runs {argv0}, not {sys.executable}: remove the stale kernel spec "
        "(`jupyter kernelspec list`) or install one for this environment (`python -m ipykernel install --user`)"
    )


def test_there_are_notebooks() -> None:
    assert ACCURACY_VS_SPARSITY in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [c.get("id", i) for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: strip the outputs of cells {dirty} before committing"
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path: Path, run_notebook: Callable[[Path], tuple[NotebookNode, Path]]) -> None:
    nb, _ = run_notebook(path)  # a failing cell raises CellExecutionError with its traceback
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]


def test_accuracy_vs_sparsity_table_has_a_row_per_run(
    run_notebook: Callable[[Path], tuple[NotebookNode, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    nb, _ = run_notebook(ACCURACY_VS_SPARSITY)
    params = parameters(nb, monkeypatch)
    sparsities, seeds = params["SPARSITIES"], params["SEEDS"]
    assert params["RESULTS_DIR"] is None and len(sparsities) >= 2 and 0.0 in sparsities

    rows = table_rows(nb)
    assert len(rows) == 2 * len(sparsities) * len(seeds)  # clip on and off
    settings = sorted({r["setting"] for r in rows})
    assert len(settings) == 2 and "no clip" in settings
    (clipped,) = (s for s in settings if s != "no clip")
    assert clipped.startswith("clip norm")
    for setting in settings:
        mine = [r for r in rows if r["setting"] == setting]
        measured = sorted(float(r["sparsity"]) for r in mine)
        assert measured == pytest.approx(sorted(100 * s for s in sparsities for _ in seeds), abs=0.5)
        assert sorted(int(r["seed"]) for r in mine) == sorted(seeds * len(sparsities))
        for r in mine:
            nonzero, total = int(r["nonzero"].replace(",", "")), int(r["total"].replace(",", ""))
            assert (nonzero == total) == (float(r["sparsity"]) == 0.0)
            assert 0.0 <= float(r["val"]) <= 100.0 and 0.0 <= float(r["test"]) <= 100.0
            assert (r["clipped"] == "-") == (setting == "no clip")


def test_accuracy_vs_sparsity_writes_and_shows_the_plot(run_notebook: Callable[[Path], tuple[NotebookNode, Path]]) -> None:
    import matplotlib.image

    nb, cwd = run_notebook(ACCURACY_VS_SPARSITY)
    png = cwd / "accuracy_vs_sparsity.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape
    assert width > height > 300
    shown = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(shown) == 1


def test_accuracy_vs_sparsity_reads_a_results_dir(
    run_notebook: Callable[[Path], tuple[NotebookNode, Path]], tmp_path: Path
) -> None:
    """RESULTS_DIR set to the first run's sweep folder: nothing is trained and the same table comes out."""
    first, first_cwd = run_notebook(ACCURACY_VS_SPARSITY)
    (sweep_dir,) = (first_cwd / "tmp").glob("clipprune-sweep-*")
    assert len(list(sweep_dir.glob("*/results.json"))) == len(table_rows(first))

    committed = nbformat.read(ACCURACY_VS_SPARSITY, as_version=4)
    nb = execute(with_parameters(committed, RESULTS_DIR=str(sweep_dir), OUT="replot.png"), tmp_path)
    assert stdout(cell(nb, "sweep")) == ""  # no run printed its progress line
    assert table_rows(nb) == table_rows(first)
    assert (tmp_path / "replot.png").is_file()
    assert not list((tmp_path / "tmp").glob("clipprune-sweep-*"))  # no sweep was run

    # a folder holding the same sweep twice (a date folder: the day's sweeps) was averaged as more seeds
    again = tmp_path / "again"
    shutil.copytree(sweep_dir, again)
    with pytest.raises(CellExecutionError, match="are the same point"):
        execute(with_parameters(committed, RESULTS_DIR=[str(sweep_dir), str(again)], OUT="mixed.png"), tmp_path)
    for path in again.glob("*/results.json"):  # the same points, but another experiment setting
        run = json.loads(path.read_text())
        run["overrides"] = [*run.get("overrides", []), "trainer.max_epochs=7"]
        run["seed"] = (run.get("seed") or 0) + 100
        path.write_text(json.dumps(run))
    with pytest.raises(CellExecutionError, match="differ in more than sparsity, seed and clipping"):
        execute(with_parameters(committed, RESULTS_DIR=[str(sweep_dir), str(again)], OUT="mixed.png"), tmp_path)


def test_accuracy_vs_sparsity_names_an_empty_results_dir(tmp_path: Path) -> None:
    nb = with_parameters(nbformat.read(ACCURACY_VS_SPARSITY, as_version=4), RESULTS_DIR=str(tmp_path / "empty"))
    with pytest.raises(CellExecutionError, match="no results.json below"):
        execute(nb, tmp_path)


QUICKSTART = NOTEBOOK_DIR / "quickstart.ipynb"
SEARCH = NOTEBOOK_DIR / "search.ipynb"


def images(cell: NotebookNode) -> list[str]:
    return [o["data"]["image/png"] for o in cell.outputs if "image/png" in o.get("data", {})]


def rich_text(cell: NotebookNode) -> str:
    return "".join(o["data"]["text/plain"] for o in cell.outputs if o.output_type == "display_data" and "text/html" in o.get("data", {}))


def test_quickstart_shows_layer_sparsity_and_clipped_norms(
    run_notebook: Callable[[Path], tuple[NotebookNode, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    nb, cwd = run_notebook(QUICKSTART)
    params = parameters(nb, monkeypatch)
    bars = tagged(nb, "layer-bars")
    assert len(images(bars)) == 1
    layers = dict(re.findall(r"^(\S+): (\d+\.\d+) % of", stdout(bars), re.M))
    assert list(layers) == ["net.layers.1.weight", "net.layers.3.weight", "net.layers.5.weight"]
    total = {"net.layers.1.weight": 64 * 256, "net.layers.3.weight": 256 * 256, "net.layers.5.weight": 256 * 10}
    overall = sum(float(s) * total[n] for n, s in layers.items()) / sum(total.values())
    assert overall == pytest.approx(100 * params["SPARSITY"], abs=0.5)  # the cubic schedule reaches its target
    norms = tagged(nb, "grad-norms")
    assert len(images(norms)) == 1
    steps, clipped, max_after = re.search(r"(\d+) steps logged, (\d+) clipped; max norm after clipping (\S+)", stdout(norms)).groups()
    assert int(steps) >= params["EPOCHS"] * 20 and float(max_after) <= params["CLIP"] * 1.0001
    assert (cwd / params["LOG_DIR"]).is_dir()


def test_search_notebook_reports_the_chosen_point_and_the_sensitivity(
    run_notebook: Callable[[Path], tuple[NotebookNode, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    nb, _ = run_notebook(SEARCH)
    params = parameters(nb, monkeypatch)
    search = tagged(nb, "search")
    assert len(images(search)) == 1
    sparsity = float(re.search(r"chosen sparsity (\d\.\d+)", stdout(search)).group(1))
    assert 0.0 <= sparsity < 1.0 and f"prune.sparsity={sparsity:.4f}" in stdout(search)
    table = rich_text(search)
    assert "chosen" in table and "test acc at the chosen point" in " ".join(table.split())
    sensitivity = tagged(nb, "sensitivity")
    assert len(images(sensitivity)) == 1
    assert sum(line.startswith("│ net.layers.") for line in rich_text(sensitivity).splitlines()) == 3  # one row per layer
    allocation = stdout(tagged(nb, "allocation"))
    assert 'MagnitudePruneCallback(scope="local", layer_sparsity={' in allocation and "++prune.layer_sparsity=" in allocation
    assert len(params["LAYER_GRID"]) >= 2
