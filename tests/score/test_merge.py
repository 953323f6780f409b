"""pipeline.score.merge: per-shard top-k merged into the exact global top-k, ties by page_id."""

from __future__ import annotations

import doctest

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
