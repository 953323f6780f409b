"""The evaluation chain, as functions: metrics of a run (``run_evaluation``), and the
scheduled offline evaluation (``run_offline_eval``: scoring flow -> metrics -> history ->
comparison -> report), which calls the scoring flow in this process.

Outputs of ``run_offline_eval`` under ``OUT = output_root/run_id``::

    OUT/config.yaml        the resolved config
    OUT/scores/            the scoring job's output (results.parquet, run.trec, ...)
    OUT/metrics.json       aggregate values keyed by ir_measures names
    OUT/per_query.parquet  query_id, measure, value
    OUT/report.md          metric table, change vs previous and baseline, plot
    OUT/history.png        every metric over the history
    OUT/summary.json       all of the above in numbers, warnings, regressions, time
    HISTORY/runs/<run_id>.parquet   this run's history row
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone

import yaml

from pipeline import __version__, storage
from pipeline.config import DEFAULT_MEASURES, EvaluateConfig, OfflineEvalConfig, ScoreConfig, parse_measures
from pipeline.evaluate import history, regression, report, runs
from pipeline.evaluate import metrics as evaluate

logger = logging.getLogger(__name__)

EXIT_REGRESSION = 3


def split_measures(items: list[str]) -> list[str]:
    """Measure names as given on a command line: each item one name or several, comma-separated
    (not inside parentheses, as in ``P(rel=2,judged_only=True)@5``)."""
    names = []
    for item in items:
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
    return [n.strip() for n in names if n.strip()]


def measure_names(extra: list[str]) -> list[str]:
    """Defaults followed by the names given on the command line (:func:`split_measures`)."""
    return [str(m) for m in parse_measures(list(DEFAULT_MEASURES) + split_measures(extra))]


EvaluationInputError = runs.EvaluationInputError


# What the evaluation jobs report as one line and exit 2: inputs missing or unreadable as given,
# raised where an input is read (:func:`read_input`), never a bare ValueError from deeper code,
# which stays an unexpected error with its traceback (exit 1).
INPUT_ERRORS = (EvaluationInputError, storage.StorageAccessError, storage.ForeignFileError)


def input_errors() -> tuple:
    """:data:`INPUT_ERRORS`, and the scoring job's refusals (a corpus or queries it cannot score as
    given) where the scoring flow was imported (it imports Ray): what offline_eval exits 2 on."""
    import sys

    score_flow = sys.modules.get("pipeline.score.flow")
    return INPUT_ERRORS + (tuple(score_flow.INPUT_ERRORS) if score_flow is not None else ())


def read_input(flag: str, uri: str, read, *args, endpoint_url: str | None = None):
    """``read(*args)``; a missing or unreadable input (not found, not parseable as given) is
    raised as :class:`EvaluationInputError` naming ``flag`` and ``uri`` (and the S3 endpoint)."""
    try:
        return read(*args)
    except (OSError, ValueError) as exc:  # ValueError: parsing (formats, UnicodeDecodeError, JSON)
        if isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, IsADirectoryError,
                                                             NotADirectoryError, PermissionError)):
            said = storage.read_failure(flag, uri, endpoint_url, exc)
            if said is None:
                raise
            raise EvaluationInputError(str(said)) from exc
        text = " ".join(str(exc).split())
        if text.startswith(flag):
            raise EvaluationInputError(text) from exc
        raise EvaluationInputError(f"{flag}: {text}" if uri in text else f"{flag} {uri}: {text}") from exc


def refuse_another_jobs_output(output: str, endpoint_url: str | None, allowed: tuple[str, ...]) -> None:
    """A folder whose summary.json another job wrote (a scoring run, an embedding output, an
    offline evaluation) is not written over: its summary would be replaced (2026-12-06)."""
    job = storage.summary_job(output, endpoint_url)
    if job is not None and job not in allowed:
        raise EvaluationInputError(
            f"--output {output} holds the output of another job ({job}: its summary.json would be replaced); "
            "pass a folder of its own, e.g. a new folder beside it")


def run_evaluation(cfg: EvaluateConfig, qrels=None, run=None) -> dict:
    """Read, evaluate and write; returns the summary (also written as summary.json).
    ``qrels``, ``run``: already read (the offline evaluation checks its inputs before it writes)."""
    started = time.time()
    ep = cfg.endpoint_url
    qrels = read_input("--qrels", cfg.qrels, runs.read_qrels, cfg.qrels, ep, endpoint_url=ep) if qrels is None else qrels
    run = read_input("--run", cfg.run, runs.read_run, cfg.run, ep, endpoint_url=ep) if run is None else run
    corpus_ids = read_input("--corpus", cfg.corpus, runs.read_corpus_page_ids, cfg.corpus, ep, endpoint_url=ep) if cfg.corpus else None
    scored_top_k = _run_summary(cfg.run, cfg.endpoint_url).get("top_k")
    result = evaluate.evaluate(qrels, run, list(cfg.measures), corpus_page_ids=corpus_ids, ranking=cfg.ranking,
                               scored_top_k=scored_top_k)

    storage.write_json(storage.join_uri(cfg.output, "metrics.json"), result.aggregate, cfg.endpoint_url)
    storage.write_parquet(storage.join_uri(cfg.output, "per_query.parquet"),
                          evaluate.per_query_table(result.per_query), cfg.endpoint_url)
    summary = {
        "job": "evaluate",
        "version": __version__,
        "run": cfg.run,
        "qrels": cfg.qrels,
        "corpus": cfg.corpus,
        "output": cfg.output,
        "measures": list(cfg.measures),
        "metrics": result.aggregate,
        "counts": result.diagnostics,
        "warnings": result.warnings,
        "elapsed_s": round(time.time() - started, 3),
    }
    storage.write_json(storage.join_uri(cfg.output, "summary.json"), summary, cfg.endpoint_url)
    return summary


def _score(cfg: OfflineEvalConfig, scores_uri: str) -> dict:
    """Run the scoring flow in this process (one Ray driver for the whole evaluation)."""
    from pipeline.score import flow as score_flow

    score_cfg = ScoreConfig.from_flags(
        cfg.score_args, corpus=cfg.corpus, queries=cfg.queries, output=scores_uri, top_k=cfg.top_k,
        model=cfg.model, max_visual_tokens=cfg.max_visual_tokens, query_embeddings=cfg.query_embeddings,
        endpoint_url=cfg.endpoint_url, ray_address=cfg.ray_address)
    logger.info("scoring %s against %s into %s", cfg.queries, cfg.corpus, scores_uri)
    return score_flow.run(score_cfg)


def _run_summary(run_uri: str, endpoint_url: str | None) -> dict:
    """The scoring job's summary.json of ``run_uri`` (its output folder, or a results.parquet /
    run.trec in it); {} where there is none (a run file from elsewhere)."""
    folder = run_uri.rstrip("/")
    if folder.rsplit("/", 1)[-1].removesuffix(".gz").endswith((".parquet", ".trec", ".txt")):
        folder = folder.rsplit("/", 1)[0]
    try:
        found = storage.read_json(storage.join_uri(folder, "summary.json"), endpoint_url)
    except (OSError, ValueError):  # none, or not readable: the run file alone is evaluated
        return {}
    return found if isinstance(found, dict) and found.get("n_results") is not None else {}


def run_offline_eval(cfg: OfflineEvalConfig, run_id: str | None = None, pin_baseline: bool = False,
                     now: datetime | None = None) -> tuple[int, dict]:
    """The whole chain; returns (exit status, summary)."""
    started = time.time()
    run_time = now or datetime.now(timezone.utc)
    run_id = history.validate_run_id(run_id or history.default_run_id(run_time))
    out = storage.join_uri(cfg.output_root, run_id)
    ep = cfg.endpoint_url

    # Every input is checked before anything is written or scored (a mistyped --qrels failed only
    # after the whole scoring run, 2026-12-06), an explicitly named baseline included: one that
    # could not be found ended as a warning and "no regression", which hid regressions.
    corpus = read_input("--corpus", cfg.corpus, history.corpus_info, cfg.corpus, ep, endpoint_url=ep)
    if cfg.max_visual_tokens is not None and corpus.max_visual_tokens not in (None, cfg.max_visual_tokens):
        raise EvaluationInputError(
            f"the corpus at {cfg.corpus} was embedded with max_visual_tokens={corpus.max_visual_tokens}, "
            f"the config asks for {cfg.max_visual_tokens}: re-embed the corpus or change max_visual_tokens"
        )
    qrels = read_input("--qrels", cfg.qrels, runs.read_qrels, cfg.qrels, ep, endpoint_url=ep)
    given_run = read_input("--run", cfg.run, runs.read_run, cfg.run, ep, endpoint_url=ep) if cfg.run else None
    past = history.read_history(cfg.history_uri, ep)
    past_others = past[past["run_id"] != run_id] if not past.empty else past
    if cfg.baseline is not None and str(cfg.baseline) == run_id:
        raise EvaluationInputError(f"--baseline {cfg.baseline} is this run: name an earlier run (or a metrics.json)")
    baseline, baseline_problem = regression.resolve_baseline(cfg.baseline, past_others, cfg.history_uri, ep)
    if baseline_problem and cfg.baseline is not None:
        known = ", ".join(sorted(set(past_others["run_id"]))[-5:]) if not past_others.empty else "none yet"
        raise EvaluationInputError(
            f"--baseline {cfg.baseline}: {baseline_problem}. Give a run id of the history at {cfg.history_uri} "
            f"(latest: {known}) or a metrics.json URI, or leave it out to use the pinned baseline")

    resolved = {**cfg.to_dict(), "run_id": run_id, "run_time": run_time.isoformat(), "output": out}
    storage.write_bytes_atomic(storage.join_uri(out, "config.yaml"), yaml.safe_dump(resolved, sort_keys=False).encode(), ep)
    model = cfg.model or corpus.model
    logger.info("run %s: corpus %s (%d pages, fingerprint %s), model %s", run_id, cfg.corpus, corpus.pages,
                corpus.fingerprint, model)
    warnings: list[str] = []

    scores_summary: dict = {}
    top_k = cfg.top_k
    if cfg.run:
        run_uri = cfg.run
        # An earlier scoring run: the history records its own top-k and model (the config's
        # made a run scored at top-1 look like a top-3 run that regressed, 2026-12-06)
        scores_summary = _run_summary(run_uri, ep)
        if scores_summary.get("top_k") is not None:
            if scores_summary["top_k"] != cfg.top_k:
                warnings.append(f"--run {run_uri} was scored at top-k {scores_summary['top_k']}, the configured "
                                f"top-k is {cfg.top_k}: the history records {scores_summary['top_k']}")
                logger.warning("%s", warnings[-1])
            top_k = scores_summary["top_k"]
            model = scores_summary.get("model") or model
        else:
            warnings.append(f"--run {run_uri}: no scoring summary.json beside it; the history records the "
                            f"configured top-k ({cfg.top_k}) and model")
            logger.warning("%s", warnings[-1])
    else:
        scores_uri = storage.join_uri(out, "scores")
        scores_summary = _score(cfg, scores_uri)
        run_uri = storage.join_uri(scores_uri, "results.parquet")
        # the model that made the query vectors: reused ones may differ from the config's
        # --model when --allow-model-mismatch lets them through
        model = scores_summary.get("model") or model

    evaluation = run_evaluation(EvaluateConfig(run=run_uri, qrels=cfg.qrels, output=out, measures=cfg.measures,
                                                corpus=cfg.corpus, endpoint_url=ep, ranking=cfg.ranking), qrels=qrels,
                                run=given_run)
    metrics = evaluation["metrics"]

    commit = history.git_commit()
    fields = dict(
        model=model,
        max_visual_tokens=corpus.max_visual_tokens if corpus.max_visual_tokens is not None else cfg.max_visual_tokens,
        top_k=top_k,
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
        report_uri=storage.join_uri(out, "report.md"),
    )
    previous = regression.previous_run(past_others, run_id, run_time)
    warnings += evaluation["warnings"]
    if baseline_problem:  # the pinned baseline (none was named): e.g. a failed run was pinned
        logger.warning("%s", baseline_problem)
        warnings.append(baseline_problem)

    current_view = {**fields, "run_id": run_id}
    comparisons = []
    cmp_prev = regression.compare(metrics, history.row_metrics(previous) if previous else None, cfg.regression,
                               "previous", previous["run_id"] if previous else None)
    cmp_prev.changed_fields = regression.changed_fields(previous, current_view)
    comparisons.append(cmp_prev)
    if baseline is not None:
        cmp_base = regression.compare(metrics, baseline.metrics, cfg.regression, "baseline", baseline.run_id)
        cmp_base.changed_fields = regression.changed_fields(baseline.row, current_view)
        comparisons.append(cmp_base)
    regressions = regression.regression_lines(comparisons)
    if cmp_prev.changed_fields.get("qrels_fingerprint"):
        warnings.append("the qrels changed since the previous run: the change in metrics is not only the system's")
        logger.warning("%s", warnings[-1])

    row = history.history_row(run_id, metrics, run_time=run_time, regression=bool(regressions),
                              regressions="\n".join(regressions) or None, status="ok", **fields)
    row_uri = history.append_run(cfg.history_uri, row, ep)
    if pin_baseline:
        regression.pin_baseline(cfg.history_uri, run_id, ep)

    full = history.read_history(cfg.history_uri, ep)
    storage.write_bytes_atomic(storage.join_uri(out, report.PLOT_FILE),
                         report.plot_history(full, baseline, measures=list(metrics)), ep)
    text = report.render_markdown(row, metrics, comparisons, baseline, regressions, warnings, evaluation["counts"])
    storage.write_bytes_atomic(storage.join_uri(out, "report.md"), text.encode(), ep)

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
    storage.write_json(storage.join_uri(out, "summary.json"), summary, ep)
    return summary["exit_status"], summary




def write_failure(cfg: OfflineEvalConfig, run_id: str, now: datetime, exc: BaseException, exit_status: int = 1) -> None:
    """A scheduled run that dies still leaves a line where its results would be, unless the
    run id already has results: a rerun that fails (a typo in its flags) keeps them."""
    failure = {"job": "offline_eval", "version": __version__, "run_id": run_id, "run_time": now.isoformat(),
               "result": f"FAILED run {run_id}: {type(exc).__name__}: {exc}", "exit_status": exit_status}
    try:
        past = history.read_history(cfg.history_uri, cfg.endpoint_url)
        if not past.empty and ((past["run_id"] == run_id) & (past["status"].fillna("ok") == "ok")).any():
            logger.warning("run %s failed; the results of its earlier run are kept (history row and summary)", run_id)
            return
        storage.write_json(storage.join_uri(cfg.output_root, run_id, "summary.json"), failure, cfg.endpoint_url)
        # The history records the failure too (no metrics; comparisons skip it), so a
        # schedule's gaps are visible where its results are tracked.
        row = history.history_row(run_id, {}, run_time=now, status="failed", error=failure["result"],
                                  output_uri=storage.join_uri(cfg.output_root, run_id),
                                  corpus_uri=cfg.corpus, queries_uri=cfg.queries, qrels_uri=cfg.qrels,
                                  top_k=cfg.top_k, model=cfg.model)
        history.append_run(cfg.history_uri, row, cfg.endpoint_url)
    except Exception:  # the original error matters more than this one
        logger.exception("could not record the failure")
