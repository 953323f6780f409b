"""Runs and qrels from any URI: TREC run files, the scoring job's results.parquet, TREC
qrels and BEIR TSVs, as frames with ir_measures' column names (qrels ``query_id, doc_id,
relevance``; runs ``query_id, doc_id, score``, where ``doc_id`` holds a *page_id*).

Page ids in these frames are always the exact page_ids of the corpus (``doc#page``, spaces
and all), whatever the file: TREC files (run.trec, TREC qrels) split lines on whitespace,
so they hold ids as :func:`pipeline.schema.trec_id` writes them (``%`` and whitespace
percent-encoded) and are decoded here with :func:`pipeline.schema.from_trec_id`; BEIR TSV
qrels split on tabs and hold raw ids, read as they are; results.parquet holds raw ids. So
a run and qrels from any pair of formats compare like with like.
"""

from __future__ import annotations

import gzip
import logging
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema, storage

logger = logging.getLogger(__name__)

IRM_QUERY = "query_id"
IRM_DOC = "doc_id"
IRM_RELEVANCE = "relevance"
IRM_SCORE = "score"

# A TREC qrels line: qid iteration page_id relevance. page_id is matched lazily between the
# fixed fields so that a doc_id holding spaces ("annual report.pdf#3") survives.
_TREC_QREL = re.compile(r"^\s*(\S+)\s+(\S+)\s+(.+?)\s+(-?\d+(?:\.\d+)?)\s*$")
# A TREC run line: qid Q0 page_id rank score tag.
_TREC_RUN = re.compile(r"^\s*(\S+)\s+(\S+)\s+(.+?)\s+(-?\d+)\s+(\S+)\s+(\S+)\s*$")

_BEIR_QUERY_NAMES = ("query-id", "query_id", "qid")
_BEIR_DOC_NAMES = ("corpus-id", "corpus_id", "doc-id", "doc_id", "docid", "page_id", "page-id")
_BEIR_REL_NAMES = ("score", "relevance", "rel", "label")


class EvaluationInputError(ValueError):
    """An input of an evaluation that cannot be used as given (the jobs exit 2 on it)."""


# ----------------------------------------------------------------------------- reading


def read_bytes(uri: str, endpoint_url: str | None = None) -> bytes:
    """Whole file at ``uri`` (any URI). Gzip is undone for ``.gz`` where the bytes are still
    gzip: pyarrow's input streams already decompress by extension (a second gunzip failed on
    every ``.gz`` file, 2026-12-06)."""
    data = storage.read_bytes(uri, endpoint_url)
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _text_lines(text: str, is_data=None) -> list[tuple[int, str]]:
    """(line number, line) for non-blank, non-comment lines.

    A line that begins with ``#`` followed by a space, a tab or nothing is a comment. One whose
    ``#`` is followed by another character is a comment unless ``is_data`` says it has the
    shape of a data line: query ids may begin with ``#`` (trec_eval has no comments), and such
    a query's lines were dropped. Comment out a data line with ``# `` (hash and space).
    """
    lines = []
    for number, line in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
        if not line.strip():
            continue
        stripped = line.lstrip()
        if stripped.startswith("#") and (stripped[1:2] in ("", " ", "\t") or not (is_data and is_data(line))):
            continue
        lines.append((number, line.rstrip("\r\n")))
    return lines


def _is_qrels_line(line: str) -> bool:
    """A TREC qrels line (``qid iter page_id rel``, as the parser reads it) or a BEIR TSV row
    (three or more tab-separated fields: the header says which is which)."""
    trec = _TREC_QREL.match(line)
    return ((trec is not None and (_is_number(trec.group(2)) or trec.group(2).upper() == "Q0"))
            or len(line.split("\t")) >= 3)


def _is_run_line(line: str) -> bool:
    """A TREC run line as the parser reads it: ``qid Q0 page_id rank score tag``."""
    return _TREC_RUN.match(line) is not None


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

    Page ids: a TREC qrels line is split on whitespace like a run line, so its page_id is
    read in run.trec's encoding and decoded (:func:`pipeline.schema.from_trec_id`):
    ``a%20b.pdf#1`` is the page ``a b.pdf#1``, and a file really named ``a%20b.pdf`` is
    written ``a%2520b.pdf#1``. Write TREC qrels with :func:`pipeline.schema.trec_id`. A page
    id with plain spaces (``reports/a b.pdf#3``) is still understood, as it holds no escape.
    BEIR TSV qrels are split on tabs and hold *raw* page ids, read verbatim (a ``%`` there
    is a ``%``).

    >>> parse_qrels("q1 0 a.pdf#1 2\\nq1 0 a.pdf#2 0\\n").to_dict("list")
    {'query_id': ['q1', 'q1'], 'doc_id': ['a.pdf#1', 'a.pdf#2'], 'relevance': [2, 0]}
    >>> parse_qrels("query-id\\tcorpus-id\\tscore\\nq1\\ta.pdf#1\\t1\\n").to_dict("list")
    {'query_id': ['q1'], 'doc_id': ['a.pdf#1'], 'relevance': [1]}
    >>> parse_qrels("q1 0 a%20b.pdf#1 1\\nq1 0 a%2520b.pdf#1 0\\n").doc_id.tolist()
    ['a b.pdf#1', 'a%20b.pdf#1']
    >>> parse_qrels("query-id\\tcorpus-id\\tscore\\nq1\\ta%20b.pdf#1\\t1\\n").doc_id.tolist()
    ['a%20b.pdf#1']
    """
    lines = _text_lines(text, _is_qrels_line)
    if not lines:
        raise ValueError(f"{source}: no judgements (the file is empty)")
    first = lines[0][1]
    tab_fields = first.split("\t")
    is_header = not _is_number(first.split()[-1])
    if is_header and len(tab_fields) == 1:  # no tab: not BEIR's header, and not a TREC qrels line
        hint = (" It has the shape of a TREC run line (qid Q0 page_id rank score tag): pass run files as --run."
                if _is_run_line(first) else "")
        raise ValueError(
            f"{source}:{lines[0][0]}: {first!r} is neither a TREC qrels line (4 whitespace-separated fields: "
            f"qid 0 page_id relevance) nor a BEIR TSV header (tab-separated: query-id, corpus-id, score).{hint}")
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
        rows.append((qid, _page_id(doc, f"{source}:{number}"), _relevance(rel, f"{source}:{number}")))
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


def _page_id(field: str, where: str) -> str:
    """A page_id field of a TREC line, decoded from run.trec's encoding."""
    try:
        return schema.from_trec_id(field)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def parse_trec_run(text: str, source: str = "run") -> pd.DataFrame:
    """TREC run text (``qid Q0 page_id rank score tag``) -> ``query_id, doc_id, score, rank``.

    The page_id field is decoded (:func:`pipeline.schema.from_trec_id`), undoing the
    scoring job's :func:`pipeline.schema.trec_id`, so ``doc_id`` holds the exact page_id.

    >>> parse_trec_run("q1 Q0 a.pdf#1 1 0.9 colqwen\\n").to_dict("list")
    {'query_id': ['q1'], 'doc_id': ['a.pdf#1'], 'score': [0.9], 'rank': [1]}
    >>> parse_trec_run("q1 Q0 a%20b%2525.pdf#1 1 0.9 colqwen\\n").doc_id.tolist()
    ['a b%25.pdf#1']
    """
    rows = []
    for number, line in _text_lines(text, _is_run_line):
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
        rows.append((qid, _page_id(doc, f"{source}:{number}"), value, int(rank)))
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
    """A run from any URI: ``results.parquet``, a scoring output folder, or a TREC run file.

    Page ids come back exact either way: results.parquet holds them raw, and a TREC run's
    encoded ids are decoded (:func:`parse_trec_run`).
    """
    fs, path = storage.open_filesystem(uri, endpoint_url)
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


def read_corpus_page_ids(corpus_uri: str, endpoint_url: str | None = None) -> set[str]:
    """Every page_id under ``CORPUS/pages/`` (of its current generation; only that column is read)."""
    table = storage.read_columns(storage.corpus_pages_folder(corpus_uri, endpoint_url), [schema.PAGE_ID], endpoint_url)
    if table is None:
        raise FileNotFoundError(f"no page files under {corpus_uri}")
    return set(table.column(schema.PAGE_ID).to_pylist())


