"""Offline retrieval metrics: score a run against qrels with ir_measures, and say what it drops.

Plain functions over text, pandas frames and Arrow tables; no Ray. Every value comes from
ir_measures (``iter_calc`` / ``calc_aggregate``); this module only reads inputs, checks
them, and reports what ir_measures would otherwise drop or score without saying so:

- queries in the run that have no judgements (ir_measures skips them);
- judged queries missing from the run (ir_measures scores them 0, which is right, but a
  reader should know why a mean fell);
- an empty run;
- retrieved or judged pages that the corpus does not contain (when the corpus is given);
- tied scores (trec_eval breaks ties by page id *descending*, while the scoring job ranks
  ties by page id ascending; ``ranking="score"`` gives every measure trec_eval's order, also
  those ir_measures computes with another provider, which broke ties otherwise;
  ``ranking="rank"`` makes the evaluator follow the run's own ranks instead).

Frames use ir_measures' column names: qrels ``query_id, doc_id, relevance`` and runs
``query_id, doc_id, score``, where ``doc_id`` holds a *page_id* (``doc#page``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import ir_measures
import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline import schema
from pipeline.config import DEFAULT_MEASURES, parse_measures  # noqa: F401  (re-exported)
from pipeline.evaluate.runs import IRM_DOC, IRM_QUERY, IRM_RELEVANCE, IRM_SCORE, EvaluationInputError

logger = logging.getLogger(__name__)

PER_QUERY_SCHEMA = pa.schema(
    [
        pa.field(schema.QUERY_ID, pa.string(), nullable=False),
        pa.field("measure", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
    ]
)

# How many example ids a diagnostic keeps; the counts are always complete.
_EXAMPLES = 10





# ----------------------------------------------------------------------------- evaluating


@dataclass
class Evaluation:
    """Aggregate values keyed by measure name, per-query values, and what was checked."""

    aggregate: dict[str, float]
    per_query: pd.DataFrame  # query_id, measure, value
    diagnostics: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _examples(values) -> list[str]:
    return sorted(values)[:_EXAMPLES]


def diagnose(qrels: pd.DataFrame, run: pd.DataFrame, corpus_page_ids: set[str] | None = None) -> tuple[dict, list[str]]:
    """Counts (and a few example ids) of what a reader of the metrics must know about."""
    judged = set(qrels[IRM_QUERY])
    with_relevant = set(qrels.loc[qrels[IRM_RELEVANCE] > 0, IRM_QUERY])
    ran = set(run[IRM_QUERY])
    unjudged = ran - judged
    missing = judged - ran
    no_relevant = judged - with_relevant
    diag: dict = {
        "run_rows": int(len(run)),
        "run_queries": len(ran),
        "judged_queries": len(judged),
        "evaluated_queries": len(judged),
        "judged_pages": int(len(qrels)),
        "queries_without_judgements": len(unjudged),
        "queries_without_judgements_examples": _examples(unjudged),
        "judged_queries_missing_from_run": len(missing),
        "judged_queries_missing_from_run_examples": _examples(missing),
        "judged_queries_without_relevant_pages": len(no_relevant),
        "judged_queries_without_relevant_pages_examples": _examples(no_relevant),
    }
    warnings: list[str] = []
    if len(run) == 0:
        warnings.append(f"the run is empty: all {len(judged)} judged queries score 0")
    run_ids, judged_ids = set(run[IRM_DOC]), set(qrels[IRM_DOC])
    if len(run) and not run_ids & judged_ids and any("#" in d for d in run_ids) and not any("#" in d for d in judged_ids):
        warnings.append(
            "no judged id is in the run: the qrels judge documents (e.g. "
            f"{_examples(judged_ids)[0]!r}), the run ranks pages (e.g. {_examples(run_ids)[0]!r}); "
            "judge pages as DOC#PAGE"
        )
    if unjudged:
        warnings.append(
            f"{len(unjudged)} run queries have no judgements and are not evaluated "
            f"(e.g. {', '.join(_examples(unjudged)[:3])})"
        )
    if missing and len(run):
        warnings.append(
            f"{len(missing)} judged queries are missing from the run and score 0 "
            f"(e.g. {', '.join(_examples(missing)[:3])})"
        )
    if no_relevant:
        warnings.append(f"{len(no_relevant)} judged queries have no relevant page and score 0 on every measure")

    duplicated = run.duplicated([IRM_QUERY, IRM_DOC]).sum()
    diag["duplicate_run_rows"] = int(duplicated)
    if duplicated:
        warnings.append(f"{duplicated} duplicate (query, page) rows in the run; kept the highest score")
    tied = run.duplicated([IRM_QUERY, IRM_SCORE], keep=False)
    diag["run_rows_with_tied_scores"] = int(tied.sum())

    if corpus_page_ids is not None:
        unknown_run = set(run[IRM_DOC]) - corpus_page_ids
        unknown_qrels = set(qrels[IRM_DOC]) - corpus_page_ids
        relevant_unknown = set(qrels.loc[qrels[IRM_RELEVANCE] > 0, IRM_DOC]) - corpus_page_ids
        diag.update(
            {
                "corpus_pages": len(corpus_page_ids),
                "run_pages_unknown_to_corpus": len(unknown_run),
                "run_pages_unknown_to_corpus_examples": _examples(unknown_run),
                "judged_pages_unknown_to_corpus": len(unknown_qrels),
                "judged_pages_unknown_to_corpus_examples": _examples(unknown_qrels),
                "relevant_pages_unknown_to_corpus": len(relevant_unknown),
            }
        )
        if unknown_run:
            warnings.append(
                f"{len(unknown_run)} pages in the run are not in the corpus "
                f"(e.g. {', '.join(_examples(unknown_run)[:3])})"
            )
        if relevant_unknown:
            warnings.append(
                f"{len(relevant_unknown)} relevant judged pages are not in the corpus; no run can retrieve them "
                f"(e.g. {', '.join(_examples(relevant_unknown)[:3])})"
            )
    return diag, warnings


def _ranked_by(run: pd.DataFrame, ranking: str) -> pd.DataFrame:
    first = {q: i for i, q in enumerate(pd.unique(run[IRM_QUERY]))}  # the queries' order in the run as given
    run = run.sort_values(IRM_SCORE, ascending=False, kind="stable").drop_duplicates([IRM_QUERY, IRM_DOC])
    if ranking == "score":
        # trec_eval's order (score descending, equal scores by page id descending), made strict
        # so that every ir_measures provider sees it: RR@10 goes to its msmarco provider, which
        # broke ties the other way, so one tied run gave RR@10 1.0 beside P@1 0.0 (2026-12-06).
        # queries kept in the run's own order: ir_measures sums them in that order, so the means
        # stay bit for bit its own on runs without ties
        ordered = run.assign(_q=run[IRM_QUERY].map(first)).sort_values(
            ["_q", IRM_SCORE, IRM_DOC], ascending=[True, False, False], kind="stable").drop(columns="_q")
        position = ordered.groupby(IRM_QUERY, sort=False).cumcount()
        return ordered.assign(**{IRM_SCORE: -position.astype(np.float64)})[[IRM_QUERY, IRM_DOC, IRM_SCORE]]
    if ranking == "rank":
        # Scores that order exactly as the run's ranks, so the evaluator's own tie-breaking
        # (page id descending) never applies.
        return run.assign(**{IRM_SCORE: -run[schema.RANK].astype(np.float64)})[[IRM_QUERY, IRM_DOC, IRM_SCORE]]
    raise ValueError(f"ranking must be 'score' or 'rank', got {ranking!r}")


def evaluate(
    qrels: pd.DataFrame,
    run: pd.DataFrame,
    measures: Sequence = DEFAULT_MEASURES,
    corpus_page_ids: set[str] | None = None,
    ranking: str = "score",
    scored_top_k: int | None = None,
) -> Evaluation:
    """Aggregate and per-query values of ``measures`` (names or ir_measures measures).

    Queries are the judged ones: a judged query the run lacks scores 0 and a run query
    without judgements is left out, as ir_measures does; both are counted in
    ``diagnostics``. The aggregate is ``ir_measures.calc_aggregate`` on the same inputs.
    A run none of whose queries is judged is refused (ValueError). ``scored_top_k``: the
    top-k the run was scored with, where known (its summary.json).

    >>> from pipeline.evaluate.runs import parse_qrels, parse_trec_run
    >>> q = parse_qrels("q1 0 a#1 1\\nq2 0 b#1 1\\n")
    >>> r = parse_trec_run("q1 Q0 x#1 1 2.0 t\\nq1 Q0 a#1 2 1.0 t\\nq2 Q0 b#1 1 5.0 t\\n")
    >>> evaluate(q, r, ["RR@10"]).aggregate  # (1/2 + 1/1) / 2
    {'RR@10': 0.75}
    """
    parsed = parse_measures(str(m) for m in measures)
    if len(qrels) == 0:
        raise ValueError("qrels hold no judgements; nothing to evaluate")
    ran, judged = set(run[IRM_QUERY]), set(qrels[IRM_QUERY])
    if ran and not ran & judged:  # every metric would be 0: almost surely another query set's qrels
        raise EvaluationInputError(
            f"no query of the run is judged in the qrels: the run's queries (e.g. {', '.join(_examples(ran)[:3])}) "
            f"and the qrels' (e.g. {', '.join(_examples(judged)[:3])}) share none. Pass the qrels of the queries "
            "that were scored")
    diagnostics, warnings = diagnose(qrels, run, corpus_page_ids)
    depth = int(run.groupby(IRM_QUERY).size().max()) if len(run) else 0
    corpus_pages = len(corpus_page_ids) if corpus_page_ids is not None else None
    # a run of every page is deep enough: known from the corpus, or from a scoring top-k that no
    # query filled (the corpus had fewer pages)
    deeper = [str(m) for m in parsed if (m.params.get("cutoff") or 0) > depth > 0
              and (corpus_pages is None or depth < corpus_pages) and (scored_top_k is None or depth >= scored_top_k)]
    diagnostics["run_depth"] = depth
    if deeper:
        warnings.append(f"the run holds at most {depth} results per query (its top-k): {', '.join(deeper)} "
                        f"count only those; score with a top-k of at least the largest cutoff to compare them "
                        "with runs that hold more")
    ranked = _ranked_by(run, ranking)
    qrels_in = qrels[[IRM_QUERY, IRM_DOC, IRM_RELEVANCE]]
    aggregate_raw = ir_measures.calc_aggregate(parsed, qrels_in, ranked)
    aggregate = {str(m): float(aggregate_raw[m]) for m in parsed}
    rows = [
        (metric.query_id, str(metric.measure), float(metric.value))
        for metric in ir_measures.iter_calc(parsed, qrels_in, ranked)
    ]
    per_query = pd.DataFrame(rows, columns=[schema.QUERY_ID, "measure", "value"])
    per_query = per_query.sort_values([schema.QUERY_ID, "measure"], kind="stable").reset_index(drop=True)
    diagnostics["ranking"] = ranking
    for message in warnings:
        logger.warning("%s", message)
    return Evaluation(aggregate=aggregate, per_query=per_query, diagnostics=diagnostics, warnings=warnings)


def per_query_table(per_query: pd.DataFrame) -> pa.Table:
    """Per-query frame -> Arrow table with :data:`PER_QUERY_SCHEMA`."""
    return pa.Table.from_pandas(per_query[[schema.QUERY_ID, "measure", "value"]], schema=PER_QUERY_SCHEMA, preserve_index=False)


