"""Corpus embedding job: documents under a URI -> ColQwen2 multi-vector embeddings as Parquet.

    python -m jobs.embed_corpus --input s3://bucket/docs/ --output s3://bucket/emb/
    ray job submit --working-dir . -- python -m jobs.embed_corpus --input ... --output ...
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.config import DEFAULT_MAX_VISUAL_TOKENS, DEFAULT_MODEL, KEEP_EMBEDDERS_HELP, embed_config

EPILOG = """\
outputs (DESIGN.md):
  OUTPUT/pages/*.parquet   one row per page: doc_id, page_number, page_id, source_uri, width,
                           height, n_vectors, embedding (list<fixed_size_list<float16,128>>),
                           doc_pages; model, prompt, token budget and dtype in the file metadata
  OUTPUT/errors/*.parquet  one row per document or page that failed: stage, error_type, message
  OUTPUT/summary.json      counts (documents, pages, vectors, errors by type) and time; OUTPUT/config.json the options
  OUTPUT/preflight.json    --preflight's report (documents, pages, error rows, CPU ms/page, GPU-hours)

reruns: files are named by content and written atomically; a rerun embeds only documents
(and pages) that are missing, so it is safe to rerun after a crash or after adding files.
Documents that ended as error rows are skipped by a rerun unless --retry-errors is given,
except StorageUnavailable rows (storage did not answer after the retries): a plain rerun
tries those again. A storage endpoint that is down at the start fails the job in seconds.
Rows record their source's size and mtime: a rerun embeds changed files again (old rows
removed) and removes the rows of deleted ones (a SourceDeleted error row each). A rerun with
another --model, --max-visual-tokens, --dtype, --pool-factor, --precision or prompt is refused (exit 2) unless
--force-new-config starts OUTPUT/generations/<n>/ (named by OUTPUT/generation.json), which
readers then use instead of OUTPUT/pages.

examples:
  python -m jobs.embed_corpus --input ./docs --output ./emb --model models/tiny-colqwen2  # jobs.build_tiny_model's
  AWS_ENDPOINT_URL=http://127.0.0.1:9000 python -m jobs.embed_corpus \\
      --input s3://bucket/docs/ --output s3://bucket/emb/ --max-actors 8 --batch-size 16
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.embed_corpus",
        description="Embed every PDF and image under --input with ColQwen2 on a Ray cluster "
        "(starts an embedded local Ray when none is running) and write Parquet to --output.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = p.add_argument_group("input and output")
    io.add_argument("--input", help="folder, single file, s3:// or gs:// prefix holding PDFs and images")
    io.add_argument("--output", help="folder, s3:// or gs:// prefix for pages/, errors/ and summary.json")
    io.add_argument("--endpoint-url", help="S3 endpoint (MinIO, Ceph...); default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL")
    io.add_argument("--all-files", action="store_true", default=None,
                    help="also try files without a PDF/image extension (they become error rows if unreadable)")
    io.add_argument("--config", help="YAML file of these options (flag names as keys); flags given here win")
    m = p.add_argument_group("model")
    m.add_argument("--model", help=f"hub name, local directory or s3:// / gs:// prefix (default: {DEFAULT_MODEL})")
    m.add_argument("--max-visual-tokens", type=int,
                   help=f"visual tokens per page; pages are rendered to meet it (default: {DEFAULT_MAX_VISUAL_TOKENS}, as trained)")
    m.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], help="default auto: bf16 on GPU, fp32 on CPU")
    m.add_argument("--attn-implementation", help="default auto: flash_attention_2 if installed, else sdpa")
    m.add_argument("--load-in-4bit", action="store_true", default=None, help=argparse.SUPPRESS)  # removed: says why
    m.add_argument("--compile", choices=["auto", "on", "off", "plain"], help="torch.compile the vision and text blocks: the actor 1.47x the pages/s of transformers' plain forward on an H200 (65.6 vs 44.5 pages/s, with two batches in flight; 2026-12-05, benchmarks/RESULTS.md) after an 8-17 s first batch on a node that never compiled the model; on: each block type compiled ahead of time and kept whole beside the compile cache, so later actors load it without tracing again; plain: torch.compile per block, traced again in each new actor (as before 2026-12-05). On a GPU node with no compiled blocks yet, a helper process compiles them while the actor runs its first batches eagerly ($VDR_COMPILE_HELPER=0 turns it off; $VDR_COMPILE_HELPER_PROCESSES, default 1; 2: one per block type): cold 3,000-page jobs 4.0 s shorter on an H200, 4.1-7.5 s on H100s, the helper's blocks as fast as the actor's own (README) (default: auto = on with GPUs)"),
    m.add_argument("--precision", choices=["default", "fp8"], help="fp8: the large matmuls in FP8 (GPUs of compute capability 8.9+; speed and fidelity against bf16 in benchmarks/RESULTS.md; recorded as vdr.precision, and scoring refuses a corpus that mixes precisions) (default: every matmul in --dtype)")
    m.add_argument("--vision-attention", choices=["auto", "sdpa", "fa4"], help="the vision tower's attention kernel: fa4 = FlashAttention 4 (pip install 'vdr-pipeline[fa4]' on the GPU nodes; head size 80 unpadded): the actor 68.5 against 64.2 pages/s on an H100, vectors within bf16 rounding (benchmarks/RESULTS.md); loaded in a thread while the first batches run on SDPA (default: auto = fa4 where installed on a Hopper GPU for a Qwen2-VL model in bf16/fp16 without FlashAttention 2, else sdpa; $VDR_VISION_ATTENTION decides where neither this flag nor --config gives it)")
    m.add_argument("--compile-cache", metavar="URI", help="shared place (s3://, gs://, a shared path) for compiled artefacts: new nodes load them instead of compiling (each node also keeps its own in $VDR_COMPILE_CACHE)")
    m.add_argument("--pool-factor", type=int, help="hierarchical token pooling (colpali-engine's; distances and Ward's merge loop on the actor's GPU with Triton installed, beside the next batch; $VDR_WARD_ON_DEVICE=0, or a CPU actor: the merge on the host in $VDR_POOL_PROCESSES worker processes per actor, default 2, ~155 MiB of host memory together): about 1/N of each page's vectors, storage and scoring cost; N=3 kept ~97.8%% of retrieval quality in the ColPali paper (default: 1 = off; queries are never pooled)")
    a = p.add_argument_group("GPU actor pool")
    a.add_argument("--batch-size", type=int, help="pages per model call (default: 16)")
    a.add_argument("--batches-in-flight", type=int, choices=[1, 2], help="2: each actor prepares the next batch on the host while the GPU runs this one (two threads): GPU busy 99%% against 92%% at 1 in the 3,000-page job on an H200 (benchmarks/RESULTS.md) (default: 2 on GPUs, 1 on CPUs)")
    a.add_argument("--min-actors", type=int, help="actors kept alive (default: every GPU present at start, or, with none yet, every GPU the autoscaler can add; 1 on CPU)")
    a.add_argument("--max-actors", type=int, help="upper bound of the autoscaling pool (default: one per GPU the cluster has or can grow to)")
    a.add_argument("--keep-embedders", type=float, metavar="SECONDS", help=KEEP_EMBEDDERS_HELP)
    a.add_argument("--device", choices=["auto", "cuda", "cpu"],
                   help="where the model runs (default auto: GPUs when the cluster has them now or its autoscaler "
                   "can add GPU nodes; the log says what it chose and why)")
    a.add_argument("--gpus-per-actor", type=float, help="GPUs per model replica; 0 runs on CPU (default: 1 if the cluster has GPUs)")
    r = p.add_argument_group("rendering (CPU)")
    r.add_argument("--render-timeout-s", type=float, help="per document (the time spent waiting for its pages); a slow or hung document becomes an error row (default: 120)")
    r.add_argument("--max-dpi", type=float, help="cap on the PDF render scale (default: 300)")
    r.add_argument("--max-longest-side-px", type=int, help="cap on a rendered page's longest side (default: 8192)")
    r.add_argument("--max-image-pixels", type=int, help="images above half this are rejected as oversized (default: 178956970)")
    r.add_argument("--max-file-bytes", type=int, help="larger files become error rows (default: 1 GiB)")
    r.add_argument("--max-pages-per-doc", type=int, help="0 = no limit (default: 0)")
    r.add_argument("--docs-per-render-task", type=int, help="documents per CPU task (default: 4)")
    o = p.add_argument_group("output and cluster")
    o.add_argument("--rows-per-file", type=int, help="pages per Parquet file (default: 256)")
    o.add_argument("--retry-errors", action="store_true", default=None,
                   help="try documents that ended as error rows again (their error files are removed first; "
                   "a rerun without it skips them)")
    o.add_argument("--force-new-config", action="store_true", default=None,
                   help="OUTPUT holds vectors of other settings: start a new generation there instead of refusing")
    o.add_argument("--ray-address", help="Ray cluster to join (default: $RAY_ADDRESS, a local `ray start` cluster, or an embedded one)")
    o.add_argument("--storage-timeout-s", type=float, help="per object-storage request: connect and stall "
                   "limit, retried by the client library (default: 20, or $PIPELINE_STORAGE_TIMEOUT_S)")
    o.add_argument("--storage-attempts", type=int, help="tries per object-storage request, with the SDK's "
                   "backoff (default: 6, or $PIPELINE_STORAGE_ATTEMPTS)")
    o.add_argument("--preflight", action="store_true", default=None, help="list and render with no model and no writes but OUTPUT/preflight.json: documents, pages, the error rows a run would write, CPU ms per page, GPU-hours")
    o.add_argument("--gpu-pages-per-second", type=float, help="--preflight's rate per GPU (default: 65.6, the actor with SDPA measured on an H200 at 768 tokens, 2026-12-05, scaled by 768/--max-visual-tokens; with FlashAttention 4 installed (.[fa4]) the actor ran 70.1-70.5 on an H200, 2026-12-06: pass 70)")
    o.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    o.add_argument("--debug", action="store_true", default=None, help="print the traceback of an unexpected error")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = {k: v for k, v in vars(args).items() if k not in ("config", "verbose", "debug")}
    try:
        cfg = embed_config(options, args.config)
    except (ValueError, TypeError, OSError) as exc:
        parser.error(str(exc))
    from pipeline import storage
    from pipeline.cluster import ensure_ray
    from pipeline.embed import flow

    try:
        flow.preflight(cfg)  # a wrong --model or unreachable storage fails here, in seconds, before Ray starts
    except (storage.StorageUnavailableError, storage.StorageAccessError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, storage.StorageUnavailableError) else 2
    ensure_ray(cfg.ray_address)
    try:
        summary = (flow.run_preflight if cfg.preflight else flow.run)(cfg)
    except flow.INPUT_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    print(flow.final_line(cfg, summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    from pipeline import cli

    sys.exit(cli.guarded(main, prog="embed_corpus"))
