"""python -m jobs.demo: all three jobs on the sample corpus, ranked results and metrics printed."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq

from pipeline.analysis import inputs
from pipeline.devtools import samples
from pipeline.evaluate.history import read_history


def test_demo_prints_ranked_results_metrics_and_where_things_are(demo_run):
    text = demo_run["stdout"]
    assert "RANDOM" in text and "arbitrary" in text  # honest about the tiny random model
    for qid in ("q-revenue", "q-invoice"):
        assert f"{qid}: " in text
    assert "  1. " in text and "  5. " in text
    assert "relevant" in text  # judgements joined to the ranking
    metrics = text.split("metrics (")[1]
    assert "nDCG@10" in metrics and "tokens-768" in metrics and "tokens-256" in metrics
    assert "jupyter lab notebooks/" in text and "pipeline.analysis.figures" in text


def test_demo_outputs_are_complete(demo_run):
    paths = inputs.demo_paths(demo_run["dir"])
    for budget, run in paths["runs"].items():
        pages = inputs.read_pages(run["corpus"], ["page_id", "width", "height"])
        assert pages.num_rows == 8 and max(pages.column("width").to_pylist()) * max(pages.column("height").to_pylist()) \
            <= budget * 28 * 28 * 2
        assert inputs.read_errors(run["corpus"]).num_rows == 2
        assert inputs.pages_metadata(run["corpus"])["vdr.max_visual_tokens"] == str(budget)
        results = pq.read_table(os.path.join(run["scores"], "results.parquet"))
        assert sorted(set(results.column("query_id").to_pylist())) == sorted(samples.SAMPLE_QUERIES)
        judged_pages = {p for _, p, _ in samples.SAMPLE_QRELS}
        assert judged_pages <= set(pages.column("page_id").to_pylist())  # judgements name real pages
        assert json.load(open(os.path.join(run["eval"], "metrics.json")))["nDCG@10"] >= 0
        # every embedding run's summary is kept, beside summary.json
        assert len(inputs.read_summaries(run["corpus"])) == 1
    history = read_history(paths["history"])
    assert history["run_id"].tolist() == ["tokens-768", "tokens-256"]
    assert history["max_visual_tokens"].tolist() == [768, 256]
