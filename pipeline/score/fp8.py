"""FP8 candidate pass with a provably exact top-k (``--precision fp8-exact-topk``).

Idea: score every page in FP8 (cheap), bound how far each FP8 score can be from the
exact one, and re-score exactly (with the exact path, :func:`score_batch`) every page
that could still be in the top-k. The final top-k is then *the same* as the exact path's:
same page ids, same float32 scores, same tie rule (lower page index first).

Quantization (:func:`quantize_rows`). Every vector x (a page vector or a query vector) is
stored as float8_e4m3fn values v with a float32 scale s (``s = max|x| / 448`` per query vector;
for page vectors the largest of the page's, so the fused kernel scales a page's maximum once;
no value saturates): x~ = s * v. At quantization time we compute, in float64,

    err(x)  >= ||x - x~||_2         (for x~ taken exactly and rounded to float32: both)
    norm(x) >= max(||x||_2, ||x~||_2)

These are *measured* per vector, not assumed from the format (subnormals, zeros, any
scale: the bound holds whatever e4m3 did to the vector).

The bound. Let s*(q, p) = sum_i max_j q_i . p_j be the real-number MaxSim of the stored
(float16) values, s~ what the candidate pass computes and s^ what the exact path
computes. For one query vector q_i and one page vector p_j (Cauchy-Schwarz twice):

    |q_i.p_j - q~_i.p~_j| = |(q_i - q~_i).p_j + q~_i.(p_j - p~_j)|
                          <= err(q_i) ||p_j|| + ||q~_i|| err(p_j)
                          <= err(q_i) Pn(p) + norm(q_i) Pe(p)

with Pn(p) = max_j norm(p_j), Pe(p) = max_j err(p_j) over the page's vectors. A max moves
by at most the largest move of its arguments (|max a - max b| <= max |a - b|), so query
vector i's term moves by at most that, and the sum over i by the sum:

    |sum_i max_j q~_i.p~_j - s*| <= Eq * Pn(p) + Qn * Pe(p),
        Eq = sum_i err(q_i),  Qn = sum_i norm(q_i).

Floating point. Each computed dot product of length 128 is within gamma_128(u) *
sum_k |a_k b_k| <= gamma_128(u) norm(q_i) Pn(p) of its real value (Higham, Thm 3.4;
any summation order, FMA or not), with u the unit roundoff of the accumulation; the max is
exact; the float32 sum over the Lq query positions adds gamma_Lq(2^-24) * sum_i |m_i|. The
exact path has the same kind of error (CPU: float64 dots and sums, one rounding to float32;
CUDA: float16 products accumulated in float32). All of it is <= c * Qn * Pn(p), with the
constant ``c`` of :func:`rounding_constant`. So

    |s^(q, p) - s~(q, p)| <= B(q, p) = Eq Pn(p) + Qn Pe(p) + c Qn Pn(p)

(evaluated in float64 and rounded outwards). ``B`` is a rank-3 outer product: a few
(n_queries x n_pages) float64 operations per batch.

Why the top-k is exact (:func:`select_candidates`). Per query, L = s~ - B <= s^ <= U = s~ + B.
Let k' = min(k, n_pages), T = the k'-th largest L, K = the k' pages with the largest L, and
C = {p : U(p) >= T}. (1) K is in C, since U >= L >= T on K. (2) Every page of K has
s^ >= L >= T. (3) A page p outside C has s^(p) <= U(p) < T <= s^(r) for every r in K: k'
pages beat it *strictly*, so it is not in the exact top-k' under any tie rule. Hence the
exact top-k is inside C, and the top-k of any set S with C <= S <= all pages, ranked by the
exact scores with the exact path's total order (score descending, page index ascending), is
the exact top-k. The re-scoring step uses S = the union of the candidate sets of a few
queries (one exact call per group), or all pages when that union is large.

What this relies on: the exact path gives each (query, page) the same float32 score
whatever other pages and queries share its call. The CPU path (float64, rounded once) is
tested for that; on CUDA the Triton kernel is deterministic per (query row, page) and the
check script ``benchmarks/bench_fp8_topk.py --gpu`` compares fp8-exact-topk with the exact
path bit for bit. The GPU candidate pass's accumulation precision (``FP8_ACCUM_UNIT_ROUNDOFF``)
is an assumption, consistent with what that script measured on an H200 (see the constant).

Candidate pass on CUDA (``FP8_CANDIDATE_BACKEND``, or ``candidate=`` of :func:`fp8_topk`):
``"fused"`` (the default: :func:`pipeline.score.triton_kernel.page_maxima_fp8_triton`, the
exact kernel's tiling on the FP8 operands, only per-page maxima leave the chip) or
``"scaled_mm"`` (``torch._scaled_mm`` blocks, the similarity matrix written to device memory
block by block; 40x slower on an H200). Both
compute the same real number per (query row, page row), (v_q . v_p) * s_q * s_p, as a float32
dot of the raw FP8 values followed by two float32 multiplications by the scales, so the same
``candidate_u`` covers both: gamma_128(FP8_ACCUM_UNIT_ROUNDOFF) for the dot (Triton's FP8
``tl.dot`` on sm90 accumulates in the tensor cores' reduced-precision accumulator by default,
``max_num_imprecise_acc`` = 2^30: the case the 2^-13 assumption is for) and 2 x 2^-24 for the
two scalings. The CPU emulation (``"emulated"``) multiplies the dequantized float32 values.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from pipeline.score.corpus import EMBEDDING_DIM
from pipeline.score.packing import PackedPages, pack_flat, triton_available
from pipeline.score.maxsim import maxsim_scores, topk_desc

E4M3_MAX = 448.0
U32 = 2.0**-24
U64 = 2.0**-53
# Unit roundoff assumed for the accumulation of FP8 products on NVIDIA tensor cores.
# Hopper's FP8 MMA keeps about 14 bits in its accumulator (DeepSeek-V3 technical report,
# section 3.3.2): 2^-13 covers that. Measured on an H200 (bench_fp8_topk.py --gpu): the largest
# accumulation error relative to ||a|| ||b|| was 8.8e-4 (fused) and 1.0e-3 (scaled_mm), within
# gamma_128(2^-13) = 0.0159.
FP8_ACCUM_UNIT_ROUNDOFF = 2.0**-13
# float16 products accumulated in float32 by the exact Triton kernel: one float32 ulp per
# addition (covers truncation as well as rounding).
FP16_ACCUM_UNIT_ROUNDOFF = 2.0**-23
# Candidate pass on CUDA: "fused" (Triton, no similarity matrix in device memory) or
# "scaled_mm". On an H200, 20k pages x 1,000 queries (2026-12-04, bench_fp8_topk.py --gpu,
# benchmarks/RESULTS.md): fused 0.100 s, scaled_mm 3.98 s (its index_reduce_ per block), same
# scores bit for bit.
FP8_CANDIDATE_BACKEND = "fused"
CANDIDATE_BACKENDS = ("scaled_mm", "fused", "emulated")


def gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): relative error bound of an n-term sum/dot."""
    if n * u >= 1:
        raise ValueError(f"gamma_{n} undefined for u={u}")
    return n * u / (1 - n * u)


def fp8_supported(device: torch.device) -> bool:
    """CUDA with FP8 tensor cores (sm89 Ada, sm90 Hopper and later) and torch's float8 type."""
    return (device.type == "cuda" and hasattr(torch, "float8_e4m3fn") and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) >= (8, 9))


def default_candidate(device: torch.device) -> str:
    """The candidate pass on ``device``: ``FP8_CANDIDATE_BACKEND`` (the fused Triton kernel) on
    FP8 tensor cores with Triton, ``"scaled_mm"`` there without Triton (slower, but FP8 scoring
    still runs), else the float32 emulation."""
    if not fp8_supported(device):
        return "emulated"
    if FP8_CANDIDATE_BACKEND == "fused" and not triton_available():
        return "scaled_mm"
    return FP8_CANDIDATE_BACKEND


@dataclasses.dataclass(frozen=True, eq=False)
class Quantized:
    """Per-row FP8 vectors: ``values`` float8_e4m3fn ``(n, 128)``, ``scales`` float32 ``(n,)``,
    ``err`` and ``norm`` float64 ``(n,)`` (bounds on ||x - x~|| and max(||x||, ||x~||))."""

    values: torch.Tensor
    scales: torch.Tensor
    err: torch.Tensor
    norm: torch.Tensor

    def dequantized(self) -> torch.Tensor:
        """float32 ``scales * values`` (what the CPU emulation multiplies)."""
        return self.values.to(torch.float32) * self.scales[:, None]


QUANTIZE_BACKENDS = ("triton", "torch")


def quantize_backend(x: torch.Tensor) -> str:
    """``"triton"`` (the fused kernel of :func:`pipeline.score.triton_kernel.quantize_rows_triton`)
    for CUDA rows of a dtype and width it takes when Triton is importable, else ``"torch"``."""
    ok = (x.is_cuda and x.ndim == 2 and x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
          and x.shape[1] > 0 and not x.shape[1] & (x.shape[1] - 1) and hasattr(torch, "float8_e4m3fn"))
    return "triton" if ok and triton_available() else "torch"


def quantize_rows(x: torch.Tensor, block_rows: int = 1 << 16, groups: torch.Tensor | None = None,
                  backend: str | None = None) -> Quantized:
    """``(n, 128)`` float16/bfloat16/float32/float64 -> float8_e4m3fn with measured errors.

    One scale per row, ``max|x| / 448``; with ``groups`` (``(n,)`` int64, a group id per
    row, e.g. its page), every row of a group takes the largest scale of the group, so the
    fused candidate kernel can scale a page's maximum once instead of every dot product.
    The bound is unaffected: ``err`` and ``norm`` are measured per row whatever the scale.

    ``backend``: ``"torch"`` (blocks of ``block_rows`` rows, float64 temporaries; the CPU
    path and the reference) or ``"triton"`` (one pass of a fused kernel after a pass for
    the row maxima: the same FP8 values bit for bit, ``err``/``norm`` the same float64
    formulas summed in another order); default :func:`quantize_backend`. Under Triton's
    interpreter (``TRITON_INTERPRET=1``) ``"triton"`` runs on CPU tensors too. On an H200, a
    20,000-page shard (14.3M rows): 8.0 ms with the kernel, 173 ms with torch, same bits
    (pipeline/score/triton_kernel.py, "FP8 quantization")."""
    if x.ndim != 2:
        raise ValueError(f"expected (n, {EMBEDDING_DIM}), got {tuple(x.shape)}")
    backend = backend or quantize_backend(x)
    if backend not in QUANTIZE_BACKENDS:
        raise ValueError(f"backend must be one of {QUANTIZE_BACKENDS}, got {backend!r}")
    n = x.shape[0]
    if backend == "triton":
        from pipeline.score.triton_kernel import quantize_rows_triton, row_absmax_triton

        amax = row_absmax_triton(x)
    else:
        amax = torch.empty(n, dtype=torch.float32, device=x.device)
        for a in range(0, n, block_rows):
            amax[a : min(n, a + block_rows)] = x[a : a + block_rows].to(torch.float32).abs().amax(dim=1)
    if groups is not None and n:
        groups = groups.to(device=x.device, dtype=torch.int64)
        gmax = torch.zeros(int(groups.max()) + 1, dtype=torch.float32, device=x.device)
        amax = gmax.scatter_reduce_(0, groups, amax, "amax")[groups]
    scales = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    if backend == "triton":
        values, err, norm = quantize_rows_triton(x, scales)
        if not bool(torch.isfinite(err).all() & torch.isfinite(norm).all()):  # one check, one sync
            raise ValueError("NaN or Inf in the embeddings: FP8 scoring needs finite vectors")
    else:
        values = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
        err = torch.empty(n, dtype=torch.float64, device=x.device)
        norm = torch.empty(n, dtype=torch.float64, device=x.device)
        for a in range(0, n, block_rows):
            b = min(n, a + block_rows)
            xf = x[a:b].to(torch.float32)
            s = scales[a:b]
            v = (xf / s[:, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
            x64 = x[a:b].to(torch.float64)
            deq64 = v.to(torch.float64) * s.to(torch.float64)[:, None]  # exact: 4 x 24 bits
            deq32 = (v.to(torch.float32) * s[:, None]).to(torch.float64)
            e = torch.linalg.vector_norm(x64 - deq64, dim=1) + torch.linalg.vector_norm(deq64 - deq32, dim=1)
            nm = torch.maximum(torch.linalg.vector_norm(x64, dim=1), torch.linalg.vector_norm(deq64, dim=1))
            nm = torch.maximum(nm, torch.linalg.vector_norm(deq32, dim=1))
            if not (torch.isfinite(e).all() and torch.isfinite(nm).all()):
                raise ValueError("NaN or Inf in the embeddings: FP8 scoring needs finite vectors")
            values[a:b], err[a:b], norm[a:b] = v, e, nm
    # Norms are float64 sums of squares: relative error ~1e-15; widen by 1e-12.
    return Quantized(values, scales, err * (1 + 1e-12), norm * (1 + 1e-12))


def rounding_constant(lq: int, candidate_u: float, exact_device: str, dim: int = EMBEDDING_DIM) -> float:
    """``c`` of the bound: all floating-point error of both passes, per unit of Qn * Pn(p).

    Candidate pass: dot products (unit roundoff ``candidate_u``) then a float32 sum of
    ``lq`` maxima. Exact path on ``exact_device``: CPU float64 dots and sums rounded once to
    float32; CUDA float16 products accumulated in float32, float32 sum over query positions.
    """
    g_dot = gamma(dim, candidate_u)
    cand = g_dot + gamma(lq, U32) * (1 + g_dot)
    if exact_device == "cuda":
        g = gamma(dim, FP16_ACCUM_UNIT_ROUNDOFF)
        exact = g + gamma(lq, U32) * (1 + g)
    else:
        g = gamma(dim, U64)
        exact = U32 * 2 + g + gamma(lq, U64) * (1 + g)
    return 1.01 * (cand + exact)  # 1% slack for the products of (1 + ...) factors dropped above


@dataclasses.dataclass(eq=False)
class Fp8Pages:
    """A packed shard's FP8 copy (same row layout) and its per-page bound terms."""

    pages: PackedPages  # the exact operands, for re-scoring
    q: Quantized  # one row per packed row (padding rows are copies: same bounds); one scale per page
    page_norm: torch.Tensor  # (n_pages,) float64 Pn(p)
    page_err: torch.Tensor  # (n_pages,) float64 Pe(p)
    page_scale: torch.Tensor  # (n_pages,) float32: the scale of every row of the page
    quantize_s: float = 0.0
    _emulated: PackedPages | None = None

    @classmethod
    def from_packed(cls, pages: PackedPages, backend: str | None = None) -> "Fp8Pages":
        """Quantize a packed shard (one scale per page); ``backend``: of :func:`quantize_rows`."""
        t0 = time.perf_counter()
        row_page = torch.repeat_interleave(
            torch.arange(pages.n_pages, device=pages.device),
            (pages.offsets[1:] - pages.offsets[:-1]).to(pages.device))
        q = quantize_rows(pages.vectors, groups=row_page, backend=backend)
        page_scale = torch.ones(pages.n_pages, dtype=torch.float32, device=pages.device)
        page_scale[row_page] = q.scales  # every row of a page has the page's scale
        page_norm = torch.zeros(pages.n_pages, dtype=torch.float64, device=pages.device)
        page_err = torch.zeros(pages.n_pages, dtype=torch.float64, device=pages.device)
        page_norm.scatter_reduce_(0, row_page, q.norm, "amax")
        page_err.scatter_reduce_(0, row_page, q.err, "amax")
        return cls(pages, q, page_norm, page_err, page_scale, time.perf_counter() - t0)

    def emulated(self) -> PackedPages:
        """The dequantized float32 pages in the packed layout (CPU emulation of FP8 matmul)."""
        if self._emulated is None:
            p = self.pages
            self._emulated = PackedPages(self.q.dequantized(), p.offsets, p.lengths, p.padded_length, p.pad_multiple)
        return self._emulated


def candidate_scores(Q: torch.Tensor, qq: Quantized, shard: Fp8Pages,
                     candidate: str | None = None) -> tuple[torch.Tensor, float]:
    """Approximate scores ``(n_queries, n_pages)`` float32 from the FP8 operands, and the unit
    roundoff of their dot products. ``qq``: the quantized rows of ``Q.reshape(-1, 128)``.
    ``candidate``: ``"scaled_mm"``, ``"fused"`` or ``"emulated"``; default
    ``FP8_CANDIDATE_BACKEND`` where FP8 tensor cores exist, else the emulation."""
    nq, lq, dim = Q.shape
    if candidate is None:
        candidate = default_candidate(shard.pages.device)
    if candidate not in CANDIDATE_BACKENDS:
        raise ValueError(f"candidate must be one of {CANDIDATE_BACKENDS}, got {candidate!r}")
    if candidate == "scaled_mm":
        return _candidate_scores_scaled_mm(qq, shard, nq, lq), FP8_ACCUM_UNIT_ROUNDOFF + 2 * U32
    if candidate == "fused":
        return _candidate_scores_fused(qq, shard, nq, lq), FP8_ACCUM_UNIT_ROUNDOFF + 2 * U32
    # Emulation: float32 matmul of the dequantized values (exactly representable in float32).
    if torch.get_float32_matmul_precision() != "highest":
        raise RuntimeError("fp8 emulation needs torch.get_float32_matmul_precision() == 'highest'")
    Qe = qq.dequantized().view(nq, lq, dim)
    return maxsim_scores(Qe, shard.emulated()), U32


def _candidate_scores_fused(qq: Quantized, shard: Fp8Pages, nq: int, lq: int) -> torch.Tensor:
    """The fused Triton kernel on the FP8 operands (CUDA sm89+, or Triton's interpreter on
    CPU): per-page maxima of the scaled dots, then the in-order float32 sum over query rows.
    Nothing of size (query rows x page rows) is written."""
    from pipeline.score.maxsim import sum_over_query_vectors
    from pipeline.score.triton_kernel import page_maxima_fp8_triton

    pages = shard.pages
    maxima = page_maxima_fp8_triton(qq.values, qq.scales, pages, shard.q.values, shard.page_scale)
    return sum_over_query_vectors(maxima.view(pages.n_pages, nq, lq)).T.contiguous()


def _candidate_scores_scaled_mm(qq: Quantized, shard: Fp8Pages, nq: int, lq: int,
                                block_elements: int = 1 << 28) -> torch.Tensor:
    """CUDA sm89+: ``torch._scaled_mm`` on the FP8 values (unit scales, float32 out), then
    the per-row scales, the max over each page's rows and the float32 sum over query rows.
    Materializes one (query rows x page rows) float32 block at a time: a fused FP8 kernel
    would avoid that traffic (see benchmarks/bench_fp8_topk.py)."""
    from pipeline.score.maxsim import sum_over_query_vectors

    pages, dev = shard.pages, shard.pages.device
    m = nq * lq
    m_pad = -(-m // 16) * 16
    a = torch.zeros((m_pad, EMBEDDING_DIM), dtype=torch.float8_e4m3fn, device=dev)
    a[:m] = qq.values
    sa = torch.zeros(m_pad, dtype=torch.float32, device=dev)
    sa[:m] = qq.scales
    one = torch.ones((), dtype=torch.float32, device=dev)
    mult = pages.pad_multiple  # every page is a whole number of these chunks
    n_rows = pages.vectors.shape[0]
    chunk_page = torch.repeat_interleave(torch.arange(pages.n_pages, device=dev),
                                         ((pages.offsets[1:] - pages.offsets[:-1]) // mult).to(dev))
    maxima = torch.full((pages.n_pages, m_pad), float("-inf"), dtype=torch.float32, device=dev)
    step = max(mult * 16, (block_elements // m_pad) // (mult * 16) * (mult * 16))
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        b = shard.q.values[r0:r1]
        pad = (-(r1 - r0)) % 16
        if pad:
            b = torch.cat([b, torch.zeros((pad, EMBEDDING_DIM), dtype=b.dtype, device=dev)])
        raw = torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)[:, : r1 - r0]
        sims = raw.mul_(sa[:, None]).mul_(shard.q.scales[None, r0:r1])  # (m_pad, rows)
        cmax = sims.reshape(m_pad, (r1 - r0) // mult, mult).amax(dim=2).T  # (chunks, m_pad)
        maxima.index_reduce_(0, chunk_page[r0 // mult : r1 // mult], cmax, "amax")
    maxima = maxima[:, :m].reshape(pages.n_pages, nq, lq)
    return sum_over_query_vectors(maxima).T.contiguous()


def score_bounds(qq: Quantized, nq: int, lq: int, shard: Fp8Pages, candidate_u: float,
                 exact_device: str | None = None) -> torch.Tensor:
    """B(q, p) ``(n_queries, n_pages)`` float64: |exact path score - candidate score| <= B.
    ``exact_device``: where the exact path runs (default: the shard's device)."""
    eq = qq.err.view(nq, lq).sum(dim=1)  # float64 sums of nonnegative terms: rel. error < lq * 2^-53
    qn = qq.norm.view(nq, lq).sum(dim=1)
    c = rounding_constant(lq, candidate_u, exact_device or shard.pages.device.type)
    pn, pe = shard.page_norm, shard.page_err
    b = eq[:, None] * pn[None, :] + qn[:, None] * pe[None, :] + c * qn[:, None] * pn[None, :]
    return b * (1 + 1e-12)  # the float64 evaluation above: a few roundings of 2^-53 each


def select_candidates(approx: torch.Tensor, bound: torch.Tensor, k: int) -> torch.Tensor:
    """``(n_queries, n_pages)`` bool: pages whose upper bound reaches the k-th largest lower
    bound (the set C of the module docstring; always holds the exact top-k)."""
    nq, n_pages = approx.shape
    kk = min(k, n_pages)
    if kk <= 0:
        return torch.zeros((nq, n_pages), dtype=torch.bool, device=approx.device)
    s = approx.to(torch.float64)
    lower = torch.nextafter(s - bound, torch.tensor(-math.inf, dtype=torch.float64, device=s.device))
    upper = torch.nextafter(s + bound, torch.tensor(math.inf, dtype=torch.float64, device=s.device))
    threshold = torch.topk(lower, kk, dim=1).values[:, -1:]
    return upper >= threshold


def subset_pages(pages: PackedPages, index: torch.Tensor) -> PackedPages:
    """The pages ``index`` (ascending) of a packed shard, packed alone in the same layout/dtype."""
    index = index.to(torch.int64).cpu()
    lengths = pages.lengths[index]
    starts = pages.offsets[index]
    rows = torch.repeat_interleave(starts - torch.cumsum(lengths, 0) + lengths, lengths) + torch.arange(int(lengths.sum()))
    flat = pages.vectors[rows.to(pages.device)]
    return pack_flat(flat, lengths, device=pages.device, dtype=pages.vectors.dtype,
                     pad_multiple=None if pages.padded_length is not None else pages.pad_multiple)


ExactFn = Callable[[torch.Tensor, PackedPages], torch.Tensor]
SubsetFn = Callable[[torch.Tensor, PackedPages, torch.Tensor], torch.Tensor]


# Queries re-scored together against the union of their candidates. 8 made the re-scoring
# launch-bound on an H200 (2026-12-03, 20k pages x 1,000 queries, topic data, 20 candidates
# per query: 125 groups, 0.39 s, against 0.123 s for the FP8 pass over every page, each group
# copying its pages with index tables built on the CPU); 64 makes 16 groups whose unions (at
# most 64 x the candidates) cost a few percent of a full pass, and ``exact_subset`` scores
# them in place. At 64 on an H200 (2026-12-04, same shape): re-scoring 0.019 s in place,
# 0.089 s from copies (benchmarks/RESULTS.md, sixth session).
RESCORE_GROUP = 64


def fp8_topk(Q: torch.Tensor, shard: Fp8Pages, k: int, exact: ExactFn, *, group: int = RESCORE_GROUP,
             full_fraction: float = 0.5, candidate: str | None = None,
             exact_subset: SubsetFn | None = None,
             quant_backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Exact top-k of ``Q`` (``(nq, Lq, 128)``, zero-padded) against ``shard``, FP8 first.

    ``exact(Q_part, pages_part)`` is the exact path (:func:`pipeline.score.scorer.score_batch`).
    Queries are re-scored ``group`` at a time against the union of their candidates, or
    against the whole shard when that union exceeds ``full_fraction`` of it. ``candidate``:
    the candidate pass (:func:`candidate_scores`). ``exact_subset(Q_part, pages, index)``:
    the exact path's scores of the pages ``index`` (ascending), ``(n, len(index))``, computed
    in place (the Triton kernel's ``page_index``); without it the pages are copied
    (:func:`subset_pages`) and passed to ``exact``. ``quant_backend``: the queries'
    :func:`quantize_rows` backend (default :func:`quantize_backend`).

    Returns ``(values, indices, stats)`` as :func:`topk_desc` would on the exact scores;
    stats: ``candidates`` (per query, ``|C|``), ``rescored_pairs``, ``candidate_s``, ``rescore_s``.
    """
    nq, lq, dim = Q.shape
    pages = shard.pages
    t0 = time.perf_counter()
    qq = quantize_rows(Q.reshape(nq * lq, dim), backend=quant_backend)
    approx, u = candidate_scores(Q, qq, shard, candidate)
    bound = score_bounds(qq, nq, lq, shard, u)
    cand = select_candidates(approx, bound, k)
    if pages.device.type == "cuda":
        torch.cuda.synchronize(pages.device)
    t1 = time.perf_counter()
    kk = min(k, pages.n_pages)
    values = torch.empty((nq, kk), dtype=torch.float32, device=pages.device)
    indices = torch.empty((nq, kk), dtype=torch.int64, device=pages.device)
    pairs = 0
    for a in range(0, nq, group):
        b = min(nq, a + group)
        union = torch.nonzero(cand[a:b].any(dim=0)).flatten()
        if union.numel() > full_fraction * pages.n_pages:
            v, i = topk_desc(exact(Q[a:b], pages), kk)
            pairs += (b - a) * pages.n_pages
        else:
            sub = exact_subset(Q[a:b], pages, union) if exact_subset else exact(Q[a:b], subset_pages(pages, union))
            v, j = topk_desc(sub, kk)
            i = union.to(j.device)[j]  # union is ascending: column order is page order
            pairs += (b - a) * int(union.numel())
        values[a:b], indices[a:b] = v, i
    if pages.device.type == "cuda":
        torch.cuda.synchronize(pages.device)
    stats = {"candidates": cand.sum(dim=1).cpu().numpy().astype(np.int64), "rescored_pairs": pairs,
             "candidate_s": t1 - t0, "rescore_s": time.perf_counter() - t1}
    return values, indices, stats
