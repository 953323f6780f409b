"""pipeline.score.triton_kernel shapes for small query sets (one page per program, split-K
over a page's chunks, small BLOCK_M, more stages) and the fused FP8 candidate pass, run by
Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is imported: a subprocess).

Every config must give the same float32 maxima. On random float data the interpreter's
numpy matmul rounds differently for different BLOCK_M (its BLAS blocks by shape), so
bit-equality across configs is checked on dyadic data (every partial sum exact in float32,
any order), and closeness to the float64 oracle on random data.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton not installed (pip install -e .[dev])")

# Configs of each new path: (BLOCK_M, BLOCK_N, warps, stages, pages_per_group, split).
CONFIGS = (
    "[(64, 64, 4, 4), (16, 64, 1, 2, 1), (32, 64, 4, 4, 1), (16, 32, 1, 5, 1), (32, 64, 2, 3, 4),"
    " (16, 64, 1, 3, 1, 2), (32, 32, 4, 4, 1, 3), (16, 64, 1, 1, 1, 8), (16, 32, 1, 2, 3), (32, 64, 2, 3, 13)]"
)


def _interpret(code: str) -> None:
    path = os.pathsep.join([ROOT, f"{ROOT}/tests", os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_choose_config_table_and_checks():
    from pipeline.score import triton_kernel as tk

    # measured on an H200: one page per program for 1 and 10 queries, 16-page groups from 100
    assert tk.choose_config(25) == tk.SINGLE_QUERY_CONFIG and tk.choose_config(25).pages_per_group == 1
    assert tk.choose_config(64).block_m == 64 and tk.choose_config(250) == tk.FEW_QUERIES_CONFIG
    assert tk.choose_config(251) == tk.DEFAULT_CONFIG and tk.choose_config(25_000) == tk.DEFAULT_CONFIG
    table = ((32, tk.KernelConfig(16, 64, 4, 4, 1, 2)), (300, tk.KernelConfig(64, 64, 4, 3, 1)),
             (None, tk.DEFAULT_CONFIG))
    assert tk.choose_config(25, table).split == 2
    assert tk.choose_config(250, table).pages_per_group == 1
    assert tk.choose_config(10**6, table) == tk.DEFAULT_CONFIG
    assert tk.as_config((256, 64, 8, 3)) == tk.DEFAULT_CONFIG and tk.DEFAULT_CONFIG.pages_per_group == 16
    with pytest.raises(ValueError, match="pages_per_group == 1"):
        tk.as_config((16, 64, 4, 4, 2, 2))
    with pytest.raises(ValueError, match=">= 1"):
        tk.as_config((16, 64, 4, 4, 0))


def test_small_query_configs_equal_oracle_and_each_other():
    """Each config (one page per program, split-K 2/3/8 with runs that are empty for
    one-chunk pages, BLOCK_M 16/32, 1-5 stages, odd group sizes, and 13 pages in groups of
    13: the group table is then a strided view, which must be made contiguous on CPU) against
    the float64 oracle on random float16 data, and bit for bit against the default config
    on dyadic data."""
    _interpret(
        "import numpy as np, torch\n"
        "from pipeline.score.packing import pack_pages, pad_queries\n"
        "from pipeline.score.triton_kernel import maxsim_scores_triton, page_maxima_triton\n"
        "from pipeline.devtools.synthetic import random_pages, random_queries, oracle_scores\n"
        f"configs = {CONFIGS}\n"
        "rng = np.random.default_rng(8)\n"
        # 1..150 vectors: pages of 1 to 3 chunks of 64, so split 3 and 8 have empty runs.
        "pages = random_pages(13, rng, max_len=150); queries = random_queries(2, rng)\n"
        "want = oracle_scores(queries, pages)\n"
        "pk = pack_pages([p[3] for p in pages], dtype=torch.float16, pad_multiple=64)\n"
        "Q, _ = pad_queries(queries, dtype=torch.float16)\n"
        "for cfg in configs:\n"
        "    got = maxsim_scores_triton(Q, pk, config=cfg).numpy()\n"
        "    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-5, err_msg=str(cfg))\n"
        # Dyadic values k/8, |k| <= 4: products and all partial sums exact in float32.
        "flat = [rng.integers(-4, 5, (len(p[3]), 128)).astype(np.float16) / 8 for p in pages]\n"
        "qs = [rng.integers(-4, 5, (int(n), 128)).astype(np.float16) / 8 for n in (25, 7, 1)]\n"
        "pk = pack_pages(flat, dtype=torch.float16, pad_multiple=64)\n"
        "Q, _ = pad_queries(qs, dtype=torch.float16)\n"
        "ref = page_maxima_triton(Q.reshape(-1, 128), pk, config=configs[0])\n"
        "exact = torch.stack([torch.from_numpy((Q.reshape(-1, 128).double().numpy() @ f.astype(np.float64).T)"
        ".max(axis=1)) for f in flat]).float()\n"
        "assert torch.equal(ref, exact)\n"
        "for cfg in configs[1:]:\n"
        "    got = page_maxima_triton(Q.reshape(-1, 128), pk, config=cfg)\n"
        "    assert got.shape == ref.shape and torch.equal(got, ref), cfg\n"
        "print('OK')\n"
    )


def test_fused_fp8_candidates_in_interpreter():
    """The FP8 variant of the kernel (float8_e4m3fn operands, per-row scales; Triton 3.9's
    interpreter decodes FP8 through float16 and dots in float32) against the float32 emulation
    of fp8.py, within the bound's rounding term; fp8_topk with it returns the exact top-k."""
    _interpret(
        "import numpy as np, torch\n"
        "from pipeline.score import fp8\n"
        "from pipeline.score.packing import pack_pages, pad_queries\n"
        "from pipeline.score.maxsim import maxsim_scores, topk_desc\n"
        "rng = np.random.default_rng(3)\n"
        "def unit(n):\n"
        "    x = rng.standard_normal((n, 128)); return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)\n"
        "pages = [unit(int(n)) for n in rng.integers(3, 90, 25)]\n"
        "queries = [unit(int(n)) for n in rng.integers(2, 9, 4)]\n"
        "PD = pack_pages(pages)\n"  # the CPU layout: emulation and exact re-scoring
        "PK = pack_pages(pages, dtype=torch.float16, pad_multiple=64)\n"  # the kernel's layout
        "Q, _ = pad_queries(queries)\n"
        "shD, shK = fp8.Fp8Pages.from_packed(PD), fp8.Fp8Pages.from_packed(PK)\n"
        "assert torch.equal(shD.page_norm, shK.page_norm) and torch.equal(shD.page_err, shK.page_err)\n"
        "qq = fp8.quantize_rows(Q.reshape(-1, 128))\n"
        "em, _ = fp8.candidate_scores(Q, qq, shD, 'emulated')\n"
        "fu, u = fp8.candidate_scores(Q, qq, shK, 'fused')\n"
        "assert fu.dtype == torch.float32 and fu.shape == em.shape\n"
        "qn = qq.norm.view(4, -1).sum(1)\n"
        "tol = 4 * fp8.gamma(128, fp8.U32) * qn[:, None] * shK.page_norm[None, :]\n"
        "assert bool(((fu.double() - em.double()).abs() <= tol).all()), (fu - em).abs().max()\n"
        "ev, ei = topk_desc(maxsim_scores(Q, PD), 5)\n"
        "def exact(q, p):\n"  # re-score on the CPU layout (fp8_topk passes subsets of PK)
        "    return maxsim_scores(q, pack_pages([p.vectors[p.offsets[j]:p.offsets[j] + p.lengths[j]]"
        " for j in range(p.n_pages)]))\n"
        "v, i, st = fp8.fp8_topk(Q, shK, 5, exact, candidate='fused')\n"
        "assert torch.equal(v, ev) and torch.equal(i, ei)\n"
        "print('OK')\n"
    )


def test_fused_in_order_sum_equals_the_torch_loop_bit_for_bit():
    """One launch instead of Lq - 1: the same float32 additions, in the same order."""
    _interpret("""
import torch
from pipeline.score import triton_kernel as tk
from pipeline.score.maxsim import sum_over_query_vectors
g = torch.Generator().manual_seed(0)
for n_pages, nq, lq in ((1, 1, 1), (70, 1, 25), (130, 17, 25), (5, 33, 3), (0, 2, 4), (3, 0, 4)):
    m = torch.randn(n_pages, nq * lq, generator=g) * torch.logspace(-6, 6, nq * lq)  # cancellations
    want = sum_over_query_vectors(m.view(n_pages, nq, lq)).T.contiguous() if n_pages and nq else torch.empty(nq, n_pages)
    got = tk.sum_over_query_vectors_triton(m, nq, lq)
    assert got.shape == (nq, n_pages) and torch.equal(got, want), (n_pages, nq, lq)
    # a strided view of a wider buffer (as a padded maxima block) too
    wide = torch.randn(n_pages, nq * lq + 3, generator=g)
    view = wide[:, : nq * lq]
    if n_pages and nq:
        assert torch.equal(tk.sum_over_query_vectors_triton(view, nq, lq),
                           sum_over_query_vectors(view.reshape(n_pages, nq, lq)).T)
print("OK")
""")


def test_pages_scored_in_place_equal_the_full_call():
    """``page_index`` (the exact re-scoring of FP8 candidates): any list of pages (unsorted,
    repeated, empty, one) scored in place gives the full call's rows for those pages, bit for
    bit on dyadic data, for each config (16-page groups and split runs included); and fp8_topk
    re-scoring in place returns what re-scoring copies returns."""
    _interpret(
        "import numpy as np, torch\n"
        "from pipeline.score import fp8\n"
        "from pipeline.score.packing import pack_pages, pad_queries\n"
        "from pipeline.score.maxsim import topk_desc\n"
        "from pipeline.score.triton_kernel import maxsim_scores_triton, page_maxima_triton\n"
        "from pipeline.devtools.synthetic import random_pages\n"
        f"configs = {CONFIGS}\n"
        "rng = np.random.default_rng(11)\n"
        "pages = random_pages(17, rng, max_len=150)\n"
        "flat = [rng.integers(-4, 5, (len(p[3]), 128)).astype(np.float16) / 8 for p in pages]\n"
        "qs = [rng.integers(-4, 5, (int(n), 128)).astype(np.float16) / 8 for n in (25, 7, 1)]\n"
        "pk = pack_pages(flat, dtype=torch.float16, pad_multiple=64)\n"
        "Q, _ = pad_queries(qs, dtype=torch.float16)\n"
        "Qf = Q.reshape(-1, 128)\n"
        "indexes = [torch.tensor([3, 0, 16, 3]), torch.tensor([], dtype=torch.int64), torch.tensor([9]),"
        " torch.arange(17)]\n"
        "for cfg in configs:\n"
        "    full = page_maxima_triton(Qf, pk, config=cfg)\n"
        "    for idx in indexes:\n"
        "        got = page_maxima_triton(Qf, pk, config=cfg, page_index=idx)\n"
        "        assert got.shape == (len(idx), Qf.shape[0]) and torch.equal(got, full[idx]), (cfg, idx)\n"
        "scores = maxsim_scores_triton(Q, pk)\n"
        "idx = torch.tensor([1, 5, 6, 12])\n"
        "assert torch.equal(maxsim_scores_triton(Q, pk, page_index=idx), scores[:, idx])\n"
        # fp8_topk: re-scoring in place against copies, on random unit vectors (many candidates)
        "def unit(n):\n"
        "    x = rng.standard_normal((n, 128)); return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)\n"
        "pages = [unit(int(n)) for n in rng.integers(3, 90, 30)]\n"
        "Q, _ = pad_queries([unit(int(n)) for n in rng.integers(2, 9, 5)], dtype=torch.float16)\n"
        "PK = pack_pages(pages, dtype=torch.float16, pad_multiple=64)\n"
        "sh = fp8.Fp8Pages.from_packed(PK)\n"
        "exact = lambda q, p: maxsim_scores_triton(q, p)\n"
        "inplace = lambda q, p, i: maxsim_scores_triton(q, p, page_index=i)\n"
        "ev, ei = topk_desc(exact(Q, PK), 4)\n"
        "for group in (1, 2, 5):\n"
        "    v1, i1, s1 = fp8.fp8_topk(Q, sh, 4, exact, group=group, candidate='fused', full_fraction=1.0)\n"
        "    v2, i2, s2 = fp8.fp8_topk(Q, sh, 4, exact, group=group, candidate='fused', full_fraction=1.0,"
        " exact_subset=inplace)\n"
        "    assert torch.equal(v1, v2) and torch.equal(i1, i2) and s1['rescored_pairs'] == s2['rescored_pairs']\n"
        "    assert torch.equal(i2, ei) and torch.equal(v2, ev), group\n"
        "print('OK')\n"
    )


def test_fp8_page_scales_in_every_mode():
    """The FP8 kernel scales each page's maximum by its query row's scale, then by the page's
    own scale: in 16-page groups (the scale looked up by the chunk's page), one page per
    program (by the program's page) and split runs alike, bit for bit against float32 torch,
    on FP8 values whose dots are exact and a different scale for every page."""
    _interpret(
        "import numpy as np, torch\n"
        "from pipeline.score.packing import pack_pages\n"
        "from pipeline.score.triton_kernel import page_maxima_fp8_triton\n"
        "from pipeline.devtools.synthetic import random_pages\n"
        f"configs = {CONFIGS}\n"
        "rng = np.random.default_rng(12)\n"
        "pages = random_pages(19, rng, max_len=150)\n"
        "flat = [rng.integers(-4, 5, (len(p[3]), 128)).astype(np.float16) / 8 for p in pages]\n"
        "pk = pack_pages(flat, dtype=torch.float16, pad_multiple=64)\n"
        "dv = pk.vectors.to(torch.float8_e4m3fn)\n"
        "assert torch.equal(dv.to(torch.float16), pk.vectors)\n"
        "qv = torch.tensor(rng.integers(-4, 5, (37, 128)) / 8, dtype=torch.float16).to(torch.float8_e4m3fn)\n"
        "qs = torch.tensor(rng.uniform(0.5, 2, 37) * 2.0 ** rng.integers(-8, 8, 37), dtype=torch.float32)\n"
        "ps = torch.tensor(rng.uniform(0.5, 2, 19) * 2.0 ** rng.integers(-8, 8, 19), dtype=torch.float32)\n"
        "dots = dv.float() @ qv.float().T\n"  # exact: small dyadic values
        "m = torch.stack([dots[int(pk.offsets[j]):int(pk.offsets[j + 1])].amax(0) for j in range(19)])\n"
        "want = (m * qs[None, :]) * ps[:, None]\n"
        "for cfg in configs:\n"
        "    got = page_maxima_fp8_triton(qv, qs, pk, dv, ps, config=cfg)\n"
        "    assert torch.equal(got, want), (cfg, (got - want).abs().max())\n"
        "print('OK')\n"
    )
