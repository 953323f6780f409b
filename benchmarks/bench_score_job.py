"""Where the scoring job's time goes: runs ``pipeline.score.flow.run`` (what
``jobs.score_queries`` runs) on a synthetic corpus with stored query embeddings, on a Ray
that is already running (an embedded local one, started once before the timed runs), and
prints the summary's phases.

The corpus is ColQwen2-shaped (600-768 vectors x 128 float16 per page) and written with the
embedding job's Parquet settings (``pipeline.storage.write_parquet``). Works on code older
than the phase timings too (then only total_s, scoring_s and the per-shard times exist).

CPU (float64 scoring, so keep queries few):
    python benchmarks/bench_score_job.py --pages 2000 --queries 20 --runs 2 \
        --out benchmarks/results/bench_score_job_cpu_2026-12-03.json
GPU (the issue's size; one H200):
    python benchmarks/bench_score_job.py --pages 20000 --queries 1000 --files 40 --runs 3 [--cache]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import schema, storage  # noqa: E402
from pipeline.devtools.synthetic import (  # noqa: E402
    corpus_metadata,
    pages_table,
    write_queries_jsonl,
    write_query_embeddings,
)


def write_corpus(folder: str, n_pages: int, n_files: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    per_file = np.array_split(np.arange(n_pages), n_files)
    total = 0
    for i, idx in enumerate(per_file):
        pages = []
        for j in idx:
            n = int(rng.integers(600, 769))
            doc = f"doc-{j // 10:06d}.pdf"
            pages.append((doc, int(j % 10 + 1), schema.page_id(doc, int(j % 10 + 1)),
                          (rng.standard_normal((n, 128), dtype=np.float32) / 11).astype(np.float16)))
            total += n
        storage.write_parquet(os.path.join(folder, "pages", f"part-{i:05d}.parquet"), pages_table(pages),
                              metadata=corpus_metadata())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=2000)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--query-vectors", type=int, default=25)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--num-actors", type=int, default=1)
    ap.add_argument("--shard-size-pages", default="auto")
    ap.add_argument("--cache", action="store_true", help="ScoreConfig(cache=True): page-major cache")
    ap.add_argument("--no-prefetch", action="store_true")
    ap.add_argument("--dir", default="")
    ap.add_argument("--num-cpus", type=int, default=0, help="CPUs of the embedded Ray (0: all)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    import ray

    from pipeline.config import ScoreConfig
    from pipeline.score import flow

    work = args.dir or tempfile.mkdtemp(prefix="bench_score_job_")
    corpus = os.path.join(work, "corpus")
    t0 = time.perf_counter()
    if not os.path.isdir(os.path.join(corpus, "pages")):
        n_vectors = write_corpus(corpus, args.pages, args.files)
    else:
        n_vectors = None
    rng = np.random.default_rng(1)
    ids = [f"q{i}" for i in range(args.queries)]
    qs = [(rng.standard_normal((args.query_vectors, 128)) / 11).astype(np.float16) for _ in ids]
    write_queries_jsonl(os.path.join(work, "q.jsonl"), ids)
    write_query_embeddings(os.path.join(work, "qemb.parquet"), ids, qs)
    print(f"corpus {corpus}: {args.pages} pages in {args.files} files "
          f"({sum(os.path.getsize(os.path.join(corpus, 'pages', f)) for f in os.listdir(os.path.join(corpus, 'pages'))) / 1e9:.2f} GB), "
          f"written in {time.perf_counter() - t0:.1f} s", flush=True)

    t0 = time.perf_counter()
    ray.init(num_cpus=args.num_cpus or None, log_to_driver=False)
    print(f"Ray started in {time.perf_counter() - t0:.1f} s (not timed below)", flush=True)
    extra = {}
    if args.cache:
        extra["cache"] = True
    if args.no_prefetch:
        extra["prefetch"] = False
    shard = args.shard_size_pages if args.shard_size_pages == "auto" else int(args.shard_size_pages)
    runs = []
    for r in range(args.runs):
        cfg = ScoreConfig(corpus=corpus, queries=os.path.join(work, "q.jsonl"), output=os.path.join(work, f"out{r}"),
                          top_k=args.top_k, query_embeddings=os.path.join(work, "qemb.parquet"),
                          num_actors=args.num_actors, shard_size_pages=shard, **extra)
        t0 = time.perf_counter()
        summary = flow.run(cfg)
        wall = time.perf_counter() - t0
        keep = {k: summary.get(k) for k in ("total_s", "scoring_s", "embed_queries_s", "phases", "shard_phases",
                                            "n_shards", "shard_size_pages", "num_actors", "devices")}
        keep["wall_s"] = round(wall, 3)
        keep["shards"] = [{k: v for k, v in s.items() if k.endswith("_s") or k in ("source", "prefetched")}
                          for s in summary["shards"]]
        runs.append(keep)
        print(json.dumps(keep), flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpus": os.cpu_count(),
        "pages": args.pages, "files": args.files, "vectors": n_vectors, "queries": args.queries,
        "query_vectors": args.query_vectors, "cache": args.cache, "prefetch": not args.no_prefetch,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip(),
        "code": os.path.dirname(os.path.abspath(flow.__file__)),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "runs": runs,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    ray.shutdown()


if __name__ == "__main__":
    main()
