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

Operands float16 (the stored values exactly) or bfloat16; products accumulate in float32.
For float32 operands (tests in Triton's interpreter) the dot is IEEE float32, not TF32.
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from pipeline.score.corpus import PackedPages
from pipeline.score.maxsim import sum_over_query_vectors

# (BLOCK_M, BLOCK_N, num_warps, num_stages): BLOCK_M query vectors x BLOCK_N page vectors.
DEFAULT_CONFIG = (256, 64, 8, 3)  # best of 8 on an H200 (benchmarks/RESULTS.md)
SMALL_BATCH_CONFIG = (64, 64, 4, 4)
PAGES_PER_GROUP = 16


@triton.jit
def _maxsim_pagemax_kernel(
    q_ptr,  # (n_rows, DIM) query vectors, zero rows for padding
    d_ptr,  # (n_chunks * BLOCK_N, DIM) page vectors
    chunk_page_ptr,  # (n_chunks + 1,) int32 page of each chunk, -1 sentinel at the end
    group_chunk_ptr,  # (n_groups + 1,) int64 first chunk of each page group
    out_ptr,  # (n_pages, n_rows) float32: max over the page's vectors, per query row
    n_rows,
    stride_q,
    stride_d,
    stride_out,
    DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    dims = tl.arange(0, DIM)
    cols = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + rows[:, None].to(tl.int64) * stride_q + dims[None, :], mask=row_ok[:, None], other=0.0)
    c_start = tl.load(group_chunk_ptr + pid_g)
    c_end = tl.load(group_chunk_ptr + pid_g + 1)
    acc = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for c in range(c_start, c_end):
        base = c * BLOCK_N  # int64: the group table is int64, rows exceed 2**31 / 128
        d = tl.load(d_ptr + (base + cols)[:, None] * stride_d + dims[None, :])
        if IEEE:
            s = tl.dot(q, tl.trans(d), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(d))
        acc = tl.maximum(acc, tl.max(s, axis=1))
        page = tl.load(chunk_page_ptr + c)
        last = page != tl.load(chunk_page_ptr + c + 1)
        # "!= 0": Triton 3.9's interpreter types a vector & scalar of booleans as int32,
        # which its masked store refuses; compiled, this is the same i1 mask.
        tl.store(out_ptr + page.to(tl.int64) * stride_out + rows, acc, mask=(row_ok & last) != 0)
        acc = tl.where(last, float("-inf"), acc)


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
        self.group_chunk = bounds.to(torch.int64).to(device)
        self.n_groups = len(bounds) - 1
        self.block_n = block_n


# Tables per packed shard and BLOCK_N, dropped with the shard.
_TABLES: "weakref.WeakKeyDictionary[PackedPages, dict[int, TritonShard]]" = weakref.WeakKeyDictionary()


def page_maxima_triton(
    Qflat: torch.Tensor,
    pages: PackedPages,
    *,
    config: tuple[int, int, int, int] | None = None,
    shard: TritonShard | None = None,
) -> torch.Tensor:
    """``(n_rows, 128)`` query vectors -> ``(n_pages, n_rows)`` float32 per-page maxima."""
    n_rows = Qflat.shape[0]
    block_m, block_n, num_warps, num_stages = config or (
        SMALL_BATCH_CONFIG if n_rows <= 64 else DEFAULT_CONFIG
    )
    if shard is None or shard.block_n != block_n:
        tables = _TABLES.setdefault(pages, {})
        if block_n not in tables:
            tables[block_n] = TritonShard(pages, block_n)
        shard = tables[block_n]
    Qflat = Qflat.to(pages.vectors.dtype).contiguous()
    out = torch.empty((pages.n_pages, n_rows), dtype=torch.float32, device=Qflat.device)
    grid = (triton.cdiv(n_rows, block_m), shard.n_groups)
    _maxsim_pagemax_kernel[grid](
        Qflat,
        pages.vectors,
        shard.chunk_page,
        shard.group_chunk,
        out,
        n_rows,
        Qflat.stride(0),
        pages.vectors.stride(0),
        out.stride(0),
        DIM=Qflat.shape[1],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        IEEE=pages.vectors.dtype == torch.float32,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def maxsim_scores_triton(
    Q: torch.Tensor, pages: PackedPages, *, config: tuple[int, int, int, int] | None = None
) -> torch.Tensor:
    """``(n_queries, Lq, 128)`` zero-padded queries -> ``(n_queries, n_pages)`` float32 MaxSim."""
    nq, lq, dim = Q.shape
    maxima = page_maxima_triton(Q.reshape(nq * lq, dim), pages, config=config)  # (P, nq*lq)
    scores = sum_over_query_vectors(maxima.view(pages.n_pages, nq, lq))  # (P, nq)
    return scores.T.contiguous()
