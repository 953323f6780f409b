"""A shard packed for scoring on one device: :class:`PackedPages` and the functions that
build it from flat float16 vectors (a loaded shard, a test's pages) and pad query batches.

The torch side of :mod:`pipeline.score.corpus`, which lists, plans, reads and caches shards
without torch, so a scoring actor can start reading its first shard while torch imports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline import schema
from pipeline.score.corpus import CUDA_PAD_MULTIPLE, EMBEDDING_DIM, LoadedShard, log


@dataclass(frozen=True, eq=False)
class PackedPages:
    """A shard of pages packed for scoring, resident on one device.

    Attributes:
        vectors: ``(n_rows, 128)``: pages one after another; page ``p`` owns rows
            ``offsets[p]:offsets[p+1]``, its real vectors first, then copies of its first
            vector up to its padded length.
        offsets: ``(n_pages + 1,)`` int64 row offsets (on CPU).
        lengths: ``(n_pages,)`` int64 real vector counts (on CPU).
        padded_length: the common padded length of every page, or ``None`` when pages
            are padded to a multiple of ``pad_multiple`` only (the layout of the Triton
            kernel).
        pad_multiple: every page's padded length is a multiple of this.
    """

    vectors: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor
    padded_length: int | None
    pad_multiple: int

    @property
    def n_pages(self) -> int:
        return int(self.lengths.numel())

    @property
    def device(self) -> torch.device:
        return self.vectors.device

    def nbytes(self) -> int:
        return self.vectors.numel() * self.vectors.element_size()


def default_compute_dtype(device: torch.device | str) -> torch.dtype:
    """float16 operands on CUDA (the stored values exactly), float64 on CPU (see module doc)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float64


def pack_flat(
    flat: np.ndarray | torch.Tensor,
    lengths: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    pad_multiple: int | None = None,
) -> PackedPages:
    """Pack pages given as one flat array of real vectors, padding each with its own vector.

    Args:
        flat: ``(sum(lengths), 128)``: the pages' real vectors one after another (what a
            Parquet ``embedding`` column flattens to, without a copy).
        lengths: ``(n_pages,)`` real vectors per page, each ``>= 1``.
        device: where the packed shard lives. ``flat`` is copied there once, in its own
            dtype, and padded there by one gather (no per-page Python loop).
        dtype: operand dtype; default :func:`default_compute_dtype` of ``device``.
        pad_multiple: ``None`` pads every page to one common length (the longest page,
            rounded up to a multiple of 8): the dense ``(n_pages, L, 128)`` layout of the
            torch path. An int pads each page only to a multiple of it (the Triton
            kernel's layout, less padding when lengths vary).

    Returns:
        :class:`PackedPages`.
    """
    device = torch.device(device)
    dtype = dtype or default_compute_dtype(device)
    lengths = torch.as_tensor(np.asarray(lengths) if not isinstance(lengths, torch.Tensor) else lengths)
    lengths = lengths.to(torch.int64).cpu()
    n_pages = int(lengths.numel())
    if n_pages and int(lengths.min()) < 1:
        bad = int(torch.nonzero(lengths < 1)[0, 0])
        raise ValueError(
            f"page {bad} has no vectors; MaxSim is undefined for an empty page. "
            "Drop pages with n_vectors == 0 before packing."
        )
    flat_t = torch.as_tensor(flat) if not isinstance(flat, torch.Tensor) else flat
    if flat_t.ndim != 2 or flat_t.shape[1] != EMBEDDING_DIM:
        raise ValueError(f"flat must be (n, {EMBEDDING_DIM}), got {tuple(flat_t.shape)}")
    if int(lengths.sum()) != flat_t.shape[0]:
        raise ValueError(f"lengths add up to {int(lengths.sum())} vectors but flat has {flat_t.shape[0]}")
    if pad_multiple is None:
        longest = int(lengths.max()) if n_pages else 0
        padded_length = max(8, -(-longest // 8) * 8)
        padded = torch.full_like(lengths, padded_length)
        multiple = padded_length
    else:
        if pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
        padded_length = None
        padded = -(-lengths // pad_multiple) * pad_multiple
        multiple = pad_multiple
    offsets = torch.zeros(n_pages + 1, dtype=torch.int64)
    torch.cumsum(padded, 0, out=offsets[1:])
    real_offsets = torch.zeros(n_pages + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=real_offsets[1:])

    # Source row of every packed row: the page's j-th real vector, or its first one where
    # j runs past the real length.
    row_page = torch.repeat_interleave(torch.arange(n_pages, device=device), padded.to(device))
    j = torch.arange(int(offsets[-1]), device=device) - offsets.to(device)[row_page]
    src = real_offsets.to(device)[row_page] + torch.where(j < lengths.to(device)[row_page], j, 0)
    del row_page, j
    on_device = flat_t.to(device)
    vectors = on_device[src].to(dtype)
    del on_device, src
    return PackedPages(vectors, offsets, lengths, padded_length, multiple)


def pack_pages(
    pages: Sequence[np.ndarray | torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    pad_multiple: int | None = None,
) -> PackedPages:
    """Pack ragged pages (``n_pages`` arrays of shape ``(n_i, 128)``); see :func:`pack_flat`.

    >>> p = pack_pages([np.ones((1, 128)), np.arange(256.).reshape(2, 128)])
    >>> p.padded_length, p.vectors.shape, p.lengths.tolist()
    (8, torch.Size([16, 128]), [1, 2])
    >>> bool((p.vectors[8:16][2:] == p.vectors[8]).all())  # padding repeats the page's own first vector
    True
    """
    for i, page in enumerate(pages):
        if np.ndim(page) != 2 or np.shape(page)[1] != EMBEDDING_DIM:
            raise ValueError(f"page {i}: expected shape (n, {EMBEDDING_DIM}), got {tuple(np.shape(page))}")
    lengths = [len(p) for p in pages]
    tensors = [torch.as_tensor(np.asarray(p)) if not isinstance(p, torch.Tensor) else p for p in pages]
    flat = torch.cat(tensors) if tensors else torch.zeros((0, EMBEDDING_DIM))
    return pack_flat(flat, lengths, device=device, dtype=dtype, pad_multiple=pad_multiple)


def pad_queries(
    queries: Sequence[np.ndarray | torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged queries into ``(n_queries, Lq, 128)``, zero vectors at the end.

    Zero query vectors add exactly 0 to every score (see the module doc), so no mask is
    needed on the query side. ``length`` fixes ``Lq`` (default: the longest query).

    Returns:
        ``(Q, lengths)``: ``Q`` of shape ``(n_queries, Lq, 128)``, ``lengths`` ``(n_queries,)``.
    """
    device = torch.device(device)
    dtype = dtype or default_compute_dtype(device)
    lengths = torch.tensor([len(q) for q in queries], dtype=torch.int64)
    lq = length if length is not None else (int(lengths.max()) if len(queries) else 1)
    lq = max(lq, 1)
    if len(queries) and int(lengths.max()) > lq:
        raise ValueError(f"a query has {int(lengths.max())} vectors, more than length={lq}")
    out = torch.zeros((len(queries), lq, EMBEDDING_DIM), dtype=torch.float32)
    host = out.numpy()
    for i, q in enumerate(queries):
        # numpy arrays copied by numpy: torch.as_tensor warned of every read-only one (a query
        # decoded from Parquet or sent through Ray's object store)
        t = q if isinstance(q, torch.Tensor) else np.asarray(q)
        if t.ndim != 2 or t.shape[1] != EMBEDDING_DIM:
            raise ValueError(f"query {i}: expected shape (n, {EMBEDDING_DIM}), got {tuple(t.shape)}")
        if isinstance(t, torch.Tensor):
            out[i, : len(t)] = t.float()
        else:
            host[i, : len(t)] = t
    return out.to(device=device, dtype=dtype), lengths


def triton_available() -> bool:
    """Whether the fused CUDA kernel can run here (Triton importable and a GPU visible)."""
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def pack_loaded(shard: LoadedShard, device: torch.device, backend: str) -> tuple[PackedPages, pa.Table, int]:
    """A :class:`~pipeline.score.corpus.LoadedShard` on ``device``, packed for ``backend``:
    ``(packed, meta of the kept pages, n_dropped)``. Pages without vectors are dropped
    (MaxSim is undefined for them) and counted; the float16 values are copied once."""
    keep = shard.lengths > 0
    dropped = int((~keep).sum())
    meta, lengths = shard.meta, shard.lengths
    if dropped:  # empty pages own no rows of flat: only the index changes
        log.warning("dropping %d page(s) with no vectors: %s", dropped,
                    meta.column(schema.PAGE_ID).filter(pa.array(~keep)).to_pylist()[:5])
        meta, lengths = meta.filter(pa.array(keep)), lengths[keep]
    use_kernel = device.type == "cuda" and (backend == "triton" or (backend == "auto" and triton_available()))
    flat_t = torch.from_numpy(shard.flat)
    packed = pack_flat(flat_t, lengths, device=device, pad_multiple=CUDA_PAD_MULTIPLE if use_kernel else None)
    return packed, meta, dropped
