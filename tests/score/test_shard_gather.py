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


def _shard(tmp_path):
    from pipeline.devtools.synthetic import random_pages, write_corpus

    pages = random_pages(23, np.random.default_rng(5), max_len=30)
    uri = write_corpus(tmp_path / "emb", pages, n_files=3)
    c = corpus.open_corpus(uri)
    spec = corpus.plan_shards(c, corpus.read_vector_counts(c), 1000)[0]
    return pages, uri, spec


def test_a_loaded_shard_holds_every_page_in_page_id_order(tmp_path):
    """Three files, pages in page_id order: the vectors of each page where the index says,
    and the stats that the job's summary sums (the host buffer allocated beside the read)."""
    import dataclasses

    pages, uri, spec = _shard(tmp_path)
    expected = sorted(pages, key=lambda p: p[2])
    for plan in (spec, dataclasses.replace(spec, n_vectors=spec.n_vectors + 7)):  # a count that is off: allocated again
        shard = corpus.load_shard(plan, uri)
        assert shard.meta.column("page_id").to_pylist() == [p[2] for p in expected]
        assert shard.lengths.tolist() == [len(p[3]) for p in expected]
        np.testing.assert_array_equal(shard.flat, np.concatenate([p[3] for p in expected]))
        assert len(shard.flat) == spec.n_vectors
        for k in ("read_s", "decode_s", "parquet_decode_s", "host_alloc_s", "host_alloc_wait_s", "gather_s"):
            assert shard.stats[k] >= 0, k


def test_a_shard_whose_last_part_has_no_rows_loads(tmp_path):
    """A part of no rows after the others (a hand-built plan, an empty file listed last) decodes
    to a table whose last chunk is empty: each page's start within its chunk must not be looked
    up at that chunk's first page (there is none)."""
    pages, uri, _ = _shard(tmp_path)
    c = corpus.open_corpus(uri)
    counts = corpus.read_vector_counts(c)
    f0, f1 = c.files[0], c.files[1]
    spec = corpus.ShardSpec(0, ((f0.path, 1, f0.num_rows), (f1.path, 0, 0)), f0.num_rows - 1, int(counts[0][1:].sum()))
    shard = corpus.load_shard(spec, uri)
    expected = sorted(_file_rows(f0.path)[1:], key=lambda p: p[0])
    assert shard.meta.column("page_id").to_pylist() == [p[0] for p in expected]
    np.testing.assert_array_equal(shard.flat, np.concatenate([p[1] for p in expected]))


def _file_rows(path):
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["page_id", "embedding"])
    return [(pid, e.values.flatten().to_numpy(zero_copy_only=False).reshape(-1, corpus.EMBEDDING_DIM))
            for pid, e in zip(t.column("page_id").to_pylist(), t.column("embedding"))]


@pytest.mark.parametrize("pages_per_shard", [3, 7, 19])
def test_shards_cut_inside_row_groups_hold_their_own_pages(tmp_path, pages_per_shard):
    """Shards that start and stop inside row groups (4 rows each here) and files: each decoded
    chunk is a slice, whose flattened values start at its first offset; empty pages included."""
    from pipeline.devtools.synthetic import random_pages, write_corpus

    pages = random_pages(41, np.random.default_rng(7), min_len=0, max_len=20)
    uri = write_corpus(tmp_path / "emb", pages, n_files=3)
    by_id = {p[2]: p[3] for p in pages}
    c = corpus.open_corpus(uri)
    seen = []
    for spec in corpus.plan_shards(c, corpus.read_vector_counts(c), pages_per_shard):
        shard = corpus.load_shard(spec, uri)
        ids = shard.meta.column("page_id").to_pylist()
        assert ids == sorted(ids) and shard.lengths.tolist() == [len(by_id[i]) for i in ids]
        np.testing.assert_array_equal(shard.flat, np.concatenate([by_id[i] for i in ids]).reshape(-1, corpus.EMBEDDING_DIM))
        seen += ids
    assert sorted(seen) == sorted(by_id)


def test_registered_pinned_memory_unless_the_user_chose(monkeypatch):
    """GPU scorers page-lock shard buffers by malloc + cudaHostRegister (4x faster to allocate
    on an H200 host); a user's own pinned setting in PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF
    stands, and their other settings are kept, in the environment and in what is applied to the
    running allocator (torch resets max_split_size_mb and others that a settings string omits)."""
    import torch

    from pipeline.score.scorer import PINNED_HOST_REGISTER, use_registered_pinned_memory

    applied = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", applied.append, raising=False)
    env = {}
    assert use_registered_pinned_memory(env) == PINNED_HOST_REGISTER
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": PINNED_HOST_REGISTER}
    assert applied == [PINNED_HOST_REGISTER]
    env = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512,expandable_segments:True"}
    use_registered_pinned_memory(env)
    want = "max_split_size_mb:512,expandable_segments:True," + PINNED_HOST_REGISTER
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == want and applied[-1] == want
    env = {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}  # torch's newer name is kept in use
    use_registered_pinned_memory(env)
    assert env == {"PYTORCH_ALLOC_CONF": "expandable_segments:True," + PINNED_HOST_REGISTER}
    assert applied[-1] == "expandable_segments:True," + PINNED_HOST_REGISTER
    env = {"PYTORCH_CUDA_ALLOC_CONF": "pinned_use_cuda_host_register:False"}
    assert use_registered_pinned_memory(env) is None
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "pinned_use_cuda_host_register:False"}
    assert len(applied) == 3


@pytest.mark.parametrize("cache", [False, True])
def test_host_alloc_s_leaves_out_the_wait_for_the_pinned_answer(tmp_path, cache):
    """``pinned`` as a function (the actor front's: it waits for the scorer, i.e. torch's
    import): host_alloc_s is the allocation, not that wait, from Parquet and from the cache."""
    import time

    pages, uri, spec = _shard(tmp_path)
    cache_uri = str(tmp_path / "_cache") if cache else None
    if cache:
        corpus.load_shard(spec, uri, cache_uri=cache_uri)  # writes it
    calls = []

    def slow_answer():
        calls.append(1)
        time.sleep(0.5)
        return False

    shard = corpus.load_shard(spec, uri, cache_uri=cache_uri, pinned=slow_answer)
    assert calls and shard.stats["source"] == ("cache" if cache else "parquet")
    assert shard.stats["host_alloc_s"] < 0.4
