"""The corpus as shards for scoring: list, check metadata, plan, read and cache one shard.

A shard is a contiguous run of rows of the embedding job's ``OUT/pages/*.parquet``
(file order, then row order), sized to one worker's memory. :func:`load_shard` reads one
into host memory in page_id order; :mod:`pipeline.score.packing` puts it on a device and
:class:`~pipeline.score.scorer.ShardScorer` scores it. This module does not import
torch (only a page-locked buffer does, lazily), so the driver plans and a scoring actor
reads its first shard while torch is still importing (:mod:`pipeline.score.actor`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
import logging
import math
import time
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import schema
from pipeline import storage
from pipeline.storage import open_filesystem

log = logging.getLogger(__name__)

# Metadata keys that must agree between the corpus files (and with the query side).
CHECKED_KEYS = (schema.META_MODEL, schema.META_QUERY_PROMPT, schema.META_MAX_VISUAL_TOKENS)
# Kernel block along page vectors: pages are padded to a multiple of it on CUDA.
CUDA_PAD_MULTIPLE = 64
EMBEDDING_DIM = 128


class CorpusError(ValueError):
    """The corpus cannot be scored as given; the message says what to change."""


# What an embedding job's --output holds even when it embedded nothing yet (every document an
# error row): such a corpus scores as empty; a folder with none of these is not a corpus.
EMBED_OUTPUT_MARKERS = ("summary.json", "config.json", "errors")


@dataclasses.dataclass(frozen=True)
class CorpusFile:
    path: str  # inside the filesystem of the corpus URI
    num_rows: int


@dataclasses.dataclass
class Corpus:
    uri: str
    files: list[CorpusFile]
    metadata: dict[str, str]  # decoded key-value metadata (vdr.* keys), equal in every file
    # pool factor (vdr.pool_factor; absent = 1, unpooled) -> files: more than one key is a mix,
    # refused by check_compatibility unless allowed
    pool_factors: dict[int, int] = dataclasses.field(default_factory=dict)
    # path -> Parquet footer, as read by open_corpus (so planning does not read them again)
    footers: dict[str, pq.FileMetaData] = dataclasses.field(default_factory=dict, repr=False)
    # precision the pages were embedded in (vdr.dtype; absent = "unrecorded") -> files: more
    # than one key is a mix, refused by check_compatibility unless allowed
    dtypes: dict[str, int] = dataclasses.field(default_factory=dict)
    # matmul precision (vdr.precision: "default" or "fp8"; absent = "default") -> files: a mix
    # is refused like a dtype mix
    precisions: dict[str, int] = dataclasses.field(default_factory=dict)

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


def open_corpus(corpus_uri: str, endpoint_url: str | None = None, generation: int | None = None) -> Corpus:
    """List ``CORPUS/pages/*.parquet`` (or ``CORPUS/*.parquet``) and read their metadata.
    Of an output with several generations (``--force-new-config``), only ``generation``'s
    pages are read: by default the current one (``CORPUS/generation.json``).

    Files whose vdr.* metadata disagree on model, query prompt or token budget are
    refused: their pages were embedded differently and must not be ranked together. Their
    pool factors are counted (:attr:`Corpus.pool_factors`); a mix is for
    :func:`check_compatibility` to refuse.
    """
    fs, root = open_filesystem(corpus_uri, endpoint_url)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise CorpusError(f"--corpus {corpus_uri} does not exist (check the path, bucket and endpoint)")
    if generation is not None and (info.type == pafs.FileType.File
                                   or corpus_uri.rstrip("/").endswith("/" + schema.PAGES_DIR)):
        raise CorpusError(f"--generation {generation} needs the embedding output folder as --corpus, not "
                          f"{corpus_uri} (its pages folder or one of its files)")
    if info.type == pafs.FileType.File:
        paths = [root]
    else:
        pages_dir = storage.corpus_pages_folder(corpus_uri, endpoint_url, generation)
        has_pages = storage.exists(pages_dir, endpoint_url)
        if (generation is not None and generation > 1 and not has_pages and not storage.exists(
                storage.join_uri(schema.generation_root(corpus_uri, generation), schema.CONFIG_FILE), endpoint_url)):
            # a generation asked for by number must exist (else the corpus root's files were read)
            raise CorpusError(f"--corpus {corpus_uri} has no generation {generation} (no {pages_dir}); its current "
                              f"one is {storage.current_generation(corpus_uri, endpoint_url)}")
        folder = pages_dir if has_pages else corpus_uri
        _, infos = storage.list_files(folder, endpoint_url)
        paths = [i.path for i in infos]
        if not has_pages and not paths and not any(
                storage.exists(storage.join_uri(corpus_uri, name), endpoint_url) for name in EMBED_OUTPUT_MARKERS):
            raise CorpusError(
                f"--corpus {corpus_uri} holds no pages/*.parquet, no *.parquet and no embedding summary: "
                "--corpus takes the --output folder of jobs.embed_corpus (or one pages Parquet file), not the "
                "documents")
    files: list[CorpusFile] = []
    metadata: dict[str, str] | None = None
    first = None
    pool_factors: dict[int, int] = {}
    dtypes: dict[str, int] = {}
    precisions: dict[str, int] = {}
    footers = dict(zip(paths, storage.read_footers(fs, paths)))
    for path, md in footers.items():
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
        factor = pool_factor_of(meta, path)
        pool_factors[factor] = pool_factors.get(factor, 0) + 1
        dtype = meta.get(schema.META_DTYPE.decode(), UNRECORDED_DTYPE)
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
        precision = meta.get(schema.META_PRECISION.decode(), "default")
        precisions[precision] = precisions.get(precision, 0) + 1
        files.append(CorpusFile(path, md.num_rows))
    return Corpus(corpus_uri, files, metadata or {}, pool_factors, footers=footers, dtypes=dtypes,
                  precisions=precisions)


UNRECORDED_DTYPE = "unrecorded"


def corpus_precision(corpus: Corpus) -> str | list[str] | None:
    """The corpus's embedding precision for the summary: one name, or the sorted names of a mix."""
    names = sorted({d for key in corpus.dtypes for d in key.split(",")})
    return names[0] if len(names) == 1 else (names or None)


def pool_factor_of(meta: dict[str, str], path: str = "") -> int:
    """A file's pool factor from its decoded metadata: 1 when it records none (unpooled)."""
    value = meta.get(schema.META_POOL_FACTOR.decode(), "1")
    try:
        return int(value)
    except ValueError:
        raise CorpusError(f"{path} records pool factor {value!r}, not an integer") from None


def check_compatibility(
    corpus: Corpus,
    *,
    model: str | None,
    query_prompt: str | None,
    max_visual_tokens: int | None,
    allow_mismatch: bool,
    queries_from: str | None = None,
) -> list[str]:
    """Differences between the corpus's recorded settings and this run's; raises unless allowed.

    ``None`` means "not checked" (e.g. a reused query-embeddings file that records no model).
    ``queries_from`` names the reused query-embeddings file whose model and prompt are checked
    (the messages then name it, not this run's settings).
    """
    meta = corpus.metadata
    problems = []
    if model is not None and meta.get(schema.META_MODEL.decode()) not in (None, model):
        uses = f"the query embeddings at {queries_from} were made with" if queries_from else "this run uses"
        problems.append(f"the corpus was embedded with model {meta[schema.META_MODEL.decode()]!r}, {uses} {model!r}")
    if query_prompt is not None and meta.get(schema.META_QUERY_PROMPT.decode()) not in (None, query_prompt):
        embeds = (f"the query embeddings at {queries_from} were made with" if queries_from
                  else "this code embeds queries as")
        problems.append(f"the corpus records query prompt {meta[schema.META_QUERY_PROMPT.decode()]!r}, "
                        f"{embeds} {query_prompt!r}")
    key = schema.META_MAX_VISUAL_TOKENS.decode()
    if max_visual_tokens is not None and meta.get(key) not in (None, str(max_visual_tokens)):
        problems.append(f"the corpus was embedded with a {meta[key]}-token visual budget, "
                        f"this run expects {max_visual_tokens} (pass --max-visual-tokens {meta[key]}, or none)")
    if len(corpus.pool_factors) > 1:
        mix = ", ".join(f"{n} file(s) at pool factor {f}" for f, n in sorted(corpus.pool_factors.items()))
        problems.append(f"the corpus mixes pooled and unpooled pages ({mix}; factor 1 = unpooled): pooled pages "
                        "are scored against cluster centroids, unpooled ones against every token, so their "
                        "scores are not on one scale. Re-embed one part with the other --pool-factor")
    if len({d for key in corpus.dtypes for d in key.split(",")}) > 1:
        mix = ", ".join(f"{n} file(s) in {d}" for d, n in sorted(corpus.dtypes.items()))
        problems.append(f"the corpus mixes embedding precisions (vdr.dtype: {mix}): the same page embedded in "
                        "bfloat16 and in float32 gets different vectors, so scores from the two parts are not "
                        "strictly comparable. Re-embed one part with the other --dtype")
    if len(corpus.precisions) > 1:
        mix = ", ".join(f"{n} file(s) at precision {p}" for p, n in sorted(corpus.precisions.items()))
        problems.append(f"the corpus mixes matmul precisions (vdr.precision: {mix}): FP8 pages get vectors "
                        "that differ from bf16 ones by more than rounding, so their scores are not on one "
                        "scale. Re-embed one part with the other --precision")
    if problems and not allow_mismatch:
        raise CorpusError(
            "; ".join(problems)
            + ". Scores across different models or settings are meaningless. Pass the corpus's own "
            "settings, or re-embed the corpus, or pass --allow-model-mismatch if you really mean it."
        )
    for p in problems:
        log.warning("allowed mismatch: %s", p)
    return problems


def auto_pages_per_shard(
    mean_vectors_per_page: float,
    memory_bytes: int,
    *,
    dtype_bytes: int,
    fraction: float = 0.5,
) -> int:
    """Pages that fit in ``fraction`` of ``memory_bytes`` as packed operands (at least 1)."""
    per_page = max(1.0, mean_vectors_per_page) * EMBEDDING_DIM * dtype_bytes * 1.15  # + padding
    return max(1, int(math.floor(memory_bytes * fraction / per_page)))


def read_vector_counts(corpus: Corpus, endpoint_url: str | None = None) -> list[np.ndarray]:
    """``n_vectors`` of every row, per file (a small column read; no embeddings)."""
    fs, _ = open_filesystem(corpus.uri, endpoint_url)
    counts = []
    for f in corpus.files:
        with fs.open_input_file(f.path) as fh:
            pf = pq.ParquetFile(fh, metadata=corpus.footers.get(f.path))
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


# ----------------------------------------------------------------------------- shard loading
#
# A shard is loaded in two timed steps: *read* pulls the bytes of the row groups it needs
# (and the footer) into host memory at storage speed, *decode* turns them into one
# contiguous ``(n_vectors, 128)`` float16 array in page_id order. Optionally the decoded
# shard is kept beside the corpus as a page-major cache (raw float16 + a small index):
# read back at storage speed with no decode. The Parquet files stay the only source of
# truth: a cache that is missing, stale (other file names, sizes or row ranges: another
# key) or damaged is rebuilt from them.

CACHE_FOLDER = "_cache"  # hidden from corpus listings (names starting with "_")
CACHE_VERSION = "1"
_CHECK_BYTES = 1 << 20  # crc32 of the cache file's first and last MiB, in its index


@dataclass(eq=False)
class LoadedShard:
    """A shard in host memory: ``meta`` (page_id, doc_id, page_number, in page_id order),
    ``flat`` ``(sum(lengths), 128)`` float16 values page after page, ``lengths`` per page,
    ``stats`` the seconds it took (``read_s``, ``decode_s``, ``cache_write_s``) and its source."""

    meta: pa.Table
    flat: np.ndarray
    lengths: np.ndarray
    stats: dict


def cache_uri_of(corpus_uri: str, endpoint_url: str | None = None) -> str:
    """Where the page-major cache of a corpus lives: ``CORPUS/_cache`` (beside a single file)."""
    fs, path = open_filesystem(corpus_uri, endpoint_url)
    if fs.get_file_info(path).type == pafs.FileType.File:
        return storage.join_uri(corpus_uri.rsplit("/", 1)[0], CACHE_FOLDER)
    return storage.join_uri(corpus_uri, CACHE_FOLDER)


def shard_cache_key(spec: ShardSpec, sizes: dict[str, int]) -> str:
    """Names, sizes and row ranges of the shard's files: a changed file gives another key."""
    import hashlib
    import json

    parts = [(os.path.basename(p), sizes[p], a, b) for p, a, b in spec.parts]
    return hashlib.sha1(json.dumps([CACHE_VERSION, parts]).encode()).hexdigest()[:20]


def _crc_ends(raw: np.ndarray) -> str:
    import zlib

    b = raw.reshape(-1).view(np.uint8)
    return f"{zlib.crc32(b[:_CHECK_BYTES]):08x}{zlib.crc32(b[-_CHECK_BYTES:]):08x}"


def _row_group_ranges(md: pq.FileMetaData, groups: list[int]) -> list[tuple[int, int]]:
    out = []
    for g in groups:
        rg = md.row_group(g)
        starts, stops = [], []
        for c in range(rg.num_columns):
            col = rg.column(c)
            start = col.data_page_offset
            if col.has_dictionary_page and col.dictionary_page_offset is not None:
                start = min(start, col.dictionary_page_offset)
            starts.append(start)
            stops.append(start + col.total_compressed_size)
        out.append((min(starts), max(stops)))
    # merge adjacent ranges: one read per run of row groups
    merged: list[list[int]] = []
    for a, b in sorted(out):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def set_decode_threads(cpu_threads: int | None, on_gpu: bool) -> None:
    """Arrow's thread count for decoding shards in this process. Ray sets OMP_NUM_THREADS to
    an actor's CPU request (1 by default) and Arrow sizes its decode pool from it, so a GPU
    actor would decode its shard on one core (seen on an H200 node: 67 M values/s for 16
    cores). Loading a shard is a short burst: a GPU actor uses the node, a CPU actor the
    ``cpu_threads`` it asked for. ``PIPELINE_SCORER_DECODE_THREADS`` sets a GPU actor's count
    (a node shared with other work)."""
    threads = cpu_threads if (cpu_threads and not on_gpu) else (os.cpu_count() or 1)
    if on_gpu and os.environ.get("PIPELINE_SCORER_DECODE_THREADS"):
        raw = os.environ["PIPELINE_SCORER_DECODE_THREADS"]
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"PIPELINE_SCORER_DECODE_THREADS must be a whole number >= 1, got {raw!r}")
        threads = int(raw)
    pa.set_cpu_count(max(1, int(threads)))


def _host_array(n_vectors: int, pinned) -> np.ndarray:
    """``(n_vectors, 128)`` float16 host memory; page-locked when ``pinned`` (a GPU worker:
    the copy to the device is then one DMA at full PCIe speed, no staging copy). ``pinned``
    may be a function that says so when called (a scoring actor that is still importing
    torch: the read goes on meanwhile, and only the buffer waits)."""
    if callable(pinned):
        pinned = pinned()
    if pinned:
        import torch

        return torch.empty((n_vectors, EMBEDDING_DIM), dtype=torch.float16, pin_memory=True).numpy()
    return np.empty((n_vectors, EMBEDDING_DIM), np.float16)


def _timed_host_array(n_vectors: int, pinned) -> tuple[np.ndarray, float]:
    if callable(pinned):  # the wait for the answer is not the allocation's time
        pinned = pinned()
    t = time.perf_counter()
    return _host_array(n_vectors, pinned), time.perf_counter() - t


def _decode_row_groups(buffers: list, plans: list, columns: list[str]) -> list[pa.Table]:
    """Decode every needed row group of every file, in parallel threads (pyarrow releases the
    GIL; one row group's nested float16 lists decode at ~0.1 GB/s on one core, measured on the
    H200 host, so a shard decoded file after file ran at that speed), then each file's rows
    ``[offset, offset + n)`` in order."""
    from concurrent.futures import ThreadPoolExecutor

    tasks = [(i, g) for i, (_, groups, _, _) in enumerate(plans) for g in groups]

    def open_file(i):  # one reader per task: a ParquetFile is not shared between threads
        return pq.ParquetFile(pa.BufferReader(pa.py_buffer(buffers[i])), metadata=plans[i][0])

    def one(task):
        i, g = task
        return open_file(i).read_row_group(g, columns=columns, use_threads=False)

    # Arrow's CPU count: the scorer sets it to the node's cores on GPU actors and to
    # --cpus-per-actor's threads on CPU actors
    workers = max(1, min(len(tasks), pa.cpu_count(), 32))
    with ThreadPoolExecutor(workers) as pool:
        decoded = iter(pool.map(one, tasks))
    pieces = []
    for i, (md, groups, offset, n) in enumerate(plans):
        if groups:
            t = pa.concat_tables([next(decoded) for _ in groups])
        else:
            t = open_file(i).schema_arrow.empty_table().select(columns)
        pieces.append(t.slice(offset, n))
    return pieces


GATHER_PIECE_VECTORS = 1 << 18  # 64 MiB of float16 vectors: the unit of work of one copy thread


def _gather_pages(parts: list[np.ndarray], part_of: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                  out: np.ndarray, threads: int | None = None) -> None:
    """``out`` = page after page, page ``i`` being ``parts[part_of[i]][starts[i] : starts[i] + lengths[i]]``.

    Straight from Arrow's decoded chunks, with no concatenated copy of them first, as block
    copies of runs of pages that are consecutive in their chunk too (a sorted file is one run:
    ``np.take`` over row indices moved 0.2 GB/s on this project's CPU machine), cut into
    64 MiB pieces that up to ``threads`` threads copy at once (numpy releases the GIL for
    large copies). Threads: by default Arrow's CPU count, which the scorer sets to the node's
    cores on GPU actors and to --cpus-per-actor's on CPU actors, at most 8."""
    n = len(lengths)
    if n == 0:
        return
    ends = starts + lengths
    # a run breaks where a page is in another chunk, or does not start where the previous ended
    breaks = np.flatnonzero((part_of[1:] != part_of[:-1]) | (starts[1:] != ends[:-1])) + 1
    run_first = np.concatenate([[0], breaks]).astype(np.int64)
    run_last = np.concatenate([breaks, [n]]).astype(np.int64)
    pieces, dst = [], 0
    for a, b in zip(run_first.tolist(), run_last.tolist()):
        src, src0, src1 = parts[int(part_of[a])], int(starts[a]), int(ends[b - 1])
        for p0 in range(src0, src1, GATHER_PIECE_VECTORS):
            p1 = min(src1, p0 + GATHER_PIECE_VECTORS)
            pieces.append((src, p0, p1, dst))
            dst += p1 - p0

    def copy(piece):
        src, p0, p1, d = piece
        out[d : d + p1 - p0] = src[p0:p1]

    workers = max(1, min(threads or min(pa.cpu_count(), storage.READ_THREADS), len(pieces)))
    if workers == 1:
        for piece in pieces:
            copy(piece)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="gather-pages") as pool:
        list(pool.map(copy, pieces))


def _read_parquet_shard(spec: ShardSpec, corpus_uri: str, endpoint_url: str | None,
                        footers: dict | None = None, pinned=False) -> LoadedShard:
    fs, _ = open_filesystem(corpus_uri, endpoint_url)
    columns = [schema.PAGE_ID, schema.DOC_ID, schema.PAGE_NUMBER, schema.EMBEDDING]
    footers = footers if footers is not None else {}
    t0 = time.perf_counter()
    # The host buffer the pages end in is allocated on a thread while the shard is read and
    # decoded: allocating 3.5 GB of page-locked memory took 2.0-2.4 s on the H200 host (in a run
    # beside another job; RESULTS "Fifth session"), about as long as reading and decoding the
    # shard; torch releases the GIL while it allocates.
    from concurrent.futures import ThreadPoolExecutor

    alloc_pool = ThreadPoolExecutor(1, thread_name_prefix="shard-host-alloc")
    alloc = alloc_pool.submit(_timed_host_array, spec.n_vectors, pinned)
    alloc_pool.shutdown(wait=False)
    buffers, plans, nbytes = [], [], 0
    for path, start, stop in spec.parts:
        if path not in footers:
            with fs.open_input_file(path) as fh:
                footers[path] = (fh.size(), pq.read_metadata(fh))
        size, md = footers[path]
        groups, first_row, row = [], None, 0
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            if row + n > start and row < stop:
                groups.append(g)
                first_row = row if first_row is None else first_row
            row += n
        # A file-sized zeroed buffer (calloc: pages never written are never resident) with
        # the needed row groups at their own offsets, so the footer's offsets hold as is.
        buf = np.zeros(size, np.uint8)
        nbytes += storage.read_ranges_into(fs, path, _row_group_ranges(md, groups), buf)
        buffers.append(buf)
        plans.append((md, groups, start - (first_row or 0), stop - start))
    t_read = time.perf_counter() - t0

    t0 = time.perf_counter()
    pieces = _decode_row_groups(buffers, plans, columns)
    del buffers
    table = pa.concat_tables(pieces) if pieces else pa.table({c: [] for c in columns})
    del pieces
    table = table.cast(pa.schema([pa.field(c, schema.PAGES_SCHEMA.field(c).type) for c in columns]))
    emb = table.column(schema.EMBEDDING)
    offsets = [c.offsets.to_numpy().astype(np.int64) for c in emb.chunks]
    lengths = np.concatenate([np.diff(o) for o in offsets] or [np.zeros(0, np.int64)])
    flat_parts = [c.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, EMBEDDING_DIM) for c in emb.chunks]
    # each page's chunk, and where its vectors start within that chunk (flatten() of a sliced
    # chunk starts at its first offset). Straight from each chunk's own offsets: a chunk may be
    # empty, the last one too (a part of no rows), and have no first page to look up.
    part_of = np.repeat(np.arange(len(emb.chunks), dtype=np.int64), [len(c) for c in emb.chunks])
    src_start = np.concatenate([o[:-1] - o[0] for o in offsets if len(o)] or [np.zeros(0, np.int64)])
    order = pc.sort_indices(table, sort_keys=[(schema.PAGE_ID, "ascending")]).to_numpy()
    meta = table.select([schema.PAGE_ID, schema.DOC_ID, schema.PAGE_NUMBER]).take(order)
    del table, emb
    t_parquet = time.perf_counter() - t0
    # Gather the vectors page by page in page_id order into one contiguous array.
    lengths = lengths[order]
    total = int(lengths.sum())
    t1 = time.perf_counter()
    flat, t_alloc = alloc.result()
    if len(flat) != total:  # the footers disagree with the plan's counts: allocate again
        flat, t_alloc = _timed_host_array(total, pinned)
    t_alloc_wait = time.perf_counter() - t1
    t1 = time.perf_counter()
    _gather_pages(flat_parts, part_of[order], src_start[order], lengths, flat)
    t_gather = time.perf_counter() - t1
    del flat_parts
    t_decode = time.perf_counter() - t0
    return LoadedShard(meta, flat, lengths, {"read_s": t_read, "decode_s": t_decode, "bytes_read": nbytes,
                                             "source": "parquet", "parquet_decode_s": t_parquet,
                                             "host_alloc_s": t_alloc, "host_alloc_wait_s": t_alloc_wait,
                                             "gather_s": t_gather})


def _read_cache(key: str, cache_uri: str, endpoint_url: str | None, pinned=False) -> LoadedShard | None:
    """The cached shard, or None when it is missing or does not check out."""
    raw_uri = storage.join_uri(cache_uri, f"shard-{key}.f16")
    idx_uri = storage.join_uri(cache_uri, f"shard-{key}.idx.parquet")
    t0 = time.perf_counter()
    try:
        if not storage.exists(idx_uri, endpoint_url):
            return None
        idx = storage.read_parquet(idx_uri, endpoint_url)
        info = {k.decode(): v.decode() for k, v in (idx.schema.metadata or {}).items()}
        lengths = idx.column(schema.N_VECTORS).to_numpy().astype(np.int64)
        want = int(lengths.sum()) * EMBEDDING_DIM * 2
        size = storage.file_size(raw_uri, endpoint_url)
        if info.get("vdr.cache.version") != CACHE_VERSION or size != want or int(info.get("vdr.cache.bytes", -1)) != want:
            log.warning("page cache %s is stale or damaged (%s bytes, expected %d); rebuilding it", raw_uri, size, want)
            return None
        if callable(pinned):  # the wait for the answer (the scorer's start) is not the allocation's time
            pinned = pinned()
        t1 = time.perf_counter()
        flat = _host_array(int(lengths.sum()), pinned)
        t_alloc = time.perf_counter() - t1
        fs, path = open_filesystem(raw_uri, endpoint_url)
        storage.read_ranges_into(fs, path, [(0, want)] if want else [], flat.reshape(-1).view(np.uint8))
        if want and _crc_ends(flat) != info.get("vdr.cache.crc_ends"):
            log.warning("page cache %s fails its checksum; rebuilding it", raw_uri)
            return None
    except (OSError, ValueError, pa.ArrowException) as exc:
        log.warning("page cache %s unreadable (%s); rebuilding it", raw_uri, exc)
        return None
    meta = idx.select([schema.PAGE_ID, schema.DOC_ID, schema.PAGE_NUMBER])
    return LoadedShard(meta, flat, lengths, {"read_s": time.perf_counter() - t0, "decode_s": 0.0,
                                             "bytes_read": want, "source": "cache", "host_alloc_s": t_alloc})


def _write_cache(key: str, cache_uri: str, endpoint_url: str | None, shard: LoadedShard) -> None:
    raw_uri = storage.join_uri(cache_uri, f"shard-{key}.f16")
    idx_uri = storage.join_uri(cache_uri, f"shard-{key}.idx.parquet")
    nbytes = shard.flat.nbytes
    idx = shard.meta.append_column(schema.N_VECTORS, pa.array(shard.lengths, pa.int32()))
    # The values first, then the index that names their size and checksum: a reader that
    # finds the index finds whole values (or a mismatch, and rebuilds).
    storage.write_buffers_atomic(raw_uri, [shard.flat], endpoint_url)
    storage.write_parquet(idx_uri, idx, endpoint_url, metadata={
        b"vdr.cache.version": CACHE_VERSION.encode(), b"vdr.cache.bytes": str(nbytes).encode(),
        b"vdr.cache.crc_ends": (_crc_ends(shard.flat) if nbytes else "").encode()})


def load_shard(spec: ShardSpec, corpus_uri: str, endpoint_url: str | None = None, *,
               cache_uri: str | None = None, footers: dict | None = None,
               pinned: bool | Callable[[], bool] = False) -> LoadedShard:
    """The shard's pages in host memory, sorted by page_id (see :class:`LoadedShard`).

    ``cache_uri``: read the page-major cache there when it is valid, else read the Parquet
    files and (re)write it. ``footers``: a dict that keeps the files' footers between calls.
    ``pinned``: decode into page-locked memory (GPU workers); or a function that says so when
    the buffer is allocated (see :func:`_host_array`).
    """
    if cache_uri is None:
        return _read_parquet_shard(spec, corpus_uri, endpoint_url, footers, pinned)
    fs, _ = open_filesystem(corpus_uri, endpoint_url)
    sizes = {p: fs.get_file_info(p).size for p, _, _ in spec.parts}
    key = shard_cache_key(spec, sizes)
    cached = _read_cache(key, cache_uri, endpoint_url, pinned)
    if cached is not None:
        return cached
    shard = _read_parquet_shard(spec, corpus_uri, endpoint_url, footers, pinned)
    t0 = time.perf_counter()
    try:
        _write_cache(key, cache_uri, endpoint_url, shard)
    except (OSError, pa.ArrowException) as exc:  # a read-only corpus: score without a cache
        log.warning("cannot write the page cache under %s: %s", cache_uri, exc)
    shard.stats["cache_write_s"] = time.perf_counter() - t0
    shard.stats["source"] = "parquet, cache written"
    return shard
