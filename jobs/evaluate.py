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
import time

from pipeline import __version__
from pipeline.evaluate import metrics as evaluate

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
        help=f"extra ir_measures measure (repeatable, or comma-separated); always computed: {', '.join(evaluate.DEFAULT_MEASURES)}",
    )
    parser.add_argument("--corpus", help="corpus URI (CORPUS or CORPUS/pages): report run and judged pages it lacks")
    parser.add_argument(
        "--ranking",
        choices=("score", "rank"),
        default="score",
        help="order pages by score, as trec_eval does (ties: page id descending), or by the run's own ranks",
    )
    parser.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    return parser


def measure_names(extra: list[str]) -> list[str]:
    """Defaults followed by the names given on the command line (comma-separated allowed,
    except inside parentheses, as in ``P(rel=2,judged_only=True)@5``)."""
    names = list(evaluate.DEFAULT_MEASURES)
    for item in extra:
        depth, current = 0, ""
        for char in item:
            depth += char == "("
            depth -= char == ")"
            if char == "," and depth == 0:
                names.append(current)
                current = ""
            else:
                current += char
        names.append(current)
    return [str(m) for m in evaluate.parse_measures(names)]


def run_evaluation(
    run_uri: str,
    qrels_uri: str,
    output_uri: str,
    measures: list[str],
    corpus_uri: str | None = None,
    endpoint_url: str | None = None,
    ranking: str = "score",
) -> dict:
    """Read, evaluate and write; returns the summary (also written as summary.json)."""
    started = time.time()
    qrels = evaluate.read_qrels(qrels_uri, endpoint_url)
    run = evaluate.read_run(run_uri, endpoint_url)
    corpus_ids = evaluate.read_corpus_page_ids(corpus_uri, endpoint_url) if corpus_uri else None
    result = evaluate.evaluate(qrels, run, measures, corpus_page_ids=corpus_ids, ranking=ranking)

    evaluate.write_json(evaluate.join_uri(output_uri, "metrics.json"), result.aggregate, endpoint_url)
    evaluate.write_parquet(
        evaluate.join_uri(output_uri, "per_query.parquet"), evaluate.per_query_table(result.per_query), endpoint_url
    )
    summary = {
        "job": "evaluate",
        "version": __version__,
        "run": run_uri,
        "qrels": qrels_uri,
        "corpus": corpus_uri,
        "output": output_uri,
        "measures": measures,
        "metrics": result.aggregate,
        "counts": result.diagnostics,
        "warnings": result.warnings,
        "elapsed_s": round(time.time() - started, 3),
    }
    evaluate.write_json(evaluate.join_uri(output_uri, "summary.json"), summary, endpoint_url)
    return summary


def format_metrics(metrics: dict[str, float]) -> str:
    width = max(len(name) for name in metrics)
    return "\n".join(f"{name:<{width}}  {value:.4f}" for name, value in metrics.items())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        measures = measure_names(args.measure)
    except ValueError as exc:
        build_parser().error(str(exc))
    summary = run_evaluation(
        args.run, args.qrels, args.output, measures, args.corpus, args.endpoint_url, ranking=args.ranking
    )
    print(format_metrics(summary["metrics"]))
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {evaluate.join_uri(args.output, 'metrics.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
