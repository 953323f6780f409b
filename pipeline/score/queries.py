"""Read a query set (``query_id``, ``text``) from ``.jsonl``, ``.csv``, ``.tsv`` or ``.parquet``.

Any URI that :func:`pipeline.storage.open_filesystem` resolves (local path, file://,
s3:// with a custom endpoint, gs://). Ids are read as strings, never as numbers, so
``007`` stays ``007``. Every problem is reported with what to change in the file.
"""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import schema, storage

FORMATS = (".jsonl", ".csv", ".tsv", ".parquet")
QUERIES_SCHEMA = pa.schema([pa.field(schema.QUERY_ID, pa.string(), nullable=False),
                            pa.field(schema.TEXT, pa.string(), nullable=False)])


class QueryFileError(ValueError):
    """The query file cannot be used as it is; the message says what to fix."""


def _format(uri: str) -> str:
    name = uri.rsplit("/", 1)[-1].lower()
    for ext in FORMATS:
        if name.endswith(ext):
            return ext
    if name.endswith(".json"):
        raise QueryFileError(f"{uri}: a .json file is not read; write one JSON object per line as .jsonl")
    raise QueryFileError(f"{uri}: unknown query file type; use one of {', '.join(FORMATS)}")


def _read_bytes(uri: str, endpoint_url: str | None) -> bytes:
    try:
        return storage.read_bytes(uri, endpoint_url)
    except FileNotFoundError as exc:
        raise QueryFileError(f"query file not found: {uri}") from exc


def _jsonl(data: bytes, uri: str) -> pa.Table:
    ids: list = []
    texts: list = []
    for n, line in enumerate(data.decode("utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QueryFileError(f"{uri}: line {n} is not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise QueryFileError(f"{uri}: line {n} must be a JSON object with query_id and text")
        missing = [c for c in (schema.QUERY_ID, schema.TEXT) if c not in obj]
        if missing:
            raise QueryFileError(f"{uri}: line {n} lacks {', '.join(missing)}; each line needs query_id and text")
        ids.append(obj[schema.QUERY_ID])
        texts.append(obj[schema.TEXT])
    bad = [i for i in ids if i is not None and (not isinstance(i, (str, int)) or isinstance(i, bool))]
    if bad:
        raise QueryFileError(f"{uri}: query_id must be a string or an integer, got {bad[0]!r}")
    ids = [str(i) if isinstance(i, int) and not isinstance(i, bool) else i for i in ids]
    if any(t is not None and not isinstance(t, str) for t in texts):
        raise QueryFileError(f"{uri}: text must be a string on every line")
    return pa.table({schema.QUERY_ID: pa.array(ids, pa.string()), schema.TEXT: pa.array(texts, pa.string())})


def _delimited(data: bytes, uri: str, delimiter: str) -> pa.Table:
    parse = pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if delimiter == "," else False,
                               newlines_in_values=delimiter == ",")
    header = data.lstrip(b"\xef\xbb\xbf").split(b"\n", 1)[0].decode("utf-8", "replace").strip("\r")
    names = [c.strip().strip('"') for c in header.split(delimiter)]
    types = {c: pa.string() for c in names}
    convert = pacsv.ConvertOptions(column_types=types, strings_can_be_null=False, quoted_strings_can_be_null=False)
    try:
        return pacsv.read_csv(io.BytesIO(data), parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as exc:
        raise QueryFileError(f"{uri}: cannot parse as {'CSV' if delimiter == ',' else 'TSV'}: {exc}") from exc


def validate_queries(table: pa.Table, uri: str = "queries") -> pa.Table:
    """Check and normalise a query table to :data:`QUERIES_SCHEMA` (order kept)."""
    if table.num_rows == 0:
        raise QueryFileError(f"{uri} holds no queries: nothing to score (give a file of query_id and text rows)")
    missing = [c for c in (schema.QUERY_ID, schema.TEXT) if c not in table.column_names]
    if missing:
        raise QueryFileError(
            f"{uri}: missing column(s) {', '.join(missing)}; found {table.column_names}. "
            "Name the columns query_id and text."
        )
    ids_col = table.column(schema.QUERY_ID)
    if pa.types.is_integer(ids_col.type):
        ids_col = ids_col.cast(pa.string())
    elif not (pa.types.is_string(ids_col.type) or pa.types.is_large_string(ids_col.type)):
        raise QueryFileError(f"{uri}: query_id must be strings or integers, got {ids_col.type}")
    ids = ids_col.to_pylist()
    texts = table.column(schema.TEXT).cast(pa.string()).to_pylist()
    empty = [n for n, i in enumerate(ids, start=1) if i is None or not str(i).strip()]
    if empty:
        raise QueryFileError(
            f"{uri}: {len(empty)} quer{'y has' if len(empty) == 1 else 'ies have'} an empty query_id "
            f"(row(s) {', '.join(map(str, empty[:10]))}{', ...' if len(empty) > 10 else ''}); give every query an id"
        )
    spaced = [i for i in ids if i != i.strip() or any(ch.isspace() for ch in i)]
    if spaced:
        raise QueryFileError(
            f"{uri}: query_id {spaced[0]!r} contains whitespace, which TREC run files cannot hold; "
            "remove or replace the whitespace in ids"
        )
    dups = [i for i, c in Counter(ids).items() if c > 1]
    if dups:
        raise QueryFileError(
            f"{uri}: duplicate query_id(s) {', '.join(map(repr, dups[:10]))}{', ...' if len(dups) > 10 else ''}; "
            "each query_id must appear once (rename or drop the repeated rows)"
        )
    no_text = [i for i, t in zip(ids, texts) if t is None]
    if no_text:
        raise QueryFileError(f"{uri}: query {no_text[0]!r} has no text; every query needs a text")
    return pa.table({schema.QUERY_ID: pa.array(ids, pa.string()), schema.TEXT: pa.array(texts, pa.string())},
                    schema=QUERIES_SCHEMA)


def read_queries(uri: str, endpoint_url: str | None = None) -> pa.Table:
    """Read and validate a query file. Returns a table of :data:`QUERIES_SCHEMA`, file order kept.

    Raises:
        QueryFileError: unknown type, missing columns, empty / duplicate / whitespace ids,
            missing text, unparseable lines.
    """
    fmt = _format(uri)
    data = _read_bytes(uri, endpoint_url)
    if fmt == ".jsonl":
        table = _jsonl(data, uri)
    elif fmt == ".csv":
        table = _delimited(data, uri, ",")
    elif fmt == ".tsv":
        table = _delimited(data, uri, "\t")
    else:
        try:
            table = pq.read_table(pa.BufferReader(data))
        except pa.ArrowInvalid as exc:
            raise QueryFileError(f"{uri}: not a readable Parquet file: {exc}") from exc
    return validate_queries(table, uri)


def query_embeddings_metadata(model: str | None, query_prompt: str | None) -> dict[bytes, bytes]:
    """What query_embeddings.parquet records about how its vectors were made (since 2026-12-06):
    a later run that reuses them (--query-embeddings) checks these against the corpus."""
    meta = {schema.META_MODEL: model, schema.META_QUERY_PROMPT: query_prompt}
    return {k: v.encode() for k, v in meta.items() if v is not None}


def read_query_embeddings(uri: str, endpoint_url: str | None, queries: pa.Table) -> pa.Table:
    """Embeddings of ``queries`` (in their order) from an earlier run's query_embeddings.parquet,
    with that file's metadata (the model and query prompt that made them, where recorded).

    Raises QueryFileError where the file lacks a query's id or embedded another text for it (the
    stored vectors would be scored as if they were this query's)."""
    try:
        table = storage.read_parquet(uri, endpoint_url)
    except (FileNotFoundError, pa.ArrowInvalid) as exc:
        raise QueryFileError(f"--query-embeddings {uri} cannot be read ({exc}); pass a query_embeddings.parquet "
                             "written by this job") from exc
    missing = [c for c in (schema.QUERY_ID, schema.EMBEDDING) if c not in table.column_names]
    if missing:
        raise QueryFileError(f"--query-embeddings {uri} lacks column(s) {missing}; pass a query_embeddings.parquet "
                         "written by this job")
    stored = table.column(schema.QUERY_ID).to_pylist()
    index = {qid: i for i, qid in enumerate(stored)}
    if len(index) < len(stored):
        dup = next(q for q, c in Counter(stored).items() if c > 1)
        raise QueryFileError(f"--query-embeddings {uri} holds query id {dup!r} more than once; pass a "
                             "query_embeddings.parquet written by this job")
    wanted = queries.column(schema.QUERY_ID).to_pylist()
    absent = [q for q in wanted if q not in index]
    if absent:
        raise QueryFileError(f"--query-embeddings {uri} has no embedding for {len(absent)} query id(s), e.g. "
                         f"{absent[:5]}; re-embed (drop --query-embeddings) or pass the matching file")
    rows = table.take(pa.array([index[q] for q in wanted], pa.int64()))
    if schema.TEXT in rows.column_names:
        changed = [(q, old, new) for q, old, new in zip(wanted, rows.column(schema.TEXT).to_pylist(),
                                                        queries.column(schema.TEXT).to_pylist()) if old != new]
        if changed:
            q, old, new = changed[0]
            raise QueryFileError(f"--query-embeddings {uri} embedded another text for {len(changed)} query id(s), "
                             f"e.g. {q}: {old!r} there, {new!r} in the query file; re-embed (drop "
                             "--query-embeddings) or pass the file written for these queries")
    emb = rows.column(schema.EMBEDDING).cast(schema.EMBEDDING_TYPE)
    kept = {k: v for k, v in (table.schema.metadata or {}).items() if k in (schema.META_MODEL, schema.META_QUERY_PROMPT)}
    return pa.table({
        schema.QUERY_ID: queries.column(schema.QUERY_ID), schema.TEXT: queries.column(schema.TEXT),
        schema.N_VECTORS: pa.array(np.diff(emb.combine_chunks().offsets.to_numpy()).astype(np.int32)),
        schema.EMBEDDING: emb,
    }, schema=schema.QUERY_EMBEDDINGS_SCHEMA.with_metadata(kept or None))
