"""jobs.score_queries survives a scoring actor's worker process dying mid-run: Ray restarts the
actor and re-runs the shard it was scoring; the top-k stays exact and every shard merges once."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import numpy as np
import pyarrow.parquet as pq

from jobs import score_queries
from pipeline.devtools.synthetic import (
    oracle_ranking,
    random_pages,
    random_queries,
    write_corpus,
    write_queries_jsonl,
    write_query_embeddings,
)

N_PAGES, SHARD, K = 240, 4, 6  # 60 shards: several seconds of scoring on 2 CPU actors


class _ShardsDone(logging.Handler):
    """Counts the driver's "shard i/n done" log lines: the kill waits until scoring is under way."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.done = 0

    def emit(self, record):
        if "done" in record.msg and record.msg.startswith("shard "):
            self.done += 1


def _kill_one_scorer(address: str, counter: _ShardsDone, after_shards: int, report: dict,
                     stop: threading.Event) -> None:
    from ray.util.state import list_actors

    deadline = time.monotonic() + 60
    while not stop.is_set() and time.monotonic() < deadline:
        if counter.done >= after_shards:
            alive = list_actors(address=address, filters=[("class_name", "=", "ShardScorer"), ("state", "=", "ALIVE")])
            pids = [a.pid for a in alive if a.pid]
            if pids:
                report["pid"], report["shards_done_at_kill"] = pids[0], counter.done
                try:
                    os.kill(pids[0], signal.SIGKILL)
                    report["killed"] = True
                except ProcessLookupError:
                    report["killed"] = False
                return
        time.sleep(0.05)


def test_a_killed_scoring_actor_costs_only_its_shard(ray_session, ray_cluster, s3, tmp_path):
    rng = np.random.default_rng(7)
    pages = random_pages(N_PAGES, rng, max_len=30)
    queries = random_queries(12, rng)
    ids = [f"q{i}" for i in range(len(queries))]
    corpus = write_corpus(tmp_path / "emb", pages, n_files=6)
    qfile = write_queries_jsonl(tmp_path / "q.jsonl", ids)
    qemb = write_query_embeddings(tmp_path / "qe.parquet", ids, queries)
    out = tmp_path / "run"

    counter, report, stop = _ShardsDone(), {}, threading.Event()
    flow_log = logging.getLogger("pipeline.score.flow")
    old_level = flow_log.level
    flow_log.setLevel(logging.INFO)
    flow_log.addHandler(counter)
    killer = threading.Thread(target=_kill_one_scorer, args=(ray_cluster["dashboard_url"], counter, 5, report, stop), daemon=True)
    killer.start()
    t0 = time.monotonic()
    try:
        argv = ["--corpus", corpus, "--queries", qfile, "--output", str(out), "--top-k", str(K),
                "--query-embeddings", qemb, "--num-actors", "2", "--shard-size-pages", str(SHARD)]
        assert score_queries.main(argv) == 0
    finally:
        stop.set()
        killer.join(timeout=10)
        flow_log.removeHandler(counter)
        flow_log.setLevel(old_level)

    report["job_s"] = round(time.monotonic() - t0, 1)
    # The kill happened, mid-run (after 5 shards, before the last one).
    assert report.get("killed") is True, report
    summary = json.loads((out / "summary.json").read_text())
    n_shards = summary["n_shards"]
    assert n_shards == N_PAGES // SHARD
    assert report["shards_done_at_kill"] < n_shards, report
    # Every shard merged exactly once; the killed process scored some, a restarted one the rest.
    assert sorted(s["shard_id"] for s in summary["shards"]) == list(range(n_shards))
    assert summary["n_pages"] == N_PAGES
    pids = {s["pid"] for s in summary["shards"]}
    assert len(pids) >= 2  # the restarted actor is a new process
    assert summary["n_shards_after_actor_restart"] >= 1
    print("fault report:", report, "scoring_s", summary["scoring_s"])

    # Exact top-k: ids and ranks equal the float64 oracle, scores within 1e-5, no page twice.
    got = pq.read_table(out / "results.parquet").to_pydict()
    truth = oracle_ranking(queries, pages, K)
    for qi, qid in enumerate(ids):
        rows = [r for r, q in enumerate(got["query_id"]) if q == qid]
        page_ids = [got["page_id"][r] for r in rows]
        assert len(set(page_ids)) == len(page_ids)
        assert page_ids == [p for p, _ in truth[qi]]
        assert [got["rank"][r] for r in rows] == list(range(1, K + 1))
        np.testing.assert_allclose([got["score"][r] for r in rows], [s for _, s in truth[qi]], rtol=0, atol=1e-5)
