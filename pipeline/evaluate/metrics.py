"""Offline retrieval metrics: read a run and qrels from any URI, score them with ir_measures.

Plain functions over text, pandas frames and Arrow tables; no Ray. Every value comes from
ir_measures (``iter_calc`` / ``calc_aggregate``); this module only reads inputs, checks
them, and reports what ir_measures would otherwise drop or score without saying so:

- queries in the run that have no judgements (ir_measures skips them);
- judged queries missing from the run (ir_measures scores them 0, which is right, but a
  reader should know why a mean fell);
- an empty run;
- retrieved or judged pages that the corpus does not contain (when the corpus is given);
- tied scores (trec_eval, and so ir_measures, breaks ties by page id *descending*, while
  the scoring job ranks ties by page id ascending; ``ranking="rank"`` makes the evaluator
  follow the run's own ranks instead).

Frames use ir_measures' column names: qrels ``query_id, doc_id, relevance`` and runs
``query_id, doc_id, score``, where ``doc_id`` holds a *page_id* (``doc#page``).
"""

from __future__ import annotations

import io
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import ir_measures
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema

logger = logging.getLogger(__name__)

DEFAULT_MEASURES: tuple[str, ...] = ("nDCG@5", "nDCG@10", "R@10", "RR@10", "AP")

# ir_measures' input column names. Its "doc_id" is whatever the qrels judge: a page_id here.
IRM_QUERY = "query_id"
IRM_DOC = "doc_id"
IRM_RELEVANCE = "relevance"
IRM_SCORE = "score"

PER_QUERY_SCHEMA = pa.schema(
    [
        pa.field(schema.QUERY_ID, pa.string(), nullable=False),
        pa.field("measure", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
    ]
)

# How many example ids a diagnostic keeps; the counts are always complete.
_EXAMPLES = 10

# A TREC qrels line: qid iteration page_id relevance. page_id is matched lazily between the
# fixed fields so that a doc_id holding spaces ("annual report.pdf#3") survives.
_TREC_QREL = re.compile(r"^\s*(\S+)\s+(\S+)\s+(.+?)\s+(-?\d+(?:\.\d+)?)\s*$")
# A TREC run line: qid Q0 page_id rank score tag.
_TREC_RUN = re.compile(r"^\s*(\S+)\s+(\S+)\s+(.+?)\s+(-?\d+)\s+(\S+)\s+(\S+)\s*$")

_BEIR_QUERY_NAMES = ("query-id", "query_id", "qid")
_BEIR_DOC_NAMES = ("corpus-id", "corpus_id", "doc-id", "doc_id", "docid", "page_id", "page-id")
_BEIR_REL_NAMES = ("score", "relevance", "rel", "label")


# ----------------------------------------------------------------------------- measures


def parse_measures(names: Iterable[str]) -> list:
    """Measure names (``"nDCG@10"``, ``"P(rel=2)@5"``) -> ir_measures measures, in order, once each.

    >>> [str(m) for m in parse_measures(["nDCG@10", "AP", "nDCG@10"])]
    ['nDCG@10', 'AP']
    """
    measures, seen = [], set()
    for name in names:
        name = name.strip()
        if not name:
            continue
        try:
            measure = ir_measures.parse_measure(name)
        except Exception as exc:  # ir_measures raises ValueError/NameError/SyntaxError
            raise ValueError(
                f"unknown measure {name!r}: use an ir_measures name such as nDCG@10, R@100, "
                f"RR@10, AP, P(rel=2)@5 ({exc})"
            ) from exc
        key = str(measure)
        if key not in seen:
            seen.add(key)
            measures.append(measure)
    if not measures:
        raise ValueError("no measures to compute")
    return measures


# ----------------------------------------------------------------------------- reading


def _open_filesystem(uri: str, endpoint_url: str | None):
    from pipeline.storage import open_filesystem

    return open_filesystem(uri, endpoint_url=endpoint_url)


def read_bytes(uri: str, endpoint_url: str | None = None) -> bytes:
    """Whole file at ``uri`` (local path, file://, s3://, gs://). Gzip is undone for ``.gz``."""
    fs, path = _open_filesystem(uri, endpoint_url)
    with fs.open_input_stream(path) as f:
        data = f.read()
    if uri.endswith(".gz"):
        import gzip

        data = gzip.decompress(data)
    return data


def _text_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) for non-blank, non-comment lines."""
    lines = []
    for number, line in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            lines.append((number, line.rstrip("\r\n")))
    return lines


def _relevance(value: str, where: str) -> int:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{where}: relevance {value!r} is not a number") from None
    if number != int(number):
        raise ValueError(f"{where}: relevance {value!r} is not an integer grade")
    return int(number)


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def parse_qrels(text: str, source: str = "qrels") -> pd.DataFrame:
    """TREC qrels (``qid 0 page_id rel``) or BEIR TSV (``query-id corpus-id score`` + header).

    The format is told by the first line: a header (its last field is not a number) or
    exactly three tab-separated fields mean BEIR; four whitespace-separated fields, TREC.
    Duplicate judgements of one (query, page) keep the highest grade.

    >>> parse_qrels("q1 0 a.pdf#1 2\\nq1 0 a.pdf#2 0\\n").to_dict("list")
    {'query_id': ['q1', 'q1'], 'doc_id': ['a.pdf#1', 'a.pdf#2'], 'relevance': [2, 0]}
    >>> parse_qrels("query-id\\tcorpus-id\\tscore\\nq1\\ta.pdf#1\\t1\\n").to_dict("list")
    {'query_id': ['q1'], 'doc_id': ['a.pdf#1'], 'relevance': [1]}
    """
    lines = _text_lines(text)
    if not lines:
        raise ValueError(f"{source}: no judgements (the file is empty)")
    first = lines[0][1]
    tab_fields = first.split("\t")
    is_header = not _is_number(first.split()[-1])
    if is_header or len(tab_fields) == 3:
        rows = _parse_beir_qrels(lines, source, header=is_header)
    else:
        rows = _parse_trec_qrels(lines, source)
    frame = pd.DataFrame(rows, columns=[IRM_QUERY, IRM_DOC, IRM_RELEVANCE])
    frame[IRM_RELEVANCE] = frame[IRM_RELEVANCE].astype(np.int64)
    before = len(frame)
    frame = (
        frame.sort_values(IRM_RELEVANCE, ascending=False, kind="stable")
        .drop_duplicates([IRM_QUERY, IRM_DOC], keep="first")
        .sort_index()
        .reset_index(drop=True)
    )
    if len(frame) < before:
        logger.warning("%s: %d duplicate judgements; kept the highest grade", source, before - len(frame))
    return frame


def _parse_trec_qrels(lines, source) -> list[tuple[str, str, int]]:
    rows = []
    for number, line in lines:
        match = _TREC_QREL.match(line)
        if match is None:
            raise ValueError(
                f"{source}:{number}: expected TREC qrels 'qid 0 page_id relevance', got {line!r}"
            )
        qid, _iteration, doc, rel = match.groups()
        rows.append((qid, doc, _relevance(rel, f"{source}:{number}")))
    return rows


def _parse_beir_qrels(lines, source, header: bool) -> list[tuple[str, str, int]]:
    q_col, d_col, r_col = 0, 1, 2
    if header:
        names = [name.strip().lower() for name in lines[0][1].split("\t")]

        def find(candidates, what):
            for i, name in enumerate(names):
                if name in candidates:
                    return i
            raise ValueError(
                f"{source}: BEIR qrels header {lines[0][1]!r} has no {what} column "
                f"(one of {', '.join(candidates)})"
            )

        q_col = find(_BEIR_QUERY_NAMES, "query")
        d_col = find(_BEIR_DOC_NAMES, "corpus/page")
        r_col = find(_BEIR_REL_NAMES, "score")
        lines = lines[1:]
    width = max(q_col, d_col, r_col) + 1
    rows = []
    for number, line in lines:
        fields = line.split("\t")
        if len(fields) < width:
            raise ValueError(
                f"{source}:{number}: expected {width} tab-separated fields "
                f"(query-id, corpus-id, score), got {line!r}"
            )
        rows.append(
            (fields[q_col].strip(), fields[d_col].strip(), _relevance(fields[r_col].strip(), f"{source}:{number}"))
        )
    return rows


def parse_trec_run(text: str, source: str = "run") -> pd.DataFrame:
    """TREC run text (``qid Q0 page_id rank score tag``) -> ``query_id, doc_id, score, rank``.

    >>> parse_trec_run("q1 Q0 a.pdf#1 1 0.9 colqwen\\n").to_dict("list")
    {'query_id': ['q1'], 'doc_id': ['a.pdf#1'], 'score': [0.9], 'rank': [1]}
    """
    rows = []
    for number, line in _text_lines(text):
        match = _TREC_RUN.match(line)
        if match is None:
            raise ValueError(
                f"{source}:{number}: expected a TREC run line 'qid Q0 page_id rank score tag', got {line!r}"
            )
        qid, _q0, doc, rank, score, _tag = match.groups()
        try:
            value = float(score)
        except ValueError:
            raise ValueError(f"{source}:{number}: score {score!r} is not a number") from None
        rows.append((qid, doc, value, int(rank)))
    return _run_frame(rows)


def _run_frame(rows) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=[IRM_QUERY, IRM_DOC, IRM_SCORE, schema.RANK])
    return frame.astype({IRM_QUERY: str, IRM_DOC: str, IRM_SCORE: np.float64, schema.RANK: np.int64})


def results_to_run(table: pa.Table) -> pd.DataFrame:
    """The scoring job's ``results.parquet`` table -> run frame (``doc_id`` holds page_id)."""
    missing = {schema.QUERY_ID, schema.PAGE_ID, schema.SCORE} - set(table.column_names)
    if missing:
        raise ValueError(f"results table lacks columns {sorted(missing)}; has {table.column_names}")
    ranks = (
        table.column(schema.RANK).to_numpy(zero_copy_only=False)
        if schema.RANK in table.column_names
        else np.zeros(table.num_rows, dtype=np.int64)
    )
    # float32 -> float64 is exact, so these are the scores the job computed, bit for bit.
    frame = pd.DataFrame(
        {
            IRM_QUERY: table.column(schema.QUERY_ID).to_pylist(),
            IRM_DOC: table.column(schema.PAGE_ID).to_pylist(),
            IRM_SCORE: table.column(schema.SCORE).to_numpy(zero_copy_only=False).astype(np.float64),
            schema.RANK: ranks.astype(np.int64),
        }
    )
    return frame.astype({IRM_QUERY: str, IRM_DOC: str})


def _is_parquet(uri: str) -> bool:
    return uri.rstrip("/").endswith(".parquet")


def read_run(uri: str, endpoint_url: str | None = None) -> pd.DataFrame:
    """A run from any URI: ``results.parquet``, a scoring output folder, or a TREC run file."""
    fs, path = _open_filesystem(uri, endpoint_url)
    import pyarrow.fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"run not found: {uri}")
    if info.type == pafs.FileType.Directory:
        # A scoring job's output folder: prefer the exact scores over the text rendering.
        for name in ("results.parquet", "run.trec"):
            child = f"{path.rstrip('/')}/{name}"
            if fs.get_file_info(child).type == pafs.FileType.File:
                return read_run(f"{uri.rstrip('/')}/{name}", endpoint_url)
        raise FileNotFoundError(f"{uri} is a folder without results.parquet or run.trec")
    data = read_bytes(uri, endpoint_url)
    if _is_parquet(uri) or data[:4] == b"PAR1":  # the Parquet magic, whatever the file's name
        return results_to_run(pq.read_table(pa.BufferReader(data)))
    return parse_trec_run(data.decode("utf-8"), source=uri)


def read_qrels(uri: str, endpoint_url: str | None = None) -> pd.DataFrame:
    """Qrels from any URI, TREC or BEIR TSV (see :func:`parse_qrels`)."""
    return parse_qrels(read_bytes(uri, endpoint_url).decode("utf-8"), source=uri)


def pages_folder(corpus_uri: str) -> str:
    """``CORPUS`` or ``CORPUS/pages`` -> the folder that holds the page Parquet files."""
    stripped = corpus_uri.rstrip("/")
    return stripped if stripped.endswith("/pages") or stripped == "pages" else f"{stripped}/pages"


def list_parquet_files(folder_uri: str, endpoint_url: str | None = None):
    """(filesystem, sorted [FileInfo]) of the visible ``*.parquet`` files under a folder."""
    import pyarrow.fs as pafs

    fs, path = _open_filesystem(folder_uri, endpoint_url)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no such folder: {folder_uri}")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = [
        i
        for i in infos
        if i.type == pafs.FileType.File
        and i.base_name.endswith(".parquet")
        and not i.base_name.startswith((".", "_"))
    ]
    return fs, sorted(files, key=lambda i: i.path)


def read_corpus_page_ids(corpus_uri: str, endpoint_url: str | None = None) -> set[str]:
    """Every page_id under ``CORPUS/pages/`` (only that column is read)."""
    fs, files = list_parquet_files(pages_folder(corpus_uri), endpoint_url)
    ids: set[str] = set()
    for info in files:
        with fs.open_input_file(info.path) as f:
            ids.update(pq.read_table(f, columns=[schema.PAGE_ID]).column(0).to_pylist())
    return ids


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
    run = run.sort_values(IRM_SCORE, ascending=False, kind="stable").drop_duplicates([IRM_QUERY, IRM_DOC])
    if ranking == "score":
        return run[[IRM_QUERY, IRM_DOC, IRM_SCORE]]
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
) -> Evaluation:
    """Aggregate and per-query values of ``measures`` (names or ir_measures measures).

    Queries are the judged ones: a judged query the run lacks scores 0 and a run query
    without judgements is left out, as ir_measures does; both are counted in
    ``diagnostics``. The aggregate is ``ir_measures.calc_aggregate`` on the same inputs.

    >>> q = parse_qrels("q1 0 a#1 1\\nq2 0 b#1 1\\n")
    >>> r = parse_trec_run("q1 Q0 x#1 1 2.0 t\\nq1 Q0 a#1 2 1.0 t\\nq2 Q0 b#1 1 5.0 t\\n")
    >>> evaluate(q, r, ["RR@10"]).aggregate  # (1/2 + 1/1) / 2
    {'RR@10': 0.75}
    """
    parsed = parse_measures(str(m) for m in measures)
    if len(qrels) == 0:
        raise ValueError("qrels hold no judgements; nothing to evaluate")
    diagnostics, warnings = diagnose(qrels, run, corpus_page_ids)
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


# ----------------------------------------------------------------------------- writing


def write_bytes(uri: str, data: bytes, endpoint_url: str | None = None) -> None:
    """Write a whole file so that readers see all of it or nothing (see ``sources.write_bytes_atomic``)."""
    from pipeline.storage import write_bytes_atomic

    write_bytes_atomic(uri, data, endpoint_url)


def write_json(uri: str, value, endpoint_url: str | None = None) -> None:
    write_bytes(uri, (json.dumps(value, indent=2, sort_keys=False, default=str) + "\n").encode(), endpoint_url)


def write_parquet(uri: str, table: pa.Table, endpoint_url: str | None = None) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    write_bytes(uri, sink.getvalue(), endpoint_url)


def join_uri(root: str, *parts: str) -> str:
    """``join_uri("s3://b/x/", "eval", "metrics.json") == "s3://b/x/eval/metrics.json"``."""
    out = root.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out
