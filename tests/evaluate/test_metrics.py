"""Metrics: values equal ir_measures' own computation, input formats, and what is reported."""

from __future__ import annotations

import json
import math

import ir_measures
import pyarrow.parquet as pq
import pytest

from pipeline.devtools.judged import (
    random_qrels_and_run,
    results_table,
    write_beir_qrels,
    write_corpus,
    write_trec_qrels,
    write_trec_run,
)
from jobs import evaluate as evaluate_job
from pipeline.evaluate import metrics as evaluate
from pipeline.evaluate import runs

DEFAULTS = ["nDCG@5", "nDCG@10", "R@10", "RR@10", "AP"]


def independent(measures, qrels_path, run_path):
    """ir_measures on the files through its own readers: no code of ours in between."""
    parsed = [ir_measures.parse_measure(m) for m in measures]
    agg = ir_measures.calc_aggregate(
        parsed, list(ir_measures.read_trec_qrels(qrels_path)), list(ir_measures.read_trec_run(run_path))
    )
    return {str(m): v for m, v in agg.items()}


def test_hand_computed_tiny_example(tmp_path):
    # q1: relevant a#1 at rank 2 -> RR 1/2, AP 1/2, nDCG 1/log2(3); q2: b#1 at rank 1 -> all 1.
    qrels = write_trec_qrels(tmp_path / "q.txt", [("q1", "a#1", 1), ("q1", "c#1", 0), ("q2", "b#1", 1)])
    run = write_trec_run(tmp_path / "r.trec", [("q1", "x#1", 1, 2.0), ("q1", "a#1", 2, 1.0), ("q2", "b#1", 1, 5.0)])
    assert evaluate_job.main(["--run", run, "--qrels", qrels, "--output", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(metrics) == DEFAULTS
    assert metrics["RR@10"] == pytest.approx((0.5 + 1.0) / 2)
    assert metrics["AP"] == pytest.approx((0.5 + 1.0) / 2)
    assert metrics["R@10"] == pytest.approx(1.0)
    assert metrics["nDCG@10"] == pytest.approx((1 / math.log2(3) + 1.0) / 2)
    assert metrics["nDCG@5"] == pytest.approx(metrics["nDCG@10"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_ir_measures_on_random_runs(tmp_path, seed):
    qrels_rows, run_rows = random_qrels_and_run(seed)
    qrels = write_trec_qrels(tmp_path / "qrels.txt", qrels_rows)
    run = write_trec_run(tmp_path / "run.trec", run_rows)
    extra = ["P@5", "nDCG(cutoff=20)", "R@100", "P(rel=2)@10"]
    out = tmp_path / "out"
    status = evaluate_job.main(
        ["--run", run, "--qrels", qrels, "--output", str(out), "--measure", "P@5,nDCG(cutoff=20)",
         "--measure", "R@100", "--measure", "P(rel=2)@10"]
    )
    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    expected = independent(DEFAULTS + extra, qrels, run)
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-12), name

    per_query = pq.read_table(out / "per_query.parquet").to_pandas()
    assert list(per_query.columns) == ["query_id", "measure", "value"]
    by_query = {
        (m.query_id, str(m.measure)): m.value
        for m in ir_measures.iter_calc(
            [ir_measures.parse_measure(x) for x in DEFAULTS + extra],
            list(ir_measures.read_trec_qrels(qrels)),
            list(ir_measures.read_trec_run(run)),
        )
    }
    got = {(r.query_id, r.measure): r.value for r in per_query.itertuples()}
    assert got.keys() == by_query.keys()
    for key, value in by_query.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    # the mean of the per-query values is the aggregate (every judged query counted once)
    ndcg = per_query[per_query.measure == "nDCG@10"].value
    assert ndcg.mean() == pytest.approx(metrics["nDCG@10"])


def test_beir_tsv_and_trec_qrels_give_the_same_metrics(tmp_path):
    qrels_rows, run_rows = random_qrels_and_run(7)
    trec = write_trec_qrels(tmp_path / "qrels.txt", qrels_rows)
    beir = write_beir_qrels(tmp_path / "qrels.tsv", qrels_rows)
    run = write_trec_run(tmp_path / "run.trec", run_rows)
    a = evaluate.evaluate(runs.read_qrels(trec), runs.read_run(run)).aggregate
    b = evaluate.evaluate(runs.read_qrels(beir), runs.read_run(run)).aggregate
    assert a == b
    assert a == pytest.approx(independent(DEFAULTS, trec, run))


def test_qrels_parsing_formats():
    beir = runs.parse_qrels("corpus-id\tquery-id\tscore\nreports/a b.pdf#3\tq1\t2\nx#1\tq2\t0\n")
    assert beir.to_dict("list") == {
        "query_id": ["q1", "q2"], "doc_id": ["reports/a b.pdf#3", "x#1"], "relevance": [2, 0],
    }
    trec = runs.parse_qrels("# comment\nq1 0 reports/a b.pdf#3 2\n\nq1 0 x#1 1\nq1 0 x#1 0\n")
    assert trec.to_dict("list") == {"query_id": ["q1", "q1"], "doc_id": ["reports/a b.pdf#3", "x#1"], "relevance": [2, 1]}
    with pytest.raises(ValueError, match="qrels.txt:2"):
        runs.parse_qrels("q1 0 a#1 1\nq1 a#1\n", source="qrels.txt")
    with pytest.raises(ValueError, match="no corpus/page column"):
        runs.parse_qrels("query-id\tfoo\tscore\nq1\ta\t1\n")
    with pytest.raises(ValueError, match="empty"):
        runs.parse_qrels("\n\n")


def test_results_parquet_equals_trec_run(tmp_path):
    qrels_rows, run_rows = random_qrels_and_run(3)
    qrels = write_trec_qrels(tmp_path / "qrels.txt", qrels_rows)
    run = write_trec_run(tmp_path / "run.trec", run_rows)
    scores = tmp_path / "scores"
    scores.mkdir()
    pq.write_table(results_table(run_rows), scores / "results.parquet")
    expected = independent(DEFAULTS, qrels, run)
    for run_input in (str(scores / "results.parquet"), str(scores)):  # the file, or the job's output folder
        out = tmp_path / "out"
        assert evaluate_job.main(["--run", run_input, "--qrels", qrels, "--output", str(out)]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics == pytest.approx(expected)


def test_unjudged_missing_and_unknown_pages_are_reported(tmp_path):
    write_corpus(tmp_path / "corpus", n_docs=2, pages_per_doc=2)  # doc0.pdf#1..doc1.pdf#2
    qrels = write_trec_qrels(
        tmp_path / "q.txt",
        [("q1", "doc0.pdf#1", 1), ("q2", "doc1.pdf#2", 1), ("q3", "gone.pdf#1", 1), ("q4", "doc0.pdf#2", 0)],
    )
    run = write_trec_run(
        tmp_path / "r.trec",
        [("q1", "doc0.pdf#1", 1, 3.0), ("q1", "ghost.pdf#9", 2, 2.0), ("q4", "doc0.pdf#2", 1, 1.0),
         ("qx", "doc1.pdf#1", 1, 1.0)],
    )
    out = tmp_path / "out"
    evaluate_job.main(["--run", run, "--qrels", qrels, "--output", str(out), "--corpus", str(tmp_path / "corpus")])
    summary = json.loads((out / "summary.json").read_text())
    counts = summary["counts"]
    assert counts["queries_without_judgements_examples"] == ["qx"]
    assert counts["judged_queries_missing_from_run_examples"] == ["q2", "q3"]
    assert counts["judged_queries_without_relevant_pages_examples"] == ["q4"]
    assert counts["run_pages_unknown_to_corpus_examples"] == ["ghost.pdf#9"]
    assert counts["judged_pages_unknown_to_corpus_examples"] == ["gone.pdf#1"]
    assert counts["corpus_pages"] == 4
    text = " ".join(summary["warnings"])
    for needle in ("qx", "q2", "ghost.pdf#9", "gone.pdf#1", "no relevant page"):
        assert needle in text
    # the missing queries count as 0, the unjudged one is left out: ir_measures' convention
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["RR@10"] == pytest.approx(1 / 4)


def test_empty_run_scores_zero_and_says_so(tmp_path):
    qrels = write_trec_qrels(tmp_path / "q.txt", [("q1", "a#1", 1), ("q2", "b#1", 1)])
    (tmp_path / "empty.trec").write_text("")
    out = tmp_path / "out"
    evaluate_job.main(["--run", str(tmp_path / "empty.trec"), "--qrels", qrels, "--output", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == {m: 0.0 for m in DEFAULTS}
    summary = json.loads((out / "summary.json").read_text())
    assert any("run is empty" in w for w in summary["warnings"])
    assert summary["counts"]["run_rows"] == 0


def test_ties_follow_the_evaluator_or_the_runs_ranks():
    qrels = runs.parse_qrels("q1 0 a#1 1\n")
    # the scoring job ranks ties by page_id ascending: a#1 first
    run = runs.parse_trec_run("q1 Q0 a#1 1 1.0 t\nq1 Q0 b#1 2 1.0 t\n")
    by_score = evaluate.evaluate(qrels, run, ["RR"]).aggregate["RR"]
    by_rank = evaluate.evaluate(qrels, run, ["RR"], ranking="rank").aggregate["RR"]
    assert by_score == ir_measures.calc_aggregate([ir_measures.RR], {"q1": {"a#1": 1}}, {"q1": {"a#1": 1.0, "b#1": 1.0}})[ir_measures.RR]
    assert by_score == 0.5  # trec_eval puts b#1 first (page id descending)
    assert by_rank == 1.0


def test_every_measure_sees_one_order_of_tied_scores():
    """ir_measures computes RR@10 with its msmarco provider and P, AP and nDCG with
    pytrec_eval; on tied scores the two broke ties in opposite orders, so one run's RR@10
    said the relevant page was first while its P@1 said it was not."""
    qrels = runs.parse_qrels("q1 0 a#1 1\nq2 0 d#1 1\n")
    run = runs.parse_trec_run("q1 Q0 a#1 1 1.0 t\nq1 Q0 b#1 2 1.0 t\nq1 Q0 c#1 3 0.5 t\n"
                              "q2 Q0 d#1 1 2.0 t\nq2 Q0 e#1 2 2.0 t\n")
    names = ["RR@10", "RR", "P@1", "AP", "nDCG@10", "R@1"]
    by_score = evaluate.evaluate(qrels, run, names).aggregate
    # trec_eval's order: b#1 before a#1, e#1 before d#1; the relevant page second in both
    assert by_score["RR@10"] == by_score["RR"] == by_score["AP"] == 0.5
    assert by_score["P@1"] == by_score["R@1"] == 0.0
    by_rank = evaluate.evaluate(qrels, run, names, ranking="rank").aggregate
    assert by_rank["RR@10"] == by_rank["RR"] == by_rank["P@1"] == by_rank["AP"] == 1.0
    # and where no score ties, "score" is ir_measures' own result on the run as it is, bit for bit
    # (queries in the run's order, not sorted by id: ir_measures sums them in its input's order)
    qids = ["q2", "q10", "q9", "q3"]
    qrels = runs.parse_qrels("".join(f"{q} 0 {q}-{i}#1 1\n" for q in qids for i in range(int(q[1:]))))
    untied = runs.parse_trec_run("".join(f"{q} Q0 {q}-0#1 1 {1.0 + n / 10} t\n{q} Q0 x#1 2 0.5 t\n"
                                         for n, q in enumerate(qids)))  # top scores rise: not the run's order
    direct = ir_measures.calc_aggregate(evaluate.parse_measures(names), qrels, untied)
    assert evaluate.evaluate(qrels, untied, names).aggregate == {str(m): float(v) for m, v in direct.items()}


def test_bad_measure_is_refused_with_a_clear_message(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate_job.main(["--run", "r", "--qrels", "q", "--output", str(tmp_path), "--measure", "nDGC@10"])
    assert "unknown measure 'nDGC@10'" in capsys.readouterr().err


def test_s3_inputs_and_outputs(tmp_path, s3):
    import pyarrow.fs as pafs

    from pipeline.storage import open_filesystem

    s3.make_bucket("eval")
    qrels_rows, run_rows = random_qrels_and_run(5)
    qrels = write_trec_qrels(tmp_path / "qrels.txt", qrels_rows)
    run = write_trec_run(tmp_path / "run.trec", run_rows)
    fs, _ = open_filesystem("s3://eval/x", s3.endpoint_url)
    pafs.copy_files(qrels, "eval/in/qrels.txt", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    pafs.copy_files(run, "eval/in/run.trec", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    status = evaluate_job.main(
        ["--run", "s3://eval/in/run.trec", "--qrels", "s3://eval/in/qrels.txt", "--output", "s3://eval/out/",
         "--endpoint-url", s3.endpoint_url]
    )
    assert status == 0
    with fs.open_input_stream("eval/out/metrics.json") as f:
        metrics = json.loads(f.read())
    assert metrics == pytest.approx(independent(DEFAULTS, qrels, run))
    with fs.open_input_file("eval/out/per_query.parquet") as f:
        assert pq.read_table(f).num_rows == len(DEFAULTS) * len({q for q, _, _ in qrels_rows})


def test_warns_of_cutoffs_deeper_than_the_run_and_of_document_level_qrels():
    """Two silent pitfalls: nDCG@10 on a top-3 run counts only 3 results (a run scored at
    another top-k then compares badly), and qrels that judge documents match no page id."""
    qrels = runs.parse_qrels("q1 0 a#1 1\n")
    run = runs.parse_trec_run("q1 Q0 a#1 1 3.0 t\nq1 Q0 b#1 2 2.0 t\nq1 Q0 c#1 3 1.0 t\n")
    result = evaluate.evaluate(qrels, run, ["nDCG@10", "P@1", "R@3"])
    assert result.diagnostics["run_depth"] == 3
    (deep,) = [w for w in result.warnings if "results per query" in w]
    assert "at most 3" in deep and "nDCG@10" in deep and "R@3" not in deep and "P@1" not in deep
    # not where the run holds every page of the corpus
    whole = evaluate.evaluate(qrels, run, ["nDCG@10"], corpus_page_ids={"a#1", "b#1", "c#1"})
    assert not any("results per query" in w for w in whole.warnings)
    docs = evaluate.evaluate(runs.parse_qrels("q1 0 a 1\n"), run, ["P@1"])
    assert any("qrels judge documents (e.g. 'a'), the run ranks pages" in w for w in docs.warnings)
    assert not any("judge documents" in w for w in result.warnings)


def test_query_ids_that_begin_with_a_hash_are_read_and_comments_still_skipped(tmp_path):
    """A '#' line is a comment only when it is not shaped like a data line: a query named
    '#7' had its judgements and results dropped as comments, and scored nothing."""
    qrels = runs.parse_qrels("# judged 2026-12-06 by the search team\n#7 0 a.pdf#1 1\nq2 0 b.pdf#1 1\n")
    assert qrels.query_id.tolist() == ["#7", "q2"]
    beir = runs.parse_qrels("query-id\tcorpus-id\tscore\n# a comment\n#7\ta.pdf#1\t1\n")
    assert beir.query_id.tolist() == ["#7"]
    run = runs.parse_trec_run("# written by hand\n#7 Q0 a.pdf#1 1 0.9 t\nq2 Q0 b.pdf#1 1 0.8 t\n")
    assert run.query_id.tolist() == ["#7", "q2"]
    result = evaluate.evaluate(qrels, run, ["P@1"])
    assert result.aggregate["P@1"] == 1.0
    # page ids with spaces, a Q0 iteration field; comments that end in a number stay comments
    qrels = runs.parse_qrels("q1 0 a.pdf#1 1\n# 3 annotators 2\n#TODO: check 3 pages 2\n#\n"
                             "#7 0 annual report.pdf#3 1\n#8 Q0 b.pdf#1 1\n")
    assert qrels.query_id.tolist() == ["q1", "#7", "#8"]
    assert qrels.doc_id.tolist() == ["a.pdf#1", "annual report.pdf#3", "b.pdf#1"]
    run = runs.parse_trec_run("#7 Q0 annual report.pdf#3 1 0.9 t\n# 1 2 3 4 5\n")
    assert run.query_id.tolist() == ["#7"] and run.doc_id.tolist() == ["annual report.pdf#3"]
    # a BEIR comment before the header stays a comment
    assert runs.parse_qrels("# note\tx\t1\nquery-id\tcorpus-id\tscore\n#7\ta.pdf#1\t1\n").query_id.tolist() == ["#7"]


def test_the_job_prints_each_warning_once(tmp_path):
    """Warnings are logged as found; the job's end names how many (it printed each a second time)."""
    import subprocess
    import sys

    qrels = write_trec_qrels(tmp_path / "q.txt", [("q1", "a#1", 1), ("q2", "b#1", 1)])
    run = write_trec_run(tmp_path / "r.trec", [("q1", "a#1", 1, 2.0)])  # q2 has no results: one warning
    proc = subprocess.run([sys.executable, "-m", "jobs.evaluate", "--run", run, "--qrels", qrels,
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    warnings = json.loads((tmp_path / "out" / "summary.json").read_text())["warnings"]
    assert warnings and all(proc.stderr.count(w) == 1 for w in warnings), proc.stderr
    assert f"{len(warnings)} warning(s) above" in proc.stderr


def test_gzipped_qrels_and_runs_are_read(tmp_path):
    """The README's ".gz is read as gzip": pyarrow already gunzips by extension, and a second
    gunzip failed on every .gz file (BadGzipFile)."""
    import gzip

    qrels = write_trec_qrels(tmp_path / "q.txt", [("q1", "a#1", 1), ("q2", "b#1", 1)])
    run = write_trec_run(tmp_path / "r.trec", [("q1", "a#1", 1, 2.0), ("q2", "x#1", 1, 1.0)])
    for path in (qrels, run):
        with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
            g.write(f.read())
    assert runs.read_qrels(qrels + ".gz").equals(runs.read_qrels(qrels))
    assert runs.read_run(run + ".gz").equals(runs.read_run(run))
    plain, zipped = tmp_path / "plain", tmp_path / "zipped"
    assert evaluate_job.main(["--run", run, "--qrels", qrels, "--output", str(plain)]) == 0
    assert evaluate_job.main(["--run", run + ".gz", "--qrels", qrels + ".gz", "--output", str(zipped)]) == 0
    assert (plain / "metrics.json").read_text() == (zipped / "metrics.json").read_text()


def test_qrels_of_another_shape_are_named_for_what_they_are():
    """A 3-field line, a run file or a CSV passed as qrels: the message says what qrels look
    like (it said a BEIR header had no query column)."""
    for text in ("q-revenue 0 reports/2023/annual.pdf#1\n", "query-id,corpus-id,score\nq1,a#1,1\n"):
        with pytest.raises(ValueError, match="neither a TREC qrels line .* nor a BEIR TSV header"):
            runs.parse_qrels(text, source="qrels.txt")
    with pytest.raises(ValueError, match="shape of a TREC run line"):
        runs.parse_qrels("q1 Q0 a#1 1 3.5 mytag\n")


def test_a_run_that_shares_no_query_with_the_qrels_is_refused(tmp_path, capsys):
    """Every metric would be 0 and the job succeeded: almost surely the wrong qrels file."""
    qrels = runs.parse_qrels("nomatch1 0 a#1 1\nnomatch2 0 b#1 1\n")
    run = runs.parse_trec_run("q1 Q0 a#1 1 3.0 t\n")
    with pytest.raises(ValueError, match="share none"):
        evaluate.evaluate(qrels, run, ["P@1"])
    # one query in common is a partial run: evaluated, with its warnings
    some = evaluate.evaluate(runs.parse_qrels("q1 0 a#1 1\nq2 0 b#1 1\n"), run, ["P@1"])
    assert some.aggregate["P@1"] == 0.5
    q = write_trec_qrels(tmp_path / "q.txt", [("nomatch1", "a#1", 1)])
    r = write_trec_run(tmp_path / "r.trec", [("q1", "a#1", 1, 3.0)])
    assert evaluate_job.main(["--run", r, "--qrels", q, "--output", str(tmp_path / "out")]) == 2
    assert "share none" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_no_top_k_advice_for_a_run_that_holds_the_whole_smaller_corpus(tmp_path):
    """Scored at top-k 10 on an 8-page corpus: the run holds every page, so 'score with a
    top-k of at least the largest cutoff' cannot be followed; the scoring summary beside the
    run says so."""
    qrels = runs.parse_qrels("q1 0 a#1 1\n")
    run = runs.parse_trec_run("q1 Q0 a#1 1 3.0 t\nq1 Q0 b#1 2 2.0 t\nq1 Q0 c#1 3 1.0 t\n")
    assert not any("results per query" in w
                   for w in evaluate.evaluate(qrels, run, ["nDCG@10"], scored_top_k=10).warnings)
    assert any("results per query" in w for w in evaluate.evaluate(qrels, run, ["nDCG@10"], scored_top_k=3).warnings)
    folder = tmp_path / "scored"
    folder.mkdir()
    pq.write_table(results_table([("q1", "a#1", 1, 3.0), ("q1", "b#1", 2, 2.0)]), folder / "results.parquet")
    (folder / "summary.json").write_text(json.dumps({"job": "score_queries", "top_k": 10, "n_results": 2}))
    q = write_trec_qrels(tmp_path / "q.txt", [("q1", "a#1", 1)])
    assert evaluate_job.main(["--run", str(folder), "--qrels", q, "--output", str(tmp_path / "out")]) == 0
    assert not any("results per query" in w
                   for w in json.loads((tmp_path / "out" / "summary.json").read_text())["warnings"])


def test_the_job_reports_bad_inputs_in_one_line_and_keeps_other_jobs_folders(tmp_path, capsys):
    """A missing run or qrels is one line and exit 2 (it was an 'unexpected' error with a
    traceback file, whose advice --debug the job refused); --output holding another job's
    summary.json (a scoring run) is refused and left as it was (it was replaced)."""
    import subprocess
    import sys

    q = write_trec_qrels(tmp_path / "q.txt", [("q1", "a#1", 1)])
    r = write_trec_run(tmp_path / "r.trec", [("q1", "a#1", 1, 3.0)])
    for argv, needle in ((["--run", str(tmp_path / "nope"), "--qrels", q], "nope"),
                         (["--run", r, "--qrels", str(tmp_path / "qrel.txt")], "qrel.txt")):
        assert evaluate_job.main([*argv, "--output", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert needle in err and "traceback" not in err
    scored = tmp_path / "scored"
    scored.mkdir()
    for before in (json.dumps({"job": "score_queries", "top_k": 10, "n_results": 1}),
                   json.dumps({"top_k": 10, "n_results": 1})):  # a scoring summary of before it named its job
        (scored / "summary.json").write_text(before)
        assert evaluate_job.main(["--run", r, "--qrels", q, "--output", str(scored)]) == 2
        assert "another job (score_queries" in capsys.readouterr().err
        assert (scored / "summary.json").read_text() == before and not (scored / "metrics.json").exists()
    # its own earlier output is replaced as before; --debug is taken
    proc = subprocess.run([sys.executable, "-m", "jobs.evaluate", "--run", r, "--qrels", q, "--output",
                           str(tmp_path / "own"), "--debug"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert evaluate_job.main(["--run", r, "--qrels", q, "--output", str(tmp_path / "own")]) == 0
