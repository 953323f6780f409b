"""Both Ray jobs end to end on a GPU machine, checked against a float64 oracle.

    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/e2e_gpu.py --out e2e.json

1. jobs.embed_corpus on generated letter PDFs (real-size random ColQwen2, bf16, compiled);
2. jobs.score_queries on its output with --model (queries embedded on the GPU, scored by
   GPU actors with the fused kernel); every top-k list must equal the float64 MaxSim oracle
   over the stored page and query embeddings (ties by page_id);
3. jobs.score_queries with --query-embeddings on a synthetic 20,000-page corpus of
   600-768 vectors x 1,000 queries of 25 vectors: job-level time and pages scored/s next to
   the kernel's own time in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def oracle_topk(q_vecs, p_vecs, page_ids, k):
    out = []
    for q in q_vecs:
        s = np.array([np.max(q @ p.T, axis=1).sum() for p in p_vecs])
        order = sorted(range(len(page_ids)), key=lambda i: (-s[i], page_ids[i]))[:k]
        out.append([page_ids[i] for i in order])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="e2e.json")
    ap.add_argument("--pages", type=int, default=320)
    ap.add_argument("--scale-pages", type=int, default=20000)
    ap.add_argument("--scale-queries", type=int, default=1000)
    ap.add_argument("--only-scale", action="store_true", help="skip parts 1-2")
    args = ap.parse_args()

    res = {}
    work = tempfile.mkdtemp(prefix="e2e-")
    if not args.only_scale:
        part12(args, res, work)
    scale(args, res, work)
    print(json.dumps(res, indent=1, default=str))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=str)


def part12(args, res, work):
    from bench_embed import letter_pdf

    from jobs import embed_corpus, score_queries
    from pipeline.schema import arrow_to_embeddings
    from pipeline.devtools.tiny import build_tiny_model

    model = build_tiny_model(os.path.join(work, "model"), real_size=True, device="cuda")
    corpus = os.path.join(work, "corpus")
    os.makedirs(corpus)
    docs = [letter_pdf(8, d) for d in range(10)]
    for d in range(args.pages // 8):
        with open(os.path.join(corpus, f"doc{d:04d}.pdf"), "wb") as f:
            f.write(docs[d % len(docs)] if d >= 10 else docs[d])
    emb = os.path.join(work, "emb")
    t = time.perf_counter()
    assert embed_corpus.main(["--input", corpus, "--output", emb, "--model", model, "--batch-size", "32"]) == 0
    res["embed_wall_s"] = round(time.perf_counter() - t, 1)

    queries = os.path.join(work, "queries.jsonl")
    with open(queries, "w") as f:
        for i in range(100):
            f.write(json.dumps({"query_id": f"q{i:03d}", "text": f"revenue {i} table row {i * 7} page"}) + "\n")
    run = os.path.join(work, "run")
    t = time.perf_counter()
    assert score_queries.main(["--corpus", emb, "--queries", queries, "--output", run, "--top-k", "10",
                               "--shard-size-pages", "64"]) == 0
    res["score_wall_s"] = round(time.perf_counter() - t, 1)
    with open(os.path.join(run, "summary.json")) as f:
        res["score_summary"] = json.load(f)

    pages = pq.read_table(os.path.join(emb, "pages"))
    p_vecs = [v.astype(np.float64) for v in arrow_to_embeddings(pages.column("embedding"))]
    page_ids = pages.column("page_id").to_pylist()
    qe = pq.read_table(os.path.join(run, "query_embeddings.parquet"))
    q_vecs = [v.astype(np.float64) for v in arrow_to_embeddings(qe.column("embedding"))]
    want = oracle_topk(q_vecs, p_vecs, page_ids, 10)
    results = pq.read_table(os.path.join(run, "results.parquet")).to_pylist()
    got: dict = {}
    for r in results:
        got.setdefault(r["query_id"], []).append(r["page_id"])
    qids = qe.column("query_id").to_pylist()
    mismatches = sum(got[q] != w for q, w in zip(qids, want))
    res["e2e_queries"] = len(qids)
    res["e2e_topk_mismatches_vs_float64_oracle"] = mismatches
    res["distinct_pages"] = len(set(page_ids))
    print(json.dumps({k: v for k, v in res.items() if k != "score_summary"}), flush=True)


def scale(args, res, work):
    """3. job-level scoring throughput at the benchmark's shape, files written as the embedding job writes them."""
    from jobs import score_queries
    from pipeline.storage import parquet_bytes
    from pipeline.devtools.synthetic import corpus_metadata, pages_table

    rng = np.random.default_rng(0)
    big = os.path.join(work, "big")
    os.makedirs(os.path.join(big, "pages"))
    per_file = 2000
    for f_i in range(args.scale_pages // per_file):
        lens = rng.integers(600, 769, per_file)
        pages_list = []
        for j, n in enumerate(lens):
            v = rng.standard_normal((n, 128)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            doc = f"d{f_i:03d}_{j:05d}.pdf"
            pages_list.append((doc, 1, f"{doc}#1", v.astype(np.float16)))
        with open(os.path.join(big, "pages", f"part-{f_i:03d}.parquet"), "wb") as fh:
            fh.write(parquet_bytes(pages_table(pages_list), corpus_metadata()))
    from pipeline.devtools.synthetic import write_queries_jsonl, write_query_embeddings

    qv = []
    for _ in range(args.scale_queries):
        v = rng.standard_normal((25, 128)).astype(np.float32)
        qv.append((v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16))
    ids = [f"q{i:04d}" for i in range(args.scale_queries)]
    qe_path = write_query_embeddings(os.path.join(work, "qe.parquet"), ids, qv)
    qj = write_queries_jsonl(os.path.join(work, "q.jsonl"), ids)
    out = os.path.join(work, "bigrun")
    t = time.perf_counter()
    assert score_queries.main(["--corpus", big, "--queries", qj, "--query-embeddings", qe_path, "--output", out,
                               "--top-k", "10", "--allow-model-mismatch"]) == 0
    res["scale_wall_s"] = round(time.perf_counter() - t, 1)
    with open(os.path.join(out, "summary.json")) as f:
        res["scale_summary"] = json.load(f)


if __name__ == "__main__":
    main()
