"""Score a run against qrels with ir_measures.

    python -m jobs.evaluate --run OUT/run.trec --qrels qrels.tsv --output EVAL/ \\
        [--measure P@5 --measure "nDCG(cutoff=20)"] [--corpus CORPUS/] [--endpoint-url URL]

Writes ``EVAL/metrics.json`` (aggregate values keyed by ir_measures names, nothing else),
``EVAL/per_query.parquet`` (query_id, measure, value) and ``EVAL/summary.json`` (inputs,
counts, warnings, time). No Ray: this is a few seconds of CPU even for large query sets.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline import cli, storage
from pipeline.config import DEFAULT_MEASURES, EvaluateConfig
from pipeline.evaluate import flow

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--run", required=True, help="TREC run file, results.parquet, or a scoring output folder (any URI)"
    )
    parser.add_argument("--qrels", required=True, help="TREC qrels or BEIR-style TSV with a header (any URI)")
    parser.add_argument("--output", required=True, help="folder URI for metrics.json, per_query.parquet, summary.json")
    parser.add_argument(
        "--measure",
        action="append",
        default=[],
        metavar="NAME",
        help=f"extra ir_measures measure (repeatable, or comma-separated); always computed: {', '.join(DEFAULT_MEASURES)}",
    )
    parser.add_argument("--corpus", help="corpus URI (CORPUS or CORPUS/pages): report run and judged pages it lacks")
    parser.add_argument(
        "--ranking",
        choices=("score", "rank"),
        default="score",
        help="order pages by score, as trec_eval does (ties: page id descending), or by the run's own ranks",
    )
    parser.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL)")
    return parser


def format_metrics(metrics: dict[str, float]) -> str:
    width = max(len(name) for name in metrics)
    return "\n".join(f"{name:<{width}}  {value:.4f}" for name, value in metrics.items())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = EvaluateConfig(run=args.run, qrels=args.qrels, output=args.output, measures=flow.measure_names(args.measure),
                             corpus=args.corpus, endpoint_url=args.endpoint_url, ranking=args.ranking)
    except ValueError as exc:
        build_parser().error(str(exc))
    try:  # a missing or malformed run, qrels or corpus, another job's folder as --output: one line, exit 2
        flow.refuse_another_jobs_output(cfg.output, cfg.endpoint_url, allowed=("evaluate",))
        summary = flow.run_evaluation(cfg)
    except flow.INPUT_ERRORS as exc:
        if cli.debugging():
            raise
        return print(f"error: {exc}", file=sys.stderr) or 2
    print(format_metrics(summary["metrics"]))
    if summary["warnings"]:  # each was logged above as it was found
        print(f"{len(summary['warnings'])} warning(s) above, also in summary.json", file=sys.stderr)
    print(f"wrote {storage.join_uri(args.output, 'metrics.json')}")
    return 0


if __name__ == "__main__":
    from pipeline import cli

    sys.exit(cli.guarded(main, prog="evaluate"))
