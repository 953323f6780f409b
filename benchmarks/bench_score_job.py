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
import pyarrow as pa

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


def pool_vectors(n: int, seed: int = 0) -> np.ndarray:
    """``(n, 128)`` float16 standard normal / 11 (the values of :func:`write_corpus`), drawn by
    torch on every core (numpy draws on one: 20-40 M values/s, minutes for a corpus)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = np.empty((n, 128), dtype=np.float16)
    step = 1 << 18
    for a in range(0, n, step):
        b = min(n, a + step)
        out[a:b] = (torch.randn((b - a, 128), generator=g) / 11).half().numpy()
    return out


def _write_pages_file(folder: str, i: int, idx: np.ndarray, n: np.ndarray, flat: np.ndarray) -> None:
    """Part file ``i``: pages ``idx`` with ``n`` vectors each, ``flat`` their float16 values."""
    offsets = np.zeros(len(idx) + 1, dtype=np.int32)
    np.cumsum(n, out=offsets[1:])
    docs = [f"doc-{j // 10:06d}.pdf" for j in idx]
    numbers = (idx % 10 + 1).astype(np.int32)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=pa.float16()), 128)
    table = pa.table({
        schema.DOC_ID: docs, schema.PAGE_NUMBER: pa.array(numbers, pa.int32()),
        schema.PAGE_ID: [schema.page_id(d, int(k)) for d, k in zip(docs, numbers)],
        schema.SOURCE_URI: [f"file:///in/{d}" for d in docs],
        schema.WIDTH: pa.array(np.full(len(idx), 100, np.int32)),
        schema.HEIGHT: pa.array(np.full(len(idx), 100, np.int32)),
        schema.N_VECTORS: pa.array(np.asarray(n).astype(np.int32)),
        schema.EMBEDDING: pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), inner),
    }, schema=schema.PAGES_SCHEMA)
    storage.write_parquet(os.path.join(folder, "pages", f"part-{i:05d}.parquet"), table,
                          metadata=corpus_metadata())


def write_corpus_pool(folder: str, n_pages: int, n_files: int, seed: int = 0, threads: int = 0) -> int:
    """The same corpus shape, fast: one pool of float16 vectors (:func:`pool_vectors`) drawn once, each file a contiguous slice of it at a random offset
    (no per-page draws, no copies before Arrow), files written in parallel threads (Parquet
    encoding releases the GIL) with the job's settings. Pages are distinct unless two slices
    start at the same row; their values repeat across files, which changes no timing."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(seed)
    per_file = np.array_split(np.arange(n_pages), n_files)
    lengths = rng.integers(600, 769, n_pages)
    longest = max(int(lengths[idx].sum()) for idx in per_file)
    pool = pool_vectors(longest + longest // 4, seed)
    starts = rng.integers(0, pool.shape[0] - longest + 1, n_files)
    os.makedirs(os.path.join(folder, "pages"), exist_ok=True)

    def write(i: int) -> None:
        idx = per_file[i]
        n = lengths[idx]
        _write_pages_file(folder, i, idx, n, pool[starts[i] : starts[i] + int(n.sum())])

    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as ex:
        list(ex.map(write, range(n_files)))
    return int(lengths.sum())


def write_corpus_topics(folder: str, n_pages: int, n_files: int, seed: int = 1) -> int:
    """Topic-structured pages (bench_fp8_topk.py's "topics" model: half of each page's vectors
    near one of n_pages / 20 topics, the rest random unit vectors), for the FP8 path's
    candidates to be few, as when relevant pages stand out."""
    from bench_fp8_topk import make_pages

    n_topics = max(1, n_pages // 20)
    os.makedirs(os.path.join(folder, "pages"), exist_ok=True)
    total = 0
    for i, idx in enumerate(np.array_split(np.arange(n_pages), n_files)):
        flat, lengths = make_pages("topics", int(idx[0]), len(idx), n_topics, seed)
        _write_pages_file(folder, i, idx, lengths.numpy(), flat.numpy())
        total += int(lengths.sum())
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
    ap.add_argument("--keep-scorers", type=float, default=0.0,
                    help="ScoreConfig(keep_scorers=S): runs after the first take over its actors")
    ap.add_argument("--precision", default="exact", help="ScoreConfig.precision: exact or fp8-exact-topk")
    ap.add_argument("--dir", default="")
    ap.add_argument("--num-cpus", type=int, default=0, help="CPUs of the embedded Ray (0: all)")
    ap.add_argument("--gen", choices=("normal", "pool", "topics"), default="normal",
                    help="corpus values: a draw per page (normal), slices of one pool written in parallel (pool, fast), or topic-structured pages and queries (topics: the FP8 path's candidates are few)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    import ray

    from pipeline.config import ScoreConfig
    from pipeline.score import flow

    work = args.dir or tempfile.mkdtemp(prefix="bench_score_job_")
    corpus = os.path.join(work, "corpus")
    t0 = time.perf_counter()
    if not os.path.isdir(os.path.join(corpus, "pages")):
        writer = {"pool": write_corpus_pool, "topics": write_corpus_topics}.get(args.gen, write_corpus)
        n_vectors = writer(corpus, args.pages, args.files)
    else:
        n_vectors = None
    rng = np.random.default_rng(1)
    ids = [f"q{i}" for i in range(args.queries)]
    if args.gen == "topics":  # queries near the topics of the pages (bench_fp8_topk.py)
        import torch
        from bench_fp8_topk import make_queries

        qs = [q.numpy() for q in make_queries("topics", args.queries, max(1, args.pages // 20),
                                               torch.Generator().manual_seed(7))]
    else:
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
    if args.precision != "exact":
        extra["precision"] = args.precision
    if args.keep_scorers:
        extra["keep_scorers"] = args.keep_scorers
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
                                            "n_shards", "shard_size_pages", "num_actors", "devices", "fp8",
                                            "actor_spawn_s", "n_actors_reused")}
        keep["wall_s"] = round(wall, 3)
        keep["shards"] = [{k: v for k, v in s.items() if k.endswith("_s") or k in ("source", "prefetched", "read_during_start")}
                          for s in summary["shards"]]
        runs.append(keep)
        print(json.dumps(keep), flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpus": os.cpu_count(),
        "pages": args.pages, "files": args.files, "vectors": n_vectors, "queries": args.queries,
        "query_vectors": args.query_vectors, "cache": args.cache, "precision": args.precision, "prefetch": not args.no_prefetch,
        "keep_scorers": args.keep_scorers,
        "commit": os.environ.get("BENCH_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
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
