"""Fused MaxSim kernel (Triton): the similarity matrix never leaves the chip.

The plain torch page-major path writes every query-vector x page-vector similarity to
device memory and reads it back for ``amax``: 2 bytes x 25k x 13.7M = 684 GB for 1,000
queries against 20,000 pages, which is what holds it at ~20% of the chip. Here each
program keeps a tile of ``BLOCK_M`` query vectors in registers, streams the pages of its
group in chunks of ``BLOCK_N`` vectors, and keeps only the running max per query vector;
at a page's last chunk it writes one float32 per query vector. Output: ``(n_pages,
n_query_rows)`` float32 maxima (2 GB in that example), summed over each query's vectors
afterwards in a fixed order (:func:`pipeline.score.maxsim.sum_over_query_vectors`).

Layout (from :func:`pipeline.score.pack_pages` with ``pad_multiple=BLOCK_N``): pages one
after another, each padded with copies of its own first vector to a multiple of
``BLOCK_N`` rows, so a chunk never straddles two pages and no mask is needed.
``chunk_page[c]`` names the page of chunk ``c``; groups of whole pages are the second grid
axis. The first grid axis runs over query tiles and varies fastest, so all query tiles
of one page group run together and the group is read from device memory once, then
served from L2.

Small query sets (a few query tiles) leave most of the chip idle with 16-page groups, so
the config (:class:`KernelConfig`, chosen by :func:`choose_config` from ``CONFIG_TABLE`` by
the number of query rows) also sets ``pages_per_group``: at 1 each program owns one page
and stores its maxima once, after the loop; with ``split`` > 1 the chunks of a page are
cut into ``split`` consecutive runs, each program writes the max of its run to its own
slice of a ``(split, n_pages, n_rows)`` buffer, and ``amax`` over the slices (exact, as
every max) gives the same float32 maxima. The grid is one axis (query tile fastest, then
split, then page group), so no grid dimension limits the number of pages.

Operands float16 (the stored values exactly) or bfloat16; products accumulate in float32.
For float32 operands (tests in Triton's interpreter) the dot is IEEE float32, not TF32.
With ``SCALED`` the operands are float8_e4m3fn values with one float32 scale per query row
and one per page (the FP8 candidate pass of :mod:`pipeline.score.fp8`): the max over the
page's rows of the float32 dots of the raw FP8 values is multiplied by the query row's scale,
then by the page's (two float32 roundings). Scales are positive and rounding is monotone, so
this equals the max of the scaled dots, as fp8.py's ``torch._scaled_mm`` path computes them,
without two multiplications per element in the loop.

Subsets (``page_index`` of :func:`page_maxima_triton`): with one page per program, the
program's chunk range comes from two tables, starts and ends, so the kernel can run over any
list of pages of a packed shard in place (the exact re-scoring of fp8.py's candidates)
without copying them: the same tile, the same float32 maxima.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pipeline.score.packing import PackedPages
from pipeline.score.maxsim import sum_over_query_vectors

PAGES_PER_GROUP = 16


class KernelConfig(NamedTuple):
    """Tile shape of the kernel: ``block_m`` query vectors x ``block_n`` page vectors per dot,
    Triton's ``num_warps``/``num_stages``, pages per program group, and programs per page
    (``split`` > 1 needs ``pages_per_group`` == 1). A plain 4-tuple means 16-page groups."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    pages_per_group: int = PAGES_PER_GROUP
    split: int = 1


DEFAULT_CONFIG = KernelConfig(256, 64, 8, 3)  # best of 8 on an H200 at 25,000 rows (benchmarks/RESULTS.md)
SMALL_BATCH_CONFIG = KernelConfig(64, 64, 4, 4)

# The config by number of query rows (queries x vectors per query, zero rows included): the
# first row whose bound is >= n_rows; None = no bound. ONE PLACE TO EDIT after a GPU sweep:
# benchmarks/bench_small_queries.py prints a replacement table from its measurements.
# Measured on an H200 (2026-12-03, commit b2227cb, bench_small_queries.py --budget-s 70;
# 20,000 pages of 600-768 vectors, queries of 25 vectors, kernel alone, benchmarks/RESULTS.md):
# 1 query 0.835 ms (4.37 TB/s; the 16-page default 0.882), 10 queries 1.587 ms (70% of
# 792 TFLOP/s; default 1.629), 100 and 1,000 queries: the 16-page default was best.
# Bounds between the measured sizes are a choice.
SINGLE_QUERY_CONFIG = KernelConfig(32, 64, 4, 5, pages_per_group=1)
FEW_QUERIES_CONFIG = KernelConfig(256, 64, 8, 3, pages_per_group=1)
CONFIG_TABLE: tuple[tuple[int | None, KernelConfig], ...] = (
    (32, SINGLE_QUERY_CONFIG),
    (64, KernelConfig(64, 64, 4, 4, pages_per_group=1)),  # 2 queries: not measured, between the two
    (250, FEW_QUERIES_CONFIG),
    (None, DEFAULT_CONFIG),
)
# The same for the FP8 candidate pass (float8 operands). On an H200 at 25,000 query rows x 20k
# pages (2026-12-04, bench_fp8_topk.py --fp8-configs): 256/64/8/3 0.0924 s (947 TFLOP/s),
# 128/64/4/4 0.0926, 256/64/8/4 0.0927, 256/64/8/3 in 32-page groups 0.0921, 256/64/4/3 0.0943,
# 128/64/8/3 0.0975: the default tile is kept. Small FP8 query sets: not measured.
FP8_CONFIG_TABLE: tuple[tuple[int | None, KernelConfig], ...] = (
    (64, SMALL_BATCH_CONFIG),
    (None, DEFAULT_CONFIG),
)


def choose_config(n_rows: int, table=CONFIG_TABLE) -> KernelConfig:
    """The config of ``table`` for ``n_rows`` query rows (see ``CONFIG_TABLE``)."""
    for bound, cfg in table:
        if bound is None or n_rows <= bound:
            return cfg
    return table[-1][1]


def as_config(config) -> KernelConfig:
    """A :class:`KernelConfig` from one, or from a 4- to 6-tuple; checks the combination."""
    cfg = config if isinstance(config, KernelConfig) else KernelConfig(*config)
    if cfg.split < 1 or cfg.pages_per_group < 1:
        raise ValueError(f"split and pages_per_group must be >= 1: {cfg}")
    if cfg.split > 1 and cfg.pages_per_group != 1:
        raise ValueError(f"split > 1 needs pages_per_group == 1 (a run must not cut a page group): {cfg}")
    return cfg


@triton.jit
def _maxsim_pagemax_kernel(
    q_ptr,  # (n_rows, DIM) query vectors, zero rows for padding
    d_ptr,  # (n_chunks * BLOCK_N, DIM) page vectors
    chunk_page_ptr,  # (n_chunks + 1,) int32 page of each chunk, -1 sentinel at the end
    group_chunk_ptr,  # (n_groups,) int64 first chunk of each page group
    group_end_ptr,  # (n_groups,) int64 one past its last chunk (group_chunk[1:], or a subset's ends)
    out_ptr,  # (SPLIT, n_groups or n_pages, n_rows) float32: max over the page's vectors, per query row
    q_scale_ptr,  # SCALED: (n_rows,) float32 scale per query row (else unused)
    d_scale_ptr,  # SCALED: float32 scale per page (n_pages,), or per group when ONE_PAGE (else unused)
    n_rows,
    n_m_tiles,
    stride_q,
    stride_d,
    stride_out,
    stride_split,
    DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    ONE_PAGE: tl.constexpr,  # pages_per_group == 1: group g is page g, one store at the end
    SPLIT: tl.constexpr,
    SCALED: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % n_m_tiles  # query tiles vary fastest: a page group is read once, then from L2
    rest = pid // n_m_tiles
    pid_s = rest % SPLIT
    pid_g = rest // SPLIT
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    dims = tl.arange(0, DIM)
    cols = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + rows[:, None].to(tl.int64) * stride_q + dims[None, :], mask=row_ok[:, None], other=0.0)
    if SCALED:
        q_scale = tl.load(q_scale_ptr + rows, mask=row_ok, other=0.0)
    c_start = tl.load(group_chunk_ptr + pid_g)
    c_end = tl.load(group_end_ptr + pid_g)
    if SPLIT > 1:  # this program's run of the page's chunks (possibly empty)
        per = (c_end - c_start + SPLIT - 1) // SPLIT
        c_start = c_start + pid_s * per
        c_end = tl.minimum(c_end, c_start + per)
    out_base = out_ptr + pid_s.to(tl.int64) * stride_split
    acc = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for c in range(c_start, c_end):
        base = c * BLOCK_N  # int64: the group table is int64, rows exceed 2**31 / 128
        d = tl.load(d_ptr + (base + cols)[:, None] * stride_d + dims[None, :])
        if IEEE:
            s = tl.dot(q, tl.trans(d), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(d))
        acc = tl.maximum(acc, tl.max(s, axis=1))
        if not ONE_PAGE:
            page = tl.load(chunk_page_ptr + c)
            last = page != tl.load(chunk_page_ptr + c + 1)
            val = acc
            if SCALED:  # the scales are positive: scaling the max = the max of the scaled
                val = (val * q_scale) * tl.load(d_scale_ptr + page)
            # "!= 0": Triton 3.9's interpreter types a vector & scalar of booleans as int32,
            # which its masked store refuses; compiled, this is the same i1 mask.
            tl.store(out_base + page.to(tl.int64) * stride_out + rows, val, mask=(row_ok & last) != 0)
            acc = tl.where(last, float("-inf"), acc)
    if ONE_PAGE:
        if SCALED:
            acc = (acc * q_scale) * tl.load(d_scale_ptr + pid_g)
        tl.store(out_base + pid_g.to(tl.int64) * stride_out + rows, acc, mask=row_ok)


class TritonShard:
    """Chunk and group tables of a packed shard, built once per shard."""

    def __init__(self, pages: PackedPages, block_n: int, pages_per_group: int = PAGES_PER_GROUP):
        if pages.padded_length is not None and pages.padded_length % block_n:
            raise ValueError(f"pages padded to {pages.padded_length}, not a multiple of BLOCK_N={block_n}")
        if pages.pad_multiple % block_n:
            raise ValueError(f"pack pages with pad_multiple a multiple of {block_n}, got {pages.pad_multiple}")
        device = pages.vectors.device
        chunks_per_page = (pages.offsets[1:] - pages.offsets[:-1]) // block_n
        chunk_page = torch.repeat_interleave(torch.arange(pages.n_pages, dtype=torch.int32), chunks_per_page)
        self.chunk_page = torch.cat([chunk_page, torch.tensor([-1], dtype=torch.int32)]).to(device)
        first_chunk = torch.zeros(pages.n_pages + 1, dtype=torch.int64)
        torch.cumsum(chunks_per_page, 0, out=first_chunk[1:])
        bounds = first_chunk[::pages_per_group]
        if bounds[-1] != first_chunk[-1]:
            bounds = torch.cat([bounds, first_chunk[-1:]])
        self.group_chunk = bounds.to(torch.int64).contiguous().to(device)  # [::ppg] is a strided view
        self.n_groups = len(bounds) - 1
        self.block_n = block_n
        self.pages_per_group = pages_per_group


# Tables per packed shard and (BLOCK_N, pages per group), dropped with the shard.
_TABLES: "weakref.WeakKeyDictionary[PackedPages, dict[tuple[int, int], TritonShard]]" = weakref.WeakKeyDictionary()


def shard_tables(pages: PackedPages, block_n: int, pages_per_group: int) -> TritonShard:
    """The :class:`TritonShard` of ``pages`` for this chunk size and grouping (cached)."""
    tables = _TABLES.setdefault(pages, {})
    key = (block_n, pages_per_group)
    if key not in tables:
        tables[key] = TritonShard(pages, block_n, pages_per_group)
    return tables[key]


def _launch(Qflat, q_scales, pages: PackedPages, d_values, d_scales, cfg: KernelConfig,
            page_index: torch.Tensor | None = None) -> torch.Tensor:
    """Run the kernel over every page of ``pages`` (tables from its layout, operands
    ``d_values``), or over the pages ``page_index`` only (one page per program); returns
    ``(n_pages or len(page_index), n_rows)`` float32 maxima."""
    n_rows = Qflat.shape[0]
    if page_index is not None:
        if cfg.pages_per_group != 1:
            cfg = cfg._replace(pages_per_group=1)  # same tile: the same maxima (one page per program)
        first = shard_tables(pages, cfg.block_n, 1).group_chunk  # (n_pages + 1,) first chunk per page
        index = page_index.to(device=first.device, dtype=torch.int64)
        starts, ends = first[index].contiguous(), first[index + 1].contiguous()
        chunk_page, n_groups = starts, int(index.numel())  # chunk_page: unused with one page per program
        if d_scales is not None:
            d_scales = d_scales[index.to(d_scales.device)].contiguous()
    else:
        shard = shard_tables(pages, cfg.block_n, cfg.pages_per_group)
        starts, ends, chunk_page, n_groups = shard.group_chunk[:-1], shard.group_chunk[1:], shard.chunk_page, shard.n_groups
    n_m_tiles = triton.cdiv(n_rows, cfg.block_m)
    out = torch.empty((cfg.split, n_groups if page_index is not None else pages.n_pages, n_rows),
                      dtype=torch.float32, device=Qflat.device)
    if cfg.split > 1:  # a run can be empty (pages shorter than split chunks): -inf there
        out.fill_(float("-inf"))
    if out.numel() == 0:
        return out[0]
    scaled = q_scales is not None
    grid = (n_m_tiles * cfg.split * n_groups,)
    _maxsim_pagemax_kernel[grid](
        Qflat,
        d_values,
        chunk_page,
        starts,
        ends,
        out,
        q_scales if scaled else Qflat,
        d_scales if scaled else Qflat,
        n_rows,
        n_m_tiles,
        Qflat.stride(0),
        d_values.stride(0),
        out.stride(1),
        out.stride(0),
        DIM=Qflat.shape[1],
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        IEEE=d_values.dtype == torch.float32,
        ONE_PAGE=cfg.pages_per_group == 1,
        SPLIT=cfg.split,
        SCALED=scaled,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out[0] if cfg.split == 1 else out.amax(dim=0)


def page_maxima_triton(
    Qflat: torch.Tensor,
    pages: PackedPages,
    *,
    config: KernelConfig | tuple | None = None,
    shard: TritonShard | None = None,
    page_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(n_rows, 128)`` query vectors -> ``(n_pages, n_rows)`` float32 per-page maxima.

    ``config``: a :class:`KernelConfig` (or tuple); default :func:`choose_config` of n_rows.
    ``shard``: tables built beforehand (used when they match the config's chunking).
    ``page_index``: only these pages (int64, any order), in place: ``(len(page_index),
    n_rows)``, each row equal to the full call's row of that page (the config's tile with
    one page per program)."""
    cfg = as_config(config or choose_config(Qflat.shape[0]))
    if shard is not None and (shard.block_n, shard.pages_per_group) == (cfg.block_n, cfg.pages_per_group):
        _TABLES.setdefault(pages, {})[(cfg.block_n, cfg.pages_per_group)] = shard
    Qflat = Qflat.to(pages.vectors.dtype).contiguous()
    return _launch(Qflat, None, pages, pages.vectors, None, cfg, page_index)


def page_maxima_fp8_triton(
    q_values: torch.Tensor,
    q_scales: torch.Tensor,
    pages: PackedPages,
    d_values: torch.Tensor,
    page_scales: torch.Tensor,
    *,
    config: KernelConfig | tuple | None = None,
) -> torch.Tensor:
    """FP8 candidate maxima: ``(n_rows, 128)`` float8_e4m3fn query rows with float32 scales
    against ``d_values`` (float8 rows in the layout of ``pages``) with one float32 scale per
    page, ``page_scales`` ``(n_pages,)``; returns ``(n_pages, n_rows)`` float32
    ``(max_j dot(q, d_j) * q_scale) * page_scale`` (= the max of the scaled dots: the scales
    are positive)."""
    cfg = as_config(config or choose_config(q_values.shape[0], FP8_CONFIG_TABLE))
    if d_values.shape != pages.vectors.shape:
        raise ValueError(f"FP8 rows {tuple(d_values.shape)} do not match the packed layout {tuple(pages.vectors.shape)}")
    if page_scales.shape != (pages.n_pages,):
        raise ValueError(f"expected one scale per page ({pages.n_pages},), got {tuple(page_scales.shape)}")
    return _launch(q_values.contiguous(), q_scales.to(torch.float32).contiguous(), pages, d_values.contiguous(),
                   page_scales.to(torch.float32).contiguous(), cfg)


@triton.jit
def _sum_in_order_kernel(m_ptr, out_ptr, n_pages, n_queries, stride_m, LQ: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    """out[q, p] = ((m[p, q*LQ] + m[p, q*LQ+1]) + ...) + m[p, q*LQ+LQ-1], in float32, left to
    right: the same additions in the same order as :func:`sum_over_query_vectors`."""
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ok = (p[:, None] < n_pages) & (q[None, :] < n_queries)
    base = m_ptr + p[:, None].to(tl.int64) * stride_m + q[None, :] * LQ
    acc = tl.load(base, mask=ok, other=0.0)
    for j in range(1, LQ):
        acc = acc + tl.load(base + j, mask=ok, other=0.0)
    tl.store(out_ptr + q[None, :].to(tl.int64) * n_pages + p[:, None], acc, mask=ok)


def sum_over_query_vectors_triton(maxima: torch.Tensor, n_queries: int, lq: int) -> torch.Tensor:
    """``(n_pages, n_queries * lq)`` float32 maxima -> ``(n_queries, n_pages)`` float32 scores,
    bit-identical to ``sum_over_query_vectors(maxima.view(P, nq, lq)).T``, in one launch (the
    torch loop is lq - 1 launches over strided columns, then a transpose copy)."""
    n_pages = maxima.shape[0]
    out = torch.empty((n_queries, n_pages), dtype=torch.float32, device=maxima.device)
    if n_pages == 0 or n_queries == 0:
        return out
    grid = (triton.cdiv(n_pages, 64), triton.cdiv(n_queries, 16))
    _sum_in_order_kernel[grid](maxima, out, n_pages, n_queries, maxima.stride(0), LQ=lq, BLOCK_P=64, BLOCK_Q=16)
    return out


def maxsim_scores_triton(
    Q: torch.Tensor, pages: PackedPages, *, config: KernelConfig | tuple | None = None, fused_sum: bool = False,
    page_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(n_queries, Lq, 128)`` zero-padded queries -> ``(n_queries, n_pages)`` float32 MaxSim.

    ``fused_sum``: add the query positions with :func:`sum_over_query_vectors_triton` (same
    bits, one launch). Off by default until measured on a GPU (benchmarks/bench_small_queries.py
    times both). ``page_index``: score these pages only, in place (``(n_queries,
    len(page_index))``; see :func:`page_maxima_triton`)."""
    nq, lq, dim = Q.shape
    maxima = page_maxima_triton(Q.reshape(nq * lq, dim), pages, config=config, page_index=page_index)
    n_cols = maxima.shape[0]  # (P or len(page_index), nq*lq)
    if fused_sum:
        return sum_over_query_vectors_triton(maxima, nq, lq)
    scores = sum_over_query_vectors(maxima.view(n_cols, nq, lq))  # (P, nq)
    return scores.T.contiguous()


# ----------------------------------------------------------------------------- FP8 quantization
#
# The CUDA path of :func:`pipeline.score.fp8.quantize_rows`: a first pass writes each row's
# max |x| (float32), torch takes the group maxima and the scales, and the second pass reads
# each row once and writes its float8_e4m3fn values and its float64 error and norm, with
# nothing of the shard's size in float32/float64 ever written to device memory.
#
# Rounding to e4m3 is done with integer arithmetic on the float32 bits, compiled and
# interpreted alike, rather than with ``.to(tl.float8e4nv)``: Triton's interpreter (3.9,
# ``runtime/interpreter.py``, ``create_fp_to_fp`` -> ``_convert_float``) converts float32 to
# an 8-bit float by cutting the significand and adding the first dropped bit (ties away
# from zero, no sticky bits), ORs a carry out of the significand into the exponent instead
# of adding it, clamps the exponent field without saturating to 448 (so 0x7F, e4m3fn's NaN,
# can come out) and mishandles e4m3fn's subnormals: not what torch's ``.to(float8_e4m3fn)``
# (round to nearest even) gives. Emitting float16 and converting afterwards would round
# twice (float32 -> float16 -> e4m3 is not always the nearest e4m3 of the float32). The
# integer code below is exact round-to-nearest-even, is the code the tests run, and does not
# depend on which cvt instruction a Triton version emits.
#
# Measured on an H200 (2026-12-04, Triton 3.6, torch 2.11; a 20,000-page topics shard of
# bench_fp8_topk, 14,255,040 float16 rows in the CUDA layout, 3.65 GB): the kernel's bits equal
# torch's on every row, and on every float32 of magnitude < 512 at scale 1 (2.3e9 values:
# denormals, every tie, saturation). Compiled, ``.to(tl.float8e4nv)`` emits
# ``cvt.rn.satfinite.e4m3x2.f32`` and agreed with torch on every float32 in [-448, 448] too;
# float32 ``/`` emits ``div.full.f32``, which differed from torch's quotient on 33% of a shard
# sample, hence ``tl.math.div_rn`` (``div.rn.f32``). ``tl.sqrt`` on float64 is ``sqrt.rn.f64``.
# Times: row maxima 0.90 ms (4.1 TB/s), this pass 5.4 ms (72 registers, no spills; 5.7 GB
# moved, ~1.1 TB/s: bound by its instructions, not by memory (a copy of the shard takes
# 1.7 ms); per element a correctly rounded division, the integer rounding, 5 conversions,
# about 7 float64 FMAs), quantize_rows 8.0 ms
# (torch path 173 ms), Fp8Pages.from_packed 10.2 ms (torch path 162 ms). Rows per program x
# warps, ms: 8x2 5.39, 16x4 5.36, 32x8 5.54, 16x2 6.00, 32x4 6.16, 8x4 6.27, 16x8 6.53,
# 64x16 7.68, 64x8 9.14.

E4M3_MAX = 448.0
QUANT_BLOCK_ROWS = 16  # rows per program of the quantization pass (H200: see the times above)
QUANT_NUM_WARPS = 4


@triton.jit
def _row_absmax_kernel(x_ptr, out_ptr, n_rows, stride_x, DIM: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[r] = max_k |float32(x[r, k])| (float32)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < n_rows
    dims = tl.arange(0, DIM)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + dims[None, :], mask=ok[:, None], other=0.0)
    tl.store(out_ptr + rows, tl.max(tl.abs(x.to(tl.float32)), axis=1), mask=ok)


@triton.jit
def _e4m3_round(y):
    """float32 ``y`` with |y| <= 448 -> (e4m3fn bits as int32 0..255, the e4m3 value as
    float32), rounded to nearest, ties to even, as torch's ``.to(torch.float8_e4m3fn)``."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF  # |y| as bits: the order of the bits is the order of the values
    # Normal e4m3 (|y| >= 2^-6): keep 3 of float32's 23 significand bits, round the other 20
    # to nearest even; a carry runs into the exponent field, as it should. Rebias 127 -> 7.
    r = a + (0x7FFFF + ((a >> 20) & 1))
    code_n = (r >> 20) - (120 << 3)
    mag_n = (r & -1048576).to(tl.float32, bitcast=True)  # -1048576 = 0xFFF00000: r's value, cut
    # Subnormal e4m3 (|y| < 2^-6): the code is round(|y| * 2^9), 0..8 (8 is 2^-6, the least
    # normal, whose bits are 8 too). |y| * 2^9 = m * 2^(e - 141), m the 24-bit significand.
    e = a >> 23
    m = (a & 0x7FFFFF) | 0x800000
    sh = tl.minimum(tl.maximum(141 - e, 1), 31)  # >= 21 where used; clamped: shifts >= 32 are undefined
    q = m >> sh
    rem = m - (q << sh)
    half = 1 << (sh - 1)
    up = (rem > half) | ((rem == half) & ((q & 1) == 1))
    code_s = q + up.to(tl.int32)
    mag_s = code_s.to(tl.float32) * 0.001953125  # 2^-9: exact
    normal = a >= 0x3C800000  # 2^-6
    code = tl.where(normal, code_n, code_s) | sign
    mag = tl.where(normal, mag_n, mag_s)
    return code, tl.where(sign != 0, -mag, mag)


@triton.jit
def _quantize_rows_kernel(
    x_ptr,  # (n_rows, DIM) float16/bfloat16/float32/float64, unit stride along a row
    scale_ptr,  # (n_rows,) float32 scale per row
    v_ptr,  # (n_rows, DIM) uint8 out: the float8_e4m3fn bits
    err_ptr,  # (n_rows,) float64 out
    norm_ptr,  # (n_rows,) float64 out
    n_rows,
    stride_x,
    DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    X_F64: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < n_rows
    dims = tl.arange(0, DIM)
    rows64 = rows.to(tl.int64)
    xin = tl.load(x_ptr + rows64[:, None] * stride_x + dims[None, :], mask=ok[:, None], other=0.0)
    s = tl.load(scale_ptr + rows, mask=ok, other=1.0)[:, None]
    xf = xin.to(tl.float32)
    # torch: (x_f32 / s).clamp_(-448, 448).to(float8_e4m3fn). Division correctly rounded
    # (Triton's "/" on float32 is not on NVIDIA: div.full.f32).
    y = tl.math.div_rn(xf, s)
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    code, v32 = _e4m3_round(y)
    tl.store(v_ptr + rows64[:, None] * DIM + dims[None, :], code.to(tl.uint8), mask=ok[:, None])
    # The measured terms in float64, as torch computes them: deq64 = v * s exactly (4 x 24
    # significand bits), deq32 = the float32 product as the FP8 candidate pass forms it.
    if X_F64:
        x64 = xin.to(tl.float64)
    else:
        x64 = xf.to(tl.float64)  # exact; bfloat16 goes through float32 (the interpreter's cast needs it)
    s64 = s.to(tl.float64)
    deq64 = v32.to(tl.float64) * s64
    deq32 = (v32 * s).to(tl.float64)
    d1 = x64 - deq64
    d2 = deq64 - deq32
    err = tl.sqrt(tl.sum(d1 * d1, axis=1)) + tl.sqrt(tl.sum(d2 * d2, axis=1))
    norm = tl.maximum(tl.sqrt(tl.sum(x64 * x64, axis=1)), tl.sqrt(tl.sum(deq64 * deq64, axis=1)))
    norm = tl.maximum(norm, tl.sqrt(tl.sum(deq32 * deq32, axis=1)))
    tl.store(err_ptr + rows, err, mask=ok)
    tl.store(norm_ptr + rows, norm, mask=ok)


QUANTIZE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_quantize_input(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 2 or x.shape[1] < 1 or x.shape[1] & (x.shape[1] - 1):
        raise ValueError(f"expected (n, dim) rows with dim a power of two, got {tuple(x.shape)}")
    if x.dtype not in QUANTIZE_DTYPES:
        raise ValueError(f"expected one of {QUANTIZE_DTYPES}, got {x.dtype}")
    return x if x.stride(1) == 1 or x.shape[0] == 0 else x.contiguous()


def row_absmax_triton(x: torch.Tensor, block_rows: int = 32) -> torch.Tensor:
    """``(n, dim)`` -> ``(n,)`` float32 ``max |x.to(float32)|`` per row (one read of ``x``)."""
    x = _check_quantize_input(x)
    n = x.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    if n:
        _row_absmax_kernel[(triton.cdiv(n, block_rows),)](x, out, n, x.stride(0), DIM=x.shape[1],
                                                          BLOCK_R=block_rows, num_warps=4)
    return out


def quantize_rows_triton(x: torch.Tensor, scales: torch.Tensor, *, block_rows: int | None = None,
                         num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(n, dim)`` rows and ``(n,)`` float32 scales -> float8_e4m3fn values
    ``clamp(x_f32 / s, -448, 448)`` (round to nearest even), and float64 ``err`` =
    ||x - v s|| + ||v s - fl32(v s)||, ``norm`` = max(||x||, ||v s||, ||fl32(v s)||), all
    measured in float64 from the values written (not yet widened; NaN/Inf pass through)."""
    x = _check_quantize_input(x)
    n, dim = x.shape
    if scales.shape != (n,) or scales.dtype != torch.float32:
        raise ValueError(f"expected ({n},) float32 scales, got {tuple(scales.shape)} {scales.dtype}")
    scales = scales.contiguous()
    values = torch.empty((n, dim), dtype=torch.float8_e4m3fn, device=x.device)
    err = torch.empty(n, dtype=torch.float64, device=x.device)
    norm = torch.empty(n, dtype=torch.float64, device=x.device)
    if n:
        br = block_rows or QUANT_BLOCK_ROWS
        _quantize_rows_kernel[(triton.cdiv(n, br),)](
            x, scales, values.view(torch.uint8), err, norm, n, x.stride(0),
            DIM=dim, BLOCK_R=br, X_F64=x.dtype == torch.float64, num_warps=num_warps or QUANT_NUM_WARPS)
    return values, err, norm
