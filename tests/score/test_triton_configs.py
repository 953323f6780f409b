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
        # the same pages, the same top-k; the values within float32 rounding (random unit vectors
        # are not dyadic: under the interpreter, numpy 2.4.6, they came 2.4e-7 apart, 2026-12-04)
        "    assert torch.equal(i2, ei) and torch.allclose(v2, ev, rtol=0, atol=1e-6), (group, (v2 - ev).abs().max())\n"
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


def test_fp8_quantization_kernel_equals_torch_in_interpreter():
    """quantize_rows' fused kernel (backend="triton") against its torch path (the reference):
    the same float8_e4m3fn bits, the same scales, err/norm within 1e-9 of torch's and never
    below the float64 values recomputed from the kernel's own FP8 values (the bound's
    premise), on float16/bfloat16/float32/float64 rows with zeros, a huge value, values in
    e4m3's subnormal range and pages of several rows (groups); rounding checked directly on
    every e4m3 tie, its float32 neighbours, saturation and float32 denormals; NaN/Inf refused.
    One interpreter process for all of it (a few seconds)."""
    _interpret("""
import numpy as np, torch
from pipeline.score import fp8
from pipeline.score.triton_kernel import quantize_rows_triton, row_absmax_triton

def recomputed(x, q):
    x64 = x.double(); s = q.scales
    deq64 = q.values.double() * s.double()[:, None]
    deq32 = (q.values.float() * s[:, None]).double()
    e = torch.linalg.vector_norm(x64 - deq64, dim=1) + torch.linalg.vector_norm(deq64 - deq32, dim=1)
    n = torch.stack([torch.linalg.vector_norm(t, dim=1) for t in (x64, deq64, deq32)]).amax(0)
    return e, n

def check(x, groups=None, name=""):
    got = fp8.quantize_rows(x, groups=groups, backend="triton")
    want = fp8.quantize_rows(x, groups=groups, backend="torch")
    assert got.values.dtype == torch.float8_e4m3fn and got.err.dtype == got.norm.dtype == torch.float64, name
    assert torch.equal(got.values.view(torch.uint8), want.values.view(torch.uint8)), (name, (
        got.values.view(torch.uint8) != want.values.view(torch.uint8)).nonzero()[:5])
    assert torch.equal(got.scales, want.scales), name
    e, n = recomputed(x, got)
    assert bool((got.err >= e).all()) and bool((got.norm >= n).all()), name
    torch.testing.assert_close(got.err, want.err, rtol=1e-9, atol=0, msg=name)
    torch.testing.assert_close(got.norm, want.norm, rtol=1e-9, atol=0, msg=name)
    return got

# 1. Rounding alone (scale 1): every e4m3 value, the midpoints between neighbours (ties: to
# even), their float32 neighbours, beyond 448 (saturates), -0.0, float32 denormals.
vals = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
mids = (vals[1:] + vals[:-1]) / 2
pts = torch.cat([vals, mids, torch.tensor([448.0, 464.0, 470.0, 480.0, 1e4, 3e38, 2.0**-10, 2.0**-11, 1e-40, 2.0**-149])])
inf = torch.tensor(float("inf"))
pts = torch.cat([pts, torch.nextafter(pts, inf), torch.nextafter(pts, -inf)]).clamp_min(0)
pts = torch.cat([pts, -pts, torch.tensor([0.0, -0.0])])
pts = torch.cat([pts, torch.zeros((-len(pts)) % 128)]).view(-1, 128)
ones = torch.ones(pts.shape[0])
v, e, n = quantize_rows_triton(pts, ones)
want = pts.clamp(-448, 448).to(torch.float8_e4m3fn)
assert torch.equal(v.view(torch.uint8), want.view(torch.uint8)), (pts[v.view(torch.uint8) != want.view(torch.uint8)][:8])
assert torch.equal(v.float(), want.float()) and (v.view(torch.uint8) & 0x7F != 0x7F).all()  # no NaN code
# odd scales: the division must be correctly rounded (a reciprocal or div.full would differ)
g = torch.Generator().manual_seed(5)
xs = torch.randn(64, 128, generator=g) * 10.0 ** torch.randint(-6, 4, (64, 1), generator=g)
sc = (torch.rand(64, generator=g) + 0.5) * 10.0 ** torch.randint(-8, 2, (64,), generator=g).float()
v, _, _ = quantize_rows_triton(xs, sc)
assert torch.equal(v.view(torch.uint8), (xs / sc[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8))

# 2. quantize_rows, kernel against torch, on the shapes of a shard.
x = torch.randn(300, 128, generator=g)
x[3] = 0                                    # a row of zeros (scale 1)
x[4] = 0; x[4, 7] = 6e4                     # one huge value, the rest zeros
x[5] = torch.randn(128, generator=g) * 1e-3; x[5, 0] = 60.0   # most of the row in e4m3's subnormal range
x[6] = torch.randn(128, generator=g) * 1e-7                    # float16 subnormals
x[7] = 65504.0; x[8] = -65504.0            # float16's largest
x[9, ::2] = -0.0; x[9, 1::2] = 0.0
x16 = x.half()
assert torch.equal(row_absmax_triton(x16), x16.float().abs().amax(1))
q = check(x16, name="float16 per row")
assert q.err[3] == 0 and q.norm[3] == 0 and q.scales[3] == 1
lengths = torch.randint(1, 40, (30,), generator=g)
groups = torch.repeat_interleave(torch.arange(30), lengths)[:300]
groups = torch.cat([groups, torch.full((300 - len(groups),), 30)])
x16g = x16.clone(); x16g[groups == 2] *= torch.logspace(-4, 0, int((groups == 2).sum())).half()[:, None]
check(x16g, groups, "float16 pages")
check(x16g[torch.randperm(300, generator=g)], groups, "groups not contiguous")
check(x.bfloat16(), groups, "bfloat16 pages")
check(x * 1e-30, name="float32 tiny")
check(x.double() * 1e-3, groups, "float64")
check(torch.randn(200, 256, generator=g).half()[:, ::2], name="strided rows")
check(x16[:0], name="no rows")
check(x16[:1], groups[:1], name="one row")

# 3. NaN and Inf refused, as by the torch path.
for bad in (float("nan"), float("inf"), float("-inf")):
    y = x16.clone(); y[11, 5] = bad
    for backend in ("triton", "torch"):
        try:
            fp8.quantize_rows(y, groups=groups, backend=backend)
        except ValueError as exc:
            assert "NaN or Inf" in str(exc)
        else:
            raise AssertionError((bad, backend))
print("OK")
""")
