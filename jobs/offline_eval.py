"""Offline evaluation for schedules: queries -> scores -> metrics -> history -> report.

    python -m jobs.offline_eval --config jobs/configs/eval.yaml [--run-id daily-2026-11-22] [flags]

Flags override the YAML file; the resolved config is written to ``OUT/config.yaml`` where
``OUT = output_root/run_id`` (the outputs: :mod:`pipeline.evaluate.flow`).

Exit status: 0, or 3 when a metric dropped by more than the configured amount against the
previous run or the baseline (the summary says which), 2 for an input that cannot be used as
given (a missing or malformed file, a baseline that is not there, a corpus the scoring job
refuses), checked before anything is scored, or 1 on another error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime, timezone

from pipeline import cli
from pipeline.config import offline_eval_config
from pipeline.evaluate import flow, history
from pipeline.evaluate.schedule import iso_time

logger = logging.getLogger(__name__)

EXIT_REGRESSION = flow.EXIT_REGRESSION


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.offline_eval", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML file with the settings below (flags override it)")
    p.add_argument("--run-id", help="id of this run (default: UTC time, 20261122T013000Z); a rerun replaces its history row")
    p.add_argument("--run-time", type=iso_time, help="ISO time this run stands for in the history (default: now, UTC); for backfills, "
                                      "which jobs.schedule_eval --now passes")
    p.add_argument("--corpus", help="embedded corpus URI (holding pages/)")
    p.add_argument("--queries", help="queries file URI (.jsonl/.csv/.tsv/.parquet)")
    p.add_argument("--qrels", help="qrels URI (TREC or BEIR TSV)")
    p.add_argument("--output-root", help="runs are written to OUTPUT_ROOT/RUN_ID/")
    p.add_argument("--history", help="history folder URI (default: OUTPUT_ROOT/history)")
    p.add_argument("--model", help="model name or path for the queries (default: the corpus's)")
    p.add_argument("--max-visual-tokens", type=int, help="refuse a corpus embedded with another token budget")
    p.add_argument("--top-k", type=int, help="results kept per query when scoring (default: 100)")
    p.add_argument("--measure", action="append", dest="extra_measures", metavar="NAME",
                   help="extra ir_measures measure (repeatable, or comma-separated)")
    p.add_argument("--ranking", choices=("score", "rank"),
                   help="tied scores in trec_eval's order (score, the default) or the run's own ranks (rank)")
    p.add_argument("--baseline", help="baseline: a run id in the history or a metrics.json URI")
    p.add_argument("--pin-baseline", action="store_true", help="after this run, make it the pinned baseline")
    p.add_argument("--max-drop", type=float, help="regression threshold for every measure (absolute unless relative: true)")
    p.add_argument("--query-embeddings", help="precomputed query_embeddings.parquet (no model needed)")
    p.add_argument("--run", help="evaluate this existing run (TREC or results.parquet) instead of scoring")
    p.add_argument("--no-fail-on-regression", dest="fail_on_regression", action="store_false", default=None,
                   help="exit 0 on a regression (default: exit 3, for schedulers to flag)")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL)")
    p.add_argument("--ray-address", help="Ray cluster for the scoring job (default: the current one, or a local Ray)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "run_id", "run_time", "pin_baseline")}
    overrides["extra_measures"] = flow.split_measures(args.extra_measures or [])
    try:
        cfg = offline_eval_config(args.config, overrides)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    now = args.run_time or datetime.now(timezone.utc)
    try:
        run_id = history.validate_run_id(args.run_id or history.default_run_id(now))
    except ValueError as exc:
        parser.error(str(exc))
    try:
        status, summary = flow.run_offline_eval(cfg, run_id=run_id, pin_baseline=args.pin_baseline, now=now)
    except Exception as exc:
        # inputs as given (files, baseline, corpus; the scoring job's own refusals): one line, exit 2
        refused = isinstance(exc, flow.input_errors())
        # a scheduled run that fails leaves a history row (unless the run id has results already)
        flow.write_failure(cfg, run_id, now, exc, exit_status=2 if refused else 1)
        if refused and not cli.debugging():
            return print(f"error: {cli.one_line(exc).split(': ', 1)[-1]}", file=sys.stderr) or 2
        raise
    print(", ".join(f"{k}={v:.4f}" for k, v in summary["metrics"].items()))
    if summary["warnings"]:  # each was logged above as it was found
        print(f"{len(summary['warnings'])} warning(s) above, also in the report", file=sys.stderr)
    print(summary["result"])
    print(f"report: {summary['outputs']['report']}")
    return status


if __name__ == "__main__":
    from pipeline import cli

    sys.exit(cli.guarded(main, prog="offline_eval"))
