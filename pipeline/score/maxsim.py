"""Exact MaxSim scoring and exact top-k, as plain torch functions.

MaxSim (late interaction, ColBERT / ColPali):

    score(q, p) = sum over q's real vectors i of  max over p's real vectors j of  <q_i, p_j>

Padding never takes part, and the sum is accumulated in float32 (float64 on CPU, see
below). The layout is *page-major*: a shard of pages is packed once into one tensor and
every query batch runs against it, so each page is read once per query batch, not once
per query.

How padding is kept out without a mask:
  * pages are padded with copies of one of their own real vectors. A repeated vector
    never changes a maximum, so ``amax`` over a padded page equals ``amax`` over its real
    vectors exactly;
  * queries are padded with zero vectors *at the end*. A zero vector's dot product with
    anything is exactly 0, its max is 0, and the per-page sum adds the query positions in
    order, so the padded positions add exactly +0.0 after every real one: the sum of the
    real positions is unchanged, bit for bit, whatever the padded length of the batch.

Precision. Stored embeddings are float16. On CUDA the operands stay float16 (the stored
values, nothing rounded; the same tensor-core rate as bfloat16) and dot products are
accumulated in float32. On CPU they are computed in float64 and the sum is rounded to
float32 once: CPU BLAS picks different kernels (GEMV vs GEMM, edge paths) for different
matrix shapes, so float32 dot products would change in the last bit with the shard or
batch size; in float64 those differences vanish in the final rounding, which keeps
results independent of shard count and batch size.

Exact top-k. Ties are broken by the lower page index (callers order a shard's pages by
``page_id``, so that is ``page_id`` ascending): :func:`topk_desc` turns (score, index)
into one unique int64 key, so the selection is exact and never depends on the order in
which torch's ``topk`` visits equal values.
"""


from __future__ import annotations


import numpy as np
import torch

from pipeline.score.corpus import EMBEDDING_DIM
from pipeline.score.packing import PackedPages, pack_pages  # noqa: F401  (pack_pages: doctests)

# Elements of one similarity block (query vectors x page vectors) on the torch path.
# 2**25 float64 = 256 MiB; bounded so that CPU workers with a few GiB never swap.
DEFAULT_BLOCK_ELEMENTS = 1 << 25


def sum_over_query_vectors(maxima: torch.Tensor) -> torch.Tensor:
    """``(..., Lq)`` -> ``(...)`` float32, adding query positions strictly in order.

    A fixed left-to-right order makes the sum independent of how much zero padding follows
    the real positions (``x + 0.0 == x``), which a tree reduction would not guarantee.
    """
    dtype = torch.float64 if maxima.dtype == torch.float64 else torch.float32
    acc = maxima[..., 0].to(dtype, copy=True)
    for j in range(1, maxima.shape[-1]):
        acc.add_(maxima[..., j])
    return acc.to(torch.float32)


def _maxsim_torch(Q: torch.Tensor, pages: PackedPages, block_elements: int) -> torch.Tensor:
    if pages.padded_length is None:
        raise ValueError("the torch path needs pages packed with pad_multiple=None (one common length)")
    nq, lq, dim = Q.shape
    n_pages, length = pages.n_pages, pages.padded_length
    D = pages.vectors.view(n_pages, length, dim)
    # Similarities are float32 (float64 on CPU): a float16 or bfloat16 product would round
    # every dot product to 3 digits before the max and the sum (scores off by ~1e-3).
    sim_dtype = torch.float64 if D.dtype == torch.float64 else torch.float32
    Qflat = Q.reshape(nq * lq, dim).to(sim_dtype)
    out = torch.empty((nq, n_pages), dtype=torch.float32, device=D.device)
    # Pages per block: one (nq*lq, chunk*length) similarity block at a time.
    chunk = max(1, block_elements // max(1, nq * lq * length))
    for start in range(0, n_pages, chunk):
        block = D[start : start + chunk].to(sim_dtype)  # (c, L, 128)
        sims = Qflat @ block.reshape(-1, dim).T  # (nq*lq, c*L)
        maxima = sims.view(nq, lq, block.shape[0], length).amax(dim=-1)  # (nq, lq, c)
        out[:, start : start + block.shape[0]] = sum_over_query_vectors(maxima.transpose(1, 2))
    return out


def maxsim_scores(
    Q: torch.Tensor,
    pages: PackedPages,
    *,
    backend: str = "auto",
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Exact MaxSim of every query against every page of a packed shard.

    Args:
        Q: ``(n_queries, Lq, 128)``, zero-padded at the end (:func:`pad_queries`), on
            ``pages.device``.
        pages: a shard from :func:`pack_pages`.
        backend: ``"torch"`` or ``"auto"`` (the same here; the fused CUDA kernel is chosen
            by :func:`pipeline.score.scorer.score_batch`).
        block_elements: size bound of one similarity block on the torch path.

    Returns:
        ``(n_queries, n_pages)`` float32 scores.

    Two pages, two queries, values checked by hand (a page's max is over its real
    vectors: page 1's padding never shows; query 1's zero padding adds nothing):

    >>> e = torch.eye(128, dtype=torch.float64)
    >>> pages = pack_pages([-e[:1], e[:2] + 0.5 * e[2]])  # page 0: -e0; page 1: e0+.5e2, e1+.5e2
    >>> Q = torch.stack([e[0:2], torch.stack([e[2], torch.zeros(128, dtype=torch.float64)])])
    >>> maxsim_scores(Q, pages)
    tensor([[-1.0000,  2.0000],
            [ 0.0000,  0.5000]])
    """
    if Q.ndim != 3 or Q.shape[-1] != EMBEDDING_DIM:
        raise ValueError(f"Q must be (n_queries, Lq, {EMBEDDING_DIM}), got {tuple(Q.shape)}")
    if pages.n_pages == 0 or Q.shape[0] == 0:
        return torch.zeros((Q.shape[0], pages.n_pages), dtype=torch.float32, device=pages.device)
    if backend not in ("auto", "torch"):
        raise ValueError(f"this is the torch path; for backend {backend!r} use pipeline.score.scorer.score_batch")
    return _maxsim_torch(Q, pages, block_elements)



def float_order_key(scores: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 with the same order (``-0.0`` and ``+0.0`` equal). NaN is refused."""
    if torch.isnan(scores).any():
        raise ValueError("NaN in MaxSim scores: the embeddings contain NaN or Inf")
    bits = (scores.to(torch.float32) + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return ordered.to(torch.int64)


def topk_desc(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row: score descending, then column index ascending.

    Args:
        scores: ``(n_rows, n_cols)`` float32.
        k: results per row; clamped to ``n_cols``.

    Returns:
        ``(values, indices)``, each ``(n_rows, min(k, n_cols))``, best first.

    >>> topk_desc(torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]]), 2)
    (tensor([[3., 3.]]), tensor([[1, 2]]))
    """
    n_rows, n_cols = scores.shape
    k = min(k, n_cols)
    if k <= 0:
        empty = torch.empty((n_rows, 0), device=scores.device)
        return empty.float(), empty.long()
    if n_cols >= 1 << 31:
        raise ValueError("a shard holds at most 2**31 - 1 pages")
    # One unique int64 per cell: score order in the high 32 bits, reversed column index in
    # the low 32, so the largest key is the best score with the lowest index.
    col = torch.arange(n_cols, device=scores.device, dtype=torch.int64)
    keys = (float_order_key(scores) << 32) | ((1 << 32) - 1 - col)
    top = torch.topk(keys, k, dim=1, largest=True, sorted=True).values
    indices = (1 << 32) - 1 - (top & 0xFFFFFFFF)
    values = torch.gather(scores.to(torch.float32), 1, indices)
    return values, indices


def maxsim_reference(query: np.ndarray, page: np.ndarray) -> float:
    """The definition, in float64: sum over query vectors of the max over page vectors.

    ``query`` ``(n_q, 128)``, ``page`` ``(n_p, 128)``, real vectors only. Slow; for tests
    and benchmarks' correctness checks.

    >>> maxsim_reference(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[0.5, -1.0], [-2.0, 0.25]]))
    0.75
    """
    sims = np.asarray(query, dtype=np.float64) @ np.asarray(page, dtype=np.float64).T
    return float(sims.max(axis=1).sum())
