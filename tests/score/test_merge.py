"""pipeline.score.merge: per-shard top-k merged into the exact global top-k, ties by page_id."""

from __future__ import annotations

import doctest
import itertools

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.score import merge
from pipeline.score.merge import QUERY_INDEX, merge_topk
from pipeline.score.maxsim import topk_desc


def test_doctests():
    result = doctest.testmod(merge, raise_on_error=False)
    assert result.attempted >= 1 and result.failed == 0


def shard_topk(scores: np.ndarray, page_ids: list[str], k: int) -> pa.Table:
    """What one shard returns: its pages sorted by page_id, exact top-k by (score, index)."""
    order = sorted(range(len(page_ids)), key=lambda j: page_ids[j])
    v, i = topk_desc(torch.from_numpy(scores[:, order]), k)
    nq, kk = v.shape
    return pa.table({
        QUERY_INDEX: np.repeat(np.arange(nq), kk),
        "page_id": [page_ids[order[j]] for j in i.reshape(-1).tolist()],
        "score": pa.array(v.reshape(-1).numpy(), pa.float32()),
    })


def global_truth(scores, page_ids, k):
    return [sorted(range(len(page_ids)), key=lambda j: (-scores[q, j], page_ids[j]))[:k]
            for q in range(scores.shape[0])]


@pytest.mark.parametrize("seed", range(6))
def test_merge_is_exact_with_heavy_ties_for_any_sharding(seed):
    rng = np.random.default_rng(seed)
    n_pages, n_queries, k = int(rng.integers(1, 60)), 4, int(rng.integers(1, 12))
    # Scores from a handful of values: ties everywhere, at every shard boundary.
    scores = rng.integers(-3, 3, (n_queries, n_pages)).astype(np.float32)
    page_ids = [f"doc{int(x)}.pdf#{j}" for j, x in enumerate(rng.permutation(n_pages))]
    truth = global_truth(scores, page_ids, k)
    results = set()
    for n_shards in (1, 2, 3, 7, n_pages):
        perm = rng.permutation(n_pages)  # pages land in shards in any order
        parts = [shard_topk(scores[:, s], [page_ids[j] for j in s], k)
                 for s in np.array_split(perm, n_shards) if len(s)]
        rng.shuffle(parts)  # shards finish in any order
        merged = merge_topk(parts, k)
        got = merged.to_pydict()
        for q in range(n_queries):
            rows = [r for r, qi in enumerate(got[QUERY_INDEX]) if qi == q]
            assert [got["page_id"][r] for r in rows] == [page_ids[j] for j in truth[q]]
            assert [got["rank"][r] for r in rows] == list(range(1, len(truth[q]) + 1))
        results.add(tuple(map(tuple, merged.to_pydict().values())))
    assert len(results) == 1  # identical tables whatever the shard count


def test_incremental_merge_equals_one_merge():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, (3, 40)).astype(np.float32)
    ids = [f"p{j:02d}" for j in range(40)]
    parts = [shard_topk(scores[:, s], [ids[j] for j in s], 5) for s in np.array_split(np.arange(40), 6)]
    running = merge_topk([parts[0]], 5)
    for p in parts[1:]:
        running = merge_topk([running.drop_columns(["rank"]), p], 5)
    assert running.equals(merge_topk(parts, 5))


def test_cutting_ties_by_another_order_would_be_wrong():
    # Why shards must cut by page_id too: a shard that kept "b" over "a" at a tie loses "a".
    scores = np.array([[1.0, 1.0]], dtype=np.float32)
    wrong = pa.table({QUERY_INDEX: [0], "page_id": ["b"], "score": pa.array([1.0], pa.float32())})
    right = shard_topk(scores, ["b", "a"], 1)
    assert merge_topk([right], 1).column("page_id").to_pylist() == ["a"]
    assert merge_topk([wrong], 1).column("page_id").to_pylist() == ["b"]


def test_duplicates_empty_and_k_beyond_rows():
    t = pa.table({QUERY_INDEX: [0, 0, 1], "page_id": ["a", "b", "a"], "score": pa.array([1, 2, 3], pa.float32()),
                  "doc_id": ["A", "B", "A"]})
    merged = merge_topk([t, t], 10)  # the same shard twice: each page kept once
    assert merged.column("page_id").to_pylist() == ["b", "a", "a"]
    assert merged.column("rank").to_pylist() == [1, 2, 1]
    assert merged.column("doc_id").to_pylist() == ["B", "A", "A"]
    empty = t.slice(0, 0)
    assert merge_topk([empty], 3).num_rows == 0
    with pytest.raises(ValueError, match="k must be"):
        merge_topk([t], 0)
    bad = t.set_column(2, "score", pa.array([1, float("nan"), 1], pa.float32()))
    with pytest.raises(ValueError, match="NaN"):
        merge_topk([bad], 2)


def test_page_id_order_is_code_point_order():
    ids = ["é#1", "z#1", "Z#1", "a#10", "a#2", "日本#1"]
    t = pa.table({QUERY_INDEX: [0] * 6, "page_id": ids, "score": pa.array([1.0] * 6, pa.float32())})
    assert merge_topk([t], 6).column("page_id").to_pylist() == sorted(ids)


# ---------------------------------------------------------------- a page held by two parts


def cands(q, pages, scores, **extra) -> pa.Table:
    cols = {QUERY_INDEX: pa.array(q, pa.int64()), "page_id": pages, "score": pa.array(scores, pa.float32())}
    cols.update(extra)
    return pa.table(cols)


def rows_of(table: pa.Table) -> list[tuple]:
    d = table.to_pydict()
    return list(zip(*(d[c] for c in table.column_names)))


def test_a_page_in_two_parts_with_different_scores_appears_once_with_its_best_score():
    # b#1 sits in two shards (or a rerun scored it again) with different scores.
    a = cands([0, 0, 1], ["b#1", "c#1", "b#1"], [5.0, 1.0, 0.5])
    b = cands([0, 0, 1, 1], ["a#1", "b#1", "b#1", "a#1"], [2.0, 3.0, 4.0, 1.0])
    for parts in ([a, b], [b, a]):
        got = merge_topk(parts, 3).to_pydict()
        assert list(zip(got[QUERY_INDEX], got["page_id"], got["score"], got["rank"])) == [
            (0, "b#1", 5.0, 1), (0, "a#1", 2.0, 2), (0, "c#1", 1.0, 3),
            (1, "b#1", 4.0, 1), (1, "a#1", 1.0, 2),
        ]
    # k cuts distinct pages: a duplicate never takes the place of another page.
    got = merge_topk([a, b], 2).to_pydict()
    assert got["page_id"] == ["b#1", "a#1", "b#1", "a#1"]


def test_a_page_in_two_parts_with_equal_scores_appears_once_whatever_the_part_order():
    # Same page, same score, from two parts; the copies differ in a ride-along column (an
    # older corpus file without doc_id): the row kept must not depend on the part order.
    a = cands([0, 0], ["x y.pdf#1", "z.pdf#2"], [1.0, 1.0], doc_id=["x y.pdf", "z.pdf"], page_number=[1, 2])
    b = cands([0, 0], ["x y.pdf#1", "a.pdf#9"], [1.0, 0.0], doc_id=[None, "a.pdf"], page_number=[1, 9])
    c = cands([0], ["x y.pdf#1"], [1.0], doc_id=["x y.pdf"], page_number=[1])  # identical copy
    tables = {tuple(rows_of(merge_topk(list(p), 5))) for p in itertools.permutations([a, b, c])}
    assert len(tables) == 1
    (rows,) = tables
    assert [r[1] for r in rows] == ["x y.pdf#1", "z.pdf#2", "a.pdf#9"]
    assert rows[0] == (0, "x y.pdf#1", 1.0, "x y.pdf", 1, 1)  # the non-null doc_id sorts first


@pytest.mark.parametrize("seed", range(8))
def test_merge_with_duplicate_pages_is_exact_and_associative(seed):
    rng = np.random.default_rng(seed)
    n_queries, k = 3, int(rng.integers(1, 8))
    page_ids = [f"d{j}.pdf#{j % 3 + 1}" for j in range(int(rng.integers(1, 25)))]
    # Several parts, each a random subset of the pages with a random score per copy:
    # most pages appear in 2-3 parts, with equal or different scores (few values: ties).
    parts = []
    for _ in range(int(rng.integers(2, 6))):
        chosen = [p for p in page_ids if rng.random() < 0.6]
        q = np.repeat(np.arange(n_queries), len(chosen))
        parts.append(cands(q, chosen * n_queries, rng.integers(-2, 3, len(q)).astype(np.float32)))
    best: dict[tuple[int, str], float] = {}
    for part in parts:
        for qi, p, s in zip(*(part.column(c).to_pylist() for c in (QUERY_INDEX, "page_id", "score"))):
            best[(qi, p)] = max(best.get((qi, p), -np.inf), s)
    truth = []
    for qi in range(n_queries):
        pages = sorted((p for (q, p) in best if q == qi), key=lambda p: (-best[(qi, p)], p))[:k]
        truth += [(qi, p, best[(qi, p)], r) for r, p in enumerate(pages, start=1)]

    def merged_rows(table):
        d = table.to_pydict()
        return list(zip(d[QUERY_INDEX], d["page_id"], d["score"], d["rank"]))

    assert merged_rows(merge_topk(parts, k)) == truth
    for _ in range(4):  # shards finish in any order; the driver merges as they arrive
        order = rng.permutation(len(parts))
        running = merge_topk([parts[order[0]]], k)
        for i in order[1:]:
            running = merge_topk([running.drop_columns(["rank"]), parts[i]], k)
        assert merged_rows(running) == truth
