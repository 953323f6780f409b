"""What --pool-factor saves, measured on CPU (issue: embedding cost, part 7).

1. Storage: the embedding job with the tiny ColQwen2 (pipeline.devtools) on the sample corpus
   at the trained token budget (768), --pool-factor 1 and 3: bytes of OUT/pages/*.parquet
   and vectors written. The tiny model has random weights: vector counts and bytes are real,
   retrieval quality is not measured here. Its vectors are more redundant than a trained
   model's (Parquet compresses them about 2x), so the same is measured on 50 pages of 755
   random unit vectors, pooled for real.
2. Scoring: pipeline.score.maxsim (the CPU actors' path: float64, one torch thread) of Q
   queries of 25 vectors against P pages of 755 vectors (a US-letter page at 768 visual
   tokens + prompt) and against the same pages pooled at factor 3 (251 vectors each: what
   pool_embeddings gives for 755 tokens).
3. Pooling cost per 755-token page on CPU, by step: similarity + pdist (on the GPU in the
   actor), Ward linkage + fcluster (always CPU), means.

    PYTHONPATH=$PWD python benchmarks/bench_pooling.py [--pages 400] [--queries 64] [--json OUT]
Starts its own embedded Ray (address="local"): it never joins another cluster of the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def storage(tmp: str) -> dict:
    import pyarrow.parquet as pq
    import ray

    from jobs import embed_corpus
    from pipeline.devtools.samples import make_sample_corpus
    from pipeline.devtools.tiny import build_tiny_model

    model = build_tiny_model(os.path.join(tmp, "tiny"))
    corpus = os.path.join(tmp, "corpus")
    os.makedirs(corpus)
    make_sample_corpus(corpus, with_broken=False)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = {}
    try:
        for factor in (1, 3):
            dest = os.path.join(tmp, f"emb-{factor}")
            t = time.perf_counter()
            rc = embed_corpus.main(["--input", corpus, "--output", dest, "--model", model, "--max-visual-tokens", "768",
                                    "--batch-size", "4", "--pool-factor", str(factor)])
            assert rc == 0
            pages = pq.read_table(os.path.join(dest, "pages"), columns=["n_vectors"])
            out[f"factor_{factor}"] = {"pages": pages.num_rows, "vectors": int(sum(pages.column(0).to_pylist())),
                                       "pages_bytes": folder_bytes(os.path.join(dest, "pages")),
                                       "job_s": round(time.perf_counter() - t, 1)}
    finally:
        ray.shutdown()
    a, b = out["factor_1"], out["factor_3"]
    out["vectors_ratio"] = round(b["vectors"] / a["vectors"], 4)
    out["bytes_ratio"] = round(b["pages_bytes"] / a["pages_bytes"], 4)
    return out


def storage_high_entropy(n_pages: int = 50) -> dict:
    """Parquet bytes (pipeline.storage.parquet_bytes, as the job writes) of pages of 755 random
    unit vectors (float16 values with little redundancy, as a trained model's are) and of the
    same pages pooled by pool_embeddings at factor 3."""
    import pyarrow as pa

    from pipeline import schema, storage
    from pipeline.embed.pooling import pool_embeddings

    g = torch.Generator().manual_seed(2)
    pages = [torch.nn.functional.normalize(torch.randn(755, 128, generator=g), dim=-1) for _ in range(n_pages)]
    out = {"pages": n_pages}
    for name, vectors in (("factor_1", pages), ("factor_3", [pool_embeddings(p, 3) for p in pages])):
        arrays = [v.numpy().astype(np.float16) for v in vectors]
        table = pa.table({schema.PAGE_ID: [f"d#{i}" for i in range(n_pages)],
                          schema.N_VECTORS: pa.array([len(a) for a in arrays], pa.int32()),
                          schema.EMBEDDING: schema.embeddings_to_arrow(arrays)})
        out[name] = {"vectors": sum(len(a) for a in arrays), "parquet_bytes": len(storage.parquet_bytes(table))}
    out["bytes_ratio"] = round(out["factor_3"]["parquet_bytes"] / out["factor_1"]["parquet_bytes"], 4)
    return out


def scoring(n_pages: int, n_queries: int, repeats: int = 3) -> dict:
    from pipeline.score.maxsim import maxsim_scores, pack_pages

    g = torch.Generator().manual_seed(0)
    Q = torch.nn.functional.normalize(torch.randn(n_queries, 25, 128, generator=g, dtype=torch.float64), dim=-1)
    out = {"pages": n_pages, "queries": n_queries, "query_vectors": 25}
    for name, length in (("unpooled_755", 755), ("pooled_f3_251", 755 // 3)):
        pages = [torch.nn.functional.normalize(torch.randn(length, 128, generator=g), dim=-1).half()
                 for _ in range(n_pages)]
        packed = pack_pages(pages, dtype=torch.float64)  # what a CPU scoring actor holds
        maxsim_scores(Q[:2], packed)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            maxsim_scores(Q, packed)
            times.append(time.perf_counter() - t)
        out[name] = {"vectors_per_page": length, "seconds_median": round(statistics.median(times), 3),
                     "seconds_all": [round(x, 3) for x in times],
                     "packed_bytes": int(packed.vectors.numel() * packed.vectors.element_size())}
    out["time_ratio"] = round(out["pooled_f3_251"]["seconds_median"] / out["unpooled_755"]["seconds_median"], 4)
    return out


def pooling_cost(n_pages: int = 5) -> dict:
    from scipy.cluster.hierarchy import fcluster, linkage

    from pipeline.embed.pooling import pool_embeddings

    g = torch.Generator().manual_seed(1)
    steps = {"similarity_and_pdist": [], "ward_and_fcluster": [], "pool_embeddings_total": []}
    for _ in range(n_pages):
        x = torch.nn.functional.normalize(torch.randn(755, 128, generator=g), dim=-1)
        t = time.perf_counter()
        condensed = torch.nn.functional.pdist((1 - x @ x.T).double()).numpy()
        t1 = time.perf_counter()
        fcluster(linkage(condensed, method="ward"), t=755 // 3, criterion="maxclust")
        t2 = time.perf_counter()
        pool_embeddings(x, 3)
        t3 = time.perf_counter()
        steps["similarity_and_pdist"].append(t1 - t)
        steps["ward_and_fcluster"].append(t2 - t1)
        steps["pool_embeddings_total"].append(t3 - t2)
    return {k + "_ms_median": round(1000 * statistics.median(v), 1) for k, v in steps.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=400)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--json")
    ap.add_argument("--skip-storage", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # a CPU scoring actor's default (--cpus-per-actor 1)
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "pooling_cost_cpu_755_tokens_f3": pooling_cost(),
              "scoring": scoring(args.pages, args.queries),
              "storage_high_entropy": storage_high_entropy()}
    if not args.skip_storage:
        with tempfile.TemporaryDirectory() as tmp:
            result["storage"] = storage(tmp)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
