"""Every notebook runs on the demo's outputs (nbclient, a real kernel) without an error and
draws its figures; committed notebooks carry no outputs."""

from __future__ import annotations

import glob
import os
import re
import time

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOKS = os.path.join(ROOT, "notebooks")

# notebook -> the figures it must draw (cells tagged figure:NAME, each with an image output)
EXPECTED = {
    "corpus": {"corpus_histograms", "corpus_errors", "corpus_storage", "corpus_summaries"},
    "results": {"results_top_k", "results_scores", "results_overlap"},
    "similarity_maps": {"similarity_map", "similarity_probe"},
    "evaluation": {"evaluation_history", "evaluation_wins_losses"},
}


def test_every_notebook_is_tested():
    found = {os.path.basename(p)[: -len(".ipynb")] for p in glob.glob(os.path.join(NOTEBOOKS, "*.ipynb"))}
    assert found == set(EXPECTED)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(NOTEBOOKS, "*.ipynb"))), ids=os.path.basename)
def test_committed_notebooks_are_stripped(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path}: run `python -m pipeline.analysis.strip`"
        assert not cell.metadata.get("execution"), path


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_and_draws_its_figures(name, demo_run, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("VDR_DEMO_DIR", demo_run["dir"])
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
    started = time.time()
    # the current interpreter's kernel (ipykernel's own spec); any cell error raises
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": NOTEBOOKS}}).execute()
    drawn = set()
    for cell in nb.cells:
        tags = [t[len("figure:"):] for t in cell.metadata.get("tags", []) if t.startswith("figure:")]
        images = [o for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
        for tag in tags:
            assert images, f"{name}: the cell for figure {tag} drew nothing"
            drawn.add(tag)
    assert drawn == EXPECTED[name]
    assert time.time() - started < 90
    # no library warning in what a reader sees (DuckDB's "Arrow output on a DB-API result makes an
    # extra copy" was printed in three notebooks)
    stderr = "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", [])
                     if o.get("output_type") == "stream" and o.get("name") == "stderr")
    assert not re.search(r"\w+Warning\b", stderr), f"{name}: {stderr[:500]}"


def test_the_strip_tool_teaches_and_refuses_what_is_not_a_notebook(tmp_path, capsys):
    """`--help` printed usage (it was read as a notebook path and ended in a traceback); a path
    that is not there is a usage error; a notebook with outputs is stripped."""
    from pipeline.analysis import strip

    with pytest.raises(SystemExit) as exc:
        strip.main(["--help"])
    assert exc.value.code == 0 and "notebooks to strip" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        strip.main([str(tmp_path / "nope.ipynb")])
    assert exc.value.code == 2 and "no such notebook" in capsys.readouterr().err
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1", execution_count=3, outputs=[
        nbformat.v4.new_output("execute_result", data={"text/plain": "1"}, execution_count=3)])])
    nbformat.write(nb, tmp_path / "a.ipynb")
    assert strip.main([str(tmp_path / "a.ipynb")]) == 0
    cell = nbformat.read(tmp_path / "a.ipynb", as_version=4).cells[0]
    assert cell.outputs == [] and cell.execution_count is None
