"""jobs.score_queries end to end on a local Ray: oracle equality, invariance, edge cases, S3, job submit."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs import score_queries
from pipeline import schema
from pipeline.devtools.synthetic import (
    corpus_metadata,
    oracle_ranking,
    random_pages,
    random_queries,
    write_corpus,
    write_queries_jsonl,
    write_query_embeddings,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 3-file corpus of 29 ragged pages and 6 ragged queries with stored embeddings."""
    folder = tmp_path_factory.mktemp("scoring")
    rng = np.random.default_rng(42)
    pages = random_pages(29, rng, max_len=35, doc_prefix="dossier é")  # a space, as real paths have
    queries = random_queries(6, rng)
    ids = ["q1", "q2", "007", "ü4", "q5", "q6"]
    return {
        "pages": pages, "queries": queries, "ids": ids,
        "corpus": write_corpus(folder / "emb", pages, n_files=3),
        "queries_file": write_queries_jsonl(folder / "q.jsonl", ids),
        "qemb": write_query_embeddings(folder / "qemb.parquet", ids, queries),
        "folder": folder,
    }


def run_job(data, out, *extra, k=5):
    argv = ["--corpus", data["corpus"], "--queries", data["queries_file"], "--output", str(out),
            "--top-k", str(k), "--query-embeddings", data["qemb"], *extra]
    assert score_queries.main(argv) == 0
    return pq.read_table(os.path.join(out, "results.parquet"))


def refused(argv, match, capsys):
    """The job refuses: exit 2 and one ``error:`` line that says why (``match``, a regex)."""
    assert score_queries.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(r"^error: .*" + match, err, re.M), err


def test_help_teaches_the_options(capsys):
    with pytest.raises(SystemExit):
        score_queries.main(["--help"])
    text = capsys.readouterr().out
    for word in ("--corpus", "--query-embeddings", "--shard-size-pages", "--allow-model-mismatch", "MaxSim",
                 "run.trec", "page_id"):
        assert word in text


def test_cache_and_read_ahead_are_command_line_options():
    """--cache and --no-prefetch reach the job's configuration (what they do: the test below)."""
    from pipeline.config import score_config

    base = ["--corpus", "c", "--queries", "q.jsonl", "--output", "o", "--top-k", "3"]
    cfg = score_config(vars(score_queries.build_parser().parse_args(base + ["-v"])))
    assert cfg.cache is False and cfg.prefetch is True
    # local paths absolute, as summary.json records them (the corpus was kept as typed)
    assert (cfg.corpus, cfg.queries, cfg.output) == tuple(os.path.abspath(p) for p in ("c", "q.jsonl", "o"))
    cfg = score_config(vars(score_queries.build_parser().parse_args(base + ["--cache", "--no-prefetch"])))
    assert cfg.cache is True and cfg.prefetch is False
    assert "CORPUS/_cache" in score_queries.build_parser().format_help()
    args = score_queries.build_parser().parse_args(base + ["--keep-scorers", "600", "--debug"])
    assert score_config(vars(args)).keep_scorers == 600
    with pytest.raises(ValueError, match="--keep-scorers must be a number of seconds >= 0"):
        score_config({**vars(args), "keep_scorers": -1})


def test_results_equal_the_oracle_and_outputs_are_complete(ray_session, data, tmp_path):
    out = tmp_path / "run"
    results = run_job(data, out, "--shard-size-pages", "7", "--num-actors", "2", k=5)
    assert results.schema.equals(schema.RESULTS_SCHEMA, check_metadata=False)
    truth = oracle_ranking(data["queries"], data["pages"], 5)
    got = results.to_pydict()
    for qi, qid in enumerate(data["ids"]):
        rows = [r for r, q in enumerate(got["query_id"]) if q == qid]
        assert [got["page_id"][r] for r in rows] == [p for p, _ in truth[qi]]
        assert [got["rank"][r] for r in rows] == [1, 2, 3, 4, 5]
        np.testing.assert_allclose([got["score"][r] for r in rows], [s for _, s in truth[qi]], rtol=1e-6)
    # Sorted by query (file order) then rank; doc_id/page_number carried along.
    assert got["query_id"] == [q for q in data["ids"] for _ in range(5)]
    by_page = {p[2]: p for p in data["pages"]}
    assert all(by_page[p][0] == d and by_page[p][1] == n
               for p, d, n in zip(got["page_id"], got["doc_id"], got["page_number"]))
    # run.trec: qid Q0 page_id rank score tag, same rows.
    lines = (out / "run.trec").read_text(encoding="utf-8").splitlines()
    assert len(lines) == results.num_rows
    first = lines[0].split(" ")
    assert all(len(line.split()) == 6 for line in lines)  # the space in page ids is encoded
    assert first[:4] == [got["query_id"][0], "Q0", schema.trec_id(got["page_id"][0]), "1"]
    assert first[2] == got["page_id"][0].replace(" ", "%20") and first[5] == "colqwen2-maxsim"
    assert np.float32(first[4]) == np.float32(got["score"][0])
    # query_embeddings.parquet round-trips the vectors used.
    qe = pq.read_table(out / "query_embeddings.parquet")
    assert qe.schema.equals(schema.QUERY_EMBEDDINGS_SCHEMA, check_metadata=False)
    assert qe.column("query_id").to_pylist() == data["ids"]
    back = schema.arrow_to_embeddings(qe.column("embedding"))
    assert all(np.array_equal(a, b) for a, b in zip(back, data["queries"]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_queries"] == 6 and summary["n_pages"] == 29 and summary["n_shards"] == 5
    assert summary["n_results"] == 30 and summary["pages_scored_per_s"] > 0


def test_results_do_not_depend_on_shards_batches_or_actors(ray_session, data, tmp_path):
    tables = [
        run_job(data, tmp_path / f"r{i}", "--shard-size-pages", shard, "--query-batch-size", batch,
                "--num-actors", actors, k=7)
        for i, (shard, batch, actors) in enumerate([("1", "1", "2"), ("4", "5", "1"), ("auto", "0", "2")])
    ]
    for t in tables[1:]:
        assert t.equals(tables[0])


def test_ties_go_to_the_lower_page_id_across_shards(ray_session, tmp_path):
    rng = np.random.default_rng(0)
    vec = (rng.standard_normal((4, 128)) / 8).astype(np.float16)
    # Ten pages with identical vectors (equal scores), spread over files in a scrambled order.
    names = ["k", "c", "a", "j", "e", "b", "i", "d", "h", "f"]
    pages = [(f"{n}.pdf", 1, f"{n}.pdf#1", vec) for n in names]
    corpus = write_corpus(tmp_path / "emb", pages, n_files=4)
    q = [(rng.standard_normal((3, 128)) / 8).astype(np.float16)]
    data = {"corpus": corpus, "queries_file": write_queries_jsonl(tmp_path / "q.jsonl", ["t"]),
            "qemb": write_query_embeddings(tmp_path / "qe.parquet", ["t"], q)}
    for shard in ("1", "3", "10"):
        got = run_job(data, tmp_path / f"o{shard}", "--shard-size-pages", shard, k=4)
        assert got.column("page_id").to_pylist() == ["a.pdf#1", "b.pdf#1", "c.pdf#1", "d.pdf#1"]
        assert len(set(got.column("score").to_pylist())) == 1


def test_empty_corpus_one_page_and_k_beyond_corpus(ray_session, data, tmp_path):
    empty = write_corpus(tmp_path / "empty", [], n_files=1)
    res = run_job({**data, "corpus": empty}, tmp_path / "e", k=3)
    assert res.num_rows == 0 and res.schema.equals(schema.RESULTS_SCHEMA, check_metadata=False)
    assert (tmp_path / "e" / "run.trec").read_text() == ""
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["n_shards"] == 0
    one = write_corpus(tmp_path / "one", data["pages"][:1], n_files=1)
    res = run_job({**data, "corpus": one}, tmp_path / "o", k=10)
    assert res.column("rank").to_pylist() == [1] * 6
    res = run_job(data, tmp_path / "big", k=100)  # k > 29 pages: every page, ranked
    assert res.num_rows == 6 * 29
    truth = oracle_ranking(data["queries"], data["pages"], 100)
    assert res.column("page_id").to_pylist()[:29] == [p for p, _ in truth[0]]


def test_refuses_a_corpus_of_another_model_or_budget(data, tmp_path, capsys):
    other = write_corpus(tmp_path / "other", data["pages"][:3], n_files=1,
                         metadata=corpus_metadata(model="vidore/colqwen2.5-v0.2", max_visual_tokens=1280))
    argv = ["--corpus", other, "--queries", data["queries_file"], "--output", str(tmp_path / "x"), "--top-k", "2"]
    refused(argv + ["--model", "some/other-model"],
            r"embedded with model 'vidore/colqwen2.5-v0.2'.*--allow-model-mismatch", capsys)
    refused(argv + ["--query-embeddings", data["qemb"], "--max-visual-tokens", "768"], "1280-token visual budget",
            capsys)
    # Mixed corpus files are refused too.
    mixed = write_corpus(tmp_path / "mixed", data["pages"][:3], n_files=1)
    os.rename(os.path.join(other, "pages", "part-000.parquet"), os.path.join(mixed, "pages", "part-009.parquet"))
    refused(["--corpus", mixed, "--queries", data["queries_file"], "--output", str(tmp_path / "y"),
             "--top-k", "2", "--query-embeddings", data["qemb"]], "disagree on vdr.model", capsys)


def test_reused_query_embeddings_are_checked_as_a_model_would_be(ray_session, data, tmp_path, capsys, caplog):
    """--query-embeddings: the file records the model and query prompt that made its vectors and
    each query's text. Another model than the corpus's, another --model, or a query whose text
    changed since is refused (until 2026-12-06 each was scored without a word)."""
    corpus = write_corpus(tmp_path / "emb", data["pages"], n_files=1, metadata=corpus_metadata(model="m/a"))

    def qemb(model):
        path = write_query_embeddings(tmp_path / f"qe-{model[-1]}.parquet", data["ids"], data["queries"])
        table = pq.read_table(path)
        pq.write_table(table.replace_schema_metadata({schema.META_MODEL: model.encode(),
                                                      schema.META_QUERY_PROMPT: schema.QUERY_PROMPT.encode()}), path)
        return path

    argv = ["--corpus", corpus, "--queries", data["queries_file"], "--top-k", "2"]
    assert score_queries.main(argv + ["--output", str(tmp_path / "ok"), "--query-embeddings", qemb("m/a")]) == 0
    # the run's own query_embeddings.parquet keeps the record, and the summary names the model
    assert pq.read_schema(tmp_path / "ok" / "query_embeddings.parquet").metadata[schema.META_MODEL] == b"m/a"
    assert json.loads((tmp_path / "ok" / "summary.json").read_text())["model"] == "m/a"
    refused(argv + ["--output", str(tmp_path / "b"), "--query-embeddings", qemb("m/b")],
            r"embedded with model 'm/a', the query embeddings at \S*qe-b\.parquet were made with 'm/b'", capsys)
    refused(argv + ["--output", str(tmp_path / "c"), "--query-embeddings", qemb("m/a"), "--model", "m/c"],
            r"was embedded with model 'm/a', this run names --model 'm/c'.*--allow-model-mismatch", capsys)
    # --allow-model-mismatch lets that through with a warning (it was refused whatever the flag)
    assert score_queries.main(argv + ["--output", str(tmp_path / "allowed"), "--query-embeddings", qemb("m/a"),
                                      "--model", "m/c", "--allow-model-mismatch"]) == 0
    assert json.loads((tmp_path / "allowed" / "summary.json").read_text())["model"] == "m/a"  # the vectors' model
    assert "allowed mismatch: --query-embeddings" in capsys.readouterr().err + "".join(
        r.getMessage() for r in caplog.records)
    texts = ["another text" if q == "q2" else f"query {q}" for q in data["ids"]]
    changed = write_queries_jsonl(tmp_path / "changed.jsonl", data["ids"], texts)
    refused(["--corpus", corpus, "--queries", changed, "--top-k", "2", "--output", str(tmp_path / "d"),
             "--query-embeddings", qemb("m/a")],
            r"embedded another text for 1 query id\(s\), e\.g\. q2: 'query q2' there, 'another text' in the query",
            capsys)
    assert not any((tmp_path / name).exists() for name in "bcd")


def test_refuses_no_queries_and_a_generation_the_corpus_lacks(data, tmp_path, capsys):
    """Said before Ray starts, with exit 2: an empty query file (it crashed on reused embeddings,
    and scored nothing without a word otherwise) and a --generation the corpus has not (it
    scored the corpus's root as if it were that generation)."""
    empty = tmp_path / "none.jsonl"
    empty.write_text("")
    argv = ["--corpus", data["corpus"], "--top-k", "2", "--query-embeddings", data["qemb"]]
    refused(argv + ["--queries", str(empty), "--output", str(tmp_path / "a")], "none.jsonl holds no queries",
            capsys)
    (tmp_path / "header.csv").write_text("query_id,text\n")
    refused(argv + ["--queries", str(tmp_path / "header.csv"), "--output", str(tmp_path / "a")],
            "header.csv holds no queries", capsys)
    argv += ["--queries", data["queries_file"], "--output", str(tmp_path / "a")]
    refused(argv + ["--generation", "2"], r"has no generation 2 .*its current one is 1", capsys)
    pages = os.path.join(data["corpus"], "pages")
    refused([*argv[:1], pages, *argv[2:], "--generation", "1"], "needs the embedding output folder as --corpus",
            capsys)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    refused([a if a != data["qemb"] else str(tmp_path / "bad.parquet") for a in argv],
            "--query-embeddings .*bad.parquet cannot be read", capsys)
    with pytest.raises(SystemExit) as e:
        score_queries.main(argv + ["--generation", "0"])
    assert e.value.code == 2 and "--generation must be a generation number" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_a_corpus_without_pages_scores_empty_without_a_model(ray_session, data, tmp_path, caplog):
    """Every document an error row: nothing to score, so no model is loaded; until 2026-12-06
    the job fetched the corpus's model from the Hub (and failed offline) to embed the queries."""
    empty = write_corpus(tmp_path / "empty", [], n_files=1)
    out = tmp_path / "r"
    assert score_queries.main(["--corpus", empty, "--queries", data["queries_file"], "--output", str(out),
                               "--top-k", "3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] is None and summary["n_results"] == 0
    assert "holds no pages" in caplog.text


def test_refuses_a_folder_that_is_not_a_corpus_and_an_output_that_is_one(ray_session, data, tmp_path, capsys):
    """--corpus given the documents folder fails at once, before Ray or a model load, saying what
    --corpus takes; --output equal to --corpus, or holding an embedding job's pages/, is refused
    before anything is written, so the embedding job's summary.json stays as it was."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.pdf").write_bytes(b"%PDF-1.4\n")
    argv = ["--queries", data["queries_file"], "--top-k", "2", "--query-embeddings", data["qemb"]]
    refused(["--corpus", str(docs), "--output", str(tmp_path / "r"), *argv],
            r"holds no pages/\*\.parquet.*--output folder of jobs\.embed_corpus", capsys)
    assert not (tmp_path / "r").exists()
    # an embedding output that embedded nothing yet (only its summary) still scores, as empty
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "summary.json").write_text("{}")
    assert score_queries.main(["--corpus", str(nothing), "--output", str(tmp_path / "r0"), "-v", *argv]) == 0
    assert pq.read_table(tmp_path / "r0" / "results.parquet").num_rows == 0
    r0 = json.loads((tmp_path / "r0" / "summary.json").read_text())
    assert r0["job"] == "score_queries" and any("holds no pages" in w for w in r0["warnings"])
    # a top-k above the corpus's pages: said, in the log and the summary
    assert score_queries.main(["--corpus", data["corpus"], "--output", str(tmp_path / "r1"), *argv[:2],
                               "--top-k", "100", *argv[4:]]) == 0
    assert any(re.search(r"holds \d+ pages, fewer than --top-k 100", w)
               for w in json.loads((tmp_path / "r1" / "summary.json").read_text())["warnings"])
    # an evaluation's folder is not written over (its summary.json was replaced)
    evaluated = tmp_path / "evaluated"
    evaluated.mkdir()
    (evaluated / "summary.json").write_text('{"job": "offline_eval", "result": "run x: no regression"}')
    refused(["--corpus", str(nothing), "--output", str(evaluated), *argv], r"another job \(offline_eval\)", capsys)
    assert json.loads((evaluated / "summary.json").read_text())["job"] == "offline_eval"

    corpus = str(tmp_path / "emb")
    shutil.copytree(data["corpus"], corpus)
    summary = os.path.join(corpus, "summary.json")
    with open(summary, "w") as f:
        f.write('{"documents": 3}')
    with pytest.raises(SystemExit) as e:
        score_queries.main(["--corpus", corpus + "/", "--output", corpus, *argv])
    assert e.value.code == 2 and "--output must differ from --corpus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # the same folder, named relative to the working directory
        score_queries.main(["--corpus", corpus, "--output", os.path.relpath(corpus), *argv])
    assert e.value.code == 2 and "--output must differ from --corpus" in capsys.readouterr().err
    refused(["--corpus", str(nothing), "--output", corpus, *argv], "holds an embedding job's pages", capsys)
    refused(["--corpus", corpus, "--output", os.path.join(corpus, "pages", "run"), *argv],
            "inside the corpus's pages folder", capsys)
    with open(summary) as f:
        assert f.read() == '{"documents": 3}'
    # an embedding output whose every document failed: no pages/, but its config.json and errors/
    failed = tmp_path / "failed"
    (failed / "errors").mkdir(parents=True)
    (failed / "config.json").write_text("{}")
    refused(["--corpus", corpus, "--output", str(failed), *argv], r"holds an embedding job's errors, config\.json",
            capsys)
    assert not (failed / "summary.json").exists()


def test_embeds_unicode_queries_with_the_model_and_rescoring_matches(ray_session, tiny_model, data, tmp_path,
                                                                      capsys, caplog):
    ids = ["emoji", "cjk", "ctrl", "empty", "long"]
    texts = ["🙂🚀 ∑∫ ü", "表の売上高は？", "tab\there\x00\u200b", "", "word " * 200]
    qfile = write_queries_jsonl(tmp_path / "q.jsonl", ids, texts)
    corpus = write_corpus(tmp_path / "emb", data["pages"], n_files=2, metadata=corpus_metadata(model=tiny_model))
    out = tmp_path / "run"
    argv = ["--corpus", corpus, "--queries", qfile, "--output", str(out), "--top-k", "4"]
    assert score_queries.main(argv) == 0
    assert "1 query has an empty text (e.g. empty)" in caplog.text  # scored, and said
    assert any("1 query has an empty text" in w for w in json.loads((out / "summary.json").read_text())["warnings"])
    qe = pq.read_table(out / "query_embeddings.parquet")
    assert qe.column("text").to_pylist() == texts
    # which model and prompt made them, for a later --query-embeddings to check
    assert qe.schema.metadata[schema.META_MODEL] == tiny_model.encode()
    assert qe.schema.metadata[schema.META_QUERY_PROMPT] == schema.QUERY_PROMPT.encode()
    assert all(n > 0 for n in qe.column("n_vectors").to_pylist())
    first = pq.read_table(out / "results.parquet")
    assert first.num_rows == 5 * 4
    # Rescore from the stored query embeddings, without the model: identical results.
    assert score_queries.main(argv[:5] + [str(tmp_path / "re"), "--top-k", "4", "--query-embeddings",
                                          str(out / "query_embeddings.parquet")]) == 0
    assert pq.read_table(tmp_path / "re" / "results.parquet").equals(first)
    # The tiny model is not the corpus's model: refused unless allowed.
    refused(["--corpus", data["corpus"], "--queries", qfile, "--output", str(tmp_path / "z"),
             "--top-k", "2", "--model", tiny_model], "embedded with model", capsys)


def test_s3_in_and_out(ray_session, s3, data, tmp_path):
    import pyarrow.fs as pafs

    from pipeline.storage import open_filesystem

    s3.make_bucket("scoring")
    fs, _ = open_filesystem("s3://scoring/x", s3.endpoint_url)
    pafs.copy_files(data["corpus"], "scoring/emb", destination_filesystem=fs)
    pafs.copy_files(data["queries_file"], "scoring/in/q.jsonl", destination_filesystem=fs)
    pafs.copy_files(data["qemb"], "scoring/in/qe.parquet", destination_filesystem=fs)
    argv = ["--corpus", "s3://scoring/emb", "--queries", "s3://scoring/in/q.jsonl", "--output", "s3://scoring/runs/r1",
            "--top-k", "5", "--query-embeddings", "s3://scoring/in/qe.parquet", "--endpoint-url", s3.endpoint_url,
            "--shard-size-pages", "10"]
    assert score_queries.main(argv) == 0
    with fs.open_input_file("scoring/runs/r1/results.parquet") as f:
        remote = pq.read_table(f)
    local = run_job(data, tmp_path / "local", k=5)
    assert remote.equals(local)
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector("scoring/runs/r1"))}
    assert names == {"results.parquet", "run.trec", "query_embeddings.parquet", "summary.json"}


def test_ray_job_submit(submit_job, data, tmp_path):
    out = tmp_path / "submitted"
    proc = submit_job(["jobs.score_queries", "--corpus", data["corpus"], "--queries", data["queries_file"],
                       "--output", str(out), "--top-k", "3", "--query-embeddings", data["qemb"], "--num-actors", "1"],
                      timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = pq.read_table(out / "results.parquet")
    truth = oracle_ranking(data["queries"], data["pages"], 3)
    assert results.column("page_id").to_pylist() == [p for t in truth for p, _ in t]


DRIVER_PHASES = ("open_inputs", "cluster_connect", "query_embedding", "actor_start", "planning", "scoring",
                 "merge", "write")
SHARD_PHASES = ("read_s", "decode_s", "wait_s", "pack_s", "score_s", "total_s")


def test_summary_times_every_phase(ray_session, data, tmp_path):
    out = tmp_path / "run"
    run_job(data, out, "--shard-size-pages", "7", "--num-actors", "2")
    summary = json.loads((out / "summary.json").read_text())
    phases = summary["phases"]
    assert set(phases) == set(DRIVER_PHASES)
    assert all(v >= 0 for v in phases.values())
    # consecutive phases of the driver's clock: together no more than the job's total
    assert sum(phases.values()) <= summary["total_s"] + 1e-3
    assert summary["total_s"] >= phases["scoring"] + phases["merge"] + phases["write"]
    # the actors' own clocks, per shard and summed
    shards = summary["shards"]
    assert len(shards) == summary["n_shards"] == 5
    for s in shards:
        assert all(s[k] >= 0 for k in SHARD_PHASES)
        assert s["wait_s"] + s["pack_s"] + s["score_s"] <= s["total_s"] + 1e-6
        assert s["bytes_read"] > 0 and s["source"] == "parquet"
    agg = summary["shard_phases"]
    for k in SHARD_PHASES:
        assert agg[k] == pytest.approx(sum(s[k] for s in shards), abs=1e-3)
    # each actor works one shard at a time inside the driver's scoring phase
    for actor in {s["actor"] for s in shards}:
        busy = sum(s["total_s"] for s in shards if s["actor"] == actor)
        assert busy <= phases["scoring"] + phases["merge"] + 1e-3
    # two actors, five shards: actors after their first shard had the next one read ahead
    assert agg["prefetched_shards"] >= 1
    # each actor's process start, and its first shard read while its scorer was being built
    assert len(summary["actor_spawn_s"]) == 2 and all(t >= 0 for t in summary["actor_spawn_s"])
    # (whether the read started before the scorer was built depends on whether this Ray worker
    # had imported torch for an earlier task: test_actor_front.py tests the overlap itself)
    firsts = [s for s in shards if "scorer_start_s" in s]
    assert len(firsts) == 2 and not any(s["prefetched"] for s in firsts)
    assert all(0 <= s["scorer_import_s"] <= s["scorer_start_s"] for s in firsts)
    assert agg["read_during_start_shards"] == sum(s["read_during_start"] for s in shards)
    assert agg["max_scorer_start_s"] > 0
    assert agg["start_wait_s"] == pytest.approx(sum(s["start_wait_s"] for s in shards), abs=1e-3)


def test_kept_scorers_serve_the_next_job_and_end_when_idle(data, tmp_path, kept_actors):
    """--keep-scorers: the next job of the same corpus and settings takes over the running
    actors (same processes, no new start) with its own queries and k; they end themselves
    once no call came for the time the last job set."""
    from pipeline.score.flow import KEPT_SCORER_NAMESPACE

    kept = kept_actors(KEPT_SCORER_NAMESPACE)
    run_job(data, tmp_path / "a", "--shard-size-pages", "7", "--num-actors", "2", "--keep-scorers", "60", k=5)
    first = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert first["n_actors_reused"] == 0 and len(kept()) == 2
    results = run_job(data, tmp_path / "b", "--shard-size-pages", "7", "--num-actors", "2", "--keep-scorers", "2", k=3)
    second = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert second["n_actors_reused"] == 2 and second["actor_spawn_s"] == []
    assert {s["pid"] for s in second["shards"]} <= {s["pid"] for s in first["shards"]}
    assert all(s["actor_reused"] and "scorer_start_s" not in s for s in second["shards"])
    truth = oracle_ranking(data["queries"], data["pages"], 3)
    assert results.column("page_id").to_pylist() == [p for t in truth for p, _ in t]
    assert kept.wait_gone() == []  # 2 s without a call


def test_page_cache_and_read_ahead_change_no_result(ray_session, data, tmp_path):
    """The page-major cache is built on first read, read back after, rebuilt when deleted,
    truncated or damaged; reading the next shard ahead changes nothing either."""
    import shutil

    from pipeline.config import ScoreConfig
    from pipeline.score import flow

    corpus = tmp_path / "corpus"
    shutil.copytree(data["corpus"], corpus)

    def run(name, **kw):
        cfg = ScoreConfig(corpus=str(corpus), queries=data["queries_file"], output=str(tmp_path / name), top_k=6,
                          query_embeddings=data["qemb"], shard_size_pages=6, num_actors=1, **kw)
        summary = flow.run(cfg)
        return pq.read_table(tmp_path / name / "results.parquet"), [s["source"] for s in summary["shards"]]

    plain, sources = run("plain", prefetch=False)
    assert sources == ["parquet"] * 5
    built, sources = run("built", cache=True)
    assert built.equals(plain) and sources == ["parquet, cache written"] * 5
    cache = corpus / "_cache"
    raws = sorted(cache.glob("shard-*.f16"))
    assert len(raws) == 5 and len(list(cache.glob("shard-*.idx.parquet"))) == 5
    assert pq.read_table(corpus / "pages").num_rows == 29  # the cache is not part of the corpus
    # damage three of the five: delete an index, truncate values, flip bytes
    raws[0].with_name(raws[0].name.replace(".f16", ".idx.parquet")).unlink()
    raws[1].write_bytes(raws[1].read_bytes()[:-256])
    blob = bytearray(raws[2].read_bytes())
    blob[:8] = bytes(8 * [0x7B])
    raws[2].write_bytes(bytes(blob))
    again, sources = run("again", cache=True)
    assert again.equals(plain)
    assert sorted(sources) == ["cache", "cache"] + ["parquet, cache written"] * 3


def test_storage_that_refuses_or_does_not_answer_is_named(s3, data, tmp_path):
    """An s3:// corpus read without credentials, or from an endpoint that does not answer: one
    line, exit 2, naming the flag, the URI and the endpoint (it was pyarrow's 'ACCESS_DENIED
    during HeadObject' or 'curlCode: 7', exit 1, with a traceback file)."""
    import subprocess
    import sys

    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint_url)
    client.create_bucket(Bucket="score-in")
    for folder, _, files in os.walk(data["corpus"]):
        for name in files:
            path = os.path.join(folder, name)
            client.upload_file(path, "score-in", "emb/" + os.path.relpath(path, data["corpus"]))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    argv = [sys.executable, "-m", "jobs.score_queries", "--corpus", "s3://score-in/emb", "--queries",
            data["queries_file"], "--output", str(tmp_path / "out"), "--top-k", "3"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_DEFAULT_REGION="us-east-1", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true", PYTHONPATH=root)
    proc = subprocess.run([*argv, "--endpoint-url", s3.endpoint_url], env=env, capture_output=True, text=True,
                          timeout=120, cwd=root)
    assert proc.returncode == 2, proc.stderr
    assert f"cannot read --corpus s3://score-in/emb (endpoint {s3.endpoint_url}): access denied" in proc.stderr
    assert "Check the credentials" in proc.stderr and "traceback" not in proc.stderr
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    proc = subprocess.run([*argv, "--endpoint-url", "http://127.0.0.1:9"], env=env, capture_output=True, text=True,
                          timeout=300, cwd=root)
    assert proc.returncode == 2, proc.stderr
    assert "could not read --corpus s3://score-in/emb (endpoint http://127.0.0.1:9)" in proc.stderr, proc.stderr
