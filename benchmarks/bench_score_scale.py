"""The scoring job at 8 shards per GPU (scoring-scale issue, part 5): runs
``pipeline.score.flow.run`` (what ``jobs.score_queries`` runs) with stored query embeddings
on an embedded Ray started once before the timed runs, on a corpus 8x one shard (default
40,000 pages, ``--shard-size-pages 5000``: 8 shards stream through one actor, each read in
the background while the previous one scores), 1,000 queries of 25 vectors, top-10.

Modes (``--modes``, in order): ``parquet`` reads the Parquet corpus; ``cache`` runs with
``ScoreConfig(cache=True)``: the first such run reads Parquet and writes the page-major
cache, a second reads the cache. Corpus generation (``write_corpus_pool`` of
bench_score_job.py: one float16 pool, files written in parallel) and Ray start are timed
apart from the runs. Reported per run: the summary's phases and shard phases, and per
shard: read, decode, cache write, wait (scoring waited for its load), pack, score, and
``hidden_load_s`` = load time (read + decode + cache write) minus wait for a prefetched
shard: the part of its load that overlapped the previous shard's work. Also per run: pages/s
read+decoded per shard, and the kernel's TFLOP/s over ``score_s`` (2 x query rows x page
vectors x 128; score_s also holds the top-k and result table).

``same_results_all_runs`` compares the runs of one invocation only. To compare invocations
(before / after a change, on the same corpus: it is seeded, so the same arguments and torch
give the same corpus), each run also records ``results_sha256``, a hash of its results sorted
by (query_id, rank), one line per row: query_id, rank, page_id, score (float32's exact bits);
see ``results_hash``.

GPU (one H200; about 7 GB of Parquet + 7 GB of cache on local disk, about 2-3 minutes):
    PYTHONPATH=$PWD python3 benchmarks/bench_score_scale.py --dir /tmp/scale --out scale.json
CPU dry run (float64 scoring, a few hundred pages):
    PYTHONPATH=$PWD python benchmarks/bench_score_scale.py --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_score_job import write_corpus_pool  # noqa: E402
from pipeline.devtools.synthetic import write_queries_jsonl, write_query_embeddings  # noqa: E402

SHARD_KEYS = ("shard_id", "pages", "source", "prefetched", "read_during_start", "bytes_read", "start_wait_s",
              "scorer_start_s", "read_s", "decode_s", "cache_write_s", "wait_s", "pack_s", "score_s", "total_s")


def shard_rows(shards: list[dict], vectors_per_page: float, query_rows: int) -> list[dict]:
    """Per-shard phases, the load hidden behind the previous shard, and rates."""
    rows = []
    for s in sorted(shards, key=lambda s: s["shard_id"]):
        r = {k: s.get(k) for k in SHARD_KEYS}
        load = s["read_s"] + s["decode_s"] + s.get("cache_write_s", 0.0)
        r["load_s"] = round(load, 4)
        r["hidden_load_s"] = (round(max(0.0, load - s["wait_s"]), 4)
                              if s["prefetched"] or s.get("read_during_start") else 0.0)
        r["pages_per_s_read_decode"] = round(s["pages"] / max(s["read_s"] + s["decode_s"], 1e-9), 1)
        flops = 2.0 * query_rows * vectors_per_page * s["pages"] * 128
        r["score_tflops"] = round(flops / max(s["score_s"], 1e-9) / 1e12, 2)
        rows.append(r)
    return rows


def run_mode(flow, ScoreConfig, work: str, corpus: str, name: str, r: int, args, vectors_per_page: float) -> dict:
    cfg = ScoreConfig(corpus=corpus, queries=os.path.join(work, "q.jsonl"), output=os.path.join(work, f"out_{name}{r}"),
                      top_k=args.top_k, query_embeddings=os.path.join(work, "qemb.parquet"), num_actors=1,
                      shard_size_pages=args.shard_size_pages, cache=name == "cache")
    t0 = time.perf_counter()
    summary = flow.run(cfg)
    wall = time.perf_counter() - t0
    results_sha256 = results_hash(os.path.join(cfg.output, "results.parquet"))
    shards = shard_rows(summary["shards"], vectors_per_page, args.queries * args.query_vectors)
    out = {"mode": name, "run": r, "wall_s": round(wall, 3),
           **{k: summary.get(k) for k in ("total_s", "scoring_s", "n_shards", "shard_size_pages", "num_actors",
                                          "devices", "pages_scored_per_s", "phases", "shard_phases")},
           "shards": shards,
           "hidden_load_s": round(sum(s["hidden_load_s"] for s in shards), 3),
           "wait_s": round(sum(s["wait_s"] for s in shards), 3),
           "sources": sorted({s["source"] for s in shards}),
           "results_sha256": results_sha256}
    return out


def results_hash(path: str) -> str:
    """sha256 of a results table's (query_id, rank, page_id, score) rows sorted by
    (query_id, rank); the score as the hex of its float32 bits, so equal hashes mean equal
    ids, ranks and scores bit for bit."""
    import hashlib

    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["query_id", "rank", "page_id", "score"]).to_pydict()
    scores = np.asarray(t["score"], dtype=np.float32).view(np.uint32)
    rows = sorted(zip(t["query_id"], t["rank"], t["page_id"], (f"{int(b):08x}" for b in scores)))
    h = hashlib.sha256()
    for q, rank, page, score in rows:
        h.update(f"{q}\t{rank}\t{page}\t{score}\n".encode())
    return h.hexdigest()


def check_same_results(work: str, names: list[str]) -> bool:
    """Every run wrote the same results table (ids, ranks, scores)."""
    import pyarrow.parquet as pq

    tables = [pq.read_table(os.path.join(work, n, "results.parquet")) for n in names]
    return all(t.equals(tables[0]) for t in tables[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=40000)
    ap.add_argument("--files", type=int, default=40)
    ap.add_argument("--shard-size-pages", type=int, default=5000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--query-vectors", type=int, default=25)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--modes", nargs="+", default=["parquet", "cache", "cache"], choices=("parquet", "cache"))
    ap.add_argument("--dir", default="", help="work folder (a corpus there is reused); default a temp folder")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (corpus, cache, outputs); else deleted")
    ap.add_argument("--num-cpus", type=int, default=0, help="CPUs of the embedded Ray (0: all)")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: 400 pages, 4 files, shards of 50, 4 queries")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.tiny:
        args.pages, args.files, args.shard_size_pages, args.queries = 400, 4, 50, 4
    import ray

    from pipeline.config import ScoreConfig
    from pipeline.score import flow

    work = args.dir or tempfile.mkdtemp(prefix="bench_score_scale_")
    corpus = os.path.join(work, "corpus")
    result = {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpus": os.cpu_count(),
              "pages": args.pages, "files": args.files, "shard_size_pages": args.shard_size_pages,
              "queries": args.queries, "query_vectors": args.query_vectors, "top_k": args.top_k,
              "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "commit": os.environ.get("BENCH_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()}
    t0 = time.perf_counter()
    if not os.path.isdir(os.path.join(corpus, "pages")):
        result["vectors"] = write_corpus_pool(corpus, args.pages, args.files)
        result["generate_s"] = round(time.perf_counter() - t0, 2)
    else:
        result["generate_s"] = None  # reused
    pages_dir = os.path.join(corpus, "pages")
    result["parquet_bytes"] = sum(os.path.getsize(os.path.join(pages_dir, f)) for f in os.listdir(pages_dir))
    vectors_per_page = (result.get("vectors") or 684.0 * args.pages) / args.pages
    rng = np.random.default_rng(1)
    ids = [f"q{i}" for i in range(args.queries)]
    qs = [(rng.standard_normal((args.query_vectors, 128)) / 11).astype(np.float16) for _ in ids]
    write_queries_jsonl(os.path.join(work, "q.jsonl"), ids)
    write_query_embeddings(os.path.join(work, "qemb.parquet"), ids, qs)
    print(f"corpus {corpus}: {args.pages} pages, {result['parquet_bytes'] / 1e9:.2f} GB of Parquet in {args.files} files, "
          f"generated in {result['generate_s']} s", flush=True)

    t0 = time.perf_counter()
    ray.init(num_cpus=args.num_cpus or None, log_to_driver=False)
    result["ray_start_s"] = round(time.perf_counter() - t0, 2)
    runs, counts = [], {}
    try:
        for name in args.modes:
            counts[name] = counts.get(name, 0) + 1
            row = run_mode(flow, ScoreConfig, work, corpus, name, counts[name] - 1, args, vectors_per_page)
            runs.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "shards"}), flush=True)
            for s in row["shards"]:
                print("   ", json.dumps(s), flush=True)
        result["runs"] = runs
        # within this invocation only; compare results_sha256 across invocations
        result["same_results_all_runs"] = check_same_results(work, [f"out_{r['mode']}{r['run']}" for r in runs])
        result["results_sha256"] = sorted({r["results_sha256"] for r in runs})
        cache_dir = os.path.join(corpus, "_cache")
        if os.path.isdir(cache_dir):
            result["cache_bytes"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache_dir) for f in fs)
    finally:
        ray.shutdown()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"same results in every run: {result.get('same_results_all_runs')}", flush=True)


if __name__ == "__main__":
    main()
