"""pipeline.score.maxsim: exact MaxSim against a float64 oracle and transformers, invariance, top-k ties."""

from __future__ import annotations

import doctest
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.score import maxsim as score
from pipeline.score.packing import pack_pages, pad_queries
from pipeline.score.maxsim import maxsim_scores, topk_desc
from pipeline.devtools.synthetic import oracle_scores, random_pages, random_queries

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_doctests():
    result = doctest.testmod(score, raise_on_error=False)
    assert result.attempted >= 5 and result.failed == 0


def _score(queries, pages, **kw):
    Q, _ = pad_queries(queries)
    return maxsim_scores(Q, pack_pages([p[3] for p in pages]), **kw).numpy()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_equals_float64_oracle_on_ragged_inputs(seed):
    rng = np.random.default_rng(seed)
    pages = random_pages(int(rng.integers(1, 30)), rng, max_len=int(rng.integers(1, 60)))
    queries = random_queries(int(rng.integers(1, 9)), rng)
    got = _score(queries, pages)
    ref = oracle_scores(queries, pages)
    assert got.dtype == np.float32
    # float64 compute rounded once to float32: within one float32 rounding of the oracle.
    np.testing.assert_allclose(got, ref, rtol=2e-7, atol=1e-7)
    # Therefore the exact ranking equals the oracle's (no near-ties in random data).
    vals, idx = topk_desc(torch.from_numpy(got), 5)
    for i in range(len(queries)):
        expect = sorted(range(len(pages)), key=lambda j: (-ref[i, j], j))[:5]
        assert idx[i].tolist() == expect


def test_padding_never_takes_part():
    # Every similarity is negative: zero padding (score_retrieval's) would turn the max into 0.
    short = -np.ones((1, 128), dtype=np.float16) / 16
    long = -np.ones((30, 128), dtype=np.float16) / 16
    q = np.ones((3, 128), dtype=np.float16) / 16
    got = _score([q, q[:1]], [("d", 1, "d#1", short), ("e", 1, "e#1", long)])
    expect = -(128 / 256) * np.array([[3, 3], [1, 1]])
    np.testing.assert_array_equal(got, expect.astype(np.float32))
    # The same query zero-padded to any length gives the same score bit for bit.
    Q8, _ = pad_queries([q], length=8)
    pk = pack_pages([short, long])
    assert torch.equal(maxsim_scores(Q8, pk), torch.from_numpy(got[:1]))


def test_float32_query_side_accumulation_on_fp16_operands():
    # float16 operands as stored; the sum is float32, not float16 (65504 would overflow in half).
    page = np.full((2, 128), 0.5, dtype=np.float16)
    q = np.full((600, 128), 1.0, dtype=np.float16)
    Q, _ = pad_queries([q], dtype=torch.float16)
    pk = pack_pages([page], dtype=torch.float16)
    assert maxsim_scores(Q, pk).item() == 600 * 64.0


def test_equals_transformers_score_retrieval_where_zero_padding_cannot_matter():
    from transformers import ColQwen2Processor

    rng = np.random.default_rng(7)
    # Ragged but all-positive vectors: a zero pad vector never wins a max.
    pages = [np.abs(rng.standard_normal((int(n), 128))).astype(np.float32) / 8 for n in rng.integers(1, 30, 11)]
    queries = [np.abs(rng.standard_normal((int(n), 128))).astype(np.float32) / 8 for n in rng.integers(1, 10, 4)]
    ref = ColQwen2Processor.score_retrieval(
        None, [torch.from_numpy(q) for q in queries], [torch.from_numpy(p) for p in pages], batch_size=4
    ).numpy()
    Q, _ = pad_queries(queries)
    got = maxsim_scores(Q, pack_pages(pages)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    # Equal-length pages and queries of both signs: no padding anywhere.
    pages = [rng.standard_normal((16, 128)).astype(np.float32) / 8 for _ in range(9)]
    queries = [rng.standard_normal((5, 128)).astype(np.float32) / 8 for _ in range(3)]
    ref = ColQwen2Processor.score_retrieval(
        None, [torch.from_numpy(q) for q in queries], [torch.from_numpy(p) for p in pages]
    ).numpy()
    Q, _ = pad_queries(queries)
    np.testing.assert_allclose(maxsim_scores(Q, pack_pages(pages)).numpy(), ref, rtol=1e-5, atol=1e-6)


def test_scores_do_not_depend_on_shard_split_or_query_batch():
    rng = np.random.default_rng(11)
    pages = random_pages(37, rng, max_len=50)
    queries = random_queries(13, rng)
    full = _score(queries, pages)
    for n_shards, batch in [(2, 1), (5, 4), (37, 13), (3, 13)]:
        if True:
            parts = []
            for s in np.array_split(np.arange(len(pages)), n_shards):
                cols = [_score(queries[b : b + batch], [pages[j] for j in s]) for b in range(0, 13, batch)]
                parts.append(np.concatenate(cols, axis=0))
            assert np.array_equal(np.concatenate(parts, axis=1), full), (n_shards, batch)
    # A tiny similarity block (many page chunks) changes nothing either.
    Q, _ = pad_queries(queries)
    tiny = maxsim_scores(Q, pack_pages([p[3] for p in pages]), block_elements=1).numpy()
    assert np.array_equal(tiny, full)


def test_topk_ties_zero_and_bounds():
    s = torch.tensor([[1.0, 2.0, 2.0, 0.0, -0.0, 2.0], [0.0, -0.0, 0.0, -1.0, 5.0, -0.0]])
    v, i = topk_desc(s, 4)
    assert i.tolist() == [[1, 2, 5, 0], [4, 0, 1, 2]]  # -0.0 ties +0.0, lower index first
    assert v.tolist() == [[2.0, 2.0, 2.0, 1.0], [5.0, 0.0, -0.0, 0.0]]
    v, i = topk_desc(s, 100)  # k larger than the shard
    assert i.shape == (2, 6)
    assert topk_desc(torch.zeros((3, 0)), 5)[1].shape == (3, 0)
    with pytest.raises(ValueError, match="NaN"):
        topk_desc(torch.tensor([[float("nan"), 1.0]]), 1)
    # Negative scores order correctly through the integer key.
    neg = torch.tensor([[-3.0, -1.5, -2.0, -1.5, float("-inf")]])
    assert topk_desc(neg, 5)[1].tolist() == [[1, 3, 2, 0, 4]]


def test_empty_inputs_and_bad_pages():
    Q, _ = pad_queries([np.ones((2, 128), np.float16)])
    assert maxsim_scores(Q, pack_pages([])).shape == (1, 0)
    assert maxsim_scores(Q[:0], pack_pages([np.ones((2, 128))])).shape == (0, 1)
    with pytest.raises(ValueError, match="no vectors"):
        pack_pages([np.ones((2, 128)), np.zeros((0, 128))])
    with pytest.raises(ValueError, match="expected shape"):
        pack_pages([np.ones((2, 64))])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed (pip install -e .[dev])")
def test_triton_kernel_in_interpreter_equals_oracle():
    """The CUDA kernel's logic, run by Triton's CPU interpreter (TRITON_INTERPRET=1) on small
    inputs against the float64 oracle: float32 operands (IEEE dot), then float16 operands in
    the scorer's layout (pad 64, float32 sums). triton is in the dev extra, so CI runs it."""
    code = (
        "import numpy as np, torch\n"
        "from pipeline.score.packing import pack_pages, pad_queries\n"
        "from pipeline.score.triton_kernel import maxsim_scores_triton\n"
        "from pipeline.devtools.synthetic import random_pages, random_queries, oracle_scores\n"
        "rng = np.random.default_rng(5)\n"
        "pages = random_pages(21, rng, max_len=45); queries = random_queries(5, rng)\n"
        "pk = pack_pages([p[3] for p in pages], dtype=torch.float32, pad_multiple=16)\n"
        "Q, _ = pad_queries(queries, dtype=torch.float32)\n"
        "want = oracle_scores(queries, pages)\n"
        "got = maxsim_scores_triton(Q, pk, config=(16, 16, 1, 1)).numpy()\n"
        "np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)\n"
        # The production layout: float16 operands as stored, pages padded to 64 (the
        # scorer's CUDA_PAD_MULTIPLE), the small-batch config; sums in float32.
        "from pipeline.score.triton_kernel import SMALL_BATCH_CONFIG\n"
        "pk = pack_pages([p[3] for p in pages], dtype=torch.float16, pad_multiple=64)\n"
        "Q, _ = pad_queries(queries, dtype=torch.float16)\n"
        "got = maxsim_scores_triton(Q, pk, config=SMALL_BATCH_CONFIG).numpy()\n"
        "assert got.dtype == np.float32\n"
        "np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-5)\n"
        "print('OK')\n"
    )
    path = os.pathsep.join([ROOT, f"{ROOT}/tests", os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


def test_fp16_operands_give_float32_similarities():
    """Stored float16 vectors in, exact float32 sums out: the torch path (the CUDA fallback)
    must not round each dot product to float16 before the max (scores off by ~1e-3)."""
    from pipeline.devtools.synthetic import oracle_scores, random_pages, random_queries

    rng = np.random.default_rng(11)
    pages = random_pages(40, rng, max_len=40)
    queries = random_queries(6, rng)
    pk = pack_pages([p[3] for p in pages], dtype=torch.float16)
    Q, _ = pad_queries(queries, dtype=torch.float16)
    got = maxsim_scores(Q, pk)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), oracle_scores(queries, pages), rtol=2e-6, atol=2e-5)


def test_read_only_queries_are_padded_without_a_warning():
    """Queries decoded from Parquet or passed through Ray's object store are read-only numpy
    arrays: torch.as_tensor warned of each one in every scoring actor's log. Their values, and
    those of float16 arrays and bfloat16 tensors, land as they are, zeros after them."""
    import warnings

    from pipeline.score.packing import pad_queries

    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 128)).astype(np.float32)
    a.setflags(write=False)
    b = rng.standard_normal((3, 128)).astype(np.float16)
    c = torch.ones(2, 128, dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q, lengths = pad_queries([a, b, c], dtype=torch.float32)
    assert [str(w.message) for w in caught] == []
    assert lengths.tolist() == [5, 3, 2] and q.shape == (3, 5, 128)
    np.testing.assert_array_equal(q[0].numpy(), a)
    np.testing.assert_array_equal(q[1, :3].numpy(), b.astype(np.float32))
    assert not q[1, 3:].any() and bool((q[2, :2] == 1).all()) and not q[2, 2:].any()
    with pytest.raises(ValueError, match="expected shape"):
        pad_queries([np.zeros(128, np.float32)])
