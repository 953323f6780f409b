"""GPU check of the job's scoring path (no Ray needed): ShardScorer on CUDA vs CPU vs float64 oracle.

    PYTHONPATH=$PWD python3 benchmarks/check_gpu_scoring.py
Writes a synthetic ragged corpus (3 files), scores it with ShardScorer on cuda (Triton kernel) and on cpu
(torch float64), for several shard sizes, and checks that all top-k lists equal the float64 oracle.
"""

import sys
import tempfile

import numpy as np

from pipeline.score.merge import merge_topk
from pipeline.score.corpus import open_corpus, plan_shards, read_vector_counts
from pipeline.score.scorer import ShardScorer, empty_candidates
from pipeline.devtools.synthetic import oracle_ranking, random_pages, random_queries, write_corpus


def run(device, corpus, queries, k, shard_size, batch, backend="auto"):
    c = open_corpus(corpus)
    shards = plan_shards(c, read_vector_counts(c), shard_size)
    flat = np.concatenate(queries)
    scorer = ShardScorer(corpus, None, flat, np.array([len(q) for q in queries]), k, query_batch_size=batch,
                         device=device, backend=backend)
    merged = merge_topk([empty_candidates()], k)
    for s in shards:
        cand, stats = scorer.score(s)
        merged = merge_topk([merged.drop_columns(["rank"]), cand], k)
    return merged


def main():
    rng = np.random.default_rng(0)
    pages = random_pages(300, rng, min_len=1, max_len=200)
    queries = random_queries(40, rng, max_len=32)
    k = 10
    ok = True
    with tempfile.TemporaryDirectory() as d:
        corpus = write_corpus(d, pages, n_files=3)
        truth = oracle_ranking(queries, pages, k)
        tables = []
        # The Triton kernel (auto on CUDA) at three shard/batch sizes, the torch fallback on CUDA
        # (float16 operands, float32 similarities), and the CPU float64 path.
        for device, shard, batch, backend in [("cuda", 300, 0, "auto"), ("cuda", 37, 7, "auto"), ("cuda", 1, 40, "auto"),
                                              ("cuda", 64, 0, "torch"), ("cpu", 64, 0, "auto")]:
            t = run(device, corpus, queries, k, shard, batch, backend)
            got = t.to_pydict()
            ids_ok = all(
                [got["page_id"][r] for r, q in enumerate(got["query_index"]) if q == qi] == [p for p, _ in truth[qi]]
                for qi in range(len(queries))
            )
            err = max(abs(s - dict(truth[q])[p]) for q, p, s in zip(got["query_index"], got["page_id"], got["score"]))
            print(f"{device} {backend} shard={shard} batch={batch}: oracle ids equal {ids_ok}, max score err {err:.2e}")
            ok &= err < 1e-4
            ok &= ids_ok
            tables.append(t)
        same = all(t.select(["query_index", "page_id", "rank"]).equals(tables[0].select(["query_index", "page_id", "rank"]))
                   for t in tables)
        gpu_same = all(t.equals(tables[0]) for t in tables[:3])
        print(f"rankings identical across devices/shards: {same}; GPU tables bit-identical across shards: {gpu_same}")
        ok &= same and gpu_same
    print("GPU CHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
