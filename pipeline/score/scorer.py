"""One scoring worker: :class:`ShardScorer` loads one shard onto its device once, sorts its
pages by ``page_id`` (the tie order of the top-k) and runs every query batch against it,
returning the shard's exact top-k per query. Plain Python: the scoring flow places it as a
Ray actor; tests call it directly.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pyarrow as pa
import torch

from pipeline import schema
from pipeline.cluster import available_host_bytes
from pipeline.score.corpus import CUDA_PAD_MULTIPLE, LoadedShard, ShardSpec, load_shard, set_decode_threads
from pipeline.score.packing import (  # noqa: F401  (triton_available: re-exported)
    PackedPages,
    pack_flat,
    pack_loaded,
    pad_queries,
    triton_available,
)
from pipeline.score.fp8 import Fp8Pages, fp8_topk
from pipeline.score.maxsim import maxsim_scores, topk_desc
from pipeline.score.merge import QUERY_INDEX, empty_candidates  # noqa: F401  (empty_candidates: re-exported)

log = logging.getLogger(__name__)

WARM_UP_TIMEOUT_S = 300  # a hung compile must not hold the first shard forever


def _uses_triton(pages: PackedPages, backend: str) -> bool:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    return backend == "triton" or (backend == "auto" and pages.device.type == "cuda" and pages.padded_length is None)


def score_batch(Q: torch.Tensor, pages: PackedPages, backend: str = "auto") -> torch.Tensor:
    """``(n_queries, n_pages)`` float32 MaxSim: the fused Triton kernel where it can run
    (``backend`` "triton", or "auto" on CUDA with pages packed for it), else torch."""
    if _uses_triton(pages, backend) and pages.n_pages and Q.shape[0]:
        from pipeline.score.triton_kernel import maxsim_scores_triton

        return maxsim_scores_triton(Q, pages)
    return maxsim_scores(Q, pages)


def exact_subset(pages: PackedPages, backend: str = "auto"):
    """For fp8.fp8_topk: the exact scores of a list of pages in place, where
    :func:`score_batch` runs the Triton kernel on ``pages`` (None elsewhere: the pages are
    copied and scored by ``score_batch``)."""
    if not _uses_triton(pages, backend):
        return None
    from pipeline.score.triton_kernel import maxsim_scores_triton

    return lambda q, p, index: maxsim_scores_triton(q, p, page_index=index)


# Page-locked host buffers from malloc + cudaHostRegister on 8 threads instead of one
# cudaHostAlloc: a shard's 3.5 GB buffer took 1.9 s with cudaHostAlloc and 0.48-0.53 s
# registered (H200 host, 2026-12-04, bench_score_job.py --cache, benchmarks/RESULTS.md).
PINNED_HOST_REGISTER = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"


def use_registered_pinned_memory(environ=os.environ) -> str | None:
    """Make this process's pinned host memory registered malloc memory (torch's allocator
    settings, ``PINNED_HOST_REGISTER``), unless the user's ``PYTORCH_CUDA_ALLOC_CONF`` /
    ``PYTORCH_ALLOC_CONF`` already chooses. Call before the process first uses CUDA (the
    environment is read then); the settings are also applied to a running allocator, with
    the user's own (torch resets max_split_size_mb, roundup_power2_divisions and
    garbage_collection_threshold to their defaults where a settings string leaves them out).
    Returns the settings applied, or None when the user's stand."""
    user = ",".join(filter(None, (environ.get("PYTORCH_CUDA_ALLOC_CONF"), environ.get("PYTORCH_ALLOC_CONF"))))
    if "pinned_use_cuda_host_register" in user:
        return None
    key = "PYTORCH_ALLOC_CONF" if environ.get("PYTORCH_ALLOC_CONF") else "PYTORCH_CUDA_ALLOC_CONF"
    settings = environ[key] = ",".join(filter(None, (environ.get(key), PINNED_HOST_REGISTER)))
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    try:
        if setter is not None:
            setter(settings)
        else:
            torch.cuda.memory._set_allocator_settings(settings)
    except Exception as exc:  # an older torch without these keys: plain cudaHostAlloc, slower, correct
        log.warning("could not set %s (%s): pinned buffers use cudaHostAlloc", PINNED_HOST_REGISTER, exc)
    return PINNED_HOST_REGISTER


class ShardScorer:
    """Scores every query against one shard at a time; the shard is loaded once.

    Args:
        corpus_uri, endpoint_url: where the shard files are.
        query_flat: ``(sum(query_lengths), 128)`` float16 query vectors (as stored).
        query_lengths: ``(n_queries,)`` vectors per query.
        k: results per query and shard.
        query_batch_size: queries per batch; 0 picks one from the shard size.
        device: ``"cuda"``, ``"cpu"`` or ``None`` (CUDA when this process sees a GPU).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :func:`score_batch`).
        cache_uri: keep and read the page-major cache of each shard there (see
            :func:`pipeline.score.corpus.load_shard`); None reads Parquet only.
        precision: ``"exact"``, or ``"fp8-exact-topk"`` (:mod:`pipeline.score.fp8`: FP8
            candidates, exact re-scoring; the same top-k, and stats on the re-scored pages).

    :meth:`score` takes the shard to score and, optionally, the shard this worker will be
    given next: that one is read and decoded by a background thread while this one scores
    (reading releases the GIL), so a worker holds at most two shards in host memory.
    """

    def __init__(self, corpus_uri: str, endpoint_url: str | None, query_flat: np.ndarray,
                 query_lengths: np.ndarray, k: int, query_batch_size: int = 0,
                 device: str | None = None, backend: str = "auto", cpu_threads: int | None = None,
                 cache_uri: str | None = None, precision: str = "exact"):
        self.t_init = time.time()
        self.corpus_uri, self.endpoint_url, self.cache_uri = corpus_uri, endpoint_url, cache_uri
        self._footers: dict = {}
        # (spec, Future of LoadedShard, how it started: "prefetch" beside the previous shard,
        # "start" while this scorer was being built: pipeline.score.actor)
        self._next: tuple[ShardSpec, object, str] | None = None
        self._reader = None
        self.precision = precision
        self.k, self.query_batch_size, self.backend = k, query_batch_size, backend
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda":
            use_registered_pinned_memory()
        if cpu_threads and self.device.type == "cpu":
            torch.set_num_threads(cpu_threads)
        set_decode_threads(cpu_threads, on_gpu=self.device.type == "cuda")
        self.set_queries(query_flat, query_lengths, k, query_batch_size)
        log.info("ShardScorer on %s (%s), %d queries, k=%d", self.device,
                 torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                 len(self.queries), k)
        # The scoring path's first use on this device runs now, on a small made-up shard, while
        # the first real shard is read: on a GPU the first call of a new process pays for lazily
        # loaded kernels and the Triton kernel's compile (or its disk-cache load), measured as
        # ~0.8 s of the 20k x 1,000 job's 0.95 s of scoring on an H200 (RESULTS.md).
        self.warm_up_s: float | None = None
        self.warmed_up: list[str] = []  # the scoring paths the warm-up ran
        self._warm, self._warm_reported = None, False
        if self.queries:
            import threading

            self._warm = threading.Thread(target=self._warm_up, name="scorer-warm-up", daemon=True)
            self._warm.start()

    @property
    def _quant_backend(self) -> str | None:
        """FP8 quantization (of the shard and of the queries): ``--backend torch`` keeps Triton
        out of it too, the flag being the way around a Triton that fails here; else the default."""
        return "torch" if self.backend == "torch" else None

    def set_queries(self, query_flat: np.ndarray, query_lengths: np.ndarray, k: int, query_batch_size: int = 0) -> None:
        """The queries (and k, batch size) every later :meth:`score` call runs: a scorer kept
        between jobs (``--keep-scorers``) is given each job's own."""
        offsets = np.zeros(len(query_lengths) + 1, dtype=np.int64)
        np.cumsum(query_lengths, out=offsets[1:])
        self.queries = [np.asarray(query_flat[offsets[i] : offsets[i + 1]]) for i in range(len(query_lengths))]
        self.k, self.query_batch_size = k, query_batch_size

    def _warm_up(self) -> None:
        t = time.perf_counter()
        try:
            with torch.inference_mode():
                use_kernel = self.device.type == "cuda" and (
                    self.backend == "triton" or (self.backend == "auto" and triton_available()))
                # 17 pages (a page count that is neither 1 nor a multiple of 16, like most
                # shards: Triton specializes on both) of two pad blocks each.
                n, rows = 17, 2 * CUDA_PAD_MULTIPLE
                flat = torch.randn((n * rows, schema.EMBEDDING_DIM), generator=torch.Generator().manual_seed(0))
                flat = (flat / flat.norm(dim=1, keepdim=True)).to(torch.float16)
                pages = pack_flat(flat, [rows] * n, device=self.device,
                                  pad_multiple=CUDA_PAD_MULTIPLE if use_kernel else None)
                queries = self.queries[: self._batch_size(n)]
                Q, _ = pad_queries(queries, device=self.device, dtype=pages.vectors.dtype)
                values, idx = topk_desc(score_batch(Q, pages, self.backend), self.k)
                values.cpu(), idx.cpu()
                self.warmed_up.append("exact")
                if self.precision == "fp8-exact-topk":  # its kernels too: the quantization, the
                    # candidate pass and the in-place re-scoring (a cold Triton compile of them made
                    # the first fp8 shard take 1.33 s to score against 0.2 s after, on an H200)
                    backend = self.backend if pages.padded_length is None else "torch"
                    quant_backend = self._quant_backend
                    values, idx, _ = fp8_topk(Q, Fp8Pages.from_packed(pages, backend=quant_backend), self.k,
                                              lambda q, p: score_batch(q, p, backend),
                                              exact_subset=exact_subset(pages, backend), quant_backend=quant_backend)
                    values.cpu(), idx.cpu()
                    self.warmed_up.append("fp8-exact-topk")
        except Exception as exc:  # the real shard's scoring raises it again, with its context
            log.warning("scoring warm-up failed (%s: %s); the first shard pays the start-up instead",
                        type(exc).__name__, exc)
        self.warm_up_s = time.perf_counter() - t

    def memory_bytes(self) -> int:
        """Memory this worker can give a shard: free GPU memory, else available RAM."""
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free)
        return available_host_bytes()

    def _batch_size(self, n_pages: int) -> int:
        if self.query_batch_size:
            return self.query_batch_size
        if self.device.type == "cuda":
            # The kernel writes (pages x query vectors) float32 maxima: keep that under 4 GiB.
            longest = max((len(q) for q in self.queries), default=1)
            return int(max(1, min(8192, (1 << 30) // max(1, n_pages * longest))))
        return 256

    def ready(self) -> float:
        """Wall-clock time (``time.time()``) this worker's constructor started."""
        return self.t_init

    def _load(self, spec: ShardSpec) -> LoadedShard:
        return load_shard(spec, self.corpus_uri, self.endpoint_url, cache_uri=self.cache_uri,
                          footers=self._footers, pinned=self.device.type == "cuda")

    def _prefetch(self, spec: ShardSpec) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-reader")
        self._next = (spec, self._reader.submit(self._load, spec), "prefetch")

    def preload(self, spec: ShardSpec, future) -> None:
        """The load of ``spec`` that the actor front started before this scorer existed (a
        Future of :class:`LoadedShard`): :meth:`score` of ``spec`` takes it."""
        self._next = (spec, future, "start")

    @torch.inference_mode()
    def score(self, spec: ShardSpec, next_spec: ShardSpec | None = None) -> tuple[pa.Table, dict]:
        """Exact top-k of every query within this shard: (candidates table, stats).

        ``next_spec``: the shard this worker scores next, read in the background meanwhile.
        Stats hold this worker's own clock: ``read_s``/``decode_s`` (wherever the load ran),
        ``wait_s`` (how long scoring waited for the load: all of it unless prefetched),
        ``pack_s``, ``score_s``, ``total_s``.
        """
        t0 = time.perf_counter()
        loaded, how = None, None
        if self._next is not None:
            pending_spec, future, how = self._next
            self._next = None
            if pending_spec == spec:
                loaded = future.result()
            else:  # not the shard announced (e.g. a retry): drop it
                future.result()
                how = None
        if loaded is None:
            loaded = self._load(spec)
        t_wait = time.perf_counter() - t0
        if next_spec is not None:
            self._prefetch(next_spec)
        warm_wait = 0.0
        if self._warm is not None:  # first shard: the warm-up ran while it loaded
            t1 = time.perf_counter()
            self._warm.join(timeout=WARM_UP_TIMEOUT_S)
            if self._warm.is_alive():
                log.warning("scoring warm-up still running after %d s; scoring without waiting for it",
                            WARM_UP_TIMEOUT_S)
            self._warm, warm_wait = None, time.perf_counter() - t1
        t1 = time.perf_counter()
        packed, meta, dropped = pack_loaded(loaded, self.device, self.backend)
        load_stats = loaded.stats
        del loaded
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t_pack = time.perf_counter() - t1
        t1 = time.perf_counter()
        parts = []
        fp8_stats = None
        if packed.n_pages and self.queries:
            bs = self._batch_size(packed.n_pages)
            backend = self.backend if packed.padded_length is None else "torch"
            quant_backend = self._quant_backend
            if self.precision == "fp8-exact-topk":
                shard8 = Fp8Pages.from_packed(packed, backend=quant_backend)
                fp8_stats = {"fp8_quantize_s": shard8.quantize_s, "fp8_candidate_s": 0.0, "fp8_rescore_s": 0.0,
                             "fp8_rescored_pairs": 0, "fp8_candidates_per_query": []}
            for s in range(0, len(self.queries), bs):
                Q, _ = pad_queries(self.queries[s : s + bs], device=self.device, dtype=packed.vectors.dtype)
                if fp8_stats is None:
                    values, idx = topk_desc(score_batch(Q, packed, backend), self.k)
                else:
                    values, idx, st = fp8_topk(Q, shard8, self.k, lambda q, p: score_batch(q, p, backend),
                                               exact_subset=exact_subset(packed, backend),
                                               quant_backend=quant_backend)
                    fp8_stats["fp8_candidate_s"] += st["candidate_s"]
                    fp8_stats["fp8_rescore_s"] += st["rescore_s"]
                    fp8_stats["fp8_rescored_pairs"] += st["rescored_pairs"]
                    fp8_stats["fp8_candidates_per_query"] += st["candidates"].tolist()
                nq, kk = values.shape
                rows = idx.reshape(-1).cpu().numpy()
                parts.append(pa.table({
                    QUERY_INDEX: pa.array(np.repeat(np.arange(s, s + nq, dtype=np.int64), kk)),
                    schema.SCORE: pa.array(values.reshape(-1).cpu().numpy().astype(np.float32)),
                }).append_column(schema.PAGE_ID, meta.column(schema.PAGE_ID).take(rows))
                  .append_column(schema.DOC_ID, meta.column(schema.DOC_ID).take(rows))
                  .append_column(schema.PAGE_NUMBER, meta.column(schema.PAGE_NUMBER).take(rows)))
        del packed
        shard8 = None  # the FP8 copy goes with the shard
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        out = pa.concat_tables(parts) if parts else empty_candidates()
        t_score = time.perf_counter() - t1
        stats = {"shard_id": spec.shard_id, "pages": spec.n_pages - dropped, "dropped_empty_pages": dropped,
                 "read_s": load_stats["read_s"], "decode_s": load_stats["decode_s"],
                 "cache_write_s": load_stats.get("cache_write_s", 0.0), "source": load_stats["source"],
                 **{k: load_stats.get(k, 0.0) for k in ("parquet_decode_s", "host_alloc_s", "host_alloc_wait_s", "gather_s")},
                 "bytes_read": load_stats["bytes_read"], "prefetched": how == "prefetch",
                 "read_during_start": how == "start", "wait_s": t_wait,
                 "pack_s": t_pack, "score_s": t_score, "load_s": t_wait + t_pack,
                 "total_s": time.perf_counter() - t0, "device": str(self.device), "precision": self.precision,
                 "warm_up_wait_s": warm_wait}
        if warm_wait or (self.warm_up_s is not None and not self._warm_reported):
            stats["warm_up_s"], self._warm_reported = self.warm_up_s, True
        if fp8_stats is not None:  # fp8_candidates_per_query: one count per query, summed over shards by the flow
            stats.update(fp8_stats)
        return out, stats
