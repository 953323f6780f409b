"""Loading a shard: pages gathered in page_id order straight from Arrow's decoded chunks,
in parallel pieces, equal to a page-by-page copy."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.score import corpus


@pytest.mark.parametrize("threads", [1, 4])
def test_gather_from_chunks_equals_page_by_page_copy(monkeypatch, threads):
    monkeypatch.setattr(corpus, "GATHER_PIECE_VECTORS", 7)  # many pieces, runs cut mid-page
    rng = np.random.default_rng(0)
    parts, pages = [], []  # pages: (chunk, start, length)
    for c in range(5):
        lengths = rng.integers(0, 12, size=rng.integers(1, 9))
        parts.append(rng.standard_normal((int(lengths.sum()), corpus.EMBEDDING_DIM)).astype(np.float16))
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        pages += [(c, int(s), int(n)) for s, n in zip(starts, lengths)]
    order = rng.permutation(len(pages))
    order[: len(order) // 2].sort()  # half of it in runs, like sorted files
    part_of = np.array([pages[i][0] for i in order], np.int64)
    starts = np.array([pages[i][1] for i in order], np.int64)
    lengths = np.array([pages[i][2] for i in order], np.int64)
    expected = np.concatenate([parts[c][s : s + n] for c, s, n in zip(part_of, starts, lengths)])
    out = np.full_like(expected, np.nan)
    corpus._gather_pages(parts, part_of, starts, lengths, out, threads=threads)
    np.testing.assert_array_equal(out, expected)


def test_gather_of_no_pages_writes_nothing():
    out = np.zeros((0, corpus.EMBEDDING_DIM), np.float16)
    corpus._gather_pages([], np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), out)
