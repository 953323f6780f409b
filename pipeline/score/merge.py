"""Merge per-shard top-k lists into the exact global top-k.

Order: score descending, then ``page_id`` ascending (code-point order, which is also
UTF-8 byte order, so Python, Arrow and DuckDB agree). That order is total, so the
global top-k is unique, and it is contained in the union of the per-shard top-k lists
*provided every shard cut its list by the same order* (``pipeline.score.topk_desc`` over
pages sorted by ``page_id`` does). A shard that cut ties by anything else could drop a
tied page with a lower ``page_id`` than the one it kept, and the merge would be wrong
only at the boundary, which is why both halves use one order.

Scores of one (query, page) pair are the same whichever shard or batch computed them
(see ``pipeline.score.maxsim``), so the merged result does not depend on shard count, query
batch size or the order in which shards finish. The merge is associative: merging
partial merges gives the same table, which lets the driver merge as results arrive.

A page appears at most once per query. When two parts hold the same ``page_id`` (the page
sits in two shards, or a rerun embedded it again), only its best entry is kept: highest
score, and among equal scores the first by the remaining columns in ascending order, so
the row kept does not depend on which part came first. Deduplicating by best score keeps
the merge exact and associative: a page in the global top-k has fewer than ``k`` distinct
pages ahead of it in any subset of the parts, so every partial merge keeps it, with its
best entry. (A *single* shard that holds one page twice could spend two of its ``k`` slots
on it and cut a page that belongs in the global top-k; the merge cannot recover that, so
shards must hold distinct pages.)
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema

QUERY_INDEX = "query_index"


def merge_topk(parts: Iterable[pa.Table], k: int) -> pa.Table:
    """Exact global top-k per query from per-shard candidate tables.

    Args:
        parts: tables with at least ``query_index`` (int), ``page_id`` (string) and
            ``score`` (float32); other columns (``doc_id``, ``page_number``) ride along.
            A page may appear in several parts, or several times in one: each query
            keeps only the page's best entry (see the module docstring).
        k: results per query, ``>= 1``.

    Returns:
        The same columns plus ``rank`` (int32, 1..k), sorted by ``query_index`` then
        ``rank``; at most ``k`` rows per query.

    >>> t = lambda q, p, s: pa.table({"query_index": q, "page_id": p, "score": pa.array(s, pa.float32())})
    >>> a = t([0, 0], ["b#1", "c#1"], [2.0, 1.0])
    >>> b = t([0, 0], ["a#1", "d#1"], [1.0, 3.0])
    >>> merge_topk([a, b], 3).to_pydict()["page_id"]  # 1.0 tie: a#1 before c#1
    ['d#1', 'b#1', 'a#1']
    >>> c = t([0, 0], ["b#1", "a#1"], [0.5, 4.0])  # pages seen again, one with a better score
    >>> m = merge_topk([a, b, c], 3).to_pydict(); list(zip(m["page_id"], m["score"]))
    [('a#1', 4.0), ('d#1', 3.0), ('b#1', 2.0)]
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    tables = [t for t in parts if t is not None]
    if not tables:
        raise ValueError("merge_topk needs at least one table (an empty one is fine)")
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    for col in (QUERY_INDEX, schema.PAGE_ID, schema.SCORE):
        if col not in table.column_names:
            raise ValueError(f"candidate table lacks column {col!r}; has {table.column_names}")
    if table.num_rows == 0:
        return table.append_column(schema.RANK, pa.array([], pa.int32()))
    if table.column(schema.SCORE).null_count or pc.any(pc.is_nan(table.column(schema.SCORE))).as_py():
        raise ValueError("candidate scores contain null or NaN")
    # Best first: score descending, ties by page_id, then by every other sortable column so
    # that duplicates of one page with one score (from parts given in any order) always
    # yield the same row. Sorting is stable, so the order of the parts cannot show through
    # except between rows identical in every sortable column.
    extra = [
        (name, "ascending")
        for name, field in zip(table.column_names, table.schema)
        if name not in (QUERY_INDEX, schema.PAGE_ID, schema.SCORE) and _sortable(field.type)
    ]
    order = pc.sort_indices(
        table,
        sort_keys=[(QUERY_INDEX, "ascending"), (schema.SCORE, "descending"), (schema.PAGE_ID, "ascending")]
        + extra,
    )
    table = table.take(order)
    q = table.column(QUERY_INDEX).to_numpy()
    # One row per (query, page_id): the first in the order above, i.e. the page's best entry.
    # Copies of a page need not be adjacent (different scores), so group by an integer code
    # of the page_id rather than comparing neighbours.
    page = table.column(schema.PAGE_ID).combine_chunks()
    codes = pc.dictionary_encode(page, null_encoding="encode").indices.to_numpy(zero_copy_only=False)
    n = len(q)
    by_key = np.lexsort((np.arange(n), codes, q))  # (query, page), then position: best first
    first = np.ones(n, dtype=bool)
    if n > 1:
        first[1:] = (q[by_key][1:] != q[by_key][:-1]) | (codes[by_key][1:] != codes[by_key][:-1])
    keep_row = np.zeros(n, dtype=bool)
    keep_row[by_key[first]] = True
    if not keep_row.all():
        table = table.filter(pa.array(keep_row))
        q = q[keep_row]
    starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(q)]))
    rank = np.arange(len(q)) - group_start + 1
    keep = rank <= k
    table = table.filter(pa.array(keep)).append_column(schema.RANK, pa.array(rank[keep].astype(np.int32)))
    return table


def _sortable(type_: pa.DataType) -> bool:
    """Whether Arrow's sort_indices can order a column of this type."""
    return (
        pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_boolean(type_)
        or pa.types.is_string(type_) or pa.types.is_large_string(type_)
        or pa.types.is_binary(type_) or pa.types.is_large_binary(type_)
        or pa.types.is_temporal(type_) or pa.types.is_decimal(type_)
    )


def empty_candidates() -> pa.Table:
    return pa.table({
        QUERY_INDEX: pa.array([], pa.int64()), schema.SCORE: pa.array([], pa.float32()),
        schema.PAGE_ID: pa.array([], pa.string()), schema.DOC_ID: pa.array([], pa.string()),
        schema.PAGE_NUMBER: pa.array([], pa.int32()),
    })
