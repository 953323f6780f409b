"""Offline evaluation for schedules: queries -> scores -> metrics -> history -> report.

    python -m jobs.offline_eval --config jobs/configs/eval.yaml [--run-id daily-2026-11-22] [flags]

Flags override the YAML file; the resolved config is written to ``OUT/config.yaml`` where
``OUT = output_root/run_id``. Outputs::

    OUT/scores/            the scoring job's output (results.parquet, run.trec, ...)
    OUT/metrics.json       aggregate values keyed by ir_measures names
    OUT/per_query.parquet  query_id, measure, value
    OUT/report.md          metric table, change vs previous and baseline, plot
    OUT/history.png        every metric over the history
    OUT/summary.json       all of the above in numbers, warnings, regressions, time
    HISTORY/runs/<run_id>.parquet   this run's history row

Exit status: 0, or 3 when a metric dropped by more than the configured amount against the
previous run or the baseline (the summary says which), or 1 on an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

import yaml

from pipeline import __version__
from pipeline.evaluate import metrics as evaluate
from pipeline.evaluate import history
from pipeline.evaluate import report
from pipeline.evaluate.history import RegressionPolicy

logger = logging.getLogger(__name__)

EXIT_REGRESSION = 3


@dataclass(frozen=True)
class OfflineEvalConfig:
    """Everything one scheduled evaluation needs. Paths are URIs (relative ones resolve
    against the working directory, as on ``ray job submit --working-dir .``)."""

    corpus: str
    queries: str
    qrels: str
    output_root: str
    history: str | None = None  # default: output_root/history
    model: str | None = None  # default: the model recorded in the corpus metadata
    max_visual_tokens: int | None = None  # when set, the corpus must have been embedded with it
    top_k: int = 100
    measures: tuple[str, ...] = evaluate.DEFAULT_MEASURES
    baseline: Any = None  # run id, metrics.json URI, {measure: value}, or None (HISTORY/baseline.json)
    regression: RegressionPolicy = field(default_factory=RegressionPolicy)
    fail_on_regression: bool = True
    query_embeddings: str | None = None  # reuse these instead of loading the model
    run: str | None = None  # evaluate this existing run instead of scoring
    score_args: tuple[str, ...] = ()  # extra flags for jobs.score_queries (shards, actors, ...)
    ranking: str = "score"
    endpoint_url: str | None = None
    ray_address: str | None = None

    def __post_init__(self):
        for name in ("corpus", "queries", "qrels", "output_root"):
            if not getattr(self, name):
                raise ValueError(f"config needs '{name}' (in the YAML file or as --{name.replace('_', '-')})")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.max_visual_tokens is not None and (not isinstance(self.max_visual_tokens, int) or self.max_visual_tokens < 1):
            raise ValueError(f"max_visual_tokens must be a positive integer, got {self.max_visual_tokens!r}")
        if self.ranking not in ("score", "rank"):
            raise ValueError(f"ranking must be 'score' or 'rank', got {self.ranking!r}")
        if isinstance(self.regression, Mapping):
            object.__setattr__(self, "regression", RegressionPolicy.from_mapping(self.regression))
        object.__setattr__(self, "measures", tuple(str(m) for m in evaluate.parse_measures(self.measures)))
        object.__setattr__(self, "score_args", tuple(str(a) for a in self.score_args))

    @property
    def history_uri(self) -> str:
        return self.history or evaluate.join_uri(self.output_root, "history")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["measures"] = list(self.measures)
        out["score_args"] = list(self.score_args)
        out["regression"] = {
            "max_drop": self.regression.max_drop,
            "per_measure": dict(self.regression.per_measure),
            "relative": self.regression.relative,
            "measures": list(self.regression.measures) if self.regression.measures is not None else None,
            "against": list(self.regression.against),
        }
        out["history"] = self.history_uri
        return out


_FIELDS = {f.name for f in dataclasses.fields(OfflineEvalConfig)}


def load_config(path: str | None, overrides: Mapping[str, Any]) -> OfflineEvalConfig:
    """YAML file (optional) + overrides (None values ignored) -> validated config."""
    values: dict[str, Any] = {}
    if path:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{path}: expected a mapping of settings at the top level")
        values.update(loaded)
    unknown = set(values) - _FIELDS
    if unknown:
        raise ValueError(f"{path}: unknown settings {sorted(unknown)}; known: {sorted(_FIELDS)}")
    extra_measures = overrides.get("extra_measures") or []
    for key, value in overrides.items():
        if key == "extra_measures" or value is None:
            continue
        if key == "max_drop":
            values["regression"] = {**(values.get("regression") or {}), "max_drop": value}
            continue
        values[key] = value
    # The default measures are always computed; the file and the flags add to them.
    values["measures"] = evaluate.DEFAULT_MEASURES + tuple(values.get("measures") or ()) + tuple(extra_measures)
    if values.get("score_args") is not None:
        values["score_args"] = tuple(values["score_args"])
    for name in ("corpus", "queries", "qrels", "output_root"):
        if not values.get(name):
            raise ValueError(f"config needs '{name}' (in the YAML file or as --{name.replace('_', '-')})")
    # Local paths become absolute so that the history's links and the resolved config stay
    # valid from anywhere (a Ray job runs in a temporary copy of its working dir).
    for name in ("corpus", "queries", "qrels", "output_root", "history", "query_embeddings", "run"):
        value = values.get(name)
        if isinstance(value, str) and value and "://" not in value:
            values[name] = os.path.abspath(value)
    if isinstance(values.get("baseline"), str) and values["baseline"].endswith(".json") and "://" not in values["baseline"]:
        values["baseline"] = os.path.abspath(values["baseline"])
    return OfflineEvalConfig(**values)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.offline_eval", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML file with the settings below (flags override it)")
    p.add_argument("--run-id", help="id of this run (default: UTC time, 20261122T013000Z); a rerun replaces its history row")
    p.add_argument("--corpus", help="embedded corpus URI (holding pages/)")
    p.add_argument("--queries", help="queries file URI (.jsonl/.csv/.tsv/.parquet)")
    p.add_argument("--qrels", help="qrels URI (TREC or BEIR TSV)")
    p.add_argument("--output-root", help="runs are written to OUTPUT_ROOT/RUN_ID/")
    p.add_argument("--history", help="history folder URI (default: OUTPUT_ROOT/history)")
    p.add_argument("--model", help="model name or path for the queries (default: the corpus's)")
    p.add_argument("--max-visual-tokens", type=int, help="refuse a corpus embedded with another token budget")
    p.add_argument("--top-k", type=int)
    p.add_argument("--measure", action="append", dest="extra_measures", metavar="NAME", help="extra measure (repeatable)")
    p.add_argument("--baseline", help="baseline: a run id in the history or a metrics.json URI")
    p.add_argument("--pin-baseline", action="store_true", help="after this run, make it the pinned baseline")
    p.add_argument("--max-drop", type=float, help="regression threshold for every measure (absolute unless relative: true)")
    p.add_argument("--query-embeddings", help="precomputed query_embeddings.parquet (no model needed)")
    p.add_argument("--run", help="evaluate this existing run (TREC or results.parquet) instead of scoring")
    p.add_argument("--no-fail-on-regression", dest="fail_on_regression", action="store_false", default=None)
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--ray-address", help="Ray cluster for the scoring job (default: the current one, or a local Ray)")
    return p


def _score(cfg: OfflineEvalConfig, scores_uri: str) -> dict:
    """Run the scoring job in this process (one Ray driver for the whole evaluation)."""
    from jobs import score_queries

    argv = ["--corpus", cfg.corpus, "--queries", cfg.queries, "--output", scores_uri, "--top-k", str(cfg.top_k)]
    if cfg.model:
        argv += ["--model", cfg.model]
    if cfg.max_visual_tokens is not None:
        argv += ["--max-visual-tokens", str(cfg.max_visual_tokens)]
    if cfg.query_embeddings:
        argv += ["--query-embeddings", cfg.query_embeddings]
    if cfg.endpoint_url:
        argv += ["--endpoint-url", cfg.endpoint_url]
    if cfg.ray_address:
        argv += ["--ray-address", cfg.ray_address]
    argv += list(cfg.score_args)
    logger.info("scoring: python -m jobs.score_queries %s", " ".join(argv))
    status = score_queries.main(argv)
    if status not in (None, 0):
        raise RuntimeError(f"the scoring job exited with status {status}")
    try:
        return json.loads(evaluate.read_bytes(evaluate.join_uri(scores_uri, "summary.json"), cfg.endpoint_url))
    except (FileNotFoundError, OSError, ValueError):
        return {}


def run_offline_eval(cfg: OfflineEvalConfig, run_id: str | None = None, pin_baseline: bool = False,
                     now: datetime | None = None) -> tuple[int, dict]:
    """The whole chain; returns (exit status, summary)."""
    started = time.time()
    run_time = now or datetime.now(timezone.utc)
    run_id = history.validate_run_id(run_id or history.default_run_id(run_time))
    out = evaluate.join_uri(cfg.output_root, run_id)
    ep = cfg.endpoint_url
    resolved = {**cfg.to_dict(), "run_id": run_id, "run_time": run_time.isoformat(), "output": out}
    evaluate.write_bytes(evaluate.join_uri(out, "config.yaml"), yaml.safe_dump(resolved, sort_keys=False).encode(), ep)

    corpus = history.corpus_info(cfg.corpus, ep)
    if cfg.max_visual_tokens is not None and corpus.max_visual_tokens not in (None, cfg.max_visual_tokens):
        raise ValueError(
            f"the corpus at {cfg.corpus} was embedded with max_visual_tokens={corpus.max_visual_tokens}, "
            f"the config asks for {cfg.max_visual_tokens}: re-embed the corpus or change max_visual_tokens"
        )
    model = cfg.model or corpus.model
    logger.info("run %s: corpus %s (%d pages, fingerprint %s), model %s", run_id, cfg.corpus, corpus.pages,
                corpus.fingerprint, model)

    scores_summary: dict = {}
    if cfg.run:
        run_uri = cfg.run
    else:
        scores_uri = evaluate.join_uri(out, "scores")
        scores_summary = _score(cfg, scores_uri)
        run_uri = evaluate.join_uri(scores_uri, "results.parquet")

    from jobs.evaluate import run_evaluation

    qrels = evaluate.read_qrels(cfg.qrels, ep)
    evaluation = run_evaluation(run_uri, cfg.qrels, out, list(cfg.measures), cfg.corpus, ep, ranking=cfg.ranking)
    metrics = evaluation["metrics"]

    commit = history.git_commit()
    fields = dict(
        model=model,
        max_visual_tokens=corpus.max_visual_tokens if corpus.max_visual_tokens is not None else cfg.max_visual_tokens,
        top_k=cfg.top_k,
        corpus_uri=cfg.corpus,
        corpus_fingerprint=corpus.fingerprint,
        corpus_pages=corpus.pages,
        queries_uri=cfg.queries,
        qrels_uri=cfg.qrels,
        qrels_fingerprint=history.qrels_fingerprint(qrels),
        evaluated_queries=evaluation["counts"]["evaluated_queries"],
        code_version=history.code_version(commit),
        git_commit=commit,
        output_uri=out,
        report_uri=evaluate.join_uri(out, "report.md"),
    )
    past = history.read_history(cfg.history_uri, ep)
    past_others = past[past["run_id"] != run_id] if not past.empty else past
    previous = history.previous_run(past_others, run_id, run_time)
    baseline, baseline_problem = history.resolve_baseline(cfg.baseline, past_others, cfg.history_uri, ep)
    warnings = list(evaluation["warnings"])
    if baseline_problem:
        warnings.append(baseline_problem)

    current_view = {**fields, "run_id": run_id}
    comparisons = []
    cmp_prev = history.compare(metrics, history.row_metrics(previous) if previous else None, cfg.regression,
                               "previous", previous["run_id"] if previous else None)
    cmp_prev.changed_fields = history.changed_fields(previous, current_view)
    comparisons.append(cmp_prev)
    if baseline is not None:
        cmp_base = history.compare(metrics, baseline.metrics, cfg.regression, "baseline", baseline.run_id)
        cmp_base.changed_fields = history.changed_fields(baseline.row, current_view)
        comparisons.append(cmp_base)
    regressions = history.regression_lines(comparisons)
    if cmp_prev.changed_fields.get("qrels_fingerprint"):
        warnings.append("the qrels changed since the previous run: the change in metrics is not only the system's")

    row = history.history_row(run_id, metrics, run_time=run_time, regression=bool(regressions),
                              regressions="\n".join(regressions) or None, **fields)
    row_uri = history.append_run(cfg.history_uri, row, ep)
    if pin_baseline:
        history.pin_baseline(cfg.history_uri, run_id, ep)

    full = history.read_history(cfg.history_uri, ep)
    evaluate.write_bytes(evaluate.join_uri(out, report.PLOT_FILE),
                         report.plot_history(full, baseline, measures=list(metrics)), ep)
    text = report.render_markdown(row, metrics, comparisons, baseline, regressions, warnings, evaluation["counts"])
    evaluate.write_bytes(evaluate.join_uri(out, "report.md"), text.encode(), ep)

    failed = bool(regressions) and cfg.fail_on_regression
    result_line = (
        f"REGRESSION in run {run_id}: " + "; ".join(regressions) if regressions else f"run {run_id}: no regression"
    )
    summary = {
        "job": "offline_eval",
        "version": __version__,
        "run_id": run_id,
        "run_time": run_time.isoformat(),
        "result": result_line,
        "regression": bool(regressions),
        "regressions": regressions,
        "exit_status": EXIT_REGRESSION if failed else 0,
        "metrics": metrics,
        "previous_run_id": previous["run_id"] if previous else None,
        "baseline": baseline.label if baseline else None,
        "comparisons": {
            c.label: {
                "reference_run_id": c.reference_run_id,
                "changes": {ch.measure: {"reference": ch.reference, "delta": ch.delta, "regressed": ch.regressed}
                            for ch in c.changes},
                "changed_fields": {k: list(v) for k, v in c.changed_fields.items()},
            }
            for c in comparisons
        },
        "corpus": {"uri": cfg.corpus, "fingerprint": corpus.fingerprint, "pages": corpus.pages,
                   "files": corpus.files, "bytes": corpus.bytes},
        "model": model,
        "code_version": fields["code_version"],
        "counts": evaluation["counts"],
        "warnings": warnings,
        "scoring": scores_summary,
        "outputs": {"root": out, "report": fields["report_uri"], "history_row": row_uri,
                    "history": cfg.history_uri, "run": run_uri},
        "elapsed_s": round(time.time() - started, 3),
    }
    evaluate.write_json(evaluate.join_uri(out, "summary.json"), summary, ep)
    return summary["exit_status"], summary


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "run_id", "pin_baseline")}
    try:
        cfg = load_config(args.config, overrides)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    now = datetime.now(timezone.utc)
    run_id = history.validate_run_id(args.run_id or history.default_run_id(now))
    try:
        status, summary = run_offline_eval(cfg, run_id=run_id, pin_baseline=args.pin_baseline, now=now)
    except Exception as exc:
        # A scheduled run that dies still leaves a line where its results would be.
        failure = {"job": "offline_eval", "version": __version__, "run_id": run_id, "run_time": now.isoformat(),
                   "result": f"FAILED run {run_id}: {type(exc).__name__}: {exc}", "exit_status": 1}
        try:
            evaluate.write_json(evaluate.join_uri(cfg.output_root, run_id, "summary.json"), failure, cfg.endpoint_url)
        except Exception:  # the original error matters more than this one
            logger.exception("could not write the failure summary")
        raise
    print(", ".join(f"{k}={v:.4f}" for k, v in summary["metrics"].items()))
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(summary["result"])
    print(f"report: {summary['outputs']['report']}")
    return status


if __name__ == "__main__":
    sys.exit(main())
