"""``--pool-factor`` on the GPU: the pooling distances in a tiled kernel (:func:`pooling_distances`)
and Ward's merge loop, scipy's nearest-neighbour chain, one Triton program per page
(:func:`ward_merges`), so the host does only what is O(n log n) (:func:`labels_from_merges`).

Why: the merge loop (scipy's ``linkage(method="ward")``, O(n^2) per page) is the one step of
the pooling that ran on the host, ~0.5 s for a batch of 32 pages on an H200 host. In the
actor's threads it held the GIL and slowed the other batch's kernel launches; in worker
processes (:class:`pipeline.embed.pooling.WardMerges`, 2026-12-05) the pooled actor still ran at
92-93% of the unpooled one, its GPU busy 93.7-94.5% of its wall time (benchmarks/RESULTS.md,
fifteenth session). Here the loop runs on the device, behind the distances, on a side stream.

The kernel is scipy 1.17's ``_hierarchy.nn_chain`` (scipy/cluster/_hierarchy.pyx), step for
step: the chain starts at the first live cluster; the nearest neighbour of the chain's top is
the first index whose distance is below the current minimum, which starts at the distance to
the previous element of the chain (so it is kept on a tie); two mutual nearest neighbours are
merged into the larger slot; the Lance-Williams update is ``_ward``'s expression, evaluated in
the same order, in float64, with Triton's fusion of multiply-adds turned off and a correctly
rounded division and square root (libdevice's ``div_rn`` and ``sqrt_rn``). On the same
condensed distances the merges, their order
and their heights are those of scipy's loop, bit for bit (tested in Triton's CPU interpreter,
ties included); what scipy does after its loop (a stable sort by height, the union-find
labels) is :func:`linkage_from_merges`, on the host.

Layout: each page's condensed distances (scipy's ``pdist`` order) one after another in one
float64 device buffer, overwritten (the kernel's working matrix); each page's ``n - 1`` merges
come out as rows ``(x, y, height, size)`` in the order they were made. A page whose distances
are not all finite gets the flag 1 and no merges (scipy raises for it; so does the caller).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _row_index(n, x, offs):
    """Condensed index of (x, i) for every lane i (i == x gives a value never read)."""
    lo = tl.minimum(offs, x)
    hi = tl.maximum(offs, x)
    return n * lo - (lo * (lo + 1)) // 2 + hi - lo - 1


@triton.jit
def _ward_nn_chain_kernel(D, d_start, lengths, Z, z_start, flags, BLOCK: tl.constexpr, IEEE: tl.constexpr):
    page = tl.program_id(0)
    n = tl.load(lengths + page).to(tl.int64)
    Dp = D + tl.load(d_start + page)
    Zp = Z + tl.load(z_start + page) * 4
    offs = tl.arange(0, BLOCK).to(tl.int64)
    live = offs < n
    inf = float("inf")

    # scipy raises on distances that are not finite; flag the page and make no merges
    m_pairs = n * (n - 1) // 2
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for s in range(0, m_pairs, BLOCK):
        v = tl.load(Dp + s + offs, mask=s + offs < m_pairs, other=0.0)
        bad += (tl.abs(v) == inf).to(tl.int32) + (v != v).to(tl.int32)
    n_bad = tl.sum(bad)
    tl.store(flags + page, (n_bad > 0).to(tl.int32))
    n_merges = tl.where(n_bad > 0, 0, n - 1)

    size = live.to(tl.int64)  # points in the cluster held by each slot; 0: merged away
    chain = tl.zeros([BLOCK], dtype=tl.int64)  # the nearest-neighbour chain, bottom first
    chain_len = n * 0
    for k in range(0, n_merges):
        # an empty chain starts at the first live slot
        first = tl.min(tl.where(size > 0, offs, BLOCK))
        chain = tl.where((offs == 0) & (chain_len == 0), first, chain)
        chain_len = tl.where(chain_len == 0, 1, chain_len)
        done = (chain_len < 0).to(tl.int32)
        x = first
        y = first
        current = (n * 0).to(tl.float64)
        steps = n * 0
        while (done == 0) & (steps <= n):
            x = tl.sum(tl.where(offs == chain_len - 1, chain, 0))
            prev = tl.sum(tl.where(offs == chain_len - 2, chain, 0))
            has_prev = chain_len > 1
            valid = (size > 0) & (offs != x)
            row = tl.load(Dp + _row_index(n, x, offs), mask=valid, other=inf)
            nearest = tl.min(row)
            first_nearest = tl.min(tl.where(row == nearest, offs, BLOCK))
            # scipy scans i = 0..n-1 with `dist < current_min`, current_min starting at the
            # distance to the previous element of the chain (kept on a tie) or +inf
            current = tl.where(has_prev, tl.sum(tl.where(offs == prev, row, 0.0)), inf)
            y = tl.where(has_prev, prev, -1)
            closer = nearest < current
            y = tl.where(closer, first_nearest, y)
            current = tl.where(closer, nearest, current)
            done = (has_prev & (y == prev)).to(tl.int32)
            chain = tl.where((offs == chain_len) & (done == 0), y, chain)
            chain_len = tl.where(done == 1, chain_len, chain_len + 1)
            steps += 1
        chain_len -= 2
        lo = tl.minimum(x, y)
        hi = tl.maximum(x, y)
        nx = tl.sum(tl.where(offs == lo, size, 0))
        ny = tl.sum(tl.where(offs == hi, size, 0))
        tl.store(Zp + 4 * k + 0, lo.to(tl.float64))
        tl.store(Zp + 4 * k + 1, hi.to(tl.float64))
        tl.store(Zp + 4 * k + 2, current)
        tl.store(Zp + 4 * k + 3, (nx + ny).to(tl.float64))
        size = tl.where(offs == lo, 0, tl.where(offs == hi, nx + ny, size))
        # Lance-Williams for Ward (scipy's _ward), for every live slot i other than hi:
        # t = 1 / (nx + ny + ni); sqrt((ni + nx) t d_xi^2 + (ni + ny) t d_yi^2 - ni t d_xy^2)
        upd = (size > 0) & (offs != hi)
        d_xi = tl.load(Dp + _row_index(n, lo, offs), mask=upd, other=0.0)
        d_yi = tl.load(Dp + _row_index(n, hi, offs), mask=upd, other=0.0)
        if IEEE:  # on a GPU: libdevice's correctly rounded division and square root, as C's
            t = libdevice.div_rn(tl.full([BLOCK], 1.0, tl.float64), (nx + ny + size).to(tl.float64))
        else:  # Triton's interpreter (numpy: IEEE already; it has no libdevice)
            t = 1.0 / (nx + ny + size).to(tl.float64)
        a = (size + nx).to(tl.float64) * t * d_xi * d_xi
        b = (size + ny).to(tl.float64) * t * d_yi * d_yi
        c = size.to(tl.float64) * t * current * current
        if IEEE:
            new = libdevice.sqrt_rn(tl.where(upd, a + b - c, 0.0))
        else:
            new = tl.sqrt(tl.where(upd, a + b - c, 0.0))
        tl.store(Dp + _row_index(n, hi, offs), new, mask=upd)
        # the next step reads what other threads of this program wrote
        tl.debug_barrier()


@triton.jit
def _pdist_rows_kernel(S, s_start, lengths, out, out_start, TILE: tl.constexpr, IEEE: tl.constexpr):
    """Condensed Euclidean distances between the rows of each page's (n, n) float64 matrix
    (given transposed: element (i, k) at ``k * n + i``), summed over the columns in order, one
    column at a time (scipy's ``pdist``: bit for bit)."""
    page = tl.program_id(1)
    n = tl.load(lengths + page).to(tl.int64)
    tiles = tl.cdiv(n, TILE)
    ti = tl.program_id(0) // tiles
    tj = tl.program_id(0) % tiles
    if (ti < tiles) & (ti <= tj):
        Sp = S + tl.load(s_start + page)
        Op = out + tl.load(out_start + page)
        i = ti * TILE + tl.arange(0, TILE).to(tl.int64)
        j = tj * TILE + tl.arange(0, TILE).to(tl.int64)
        acc = tl.zeros([TILE, TILE], dtype=tl.float64)
        for k in range(0, n):  # column k of rows i and j: contiguous in the transposed copy
            a = tl.load(Sp + k * n + i, mask=i < n, other=0.0)
            b = tl.load(Sp + k * n + j, mask=j < n, other=0.0)
            d = a[:, None] - b[None, :]
            acc = acc + d * d
        if IEEE:
            dist = libdevice.sqrt_rn(acc)
        else:
            dist = tl.sqrt(acc)
        ii = i[:, None]
        jj = j[None, :]
        keep = (ii < jj) & (jj < n)
        tl.store(Op + (n * ii - (ii * (ii + 1)) // 2 + jj - ii - 1), dist, mask=keep)


# the pages' (n, n) matrices held on the device at once by pooling_distances (at least one page)
SIMS_BUDGET_BYTES = 512 * 2**20

# (tile, warps) of the distance kernel: 32 x 32 pairs, 4 warps, the fastest of five on an H100
# (2026-12-05, row-major loads: 9.5 ms a batch of 32 pages against 10.4-11.9 for the others and
# 14.9 for torch's pdist); benchmarks/check_pooling_gpu.py times them
PDIST_CONFIG = (32, 4)


def pooling_distances(flat: torch.Tensor, lengths: list[int], config: tuple[int, int] | None = None) -> torch.Tensor:
    """Each row's condensed pooling distances, one row after another (pages of one vector take
    none): the Euclidean distances between the rows of ``1 - E @ E.T`` (float32, then float64),
    as :func:`pipeline.embed.pooling.condensed_distances` and colpali's ``linkage(D, metric=
    "euclidean")`` compute them, in a tiled Triton kernel whose sums run over the columns in
    scipy's order (equal to scipy's ``pdist`` on the same matrix, bit for bit, as scipy's x86-64
    wheels compute it: a compiler that fuses its multiply-add, as GCC does for aarch64 by
    default, would round differently). ``flat``: the
    rows' vectors one after another. Queued on ``flat``'s device, no host sync.

    Why: torch's CUDA ``pdist`` gives each of a page's ~300k pairs a thread block of its own,
    which reads both rows again (~19 ms a batch of 32 pages on an H200, ~4% of the pooled
    actor's GPU time: RESULTS fourteenth session, call F); tiles of 64 x 64 pairs read each row
    once per tile. The pages' (n, n) matrices are made a few pages at a time
    (:data:`SIMS_BUDGET_BYTES`), one kernel launch each."""
    dev = flat.device
    pages, starts, start = [], [], 0
    for n in lengths:
        if n > 1:
            pages.append(n)
            starts.append(start)
        start += n
    out = torch.empty(sum(n * (n - 1) // 2 for n in pages), dtype=torch.float64, device=dev)
    if not pages:
        return out
    sizes = np.array(pages, dtype=np.int64)
    o_start = np.concatenate([[0], np.cumsum(sizes * (sizes - 1) // 2)[:-1]])
    tile, warps = config or PDIST_CONFIG
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    # the (n, n) float64 matrices of a few pages at a time: ~160 MB for 32 pages of 790
    # vectors in one go, but 4.3 GB for 32 pages at --max-visual-tokens 4096
    first = 0
    while first < len(pages):
        last, held = first, 0
        while last < len(pages) and (last == first or held + int(sizes[last]) ** 2 * 8 <= SIMS_BUDGET_BYTES):
            held += int(sizes[last]) ** 2 * 8
            last += 1
        chunk = sizes[first:last]
        s_start = np.concatenate([[0], np.cumsum(chunk * chunk)[:-1]])
        sims = torch.empty(int((chunk * chunk).sum()), dtype=torch.float64, device=dev)
        for n, row, s in zip(pages[first:last], starts[first:last], s_start):
            x = flat[row : row + n].to(torch.float32)
            # float32, as colpali's 1 - similarities; stored transposed (element (i, k) at k n + i),
            # so that the kernel's loads of one column for a tile's rows are contiguous
            sims[int(s) : int(s) + n * n].view(n, n).copy_((1 - x @ x.T).T)
        meta = torch.from_numpy(np.stack([s_start, chunk, o_start[first:last]]))
        if dev.type == "cuda":  # pinned: a copy from pageable memory would wait for the stream's work
            meta = meta.pin_memory()
        meta = meta.to(dev, non_blocking=True)
        tiles = -(-int(chunk.max()) // tile)
        _pdist_rows_kernel[(tiles * tiles, len(chunk))](
            sims, meta[0], meta[1], out, meta[2], TILE=tile, IEEE=not interpreted,
            num_warps=warps, enable_fp_fusion=False)
        first = last
    return out


def block_size(n_max: int) -> int:
    """Lanes per program: the next power of two at or above the longest page (at least 16).
    Up to 4,096 (--max-visual-tokens up to ~4,000) the kernel keeps everything in registers;
    above, ptxas spills (8,192 lanes: ~600 spill stores, review 2026-12-05): slower, not wrong."""
    return max(16, triton.next_power_of_2(int(n_max)))


def ward_merges(condensed: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Queue Ward's merge loop of every page with more than one vector on ``condensed``'s
    device (its current stream). ``condensed``: the pages' condensed float64 distances one
    after another (:func:`pipeline.embed.model.pooling_distances`'s layout), overwritten.
    Returns ``(merges, flags)``: ``(sum(n - 1), 4)`` float64 rows ``(x, y, height, size)``
    per page in the order made, and one int32 per page (1: distances not all finite).
    Pages of one vector take no row and no flag."""
    if condensed.dtype != torch.float64:
        raise ValueError(f"Ward's merge loop runs in float64, got {condensed.dtype}")
    pages = [n for n in lengths if n > 1]
    dev = condensed.device
    merges = torch.empty((sum(n - 1 for n in pages), 4), dtype=torch.float64, device=dev)
    flags = torch.zeros(len(pages), dtype=torch.int32, device=dev)
    if not pages:
        return merges, flags
    sizes = np.array(pages, dtype=np.int64)
    d_start = np.concatenate([[0], np.cumsum(sizes * (sizes - 1) // 2)[:-1]])
    z_start = np.concatenate([[0], np.cumsum(sizes - 1)[:-1]])
    expected = int((sizes * (sizes - 1) // 2).sum())
    if condensed.numel() != expected:
        raise ValueError(f"{condensed.numel()} distances given; pages of {pages} vectors have {expected}")
    meta = torch.from_numpy(np.stack([d_start, sizes, z_start]))
    if dev.type == "cuda":  # pinned: a copy from pageable memory would wait for the stream's work
        meta = meta.pin_memory()
    meta = meta.to(dev, non_blocking=True)
    block = block_size(int(sizes.max()))
    # a few lanes per thread: ~10 vectors of 64-bit values live across the loop
    warps = max(4, min(16, block // 128))
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    _ward_nn_chain_kernel[(len(pages),)](
        condensed, meta[0], meta[1], merges, meta[2], flags, BLOCK=block, IEEE=not interpreted,
        num_warps=warps, enable_fp_fusion=False)
    return merges, flags


def _last_merge_into(slots: np.ndarray, before: np.ndarray, into: np.ndarray) -> np.ndarray:
    """For each (slot, before): the largest merge index j < before with ``into[j] == slot``, or -1."""
    m = len(into)
    keys = np.sort(into * m + np.arange(m, dtype=np.int64))
    pos = np.searchsorted(keys, slots * m + before) - 1
    hit = keys[np.maximum(pos, 0)]
    return np.where((pos >= 0) & (hit // m == slots), hit % m, -1)


def linkage_from_merges(merges: np.ndarray, n: int) -> np.ndarray:
    """scipy's linkage matrix from one page's ``n - 1`` merges as the chain made them
    (:func:`ward_merges`): what ``_hierarchy.nn_chain`` does after its loop, a stable sort by
    height, then each merge's two clusters named by the node ids of scipy's union-find
    (``label``), smaller first.

    Vectorised: a merge keeps its cluster in the larger of its two slots, so the cluster in
    slot s just before merge i is made by the last earlier merge into slot s (node n + that
    merge's sorted position), or is the point s. In sorted order this is what the union-find
    finds as long as every merge sorts after the merges that made its two clusters (heights
    that tie keep the order made: the sort is stable). Should rounding in the update make a
    later merge lower than one it depends on, the union-find itself runs, in Python."""
    m = n - 1
    order = np.argsort(merges[:, 2], kind="mergesort")
    z = merges[order].copy()
    idx = np.arange(m, dtype=np.int64)
    # every merge after the merges that made its clusters, in sorted order?
    rank = np.empty(m, dtype=np.int64)
    rank[order] = idx
    made_lo, made_hi = merges[:, 0].astype(np.int64), merges[:, 1].astype(np.int64)
    for slots in (made_lo, made_hi):
        maker = _last_merge_into(slots, idx, made_hi)
        if np.any(rank[maker[maker >= 0]] >= rank[maker >= 0]):
            return _label_by_union_find(z, n)
    lo, hi = z[:, 0].astype(np.int64), z[:, 1].astype(np.int64)
    a = _last_merge_into(lo, idx, hi)
    b = _last_merge_into(hi, idx, hi)
    a = np.where(a >= 0, n + a, lo)
    b = np.where(b >= 0, n + b, hi)
    z[:, 0] = np.minimum(a, b)
    z[:, 1] = np.maximum(a, b)
    return z


def _label_by_union_find(z: np.ndarray, n: int) -> np.ndarray:
    """scipy's ``label`` (``LinkageUnionFind``), step for step: sorted merges of slots in,
    node ids out. Only for merges whose sorted order breaks the rule above."""
    parent = np.arange(2 * n - 1)
    size = np.ones(2 * n - 1, dtype=np.int64)
    nxt = n

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            x, parent[x] = parent[x], root
        return int(root)

    out = z.copy()
    for i in range(n - 1):
        xr, yr = find(int(z[i, 0])), find(int(z[i, 1]))
        out[i, 0], out[i, 1] = (xr, yr) if xr < yr else (yr, xr)
        parent[xr] = parent[yr] = nxt
        size[nxt] = size[xr] + size[yr]
        out[i, 3] = size[nxt]
        nxt += 1
    return out


def labels_from_merges(merges: np.ndarray, n: int, pool_factor: int) -> np.ndarray:
    """Cluster id (0-based, scipy's order) of each of a page's n vectors from its merges
    (:func:`ward_merges`): ``fcluster(criterion="maxclust")`` on the linkage matrix, as
    :func:`pipeline.embed.ward.labels_from_distances` does with scipy's own loop."""
    from scipy.cluster.hierarchy import fcluster

    z = linkage_from_merges(merges, n)
    return fcluster(z, t=max(n // pool_factor, 1), criterion="maxclust") - 1
