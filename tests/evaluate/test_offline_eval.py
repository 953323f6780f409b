"""The offline evaluation chain: config, scoring, metrics, history, comparison, report, exit status."""

from __future__ import annotations

import json
import os
import re

import ir_measures
import pyarrow.parquet as pq
import pytest
import yaml

import pipeline

from pipeline.devtools.judged import results_table, write_corpus, write_queries, write_query_embeddings, write_trec_qrels
from jobs import offline_eval
from pipeline.config import offline_eval_config
from pipeline.evaluate import history
from pipeline.storage import read_bytes

QIDS = [f"q{i}" for i in range(8)]


@pytest.fixture()
def setup(tmp_path):
    """A 12-page corpus, 8 queries each judging one page relevant, and a config file."""
    vectors = write_corpus(tmp_path / "corpus")
    pages = sorted(vectors)
    targets = {q: pages[i] for i, q in enumerate(QIDS)}
    qrels = write_trec_qrels(tmp_path / "qrels.txt", [(q, targets[q], 1) for q in QIDS])
    queries = write_queries(tmp_path / "queries.jsonl", QIDS)
    config = tmp_path / "eval.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "corpus": str(tmp_path / "corpus"),
                "queries": queries,
                "qrels": qrels,
                "output_root": str(tmp_path / "runs"),
                "top_k": 10,
                "max_visual_tokens": 768,
                "measures": ["P@1"],
                "regression": {"max_drop": 0.05},
            }
        )
    )
    return {"tmp": tmp_path, "config": str(config), "targets": targets, "pages": pages, "vectors": vectors,
            "qrels": qrels}


def _run_file(tmp, name, targets, pages, hits):
    """A results.parquet where the first ``hits`` queries rank their target first and the
    others rank it third."""
    rows = []
    for i, q in enumerate(QIDS):
        others = [p for p in pages if p != targets[q]][:4]
        order = [targets[q]] + others if i < hits else others[:2] + [targets[q]] + others[2:]
        rows += [(q, p, r, float(10 - r)) for r, p in enumerate(order, start=1)]
    path = tmp / f"{name}.parquet"
    pq.write_table(results_table(rows), path)
    return str(path)


def _summary(tmp, run_id):
    return json.loads((tmp / "runs" / run_id / "summary.json").read_text())


def test_history_append_and_regression_exit(setup, capsys):
    tmp = setup["tmp"]
    good = _run_file(tmp, "good", setup["targets"], setup["pages"], hits=8)
    same = _run_file(tmp, "same", setup["targets"], setup["pages"], hits=8)
    worse = _run_file(tmp, "worse", setup["targets"], setup["pages"], hits=5)

    assert offline_eval.main(["--config", setup["config"], "--run-id", "day1", "--run", good]) == 0
    first = _summary(tmp, "day1")
    assert first["metrics"]["RR@10"] == pytest.approx(1.0) and first["previous_run_id"] is None
    assert first["regression"] is False and "no regression" in first["result"]

    assert offline_eval.main(["--config", setup["config"], "--run-id", "day2", "--run", same]) == 0
    capsys.readouterr()
    status = offline_eval.main(["--config", setup["config"], "--run-id", "day3", "--run", worse])
    assert status == offline_eval.EXIT_REGRESSION
    out = capsys.readouterr().out
    assert "REGRESSION in run day3" in out

    third = _summary(tmp, "day3")
    # 5 queries at rank 1, 3 at rank 3: the values ir_measures gives on the same inputs
    expected = ir_measures.calc_aggregate(
        [ir_measures.RR @ 10, ir_measures.P @ 1],
        list(ir_measures.read_trec_qrels(setup["qrels"])),
        {q: {p: s for qq, p, r, s in pq.read_table(worse).to_pandas()[["query_id", "page_id", "rank", "score"]]
             .itertuples(index=False) if qq == q} for q in QIDS},
    )
    assert third["metrics"]["RR@10"] == pytest.approx(expected[ir_measures.RR @ 10]) == pytest.approx((5 + 3 / 3) / 8)
    assert third["metrics"]["P@1"] == pytest.approx(5 / 8)
    assert third["regression"] is True and third["exit_status"] == 3
    assert third["previous_run_id"] == "day2"
    assert any(line.startswith("RR@10 0.7500 vs previous 1.0000 (day2)") for line in third["regressions"])
    assert third["result"].startswith("REGRESSION in run day3")

    table = history.read_history(str(tmp / "runs" / "history"))
    assert list(table.run_id) == ["day1", "day2", "day3"]
    assert list(table.regression) == [False, False, True]
    row = table.iloc[-1]
    assert row["model"] == "tiny/colqwen2" and row["max_visual_tokens"] == 768 and row["top_k"] == 10
    assert row["corpus_fingerprint"] == history.corpus_info(str(tmp / "corpus")).fingerprint
    assert row["corpus_pages"] == 12 and row["evaluated_queries"] == 8
    assert row["output_uri"] == str(tmp / "runs" / "day3")
    assert row["code_version"].startswith(pipeline.__version__)
    assert row["P@1"] == pytest.approx(5 / 8)

    day3 = tmp / "runs" / "day3"
    assert json.loads((day3 / "metrics.json").read_text()) == third["metrics"]
    assert pq.read_table(day3 / "per_query.parquet").num_rows == 8 * 6
    report_text = (day3 / "report.md").read_text()
    assert "**REGRESSION** vs previous" in report_text and "![metrics over the history](history.png)" in report_text
    assert (day3 / "history.png").read_bytes()[:4] == b"\x89PNG"
    resolved = yaml.safe_load((day3 / "config.yaml").read_text())
    assert resolved["run_id"] == "day3" and resolved["run"] == worse and resolved["top_k"] == 10

    # rerunning a run id replaces its row: still three runs
    offline_eval.main(["--config", setup["config"], "--run-id", "day3", "--run", worse])
    assert len(history.read_history(str(tmp / "runs" / "history"))) == 3


def test_drift_is_caught_by_the_pinned_baseline(setup):
    tmp = setup["tmp"]
    runs = [_run_file(tmp, f"h{h}", setup["targets"], setup["pages"], hits=h) for h in (8, 7, 6)]
    config = yaml.safe_load(open(setup["config"]))
    config["regression"] = {"max_drop": 0.1, "measures": ["RR@10"]}
    (tmp / "drift.yaml").write_text(yaml.safe_dump(config))
    cfg = ["--config", str(tmp / "drift.yaml")]
    # each step drops RR@10 by 1/12 (< 0.1) against the previous run; two steps exceed it
    assert offline_eval.main(cfg + ["--run-id", "a", "--run", runs[0], "--pin-baseline"]) == 0
    assert offline_eval.main(cfg + ["--run-id", "b", "--run", runs[1]]) == 0
    assert offline_eval.main(cfg + ["--run-id", "c", "--run", runs[2]]) == 3
    summary = _summary(tmp, "c")
    assert [line.split(" vs ")[1].split()[0] for line in summary["regressions"]] == ["baseline"] * len(summary["regressions"])
    assert summary["comparisons"]["previous"]["reference_run_id"] == "b"
    assert summary["comparisons"]["baseline"]["reference_run_id"] == "a"
    assert not any(c["regressed"] for c in summary["comparisons"]["previous"]["changes"].values())
    # no gating: same inputs, exit 0, still recorded as a regression
    assert offline_eval.main(cfg + ["--run-id", "d", "--run", runs[2], "--baseline", "a",
                                    "--no-fail-on-regression"]) == 0
    assert _summary(tmp, "d")["regression"] is True


def test_flags_override_yaml_and_bad_config_fails_fast(setup, capsys):
    tmp = setup["tmp"]
    cfg = offline_eval_config(setup["config"], {"top_k": 5, "max_drop": 0.2, "extra_measures": ["R@100"]})
    assert cfg.top_k == 5 and cfg.regression.max_drop == 0.2
    assert cfg.measures == ("nDCG@5", "nDCG@10", "R@10", "RR@10", "AP", "P@1", "R@100")
    assert cfg.history_uri == str(tmp / "runs") + "/history"

    (tmp / "bad.yaml").write_text("corpus: x\nqueries: y\nqrels: z\noutput_root: o\ntopk: 3\n")
    with pytest.raises(SystemExit):
        offline_eval.main(["--config", str(tmp / "bad.yaml")])
    assert "unknown settings ['topk']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs 'qrels'"):
        offline_eval_config(None, {"corpus": "c", "queries": "q", "output_root": "o"})

    good = _run_file(tmp, "good", setup["targets"], setup["pages"], hits=8)
    capsys.readouterr()
    assert offline_eval.main(["--config", setup["config"], "--max-visual-tokens", "1024", "--run", good]) == 2
    assert re.search("embedded with max_visual_tokens=768.*asks for 1024", capsys.readouterr().err)


def test_end_to_end_with_the_scoring_job(setup, ray_session):
    """queries -> scoring job (precomputed query embeddings, no model) -> metrics -> history."""
    tmp = setup["tmp"]
    config = yaml.safe_load(open(setup["config"]))
    config["score_args"] = ["--num-actors", "1"]  # one actor is plenty for 12 pages; CI has 2 cores
    (tmp / "e2e.yaml").write_text(yaml.safe_dump(config))
    setup = {**setup, "config": str(tmp / "e2e.yaml")}
    good = write_query_embeddings(tmp / "qe_good.parquet", setup["targets"], setup["vectors"], noise=0.05)
    bad = write_query_embeddings(tmp / "qe_bad.parquet", setup["targets"], setup["vectors"], noise=5.0)
    assert offline_eval.main(["--config", setup["config"], "--run-id", "e1", "--query-embeddings", good]) == 0
    first = _summary(tmp, "e1")
    assert first["metrics"]["RR@10"] == pytest.approx(1.0)  # each query's vectors are its page's
    scores = tmp / "runs" / "e1" / "scores"
    assert (scores / "results.parquet").exists() and (scores / "run.trec").exists()
    # the metrics are ir_measures' on the scoring job's TREC output
    expected = ir_measures.calc_aggregate(
        [ir_measures.nDCG @ 10, ir_measures.AP],
        list(ir_measures.read_trec_qrels(setup["qrels"])),
        list(ir_measures.read_trec_run(str(scores / "run.trec"))),
    )
    assert first["metrics"]["nDCG@10"] == pytest.approx(expected[ir_measures.nDCG @ 10])
    assert first["metrics"]["AP"] == pytest.approx(expected[ir_measures.AP])

    status = offline_eval.main(["--config", setup["config"], "--run-id", "e2", "--query-embeddings", bad])
    second = _summary(tmp, "e2")
    assert second["metrics"]["RR@10"] < 0.9
    assert status == 3 and second["regression"] is True
    assert list(history.read_history(str(tmp / "runs" / "history")).run_id) == ["e1", "e2"]

    # --model names another model than the reused vectors': --allow-model-mismatch lets it through,
    # and the history records the model that made the vectors (it recorded the config's, 2026-12-06)
    from pipeline import schema

    table = pq.read_table(good)
    pq.write_table(table.replace_schema_metadata({schema.META_MODEL: b"tiny/colqwen2"}), tmp / "qe_meta.parquet")
    config["score_args"] = ["--num-actors", "1", "--allow-model-mismatch"]
    (tmp / "e3.yaml").write_text(yaml.safe_dump(config))
    assert offline_eval.main(["--config", str(tmp / "e3.yaml"), "--run-id", "e3", "--model", "m/c",
                              "--query-embeddings", str(tmp / "qe_meta.parquet")]) == 0
    assert _summary(tmp, "e3")["scoring"]["model"] == "tiny/colqwen2"
    assert history.read_history(str(tmp / "runs" / "history")).iloc[-1]["model"] == "tiny/colqwen2"


def test_outputs_and_history_on_s3(setup, s3):
    tmp = setup["tmp"]
    s3.make_bucket("evalruns")
    good = _run_file(tmp, "good", setup["targets"], setup["pages"], hits=8)
    worse = _run_file(tmp, "worse", setup["targets"], setup["pages"], hits=6)
    base = ["--config", setup["config"], "--output-root", "s3://evalruns/runs", "--endpoint-url", s3.endpoint_url]
    assert offline_eval.main(base + ["--run-id", "s1", "--run", good, "--pin-baseline"]) == 0
    assert offline_eval.main(base + ["--run-id", "s2", "--run", worse]) == 3
    table = history.read_history("s3://evalruns/runs/history", s3.endpoint_url)
    assert list(table.run_id) == ["s1", "s2"] and list(table.regression) == [False, True]
    summary = json.loads(read_bytes("s3://evalruns/runs/s2/summary.json", s3.endpoint_url))
    assert summary["comparisons"]["baseline"]["reference_run_id"] == "s1"
    assert summary["outputs"]["report"] == "s3://evalruns/runs/s2/report.md"


def test_a_failed_run_leaves_a_summary_and_a_failed_history_row(setup):
    """The history records the failure (no metrics), and the next run compares with the
    last run that succeeded, not with the failed one."""
    tmp = setup["tmp"]
    # a missing input is one line and exit 2 (it was an unexpected error, exit 1)
    assert offline_eval.main(["--config", setup["config"], "--run-id", "broken", "--run", str(tmp / "missing.trec")]) == 2
    summary = _summary(tmp, "broken")
    assert summary["exit_status"] == 2 and summary["result"].startswith("FAILED run broken: EvaluationInputError")
    assert "--run" in summary["result"] and "missing.trec" in summary["result"]
    table = history.read_history(str(tmp / "runs" / "history"))
    assert list(table.run_id) == ["broken"] and list(table.status) == ["failed"]
    assert table.iloc[0]["error"].startswith("FAILED run broken")
    from pipeline.evaluate import regression

    assert regression.previous_run(table, "next") is None


def test_an_earlier_run_is_recorded_with_its_own_top_k_and_model(setup, caplog):
    """--run of a scoring output: the history row takes the run's top-k and model from its
    summary.json, not the config's (a run scored at top-1 was recorded as top-10 and its drop
    looked unexplained); the comparison names top_k among what changed."""
    tmp = setup["tmp"]
    assert offline_eval.main(["--config", setup["config"], "--run-id", "day1",
                              "--run", _run_file(tmp, "good", setup["targets"], setup["pages"], hits=8)]) == 0
    folder = tmp / "scored"
    folder.mkdir()
    os.replace(_run_file(tmp, "r", setup["targets"], setup["pages"], hits=8), folder / "results.parquet")
    (folder / "summary.json").write_text(json.dumps({"top_k": 1, "model": "m/other", "n_results": 8}))
    assert offline_eval.main(["--config", setup["config"], "--run-id", "day2", "--no-fail-on-regression",
                              "--run", str(folder / "results.parquet")]) in (0, offline_eval.EXIT_REGRESSION)
    row = history.read_history(str(tmp / "runs" / "history")).iloc[-1]
    assert row["run_id"] == "day2" and row["top_k"] == 1 and row["model"] == "m/other"
    assert "was scored at top-k 1, the configured top-k is 10" in caplog.text
    assert any("scored at top-k 1" in w for w in _summary(tmp, "day2")["warnings"])  # it was only logged
    assert "top_k" in json.dumps(_summary(tmp, "day2")["comparisons"])


def test_flags_take_a_measure_list_and_the_ranking(setup):
    """--measure takes comma lists as jobs.evaluate does (it was refused as one unknown name),
    and --ranking, a YAML key, has its flag."""
    tmp = setup["tmp"]
    run = _run_file(tmp, "good", setup["targets"], setup["pages"], hits=8)
    assert offline_eval.main(["--config", setup["config"], "--run-id", "d1", "--run", run,
                              "--measure", "P@3,nDCG(cutoff=3)", "--ranking", "rank"]) == 0
    summary = _summary(tmp, "d1")
    assert {"P@3", "nDCG@3", "P@1"} <= set(summary["metrics"])
    assert yaml.safe_load((tmp / "runs" / "d1" / "config.yaml").read_text())["ranking"] == "rank"


def test_a_gzipped_trec_run_finds_the_summary_beside_it(tmp_path):
    """--run OUT/run.trec.gz reads OUT/summary.json, as run.trec does (it looked in run.trec.gz/)."""
    from pipeline.evaluate import flow

    (tmp_path / "summary.json").write_text(json.dumps({"top_k": 3, "model": "m/x", "n_results": 6}))
    for name in ("run.trec.gz", "run.trec", "results.parquet", ""):
        assert flow._run_summary(str(tmp_path / name) if name else str(tmp_path), None)["top_k"] == 3, name


def test_a_baseline_that_cannot_be_found_is_refused(setup, capsys):
    """--baseline with a typo (a run id not in the history, a metrics.json that is not there)
    exits 2 naming it; it was a warning and 'no regression', which hid the regression that
    the pinned baseline catches."""
    tmp = setup["tmp"]
    good = _run_file(tmp, "good", setup["targets"], setup["pages"], hits=8)
    bad = _run_file(tmp, "bad", setup["targets"], setup["pages"], hits=2)
    assert offline_eval.main(["--config", setup["config"], "--run-id", "good", "--run", good, "--pin-baseline"]) == 0
    for baseline in ("nosuchrun", str(tmp / "missing" / "metrics.json")):
        capsys.readouterr()
        assert offline_eval.main(["--config", setup["config"], "--run-id", "w3", "--run", bad,
                                  "--baseline", baseline]) == 2
        err = capsys.readouterr().err
        assert f"--baseline {baseline}" in err and "latest: good" in err, err
        assert _summary(tmp, "w3")["result"].startswith("FAILED run w3")
    # a rerun of the good run with a typo keeps its results (it replaced them with a failed row,
    # and the pinned baseline then had no metrics: regressions went unseen)
    good_summary = (tmp / "runs" / "good" / "summary.json").read_text()
    good_config = (tmp / "runs" / "good" / "config.yaml").read_text()
    for typo in (["--run", good, "--qrels", str(tmp / "qrel.txt")], ["--run", str(tmp / "goood.parquet")]):
        assert offline_eval.main(["--config", setup["config"], "--run-id", "good", *typo]) == 2
        assert (tmp / "runs" / "good" / "summary.json").read_text() == good_summary
        assert (tmp / "runs" / "good" / "config.yaml").read_text() == good_config  # written only once inputs hold
    capsys.readouterr()
    assert offline_eval.main(["--config", setup["config"], "--run-id", "good", "--run", good,
                              "--baseline", "good"]) == 2
    assert "--baseline good is this run" in capsys.readouterr().err
    assert offline_eval.main(["--config", setup["config"], "--run-id", "w4", "--run", bad]) == offline_eval.EXIT_REGRESSION
    assert _summary(tmp, "w4")["baseline"] == "run good"


def test_a_mistyped_qrels_fails_before_any_scoring(setup, capsys):
    """The qrels are read before the scoring job runs (a typo failed only after a whole
    scoring run); no Ray is started, nothing is scored."""
    tmp = setup["tmp"]
    assert offline_eval.main(["--config", setup["config"], "--run-id", "q", "--qrels", str(tmp / "qrel.txt")]) == 2
    assert "qrel.txt" in capsys.readouterr().err
    assert not (tmp / "runs" / "q" / "scores").exists()
    assert history.read_history(str(tmp / "runs" / "history")).iloc[-1]["status"] == "failed"


def test_a_backfill_is_recorded_at_the_time_it_stands_for(setup, capsys):
    """--run-time (jobs.schedule_eval --now passes it): the history orders the backfilled run by
    its period, and compares it with the run before that time (it was recorded at when it ran,
    after every later run)."""
    tmp = setup["tmp"]
    run = _run_file(tmp, "good", setup["targets"], setup["pages"], hits=8)
    assert offline_eval.main(["--config", setup["config"], "--run-id", "dec", "--run", run,
                              "--run-time", "2026-12-06T01:00:00Z"]) == 0
    assert offline_eval.main(["--config", setup["config"], "--run-id", "nov", "--run", run,
                              "--run-time", "2026-11-03"]) == 0
    table = history.read_history(str(tmp / "runs" / "history"))
    assert list(table.run_id) == ["nov", "dec"]
    assert _summary(tmp, "nov")["previous_run_id"] is None
    with pytest.raises(SystemExit) as exc:
        offline_eval.main(["--config", setup["config"], "--run-time", "yesterday"])
    assert exc.value.code == 2 and "is not an ISO time" in capsys.readouterr().err
