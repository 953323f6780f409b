"""Every notebook runs on the demo's outputs (nbclient, a real kernel) without an error and
draws its figures; committed notebooks carry no outputs."""

from __future__ import annotations

import glob
import os
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
