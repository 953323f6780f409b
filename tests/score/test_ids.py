"""Page ids in TREC files: one reversible encoding (``%`` and whitespace percent-encoded),
written by the scoring job's run.trec and undone wherever TREC files are read, so that the
evaluation compares exact page ids whatever the formats of the run and the qrels."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.config import EvaluateConfig, ScoreConfig
from pipeline.devtools.judged import results_table, write_beir_qrels
from pipeline.evaluate import runs
from pipeline.evaluate.flow import run_evaluation

AWKWARD = [
    "reports/annual report 100%.pdf#2",
    "a%20b.pdf#1",
    "a b.pdf#1",
    "a%2520b.pdf#1",
    "日本 語.pdf#3",
    "x\ty.pdf#1",
    "line\nbreak\r\n.pdf#1",
    "wide\u3000space\u00a0nbsp\u2028sep.pdf#1",
    "100%.pdf#1",
    "%41%zz%.pdf#1",
    "plain/doc.pdf#12",
    "hash#in#name.pdf#4",
    "",
]


@pytest.mark.parametrize("page_id", AWKWARD)
def test_trec_id_round_trips_and_is_one_whitespace_free_field(page_id):
    encoded = schema.trec_id(page_id)
    assert schema.from_trec_id(encoded) == page_id
    assert not any(c.isspace() for c in encoded)
    if page_id:
        assert encoded.split() == [encoded] and encoded.splitlines() == [encoded]


def test_trec_id_is_injective_where_the_old_encoding_collided():
    encoded = [schema.trec_id(p) for p in AWKWARD]
    assert len(set(encoded)) == len(AWKWARD)
    assert schema.trec_id("a b.pdf#1") == "a%20b.pdf#1"
    assert schema.trec_id("a%20b.pdf#1") == "a%2520b.pdf#1"


def test_trec_id_touches_only_percent_and_whitespace():
    for readable in ("plain/doc.pdf#12", "日本語/ü-é_(1)+[x]~!$&'*,;=:@?.pdf#3", "hash#in#name.pdf#4"):
        assert schema.trec_id(readable) == readable
        assert schema.from_trec_id(readable) == readable
    assert schema.trec_id("reports/annual report 100%.pdf#2") == "reports/annual%20report%20100%25.pdf#2"
    assert schema.trec_id("日本 語.pdf#3") == "日本%20語.pdf#3"
    assert schema.trec_id("x\ty.pdf#1") == "x%09y.pdf#1"
    assert schema.trec_id("a\nb\rc") == "a%0Ab%0Dc"
    assert schema.trec_id("a\u3000b") == "a%E3%80%80b"  # UTF-8 bytes, as percent-encoding does


def test_from_trec_id_leniency_and_errors():
    assert schema.from_trec_id("a b.pdf#1") == "a b.pdf#1"  # raw spaces: nothing to decode
    assert schema.from_trec_id("100%.pdf#1") == "100%.pdf#1"  # a "%" that starts no escape
    assert schema.from_trec_id("%e6%97%a5.pdf#1") == "日.pdf#1"  # lower-case hex too
    with pytest.raises(ValueError, match="not UTF-8"):
        schema.from_trec_id("bad%FF.pdf#1")


def test_trec_parsers_decode_page_ids():
    ids = ["a b.pdf#1", "a%20b.pdf#1", "x\ty.pdf#1", "日本 語.pdf#3", "reports/annual report 100%.pdf#2"]
    run_text = "".join(f"q1 Q0 {schema.trec_id(p)} {r} {10 - r} tag\n" for r, p in enumerate(ids, start=1))
    assert runs.parse_trec_run(run_text).doc_id.tolist() == ids
    qrels_text = "".join(f"q1 0 {schema.trec_id(p)} 1\n" for p in ids)
    assert runs.parse_qrels(qrels_text).doc_id.tolist() == ids
    # BEIR TSV holds raw ids: a "%" there is a "%", a space a space.
    beir = "query-id\tcorpus-id\tscore\n" + "".join(f"q1\t{p}\t1\n" for p in ids if "\t" not in p)
    assert runs.parse_qrels(beir).doc_id.tolist() == [p for p in ids if "\t" not in p]
    with pytest.raises(ValueError, match=r"run:1: .*not UTF-8"):
        runs.parse_trec_run("q1 Q0 bad%FF#1 1 1.0 tag\n")


RESULT_ROWS = [  # (query_id, page_id, rank, score): what results.parquet holds
    ("q1", "a b.pdf#1", 1, 3.0),
    ("q1", "a%20b.pdf#1", 2, 2.0),
    ("q1", "reports/annual report 100%.pdf#2", 3, 1.0),
    ("q2", "日本 語.pdf#3", 1, 2.5),
    ("q2", "x\ty.pdf#1", 2, 2.25),
    ("q2", "plain.pdf#1", 3, 0.5),
]


@pytest.fixture
def scored(tmp_path):
    """A scoring output folder written by the scoring flow's own writer."""
    from pipeline.score import flow

    out = tmp_path / "scores"
    cfg = ScoreConfig(corpus=str(tmp_path / "corpus"), queries=str(tmp_path / "q.jsonl"), output=str(out), top_k=3)
    flow._write_outputs(cfg, results_table(RESULT_ROWS), schema.QUERY_EMBEDDINGS_SCHEMA.empty_table(), {})
    return out


def test_run_trec_from_the_scoring_writer_reads_back_exact_ids(scored):
    lines = (scored / schema.RUN_FILE).read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and all(len(line.split()) == 6 for line in lines[:-1])  # one line per row
    assert len(lines) - 1 == len(RESULT_ROWS)
    from_trec = runs.read_run(str(scored / schema.RUN_FILE))
    from_parquet = runs.read_run(str(scored / schema.RESULTS_FILE))
    assert from_trec.doc_id.tolist() == [p for _, p, _, _ in RESULT_ROWS]
    assert from_trec.to_dict("list") == from_parquet.to_dict("list")
    assert from_trec.groupby("query_id").doc_id.nunique().tolist() == [3, 3]  # no collision


@pytest.mark.parametrize("run_file", [schema.RUN_FILE, schema.RESULTS_FILE])
def test_beir_and_trec_qrels_with_spaces_match_the_run(scored, tmp_path, run_file):
    judged = [("q1", "a%20b.pdf#1", 1), ("q2", "日本 語.pdf#3", 2), ("q2", "x\ty.pdf#1", 1)]
    # BEIR TSV cannot hold a tab inside an id; it judges the other two, raw.
    beir = write_beir_qrels(tmp_path / "qrels.tsv", [j for j in judged if "\t" not in j[1]])
    trec = tmp_path / "qrels.txt"
    trec.write_text("".join(f"{q} 0 {schema.trec_id(p)} {r}\n" for q, p, r in judged), encoding="utf-8")
    expected_rr = {"beir": {"q1": 1 / 2, "q2": 1.0}, "trec": {"q1": 1 / 2, "q2": 1.0}}
    for name, qrels in (("beir", beir), ("trec", str(trec))):
        out = tmp_path / f"eval-{name}-{run_file}"
        summary = run_evaluation(EvaluateConfig(run=str(scored / run_file), qrels=qrels, output=str(out)))
        per_query = pq.read_table(out / "per_query.parquet").to_pandas()
        rr = per_query[per_query.measure == "RR@10"].set_index("query_id").value.to_dict()
        assert rr == pytest.approx(expected_rr[name]), (name, rr)
        assert summary["metrics"]["RR@10"] == pytest.approx(0.75)
        assert json.loads((out / "metrics.json").read_text())["RR@10"] == pytest.approx(0.75)
        if name == "trec":  # both judged q2 pages retrieved at ranks 1 and 2
            ndcg = per_query[per_query.measure == "nDCG@10"].set_index("query_id").value.to_dict()
            assert ndcg["q2"] == pytest.approx(1.0)
