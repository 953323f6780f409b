"""Score a query set against an embedded corpus: exact MaxSim, sharded on Ray, exact top-k.

    python -m jobs.score_queries --corpus s3://bucket/emb/ --queries queries.jsonl \\
        --output s3://bucket/runs/2026-11-22/ --top-k 100
    ray job submit --working-dir . -- python -m jobs.score_queries ...

Writes OUTPUT/results.parquet, OUTPUT/run.trec, OUTPUT/query_embeddings.parquet and
OUTPUT/summary.json. See --help.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time

import numpy as np
import pyarrow as pa

from pipeline import schema
from pipeline.score.merge import QUERY_INDEX, merge_topk

log = logging.getLogger("jobs.score_queries")

DESCRIPTION = """\
Score queries against a corpus embedded by jobs.embed_corpus, with exact MaxSim:
score(q, p) = sum over the query's vectors of the max dot product over the page's real
vectors (no padding ever takes part), accumulated in float32; top-k ties go to the lower
page_id. Results do not depend on shard count, batch sizes or actor count.

How it runs: queries are embedded once (or read back with --query-embeddings); the corpus
(CORPUS/pages/*.parquet) is cut into shards that fit one worker; a pool of Ray actors
(one GPU each where the cluster has GPUs, else CPU) loads each shard ONCE and scores
every query batch against it; per-shard top-k lists are merged into the global top-k.
With no --ray-address and no RAY_ADDRESS, it joins a local `ray start` cluster or starts
an embedded Ray.

Outputs under --output (local path, s3://, gs://):
  results.parquet          query_id, rank, page_id, doc_id, page_number, score (float32)
  run.trec                 qid Q0 page_id rank score tag
  query_embeddings.parquet query_id, text, n_vectors, embedding (reuse with --query-embeddings)
  summary.json             counts, shards, pages scored per second, times
"""

EPILOG = """\
examples:
  # local corpus, embedded Ray, default model taken from the corpus metadata
  python -m jobs.score_queries --corpus out/emb --queries q.jsonl --output out/run1 --top-k 10
  # rescore without the model, 4 GPU actors, shards of 50,000 pages
  python -m jobs.score_queries --corpus s3://b/emb --queries q.jsonl --output s3://b/run2 \\
      --top-k 100 --query-embeddings s3://b/run1/query_embeddings.parquet \\
      --num-actors 4 --gpus-per-actor 1 --shard-size-pages 50000
  # MinIO / moto / Ceph: --endpoint-url http://host:9000 (or AWS_ENDPOINT_URL)
"""


def _shard_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--shard-size-pages must be a positive integer or 'auto', got {value!r}") from exc
    if n < 1:
        raise argparse.ArgumentTypeError(f"--shard-size-pages must be >= 1, got {n}")
    return n


def _positive(name: str):
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {value!r}") from exc
        if n < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {n}")
        return n

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.score_queries", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--corpus", required=True, metavar="URI",
                    help="output folder of jobs.embed_corpus (its pages/*.parquet are read), or one pages Parquet file")
    io.add_argument("--queries", required=True, metavar="FILE",
                    help="query set: .jsonl, .csv, .tsv or .parquet with columns query_id and text (ids unique, non-empty)")
    io.add_argument("--output", required=True, metavar="URI", help="folder for results.parquet, run.trec, "
                    "query_embeddings.parquet and summary.json (overwritten)")
    io.add_argument("--top-k", required=True, type=_positive("--top-k"), metavar="K",
                    help="results per query (fewer when the corpus has fewer pages)")
    io.add_argument("--endpoint-url", default=None, metavar="URL",
                    help="S3-compatible endpoint (MinIO, moto, Ceph); default: AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3")
    io.add_argument("--run-tag", default="colqwen2-maxsim", help="last column of run.trec (default: %(default)s)")
    q = p.add_argument_group("query embedding")
    q.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                   help="ColQwen2 checkpoint (hub name, local folder, s3:// or gs:// prefix); default: the model "
                        "recorded in the corpus metadata. Must be the corpus's model unless --allow-model-mismatch")
    q.add_argument("--query-embeddings", default=None, metavar="URI",
                   help="reuse a query_embeddings.parquet of an earlier run instead of loading the model; it must "
                        "hold every query_id of --queries")
    q.add_argument("--embed-batch-size", type=_positive("--embed-batch-size"), default=32,
                   help="queries per model forward pass (default: %(default)s)")
    q.add_argument("--max-visual-tokens", type=int, default=None,
                   help="refuse a corpus embedded with another visual-token budget (default: not checked)")
    q.add_argument("--allow-model-mismatch", action="store_true",
                   help="score even if the corpus was embedded with another model, query prompt or token budget")
    s = p.add_argument_group("sharding and actors")
    s.add_argument("--shard-size-pages", type=_shard_size, default="auto", metavar="N|auto",
                   help="pages per corpus shard; 'auto' sizes a shard to 30%% of the free memory of one worker "
                        "(GPU memory on GPU actors, RAM on CPU), and makes at least one shard per actor")
    s.add_argument("--query-batch-size", type=int, default=0, metavar="N",
                   help="queries scored together against a loaded shard; 0 = auto (GPU: keep the per-batch "
                        "maxima under 4 GiB; CPU: 256)")
    s.add_argument("--num-actors", type=int, default=0, metavar="N",
                   help="scoring actors; 0 = one per GPU of the cluster, or min(4, CPUs) without GPUs")
    s.add_argument("--gpus-per-actor", type=float, default=None, metavar="G",
                   help="GPUs per actor (default: 1 if the cluster has GPUs, else 0 = CPU scoring)")
    s.add_argument("--cpus-per-actor", type=float, default=1, metavar="C",
                   help="CPUs per actor; CPU actors use that many torch threads (default: %(default)s)")
    s.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="MaxSim implementation: the fused Triton kernel on CUDA, torch elsewhere (default: auto)")
    s.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster to join (default: RAY_ADDRESS, a local `ray start` cluster, or an embedded Ray)")
    return p


def _read_query_embeddings(uri: str, endpoint_url: str | None, queries: pa.Table) -> pa.Table:
    import pyarrow.parquet as pq

    from pipeline.storage import open_filesystem

    fs, path = open_filesystem(uri, endpoint_url)
    with fs.open_input_file(path) as f:
        table = pq.read_table(f)
    missing = [c for c in (schema.QUERY_ID, schema.EMBEDDING) if c not in table.column_names]
    if missing:
        raise ValueError(f"--query-embeddings {uri} lacks column(s) {missing}; pass a query_embeddings.parquet "
                         "written by this job")
    index = {qid: i for i, qid in enumerate(table.column(schema.QUERY_ID).to_pylist())}
    wanted = queries.column(schema.QUERY_ID).to_pylist()
    absent = [q for q in wanted if q not in index]
    if absent:
        raise ValueError(f"--query-embeddings {uri} has no embedding for {len(absent)} query id(s), e.g. "
                         f"{absent[:5]}; re-embed (drop --query-embeddings) or pass the matching file")
    rows = table.take(pa.array([index[q] for q in wanted]))
    emb = rows.column(schema.EMBEDDING).cast(schema.EMBEDDING_TYPE)
    return pa.table({
        schema.QUERY_ID: queries.column(schema.QUERY_ID), schema.TEXT: queries.column(schema.TEXT),
        schema.N_VECTORS: pa.array(np.diff(emb.combine_chunks().offsets.to_numpy()).astype(np.int32)),
        schema.EMBEDDING: emb,
    }, schema=schema.QUERY_EMBEDDINGS_SCHEMA)


def _embed_queries_remote(model_name: str, texts: list[str], batch_size: int, endpoint_url: str | None,
                          num_gpus: float) -> list[np.ndarray]:
    """Embed on a Ray worker with the actors' resources (the driver may have no GPU)."""
    import ray

    def embed(name, texts, batch_size, endpoint_url):
        from pipeline.embed.model import embed_queries, load_model

        lm = load_model(name, endpoint_url=endpoint_url)
        return [np.asarray(v, dtype=np.float16) for v in embed_queries(lm, texts, batch_size=batch_size)]

    task = ray.remote(num_gpus=num_gpus, num_cpus=1, max_retries=0)(embed)
    return ray.get(task.remote(model_name, texts, batch_size, endpoint_url))


def _cluster_defaults(args) -> tuple[int, float]:
    import ray

    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0))
    cpus = float(res.get("CPU", 1))
    gpus_per_actor = args.gpus_per_actor if args.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if args.num_actors:
        n = args.num_actors
    elif gpus_per_actor > 0:
        n = max(1, int(gpus // gpus_per_actor))
    else:
        n = max(1, min(4, int(cpus // max(args.cpus_per_actor, 1e-9)) - 0))
    return n, gpus_per_actor


_WHITESPACE = re.compile(r"\s")


def trec_id(page_id: str) -> str:
    """A page_id as a TREC run file can hold it: whitespace (paths with spaces) percent-encoded.

    TREC run and qrels lines are split on whitespace, so ``a b.pdf#1`` is written
    ``a%20b.pdf#1``; results.parquet keeps the exact id.

    >>> trec_id("reports/annual report.pdf#2")
    'reports/annual%20report.pdf#2'
    """
    return _WHITESPACE.sub(lambda m: "%" + format(ord(m.group()), "02X"), page_id)


def _write_outputs(args, results: pa.Table, query_emb: pa.Table, summary: dict) -> None:
    from pipeline.storage import join_uri
    from pipeline.embed.plan import write_bytes_atomic, write_json, write_table

    out = args.output
    write_table(query_emb, join_uri(out, "query_embeddings.parquet"), args.endpoint_url)
    write_table(results, join_uri(out, "results.parquet"), args.endpoint_url)
    lines = [
        f"{q} Q0 {trec_id(p)} {r} {np.format_float_positional(np.float32(s), unique=True, trim='-')} {args.run_tag}\n"
        for q, p, r, s in zip(
            results.column(schema.QUERY_ID).to_pylist(), results.column(schema.PAGE_ID).to_pylist(),
            results.column(schema.RANK).to_pylist(), results.column(schema.SCORE).to_pylist(),
        )
    ]
    write_bytes_atomic(join_uri(out, "run.trec"), "".join(lines).encode("utf-8"), args.endpoint_url)
    write_json(join_uri(out, "summary.json"), summary, args.endpoint_url)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t_start = time.perf_counter()

    from pipeline.embed import model as model_mod
    from pipeline.score.queries import read_queries
    from pipeline.cluster import ensure_ray
    from pipeline.score.maxsim import auto_pages_per_shard
    from pipeline.score.corpus import (
        ShardScorer,
        check_compatibility,
        empty_candidates,
        open_corpus,
        plan_shards,
        read_vector_counts,
    )

    # Everything that can be wrong with the inputs fails here, before any heavy work.
    corpus = open_corpus(args.corpus, args.endpoint_url)
    queries = read_queries(args.queries, args.endpoint_url)
    corpus_model = corpus.metadata.get(schema.META_MODEL.decode())
    model_name = args.model or corpus_model or model_mod.DEFAULT_MODEL
    check_compatibility(
        corpus,
        model=None if args.query_embeddings else model_name,
        query_prompt=None if args.query_embeddings else model_mod.QUERY_PROMPT,
        max_visual_tokens=args.max_visual_tokens,
        allow_mismatch=args.allow_model_mismatch,
    )
    log.info("corpus %s: %d file(s), %d page rows, model %s; %d queries", args.corpus, len(corpus.files),
             corpus.num_rows, corpus_model, queries.num_rows)

    ensure_ray(args.ray_address)
    import ray

    num_actors, gpus_per_actor = _cluster_defaults(args)

    # Queries: embed once, store as float16 (the values every score uses, so a rescore from
    # query_embeddings.parquet gives the same numbers).
    t0 = time.perf_counter()
    if args.query_embeddings:
        query_emb = _read_query_embeddings(args.query_embeddings, args.endpoint_url, queries)
        log.info("reusing %d query embeddings from %s (no model loaded)", query_emb.num_rows, args.query_embeddings)
    else:
        texts = queries.column(schema.TEXT).to_pylist()
        vectors = _embed_queries_remote(model_name, texts, args.embed_batch_size, args.endpoint_url,
                                        gpus_per_actor if gpus_per_actor > 0 else 0) if texts else []
        query_emb = pa.table({
            schema.QUERY_ID: queries.column(schema.QUERY_ID), schema.TEXT: queries.column(schema.TEXT),
            schema.N_VECTORS: pa.array([len(v) for v in vectors], pa.int32()),
            schema.EMBEDDING: schema.embeddings_to_arrow(vectors),
        }, schema=schema.QUERY_EMBEDDINGS_SCHEMA)
        log.info("embedded %d queries with %s in %.1f s", len(vectors), model_name, time.perf_counter() - t0)
    t_embed = time.perf_counter() - t0
    emb_col = query_emb.column(schema.EMBEDDING).combine_chunks()
    q_lengths = np.diff(emb_col.offsets.to_numpy()).astype(np.int64)
    if (q_lengths == 0).any():
        bad = query_emb.column(schema.QUERY_ID).filter(pa.array(q_lengths == 0)).to_pylist()
        raise ValueError(f"queries {bad[:5]} have no vectors; their embeddings are empty")
    q_flat = emb_col.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, schema.EMBEDDING_DIM)

    # Shards.
    counts = read_vector_counts(corpus, args.endpoint_url)
    total_vectors = int(sum(int(c.sum()) for c in counts))
    mean_vectors = total_vectors / max(1, corpus.num_rows)
    actor_options = {"num_cpus": args.cpus_per_actor, "num_gpus": gpus_per_actor, "max_restarts": 0}
    Scorer = ray.remote(ShardScorer)
    if args.shard_size_pages == "auto":
        probe = Scorer.options(**actor_options).remote(
            corpus.uri, args.endpoint_url, q_flat[:0], q_lengths[:0], args.top_k, device=None)
        memory = ray.get(probe.memory_bytes.remote())
        gpu = gpus_per_actor > 0
        ray.kill(probe)
        # CPU actors compute in float64 (8 bytes) and share the node's RAM with each other.
        per_actor = memory if gpu else memory // max(1, num_actors)
        # 0.3: packing holds the Arrow values, the padded copy and gather indices at once, and
        # a query batch adds its (pages x query vectors) maxima.
        pages_per_shard = auto_pages_per_shard(mean_vectors, per_actor, dtype_bytes=2 if gpu else 8, fraction=0.3)
        pages_per_shard = min(pages_per_shard, max(1, -(-corpus.num_rows // num_actors)))
    else:
        pages_per_shard = args.shard_size_pages
    shards = plan_shards(corpus, counts, pages_per_shard) if corpus.num_rows else []
    num_actors = max(1, min(num_actors, len(shards))) if shards else 0
    log.info("%d pages (%.0f vectors/page) in %d shard(s) of <= %d pages; %d actor(s), %s GPU each",
             corpus.num_rows, mean_vectors, len(shards), pages_per_shard, num_actors, gpus_per_actor)

    # Score: each actor takes the next shard when it is free; results merge as they arrive.
    t0 = time.perf_counter()
    merged = merge_topk([empty_candidates()], args.top_k)
    shard_stats = []
    if shards and queries.num_rows:
        q_flat_ref, q_len_ref = ray.put(q_flat), ray.put(q_lengths)
        cpu_threads = max(1, int(args.cpus_per_actor))
        actors = [
            Scorer.options(**actor_options).remote(
                corpus.uri, args.endpoint_url, q_flat_ref, q_len_ref, args.top_k,
                query_batch_size=args.query_batch_size, backend=args.backend, cpu_threads=cpu_threads)
            for _ in range(num_actors)
        ]
        pool = ray.util.ActorPool(actors)
        pages_done = 0
        for candidates, stats in pool.map_unordered(lambda a, spec: a.score.remote(spec), shards):
            merged = merge_topk([merged.drop_columns([schema.RANK]), candidates], args.top_k)
            shard_stats.append(stats)
            pages_done += stats["pages"]
            elapsed = time.perf_counter() - t0
            log.info("shard %d/%d done (%d pages, %.1f s on %s); %d/%d pages, %.0f pages/s",
                     len(shard_stats), len(shards), stats["pages"], stats["total_s"], stats["device"],
                     pages_done, corpus.num_rows, pages_done / max(elapsed, 1e-9))
        for a in actors:
            ray.kill(a)
    t_score = time.perf_counter() - t0

    qids = queries.column(schema.QUERY_ID)
    results = pa.table({
        schema.QUERY_ID: qids.take(merged.column(QUERY_INDEX)),
        schema.RANK: merged.column(schema.RANK),
        schema.PAGE_ID: merged.column(schema.PAGE_ID),
        schema.DOC_ID: merged.column(schema.DOC_ID),
        schema.PAGE_NUMBER: merged.column(schema.PAGE_NUMBER).cast(pa.int32()),
        schema.SCORE: merged.column(schema.SCORE).cast(pa.float32()),
    }, schema=schema.RESULTS_SCHEMA)
    pages_scored = sum(s["pages"] for s in shard_stats)
    summary = {
        "corpus": args.corpus, "queries_file": args.queries, "output": args.output,
        "model": None if args.query_embeddings else model_name, "corpus_model": corpus_model,
        "query_embeddings_reused": args.query_embeddings,
        "n_queries": queries.num_rows, "n_query_vectors": int(q_lengths.sum()),
        "n_pages": pages_scored, "n_pages_dropped_empty": sum(s["dropped_empty_pages"] for s in shard_stats),
        "n_corpus_files": len(corpus.files), "n_vectors": total_vectors,
        "top_k": args.top_k, "n_results": results.num_rows,
        "n_shards": len(shards), "shard_size_pages": pages_per_shard, "num_actors": num_actors,
        "gpus_per_actor": gpus_per_actor, "query_batch_size": args.query_batch_size or "auto",
        "backend": args.backend, "devices": sorted({s["device"] for s in shard_stats}),
        "pages_scored_per_s": pages_scored / t_score if t_score > 0 and pages_scored else 0.0,
        "query_page_pairs_per_s": pages_scored * queries.num_rows / t_score if t_score > 0 else 0.0,
        "embed_queries_s": round(t_embed, 3), "scoring_s": round(t_score, 3),
        "total_s": round(time.perf_counter() - t_start, 3),
        "shards": sorted(shard_stats, key=lambda s: s["shard_id"]),
    }
    _write_outputs(args, results, query_emb, summary)
    log.info("wrote %d results for %d queries to %s in %.1f s", results.num_rows, queries.num_rows,
             args.output, summary["total_s"])
    print(json.dumps({k: summary[k] for k in ("n_queries", "n_pages", "n_shards", "n_results",
                                              "pages_scored_per_s", "total_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
