"""The notebooks' logic on tables built here: counts, errors, storage, overlap, history."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pytest

from pipeline import schema
from pipeline.analysis import corpus, evaluation, inputs, results
from pipeline.devtools import judged
from pipeline.evaluate import history


def test_documents_and_overview(tmp_path):
    judged.write_corpus(str(tmp_path / "emb"), n_docs=3, pages_per_doc=2)
    pages = inputs.read_pages(str(tmp_path / "emb"), ["doc_id", "n_vectors"])
    docs = corpus.documents(pages)
    assert docs.to_pylist() == [{"doc_id": f"doc{d}.pdf", "pages": 2, "vectors": 12} for d in range(3)]
    errors = inputs.read_errors(str(tmp_path / "emb"))  # none written: empty, with the contract's columns
    assert errors.num_rows == 0 and errors.schema.names == schema.ERRORS_SCHEMA.names
    assert corpus.overview(pages, errors) == {"documents_with_pages": 3, "pages": 6, "vectors": 36,
                                              "documents_with_errors": 0, "error_rows": 0}
    stats = inputs.file_stats(str(tmp_path / "emb"))
    s = corpus.storage_per_page(stats, 36)
    assert s["pages"] == 6 and s["files"] == 1 and 0.5 < s["embedding_share"] < 1
    assert s["bytes_per_page"] == stats.column("file_bytes")[0].as_py() / 6


def test_error_summary_groups_types_with_examples_and_advice():
    rows = [("a.pdf", "CorruptDocument", "open"), ("b.pdf", "CorruptDocument", "open"),
            ("c.png", "EmptyFile", "open"), ("d.pdf", "Weird", "render")]
    errors = pa.Table.from_pylist([{"doc_id": d, "source_uri": f"/in/{d}", "page_number": None, "stage": s,
                                    "error_type": t, "message": f"{t} in {d}"} for d, t, s in rows],
                                  schema=schema.ERRORS_SCHEMA)
    summary = corpus.error_summary(errors).to_pylist()
    assert [(r["error_type"], r["rows"], r["examples"]) for r in summary] == [
        ("CorruptDocument", 2, "a.pdf, b.pdf"), ("EmptyFile", 1, "c.png"), ("Weird", 1, "d.pdf")]
    assert "fetch the file again" in summary[0]["what_to_do"] and "report it" in summary[2]["what_to_do"]


def test_summaries_table_reads_old_and_new_layouts(tmp_path):
    import json

    out = tmp_path / "emb"
    (out / "summaries").mkdir(parents=True)
    for i, pages in enumerate((8, 3)):
        s = {"started_at": f"2026-12-0{i + 1}T00:00:00Z", "generation": 1, "max_visual_tokens": 768,
             "this_run": {"pages": pages, "vectors": 10 * pages, "error_rows": 0, "seconds": 2.0, "pages_per_second": pages / 2}}
        (out / "summaries" / f"{i}.json").write_text(json.dumps(s))
    table = corpus.summaries_table(inputs.read_summaries(str(out)))
    assert table.column("pages").to_pylist() == [8, 3] and table.column("pages_per_second").to_pylist() == [4.0, 1.5]
    old = tmp_path / "old"
    old.mkdir()
    (old / "summary.json").write_text(json.dumps({"started_at": "x", "this_run": {"pages": 1}}))
    assert corpus.summaries_table(inputs.read_summaries(str(old))).column("pages").to_pylist() == [1]


def _results(ranking: dict[str, list[str]]) -> pa.Table:
    rows = [(q, p, r, 10.0 - r) for q, pages in ranking.items() for r, p in enumerate(pages, start=1)]
    return judged.results_table(rows)


def test_top_k_with_judgements_and_score_stats():
    t = _results({"q1": ["a.pdf#1", "b.pdf#1", "c.pdf#2"], "q2": ["c.pdf#2"]})
    top = results.top_k(t, "q1", 2, {("q1", "b.pdf#1"): 2, ("q1", "a.pdf#1"): 0})
    assert top.column("page_id").to_pylist() == ["a.pdf#1", "b.pdf#1"]
    assert top.column("relevance").to_pylist() == [0, 2]
    stats = {r["query_id"]: r for r in results.score_stats(t).to_pylist()}
    assert stats["q1"]["top1"] == 9.0 and stats["q1"]["kth"] == 7.0 and stats["q1"]["gap"] == 1.0
    assert stats["q2"]["gap"] is None


def test_rank_overlap():
    a = _results({"q1": ["x#1", "y#1", "z#1"], "q2": ["x#1", "y#1"], "q3": ["x#1"]})
    b = _results({"q1": ["x#1", "y#1", "z#1"], "q2": ["y#1", "w#1"], "q4": ["x#1"]})
    rows = {r["query_id"]: r for r in results.overlap(a, b, k=3).to_pylist()}
    assert set(rows) == {"q1", "q2"}  # only queries in both runs
    assert rows["q1"] == {"query_id": "q1", "common": 3, "jaccard": 1.0, "same_top1": True, "rbo": pytest.approx(1.0)}
    assert rows["q2"]["common"] == 1 and rows["q2"]["jaccard"] == pytest.approx(1 / 3) and not rows["q2"]["same_top1"]
    assert 0 < rows["q2"]["rbo"] < 1
    # Swapping the top two costs more than swapping the last two.
    assert results.rbo(list("abcd"), list("bacd")) < results.rbo(list("abcd"), list("abdc"))


def test_thumbnails_are_rendered_once_and_cached(sample_corpus, tmp_path):
    import os

    from PIL import Image

    src = os.path.join(sample_corpus, "reports", "2023", "annual.pdf")
    path = results.thumbnail(src, 2, str(tmp_path / "thumbs"), max_side=120)
    with Image.open(path) as im:
        assert max(im.size) == 120 and im.size[0] < im.size[1]  # a portrait letter page
    mtime = os.stat(path).st_mtime_ns
    assert results.thumbnail(src, 2, str(tmp_path / "thumbs"), max_side=120) == path
    assert os.stat(path).st_mtime_ns == mtime
    assert results.thumbnail(src, 3, str(tmp_path / "thumbs"), max_side=120) != path
    with pytest.raises(KeyError):
        results.source_page_image(src, 9)


def _history(tmp_path, values: list[float]) -> str:
    uri = str(tmp_path / "history")
    t0 = datetime(2026, 12, 1, tzinfo=timezone.utc)
    for i, v in enumerate(values):
        regressions = f"nDCG@10 {v:.4f} vs previous ..." if i and v < values[i - 1] - 0.01 else None
        history.append_run(uri, history.history_row(f"r{i}", {"nDCG@10": v, "R@10": 0.5}, run_time=t0 + timedelta(days=i),
                                                    regression=regressions is not None, regressions=regressions,
                                                    status="ok"))
    history.append_run(uri, history.history_row("failed", {}, run_time=t0 + timedelta(days=9), status="failed",
                                                error="boom"))
    return uri


def test_history_series_marks_regressions(tmp_path):
    hist = history.read_history(_history(tmp_path, [0.5, 0.6, 0.4, 0.45]))
    s = evaluation.series(hist)
    ndcg = s[s["measure"] == "nDCG@10"]
    assert ndcg["run_id"].tolist() == ["r0", "r1", "r2", "r3"]  # failed runs have no values
    assert ndcg["regressed"].tolist() == [False, False, True, False]
    assert not s[s["measure"] == "R@10"]["regressed"].any()
    table = evaluation.metric_table(hist)
    assert table.index.tolist() == ["r0", "r1", "r2", "r3"] and table.loc["r2", "nDCG@10"] == 0.4


def test_wins_and_losses_per_query():
    def per_query(values):
        return pa.Table.from_pylist([{"query_id": q, "measure": m, "value": v} for (q, m), v in values.items()])

    a = per_query({("q1", "nDCG@10"): 0.5, ("q2", "nDCG@10"): 0.9, ("q3", "nDCG@10"): 0.3, ("q4", "nDCG@10"): 1.0,
                   ("q1", "AP"): 0.1})
    b = per_query({("q1", "nDCG@10"): 0.7, ("q2", "nDCG@10"): 0.2, ("q3", "nDCG@10"): 0.3})
    wl = evaluation.wins_losses(a, b, "nDCG@10")
    assert wl["query_id"].tolist() == ["q2", "q1", "q3"]  # biggest change first; q4 not in both
    assert wl["outcome"].tolist() == ["loss", "win", "tie"]
    assert evaluation.outcome_counts(wl) == {"win": 1, "loss": 1, "tie": 1}
    assert np.isclose(wl.loc[wl["query_id"] == "q2", "delta"].item(), -0.7)


def test_notebook_inputs_default_to_the_demo_and_take_variables(tmp_path, monkeypatch):
    demo = tmp_path / "demo"
    demo.mkdir()
    d = inputs.notebook_inputs({"VDR_DEMO_DIR": str(demo)})
    assert d["corpus"] == str(demo / "embeddings-768") and d["run_b"].endswith("tokens-256")
    d = inputs.notebook_inputs({"VDR_DEMO_DIR": "/x", "VDR_RUN_A": "s3://b/runs/r1"})
    assert d["corpus"] == "/x/embeddings-768" and d["run_a"] == "s3://b/runs/r1" and d["history"] == "/x/eval/history"
    # no demo and no output named: what to run first (it was a traceback deep in a reader)
    with pytest.raises(FileNotFoundError, match="run `python -m jobs.demo` first"):
        inputs.notebook_inputs({"VDR_DEMO_DIR": str(tmp_path / "nodemo")})
    # relative paths: from the working directory, else from the repository root (Jupyter's
    # kernel runs in notebooks/, where VDR_CORPUS=demo/... was not found)
    (tmp_path / "work" / "emb").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    d = inputs.notebook_inputs({"VDR_DEMO_DIR": str(demo), "VDR_CORPUS": "emb", "VDR_QRELS": "pyproject.toml"})
    assert d["corpus"] == str(tmp_path / "work" / "emb")
    assert d["qrels"] == os.path.join(inputs.REPO_ROOT, "pyproject.toml")


def test_two_runs_get_labels_that_tell_them_apart():
    """offline_eval writes OUTPUT_ROOT/RUN_ID/scores: two runs' folders share the name "scores",
    which gave one figure panel (run A lost) and "scores vs scores"."""
    assert inputs.run_names("/o/r1/scores", "/o/r2/scores/") == ("r1/scores", "r2/scores")
    assert inputs.run_names("s3://b/runs/tokens-768", "s3://b/runs/tokens-256") == ("tokens-768", "tokens-256")
    assert inputs.run_names("/a/x/y/scores", "/b/x/y/scores") == ("a/x/y/scores", "b/x/y/scores")
    assert inputs.run_names("/o/run", "/o/run/") == ("A: run", "B: run")


def test_judgements_are_read_from_any_uri(tmp_path):
    """The notebooks mark relevant hits from VDR_QRELS; a file:// (or s3://) URI was dropped by an
    os.path.exists check, with no message."""
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("q1 0 a.pdf#1 1\nq1 0 b.pdf#2 0\n")
    for uri in (str(qrels), f"file://{qrels}"):
        got = inputs.qrels_or_none({"qrels": uri, "endpoint_url": None})
        assert got == {("q1", "a.pdf#1"): 1, ("q1", "b.pdf#2"): 0}, uri
    assert inputs.qrels_or_none({"qrels": str(tmp_path / "none.txt"), "endpoint_url": None}) is None
    assert inputs.qrels_or_none({"qrels": None, "endpoint_url": None}) is None
