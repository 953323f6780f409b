"""The corpus as shards for scoring: list, check metadata, plan, load, score one shard.

A shard is a contiguous run of rows of the embedding job's ``OUT/pages/*.parquet``
(file order, then row order), sized to one worker's memory. :class:`ShardScorer` loads
one shard onto its device once, sorts its pages by ``page_id`` (the tie order of the
top-k) and runs every query batch against it, returning the shard's exact top-k per
query. Plain Python: the job wraps it in Ray actors; tests call it directly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from pipeline import schema
from pipeline.score.merge import QUERY_INDEX
from pipeline.score.maxsim import (
    EMBEDDING_DIM,
    PackedPages,
    maxsim_scores,
    pack_flat,
    pad_queries,
    topk_desc,
    triton_available,
)
from pipeline.storage import open_filesystem

log = logging.getLogger(__name__)

PAGES_DIR = "pages"
# Metadata keys that must agree between the corpus files (and with the query side).
CHECKED_KEYS = (schema.META_MODEL, schema.META_QUERY_PROMPT, schema.META_MAX_VISUAL_TOKENS)
# Kernel block along page vectors: pages are padded to a multiple of it on CUDA.
CUDA_PAD_MULTIPLE = 64


class CorpusError(ValueError):
    """The corpus cannot be scored as given; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class CorpusFile:
    path: str  # inside the filesystem of the corpus URI
    num_rows: int


@dataclasses.dataclass
class Corpus:
    uri: str
    files: list[CorpusFile]
    metadata: dict[str, str]  # decoded key-value metadata (vdr.* keys), equal in every file

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """Rows ``[start, stop)`` of each listed file."""

    shard_id: int
    parts: tuple[tuple[str, int, int], ...]
    n_pages: int
    n_vectors: int


def _decode(meta: dict | None) -> dict[str, str]:
    return {k.decode(): v.decode("utf-8", "replace") for k, v in (meta or {}).items() if k.startswith(b"vdr.")}


def open_corpus(corpus_uri: str, endpoint_url: str | None = None) -> Corpus:
    """List ``CORPUS/pages/*.parquet`` (or ``CORPUS/*.parquet``) and read their metadata.

    Files whose vdr.* metadata disagree on model, query prompt or token budget are
    refused: their pages were embedded differently and must not be ranked together.
    """
    fs, root = open_filesystem(corpus_uri, endpoint_url)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise CorpusError(f"--corpus {corpus_uri} does not exist (check the path, bucket and endpoint)")
    if info.type == pafs.FileType.File:
        paths = [root]
    else:
        pages_dir = f"{root.rstrip('/')}/{PAGES_DIR}"
        folder = pages_dir if fs.get_file_info(pages_dir).type == pafs.FileType.Directory else root
        entries = fs.get_file_info(pafs.FileSelector(folder, recursive=False))
        paths = sorted(
            e.path for e in entries
            if e.type == pafs.FileType.File and e.base_name.endswith(".parquet")
            and not e.base_name.startswith((".", "_"))
        )
    files: list[CorpusFile] = []
    metadata: dict[str, str] | None = None
    first = None
    for path in paths:
        with fs.open_input_file(path) as f:
            md = pq.read_metadata(f)
        names = md.schema.to_arrow_schema().names
        missing = [c for c in (schema.PAGE_ID, schema.DOC_ID, schema.PAGE_NUMBER, schema.EMBEDDING) if c not in names]
        if missing:
            raise CorpusError(f"{path} lacks column(s) {missing}: not an embedding job's pages file")
        meta = _decode(md.metadata)
        if metadata is None:
            metadata, first = meta, path
        else:
            for key in (k.decode() for k in CHECKED_KEYS):
                if meta.get(key) != metadata.get(key):
                    raise CorpusError(
                        f"corpus files disagree on {key}: {first} has {metadata.get(key)!r}, {path} has "
                        f"{meta.get(key)!r}. Score each embedding run separately, or re-embed one of them."
                    )
        files.append(CorpusFile(path, md.num_rows))
    return Corpus(corpus_uri, files, metadata or {})


def check_compatibility(
    corpus: Corpus,
    *,
    model: str | None,
    query_prompt: str | None,
    max_visual_tokens: int | None,
    allow_mismatch: bool,
) -> list[str]:
    """Differences between the corpus's recorded settings and this run's; raises unless allowed.

    ``None`` means "not checked" (e.g. no model when query embeddings are reused).
    """
    meta = corpus.metadata
    problems = []
    if model is not None and meta.get(schema.META_MODEL.decode()) not in (None, model):
        problems.append(f"the corpus was embedded with model {meta[schema.META_MODEL.decode()]!r}, "
                        f"this run uses {model!r}")
    if query_prompt is not None and meta.get(schema.META_QUERY_PROMPT.decode()) not in (None, query_prompt):
        problems.append(f"the corpus records query prompt {meta[schema.META_QUERY_PROMPT.decode()]!r}, "
                        f"this code embeds queries as {query_prompt!r}")
    key = schema.META_MAX_VISUAL_TOKENS.decode()
    if max_visual_tokens is not None and meta.get(key) not in (None, str(max_visual_tokens)):
        problems.append(f"the corpus was embedded with a {meta[key]}-token visual budget, "
                        f"this run expects {max_visual_tokens}")
    if problems and not allow_mismatch:
        raise CorpusError(
            "; ".join(problems)
            + ". Scores across different models or settings are meaningless. Pass the corpus's own "
            "--model, or re-embed the corpus, or pass --allow-model-mismatch if you really mean it."
        )
    for p in problems:
        log.warning("allowed mismatch: %s", p)
    return problems


def read_vector_counts(corpus: Corpus, endpoint_url: str | None = None) -> list[np.ndarray]:
    """``n_vectors`` of every row, per file (a small column read; no embeddings)."""
    fs, _ = open_filesystem(corpus.uri, endpoint_url)
    counts = []
    for f in corpus.files:
        with fs.open_input_file(f.path) as fh:
            pf = pq.ParquetFile(fh)
            if schema.N_VECTORS in pf.schema_arrow.names:
                col = pf.read(columns=[schema.N_VECTORS]).column(0)
                counts.append(col.to_numpy().astype(np.int64))
            else:
                col = pf.read(columns=[schema.EMBEDDING]).column(0).combine_chunks()
                counts.append(np.diff(col.offsets.to_numpy()).astype(np.int64))
    return counts


def plan_shards(corpus: Corpus, counts: list[np.ndarray], pages_per_shard: int) -> list[ShardSpec]:
    """Contiguous shards of at most ``pages_per_shard`` rows, in file then row order."""
    if pages_per_shard < 1:
        raise ValueError(f"pages_per_shard must be >= 1, got {pages_per_shard}")
    shards: list[ShardSpec] = []
    parts: list[tuple[str, int, int]] = []
    n_pages = n_vectors = 0
    for f, c in zip(corpus.files, counts):
        start = 0
        while start < f.num_rows:
            take = min(f.num_rows - start, pages_per_shard - n_pages)
            parts.append((f.path, start, start + take))
            n_pages += take
            n_vectors += int(c[start : start + take].sum())
            start += take
            if n_pages == pages_per_shard:
                shards.append(ShardSpec(len(shards), tuple(parts), n_pages, n_vectors))
                parts, n_pages, n_vectors = [], 0, 0
    if parts:
        shards.append(ShardSpec(len(shards), tuple(parts), n_pages, n_vectors))
    return shards


def read_shard_table(spec: ShardSpec, corpus_uri: str, endpoint_url: str | None = None) -> pa.Table:
    """The shard's rows (page_id, doc_id, page_number, embedding), sorted by page_id."""
    fs, _ = open_filesystem(corpus_uri, endpoint_url)
    columns = [schema.PAGE_ID, schema.DOC_ID, schema.PAGE_NUMBER, schema.EMBEDDING]
    def read_part(part):
        path, start, stop = part
        with fs.open_input_file(path) as fh:
            pf = pq.ParquetFile(fh)
            # Read only the row groups that hold [start, stop).
            groups, first_row, row = [], None, 0
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if row + n > start and row < stop:
                    groups.append(g)
                    first_row = row if first_row is None else first_row
                row += n
            t = pf.read_row_groups(groups, columns=columns) if groups else pf.schema_arrow.empty_table().select(columns)
            return t.slice(start - (first_row or 0), stop - start)

    # Files are decoded in parallel (pyarrow releases the GIL): one thread decodes nested
    # float16 lists at ~20-100 M values/s, far below disk or network speed.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(len(spec.parts), os.cpu_count() or 1))) as pool:
        pieces = list(pool.map(read_part, spec.parts))
    table = pa.concat_tables(pieces) if pieces else pa.table({c: [] for c in columns})
    table = table.cast(pa.schema([pa.field(c, schema.PAGES_SCHEMA.field(c).type) for c in columns]))
    return table.take(pc.sort_indices(table, sort_keys=[(schema.PAGE_ID, "ascending")]))


def pack_shard_table(table: pa.Table, device: torch.device, backend: str) -> tuple[PackedPages, pa.Table, int]:
    """Arrow shard -> packed pages on ``device`` (one copy of the float16 values).

    Pages without vectors are dropped (MaxSim is undefined for them) and counted.
    Returns ``(packed, meta table of the kept pages, n_dropped)``.
    """
    emb = table.column(schema.EMBEDDING).combine_chunks()
    lengths = np.diff(emb.offsets.to_numpy()).astype(np.int64)
    keep = lengths > 0
    dropped = int((~keep).sum())
    if dropped:
        log.warning("dropping %d page(s) with no vectors: %s", dropped,
                    table.column(schema.PAGE_ID).filter(pa.array(~keep)).to_pylist()[:5])
        table = table.filter(pa.array(keep))
        emb = table.column(schema.EMBEDDING).combine_chunks()
        lengths = lengths[keep]
    flat = emb.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, EMBEDDING_DIM)
    # Without Triton on a CUDA node, "auto" falls back to the torch path (one common padded length).
    use_kernel = device.type == "cuda" and (backend == "triton" or (backend == "auto" and triton_available()))
    with warnings.catch_warnings():
        # Arrow buffers are read-only; the tensor is only read (copied to the device / gathered).
        warnings.simplefilter("ignore", UserWarning)
        flat_t = torch.from_numpy(np.ascontiguousarray(flat))
    packed = pack_flat(flat_t, lengths, device=device, pad_multiple=CUDA_PAD_MULTIPLE if use_kernel else None)
    return packed, table.drop_columns([schema.EMBEDDING]), dropped


class ShardScorer:
    """Scores every query against one shard at a time; the shard is loaded once.

    Args:
        corpus_uri, endpoint_url: where the shard files are.
        query_flat: ``(sum(query_lengths), 128)`` float16 query vectors (as stored).
        query_lengths: ``(n_queries,)`` vectors per query.
        k: results per query and shard.
        query_batch_size: queries per batch; 0 picks one from the shard size.
        device: ``"cuda"``, ``"cpu"`` or ``None`` (CUDA when this process sees a GPU).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :func:`pipeline.score.maxsim_scores`).
    """

    def __init__(self, corpus_uri: str, endpoint_url: str | None, query_flat: np.ndarray,
                 query_lengths: np.ndarray, k: int, query_batch_size: int = 0,
                 device: str | None = None, backend: str = "auto", cpu_threads: int | None = None):
        self.corpus_uri, self.endpoint_url = corpus_uri, endpoint_url
        self.k, self.query_batch_size, self.backend = k, query_batch_size, backend
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if cpu_threads and self.device.type == "cpu":
            torch.set_num_threads(cpu_threads)
        # Ray sets OMP_NUM_THREADS to the actor's CPU request (1 by default) and Arrow sizes
        # its decode pool from it, so a GPU actor would decode its shard on one core (seen on
        # an H200 node: 67 M values/s for 16 cores). Loading a shard is a short burst: use the node.
        decode_threads = cpu_threads if (cpu_threads and self.device.type == "cpu") else (os.cpu_count() or 1)
        pa.set_cpu_count(max(1, int(decode_threads)))
        offsets = np.zeros(len(query_lengths) + 1, dtype=np.int64)
        np.cumsum(query_lengths, out=offsets[1:])
        self.queries = [np.asarray(query_flat[offsets[i] : offsets[i + 1]]) for i in range(len(query_lengths))]
        log.info("ShardScorer on %s (%s), %d queries, k=%d", self.device,
                 torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                 len(self.queries), k)

    def memory_bytes(self) -> int:
        """Memory this worker can give a shard: free GPU memory, else available RAM."""
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free)
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except ImportError:  # pragma: no cover
            import os

            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))

    def _batch_size(self, n_pages: int) -> int:
        if self.query_batch_size:
            return self.query_batch_size
        if self.device.type == "cuda":
            # The kernel writes (pages x query vectors) float32 maxima: keep that under 4 GiB.
            longest = max((len(q) for q in self.queries), default=1)
            return int(max(1, min(8192, (1 << 30) // max(1, n_pages * longest))))
        return 256

    @torch.inference_mode()
    def score(self, spec: ShardSpec) -> tuple[pa.Table, dict]:
        """Exact top-k of every query within this shard: (candidates table, stats)."""
        t0 = time.perf_counter()
        table = read_shard_table(spec, self.corpus_uri, self.endpoint_url)
        t_read = time.perf_counter() - t0
        packed, meta, dropped = pack_shard_table(table, self.device, self.backend)
        del table
        t_load = time.perf_counter() - t0
        parts = []
        if packed.n_pages and self.queries:
            bs = self._batch_size(packed.n_pages)
            for s in range(0, len(self.queries), bs):
                Q, _ = pad_queries(self.queries[s : s + bs], device=self.device, dtype=packed.vectors.dtype)
                backend = self.backend if packed.padded_length is None else "torch"
                values, idx = topk_desc(maxsim_scores(Q, packed, backend=backend), self.k)
                nq, kk = values.shape
                rows = idx.reshape(-1).cpu().numpy()
                parts.append(pa.table({
                    QUERY_INDEX: pa.array(np.repeat(np.arange(s, s + nq, dtype=np.int64), kk)),
                    schema.SCORE: pa.array(values.reshape(-1).cpu().numpy().astype(np.float32)),
                }).append_column(schema.PAGE_ID, meta.column(schema.PAGE_ID).take(rows))
                  .append_column(schema.DOC_ID, meta.column(schema.DOC_ID).take(rows))
                  .append_column(schema.PAGE_NUMBER, meta.column(schema.PAGE_NUMBER).take(rows)))
        del packed
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        out = pa.concat_tables(parts) if parts else empty_candidates()
        stats = {"shard_id": spec.shard_id, "pages": spec.n_pages - dropped, "dropped_empty_pages": dropped,
                 "read_s": t_read, "load_s": t_load, "total_s": time.perf_counter() - t0,
                 "device": str(self.device)}
        return out, stats


def empty_candidates() -> pa.Table:
    return pa.table({
        QUERY_INDEX: pa.array([], pa.int64()), schema.SCORE: pa.array([], pa.float32()),
        schema.PAGE_ID: pa.array([], pa.string()), schema.DOC_ID: pa.array([], pa.string()),
        schema.PAGE_NUMBER: pa.array([], pa.int32()),
    })
