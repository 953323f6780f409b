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
            A page may appear in several parts (identical rows are kept once).
        k: results per query, ``>= 1``.

    Returns:
        The same columns plus ``rank`` (int32, 1..k), sorted by ``query_index`` then
        ``rank``; at most ``k`` rows per query.

    >>> t = lambda q, p, s: pa.table({"query_index": q, "page_id": p, "score": pa.array(s, pa.float32())})
    >>> a = t([0, 0], ["b#1", "c#1"], [2.0, 1.0])
    >>> b = t([0, 0], ["a#1", "d#1"], [1.0, 3.0])
    >>> merge_topk([a, b], 3).to_pydict()["page_id"]  # 1.0 tie: a#1 before c#1
    ['d#1', 'b#1', 'a#1']
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
    order = pc.sort_indices(
        table,
        sort_keys=[(QUERY_INDEX, "ascending"), (schema.SCORE, "descending"), (schema.PAGE_ID, "ascending")],
    )
    table = table.take(order)
    q = table.column(QUERY_INDEX).to_numpy()
    page = table.column(schema.PAGE_ID)
    # The same page from two parts: identical (query, page_id) rows are adjacent after
    # the sort (same score), keep the first.
    same_as_prev = np.zeros(len(q), dtype=bool)
    if len(q) > 1:
        same_page = pc.equal(page.slice(1), page.slice(0, len(q) - 1)).to_numpy(zero_copy_only=False)
        same_as_prev[1:] = (q[1:] == q[:-1]) & same_page
    if same_as_prev.any():
        table = table.filter(pa.array(~same_as_prev))
        q = q[~same_as_prev]
    starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(q)]))
    rank = np.arange(len(q)) - group_start + 1
    keep = rank <= k
    table = table.filter(pa.array(keep)).append_column(schema.RANK, pa.array(rank[keep].astype(np.int32)))
    return table
