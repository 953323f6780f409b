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
import sys

from pipeline.config import (CACHE_HELP, KEEP_SCORERS_HELP, PRECISION_HELP, SCORE_PRECISIONS, score_config,
                             shard_size_arg)

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
    io.add_argument("--top-k", required=True, type=int, metavar="K",
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
    q.add_argument("--embed-batch-size", type=int, default=32,
                   help="queries per model forward pass (default: %(default)s)")
    q.add_argument("--max-visual-tokens", type=int, default=None,
                   help="refuse a corpus embedded with another visual-token budget (default: not checked)")
    io.add_argument("--generation", type=int, default=None, metavar="N", help="which generation of an output "
                    "with several (embed_corpus --force-new-config) to score (default: its current one)")
    q.add_argument("--allow-model-mismatch", action="store_true",
                   help="score even if the corpus was embedded with another model, query prompt or token budget, "
                        "or mixes pool factors (pooled and unpooled files) or precisions (--precision fp8 and default)")
    s = p.add_argument_group("sharding and actors")
    s.add_argument("--shard-size-pages", type=shard_size_arg, default="auto", metavar="N|auto",
                   help="pages per corpus shard; 'auto' sizes a shard to 30%% of the free memory of one worker "
                        "(GPU memory on GPU actors, RAM on CPU), and makes at least one shard per actor")
    s.add_argument("--query-batch-size", type=int, default=0, metavar="N",
                   help="queries scored together against a loaded shard; 0 = auto (GPU: keep the per-batch "
                        "maxima under 4 GiB; CPU: 256)")
    s.add_argument("--num-actors", type=int, default=0, metavar="N",
                   help="scoring actors; 0 = one per GPU of the cluster, or min(4, CPUs) without GPUs")
    s.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="where shards are scored (default auto: GPUs when the cluster has them now or its "
                        "autoscaler can add GPU nodes)")
    s.add_argument("--gpus-per-actor", type=float, default=None, metavar="G",
                   help="GPUs per actor (default: 1 if the cluster has GPUs, else 0 = CPU scoring)")
    s.add_argument("--cpus-per-actor", type=float, default=1, metavar="C",
                   help="CPUs per actor; CPU actors use that many torch threads (default: %(default)s)")
    s.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="MaxSim implementation: the fused Triton kernel on CUDA, torch elsewhere (default: auto)")
    s.add_argument("--precision", choices=SCORE_PRECISIONS, default="exact", help=PRECISION_HELP)
    s.add_argument("--cache", action="store_true", help=CACHE_HELP)
    s.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                   help="do not read an actor's next shard while it scores this one (less host memory)")
    s.add_argument("--keep-scorers", type=float, default=0.0, metavar="SECONDS", help=KEEP_SCORERS_HELP)
    s.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster to join (default: RAY_ADDRESS, a local `ray start` cluster, or an embedded Ray)")
    s.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    s.add_argument("--debug", action="store_true", help="print the traceback of an unexpected error")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = score_config(vars(args))
    except ValueError as exc:
        parser.error(str(exc))
    from pipeline.score import flow

    try:  # no credentials or no answer, a corpus or queries that cannot be scored as given: said before any work
        summary = flow.run(cfg)
    except flow.INPUT_ERRORS as exc:
        return print(f"error: {exc}", file=sys.stderr) or 2
    print(json.dumps({k: summary[k] for k in flow.PRINTED_SUMMARY_KEYS if k in summary}))
    return 0


if __name__ == "__main__":
    from pipeline import cli

    sys.exit(cli.guarded(main, prog="score_queries"))
