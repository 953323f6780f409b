"""The three Ray Data operators of the corpus job, as plain callables over Arrow tables.

``render_documents`` (CPU tasks) -> ``PageEmbedder`` (GPU actor pool) -> ``ShardWriter``
(CPU tasks). Rows between stages carry either a page (``pixels``: the RGB image on the
model's grid) or an error (``error_type`` set); errors pass through the actor untouched,
so every document ends as page rows or error rows in one stream.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import socket
import uuid
import sys
import threading
import json
import logging
import time

import numpy as np
import pyarrow as pa

from pipeline import schema, storage
from pipeline.embed import counters
from pipeline.embed.rasterize import DocInfo, ErrorItem, PageItem, RenderSpec
from pipeline.embed.renderer import Renderer

log = logging.getLogger(__name__)

PIXELS = "pixels"
# The dtype the actor really used (a GPU actor on a node without CUDA runs in float32 on CPU):
# written to each file's metadata, then dropped.
MODEL_DTYPE = "_model_dtype"
# host:pid:call of the render task that rendered the row: the summary counts render tasks
# and the worker processes they ran in.
RENDER_WORKER = "_render_worker"

STREAM_SCHEMA = pa.schema(
    [
        pa.field(schema.DOC_ID, pa.string()),
        pa.field(schema.PAGE_NUMBER, pa.int32()),
        pa.field(schema.SOURCE_URI, pa.string()),
        pa.field(schema.DOC_PAGES, pa.int32()),
        pa.field(schema.WIDTH, pa.int32()),
        pa.field(schema.HEIGHT, pa.int32()),
        pa.field(PIXELS, pa.large_binary()),
        pa.field(schema.STAGE, pa.string()),
        pa.field(schema.ERROR_TYPE, pa.string()),
        pa.field(schema.MESSAGE, pa.string()),
        pa.field(schema.SOURCE_SIZE, pa.int64()),
        pa.field(schema.SOURCE_MTIME, pa.int64()),
        pa.field(RENDER_WORKER, pa.string()),
    ]
)

_renderer: Renderer | None = None


def _get_renderer(timeout_s: float, memory_limit_bytes: int | None = None) -> Renderer:
    # One renderer (a zygote child that forks a fresh process per document) per Ray worker
    # process, reused across tasks. timeout_s is per document; memory_limit_bytes None keeps
    # the default (8 GiB, or PIPELINE_RENDER_MEMORY_LIMIT_BYTES).
    global _renderer
    if _renderer is None:
        _renderer = Renderer(timeout_s, memory_limit_bytes)
    _renderer.timeout_s = timeout_s
    if memory_limit_bytes is not None:
        _renderer.memory_limit_bytes = memory_limit_bytes
    return _renderer


def start_renderer(render_timeout_s: float) -> str:
    """Start this worker process's renderer (its zygote) now, ahead of its first document
    (:func:`pipeline.embed.flow.warm_render_worker`). Returns the worker (host:pid)."""
    try:
        _get_renderer(render_timeout_s).start()
    except Exception as exc:  # noqa: BLE001 - only a head start: the render task starts it again
        log.warning("could not start a renderer ahead of the first render task: %s", exc)
    return f"{socket.gethostname()}:{os.getpid()}"


class _Rows:
    def __init__(self):
        self.cols = {f.name: [] for f in STREAM_SCHEMA}

    def add(self, **values):
        for name, col in self.cols.items():
            col.append(values.get(name))

    def __len__(self):
        return len(self.cols[schema.DOC_ID])

    def table(self) -> pa.Table:
        return pa.table(self.cols, schema=STREAM_SCHEMA)


def render_documents(batch: pa.Table, spec: RenderSpec, render_timeout_s: float, max_file_bytes: int,
                     endpoint_url: str | None = None, pages_per_block: int = 16, storage_settings: dict | None = None):
    """Documents (doc_id, source_uri, size_bytes, mtime_ns, skip_pages) -> stream rows, yielded
    in blocks of ``pages_per_block`` so a 500-page PDF never sits in one huge block. Every row
    records the listed version of its source (size, modification time).

    A read that fails because of the document (missing, forbidden) is a final error row; one
    that fails because storage did not answer, after the client's retries
    (``storage_settings``: :func:`pipeline.storage.configure`), is a
    ``StorageUnavailable`` row that a rerun tries again (:data:`schema.RETRYABLE_ERRORS`)."""
    storage.configure(**(storage_settings or {}))
    renderer = _get_renderer(render_timeout_s)
    rows = _Rows()
    worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    for doc in batch.to_pylist():
        doc_id, uri = doc["doc_id"], doc["source_uri"]
        base = {schema.DOC_ID: doc_id, schema.SOURCE_URI: uri, RENDER_WORKER: worker,
                schema.SOURCE_SIZE: doc["size_bytes"], schema.SOURCE_MTIME: doc.get("mtime_ns")}
        if doc["size_bytes"] > max_file_bytes:
            rows.add(**base, stage="read", error_type="OversizedFile",
                     message=f"{doc['size_bytes']} bytes is over --max-file-bytes {max_file_bytes}")
            continue
        try:
            data = storage.read_bytes(uri, endpoint_url)
        except Exception as exc:  # noqa: BLE001 - every document ends as rows
            if storage.is_storage_failure(exc):
                log.warning("storage did not answer for %s: recorded as retryable (%s)", doc_id, exc)
                rows.add(**base, stage="read", error_type=schema.STORAGE_UNAVAILABLE,
                         message=str(storage.storage_unavailable(uri, endpoint_url, exc)))
            else:
                rows.add(**base, stage="read", error_type=type(exc).__name__, message=f"could not read: {exc}")
            continue
        n_pages = None
        items = renderer.render(data, spec, frozenset(doc.get("skip_pages") or ()))
        try:
            for item in items:
                if isinstance(item, DocInfo):
                    n_pages = item.n_pages
                elif isinstance(item, PageItem):
                    h, w, _ = item.image.shape
                    rows.add(**base, page_number=item.page_number, doc_pages=n_pages, width=w, height=h,
                             pixels=np.ascontiguousarray(item.image).tobytes())
                elif isinstance(item, ErrorItem):
                    rows.add(**base, page_number=item.page_number, doc_pages=n_pages, stage=item.stage,
                             error_type=item.error_type, message=item.message)
                if len(rows) >= pages_per_block:
                    yield rows.table()
                    rows = _Rows()
        finally:
            items.close()  # a task stopped mid-document kills the document's renderer
    if len(rows):
        yield rows.table()


def pixel_views(column) -> list:
    """A binary column of page pixels -> a uint8 array per row (None for null rows), viewing
    Arrow's buffer instead of copying each value into Python bytes."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.type != pa.large_binary():
        arr = arr.cast(pa.large_binary())
    if len(arr) == 0:
        return []
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    return [data[offsets[i] : offsets[i + 1]] if valid[i] else None for i in range(len(arr))]


@dataclasses.dataclass
class JobCounters:
    """One job's view of an actor (the hidden counter columns, :mod:`pipeline.embed.counters`):
    the model load it paid (0 for the later jobs of a kept actor), when its first batch here
    started, that batch's (wall s, forward s, pages), and its pages."""

    model_load_s: float
    first_batch_at: float | None = None
    first_batch: tuple[float, float, float] | None = None
    pages: int = 0
    compile_state: str | None = None  # PageEmbedder.compile_state() after the first batch, JSON


class PageEmbedder:
    """GPU stage: one ColQwen2 per actor, loaded once; each batch of rendered pages in,
    the same rows with ``n_vectors`` and ``embedding`` out (pixels dropped). With
    ``pool_factor`` > 1 the vectors are hierarchically pooled (:mod:`pipeline.embed.pooling`)."""

    def __init__(self, model: str, device: str | None = None, dtype: str = "auto",
                 attn_implementation: str = "auto", endpoint_url: str | None = None,
                 compile_model: bool = False, pool_factor: int = 1, compile_cache: str | None = None,
                 precision: str = "default", batches_in_flight: int = 1, precompiled: bool | None = None,
                 vision_attention: str = "auto"):
        from pipeline.cluster import actor_device, bytecode_warning
        from pipeline.embed import vision_kernels
        from pipeline.embed import compile_helper
        from pipeline.embed.pooling import WardMerges

        self.started = time.time()
        if vision_attention not in vision_kernels.CHOICES:  # before the weights load
            raise ValueError(f"--vision-attention must be one of {', '.join(vision_kernels.CHOICES)}, "
                             f"got {vision_attention!r}")
        # --pool-factor: Ward's merge loops on the GPU where Triton is installed ($VDR_WARD_ON_DEVICE),
        # else in worker processes ($VDR_POOL_PROCESSES, default 2; 0: in the calling thread),
        # started at the first batch that needs them; a misspelt value fails here, before the weights load
        self.merges = WardMerges.from_env() if pool_factor > 1 else None
        self.pool_factor = pool_factor  # each page's vectors pooled after the forward (pipeline.embed.pooling)
        if pool_factor > 1:
            from pipeline.embed.pooling import ward_on_device

            ward_on_device(device or "cpu")
        device, warning = actor_device(device or "cpu")
        if warning:
            log.warning(warning)
            compile_model = False
        if vision_attention == "fa4":  # refused before the weights load (and any helper), where it can be told now
            from pipeline.embed.model import dtype_from_name, pick_attn_implementation

            vision_kernels.check("fa4", device, str(dtype_from_name(dtype, device)).removeprefix("torch."),
                                 op_in_use=pick_attn_implementation(device, attn_implementation) == "sdpa")
        slow_imports = bytecode_warning()
        if slow_imports:
            log.warning(slow_imports)
        # A new node (on a GPU, unless VDR_COMPILE_HELPER=0): the blocks compiled in helper processes while
        # this one loads the weights and runs eagerly (pipeline.embed.compile_helper; stopped below where
        # the node is warm)
        self.helper = None
        if compile_helper.wanted(device, compile_model, precompiled):
            from pipeline.cluster import visible_gpu_free_bytes

            free = visible_gpu_free_bytes() if str(device).startswith("cuda") else None
            parts = compile_helper.helpers_with_room(free, compile_helper.processes())
            if parts:
                try:
                    self.helper = compile_helper.CompileHelper(model, device, dtype, attn_implementation, precision,
                                                               endpoint_url, parts=parts)
                except OSError as exc:  # could not start a process: compile here, as without helpers
                    log.warning("no compile helper: it could not be started (%s: %s)", type(exc).__name__, exc)
            else:
                log.warning("no compile helper: %.1f GiB free on the GPU, %d GiB wanted for one beside the actor",
                            free / 2**30, compile_helper.MIN_FREE_BYTES >> 30)
        try:
            self._load(model, device, dtype, attn_implementation, endpoint_url, compile_model, precision,
                       precompiled, batches_in_flight, compile_cache, vision_attention)
        except BaseException:
            if self.helper is not None:
                self.helper.stop()
            raise

    def _load(self, model, device, dtype, attn_implementation, endpoint_url, compile_model, precision, precompiled,
              batches_in_flight, compile_cache, vision_attention="auto") -> None:
        from pipeline.embed import compile_cache as cc, vision_kernels
        from pipeline.embed.model import ForwardTimer, TurnLock, load_model

        self.lm = load_model(model, device=device, dtype=dtype, attn_implementation=attn_implementation,
                             endpoint_url=endpoint_url, compile_model=compile_model, precision=precision,
                             precompiled=precompiled)
        # SDPA until FlashAttention 4 is loaded in a thread, where it is installed and wanted
        # (--vision-attention; pipeline.embed.vision_kernels): begun after the weights, so that its
        # import does not hold the GIL beside transformers'
        self.vision = vision_kernels.start(vision_attention, device, self.lm.model.config, self.started,
                                           self.lm.image_attention_op, cache_dir=os.path.join(cc.local_dir(), "fa4"),
                                           dtype=self.lm.dtype, shared_uri=compile_cache, endpoint_url=endpoint_url)
        self.dtype = str(self.lm.dtype).removeprefix("torch.")
        self.loaded_s = time.time() - self.started
        self.actor = f"{socket.gethostname()}:{os.getpid()}"
        self.timer = ForwardTimer(device)
        self.counts = JobCounters(self.loaded_s)  # the job's (a kept actor's callers pass their own)
        # --batches-in-flight 2: Ray Data calls this from two threads (ActorPoolStrategy's
        # enable_true_multi_threading); the device work of one batch is queued at a time,
        # under this lock, while the other thread prepares its batch on the host.
        self.device_lock = TurnLock() if batches_in_flight > 1 else None
        self._state_lock = threading.Lock()
        # Warm starts: compiled artefacts of an earlier actor (this node's, or --compile-cache's)
        # are loaded before the first batch compiles; this actor's are saved after it.
        self.compile_cache = None
        if compile_model:
            from pipeline.embed import compile_cache as cc

            self.compile_cache = (cc.cache_key(self.lm.model.config.to_dict(),
                                                 self.dtype if precision == "default" else f"{self.dtype}+{precision}", device,
                                                 getattr(self.lm.model.config, "_attn_implementation", None),
                                                 precompiled=bool(self.lm.precompiled)),
                                  compile_cache, endpoint_url)
            self.compile_cache_from = cc.load(*self.compile_cache)
            t = time.perf_counter()
            self.precompiled_from = cc.load_precompiled(self.compile_cache[0], self.lm.precompiled,
                                                        *self.compile_cache[1:])
            self.precompiled_load_s = time.perf_counter() - t
            self._graphs_saved = -1
            # variants saved (counted once this actor has compiled any): loaded ones alone are in a
            # cache already, or a compile helper saves them (the last of its processes, every part's
            # blocks together); once it compiles some (a new page size, a helper that failed), it saves
            # all it has, and again when more come (a later helper part's)
            self._variants_saved = 0
            self._saving = False
        if self.helper is not None:
            if self.compile_cache is None or self.precompiled_from is not None:
                self.helper.stop("stopped: the precompiled blocks were in the cache")
            elif not any(pf.fallback is None for pf in self.lm.precompiled):
                self.helper.stop("stopped: no block can be precompiled here")
            else:  # until its helper has ended, a block no variant fits runs eagerly
                for i, pf in enumerate(self.lm.precompiled):
                    pf.defer = self.helper.defer_hook(i)

    def __call__(self, batch: pa.Table, counts: JobCounters | None = None) -> pa.Table:
        import torch

        from pipeline.embed import vision_kernels
        from pipeline.embed.model import embed_pages

        c = self.counts if counts is None else counts
        call_start = time.time()
        with self._state_lock:
            if c.first_batch_at is None:
                c.first_batch_at = call_start
        widths = batch.column(schema.WIDTH).to_pylist()
        heights = batch.column(schema.HEIGHT).to_pylist()
        pixels = pixel_views(batch.column(PIXELS))
        page_idx = [i for i, p in enumerate(pixels) if p is not None]
        images = [pixels[i].reshape(heights[i], widths[i], 3) for i in page_idx]
        if images:
            self.vision.batch_begins()
        helper = self.helper if self.helper is not None and self.helper.pending() else None
        if helper is not None:
            if images:  # what it compiles for: this first batch's page shapes (the size hints the actor's would give)
                helper.first_batch([im.shape[:2] for im in images], *self.compile_cache)
            helper.collect(self.lm.precompiled)  # its blocks, once it has written them
            eager_before = sum(pf.eager_calls for pf in self.lm.precompiled)
        busy_before = self.timer.thread_busy_s
        # float16, what is stored (converted on the device; pooled vectors on the host: pipeline.embed.model.launch_embeddings)
        vectors = embed_pages(self.lm, images, self.timer, self.pool_factor, out_dtype=torch.float16,
                              device_lock=self.device_lock, merges=self.merges)
        busy = self.timer.thread_busy_s - busy_before
        if helper is not None and sum(pf.eager_calls for pf in self.lm.precompiled) > eager_before:
            with self._state_lock:
                helper.eager_batches += 1
        with self._state_lock:
            if c.first_batch is None and images:
                c.first_batch = (time.time() - call_start, busy, float(len(images)))
                # One line per actor (Ray forwards it to the driver's log with the actor's pid):
                # when each node's GPU started working, from the actor's own clock.
                print(f"[PageEmbedder] pid {os.getpid()}: model loaded in {self.loaded_s:.1f} s "
                      f"({', '.join(f'{k} {v:.1f}' for k, v in self.lm.load_phases.items())}), first batch of "
                      f"{len(images)} done at {time.strftime('%H:%M:%S', time.gmtime())} UTC (unix {time.time():.3f}, "
                      f"{time.time() - self.started:.1f} s after start, "
                      f"{c.first_batch[0]:.1f} s for the batch"
                      + (f", compile cache {'warm from ' + self.compile_cache_from if self.compile_cache_from else 'cold'}"
                         f", precompiled blocks {self._precompiled_state()}"
                         + (f", compile helper {self.helper.state}" if self.helper is not None else "")
                         + f", compile s in this process so far {self._compile_times()}"
                         if self.compile_cache is not None else "")
                      + f", vision attention {self.vision.state}" + ")",
                      file=sys.stderr, flush=True)
            # FA4 dropped after a failed call since the state was recorded: recorded again, so the summary says so
            newly_failed = c.compile_state is not None and vision_kernels.ACTIVE["runtime_error"] is not None \
                and "failed at runtime" not in c.compile_state
            if images and (c.compile_state is None or '"provisional": true' in c.compile_state or newly_failed):
                state = self.compile_state()
                if counts is not None and c.model_load_s == 0:
                    # a kept actor's later job: the counts are the actor's since it started
                    state["kept_actor"] = True
                    state.pop("start", None)  # its start was an earlier job's
                    for key in ("ready_after_s", "ready_at", "load_s", "sdpa_batches_before", "kernel_cache"):
                        state["vision_attention"].pop(key, None)  # so was FA4's load
                c.compile_state = json.dumps(state)
            c.pages += len(images)
            first_batch, first_batch_at = c.first_batch, c.first_batch_at
        if self.compile_cache is not None and images:
            self._save_compiled()
        all_vectors: list = [np.zeros((0, schema.EMBEDDING_DIM), np.float16)] * batch.num_rows
        n_vectors: list = [None] * batch.num_rows
        for i, v in zip(page_idx, vectors):
            all_vectors[i] = v
            n_vectors[i] = len(v)
        out = batch.drop_columns([PIXELS]).append_column(MODEL_DTYPE, pa.array([self.dtype] * batch.num_rows))
        out = out.append_column(schema.N_VECTORS, pa.array(n_vectors, type=pa.int32()))
        out = out.append_column(schema.EMBEDDING, schema.embeddings_to_arrow(all_vectors))
        hidden = counters.counter_columns(batch.num_rows, self.actor, busy, first_batch_at, time.time(),
                                          c.model_load_s, first_batch, c.compile_state)
        for name, column in hidden.items():
            out = out.append_column(name, column)
        return out

    def compile_state(self) -> dict:
        """How this actor came by its compiled model, for the job's summary: ``mode`` off,
        precompiled (blocks compiled ahead of time, kept whole) or torch.compile (per block,
        ``--compile plain`` or a fallback); where the compile cache and the precompiled blocks
        were loaded from (None: this actor compiled them), the block variants loaded and
        compiled here, and this process's compile seconds so far by phase. With them, where the
        actor's start went (``start``: when its constructor began, the model load's steps; the
        summary gives them per actor, :func:`pipeline.embed.counters.summarize`)."""
        start = {"constructed_at": self.started, "load_phases": dict(self.lm.load_phases)}
        # read before the summary: FA4's load (and the sharing of its kernels) may end in between
        vision_pending = self.vision.pending
        if self.compile_cache is None:
            state = {"mode": "off", "start": start, "vision_attention": self.vision.summary()}
            if vision_pending:  # replaced by a later batch's, once FA4's load and sharing have ended
                state["provisional"] = True
            return state
        state = {"mode": "torch.compile", "compile_cache_from": self.compile_cache_from, "start": start,
                 "vision_attention": self.vision.summary()}
        if self.lm.precompiled:
            fallbacks = {pf.name: pf.fallback_reason for pf in self.lm.precompiled if pf.fallback is not None}
            state.update(mode="precompiled" if not fallbacks else "precompiled, with fallbacks",
                         precompiled_from=self.precompiled_from,
                         variants_loaded=sum(pf.loaded for pf in self.lm.precompiled),
                         variants_compiled=sum(pf.compiled for pf in self.lm.precompiled))
            if fallbacks:
                state["fallbacks"] = fallbacks
        if self.helper is not None:
            state["compile_helper"] = self.helper.summary(self.lm.precompiled)
            if self.helper.pending():  # replaced by a later batch's, once the helper has ended
                state["provisional"] = True
        if vision_pending:  # the same, once FA4's load and sharing have ended
            state["provisional"] = True
        state["compile_s"] = self._compile_times()
        return state

    def _precompiled_state(self) -> str:
        if not self.lm.precompiled:
            return "off"
        parts = [f"{pf.name}: " + (f"fallback ({pf.fallback_reason})" if pf.fallback is not None else
                                   f"{pf.loaded} loaded, {pf.compiled} compiled in {pf.compile_s:.1f} s")
                 for pf in self.lm.precompiled]
        return (f"loaded in {self.precompiled_load_s:.1f} s from {self.precompiled_from}: " if self.precompiled_from
                else "") + "; ".join(parts)

    @staticmethod
    def _compile_times() -> dict:
        from pipeline.embed import compile_cache as cc

        return cc.compile_times()

    def _save_compiled(self) -> None:
        """Save the compiled artefacts after the first batch, and again after any batch that
        compiled something new (another page size or batch size)."""
        from torch._dynamo.utils import counters as dynamo_counters

        from pipeline.embed import compile_cache as cc

        with self._state_lock:  # one thread saves a given set of graphs
            graphs = int(dynamo_counters["stats"]["unique_graphs"])
            variants = (sum(len(pf.variants) for pf in self.lm.precompiled)
                        if any(pf.compiled for pf in self.lm.precompiled) else self._variants_saved)
            if (graphs == self._graphs_saved and variants == self._variants_saved) or self._saving:
                return
            self._saving = True
        try:
            if graphs != self._graphs_saved and cc.save(*self.compile_cache) > 0:
                self._graphs_saved = graphs  # a failed save is tried again after the next batch
            if variants != self._variants_saved and cc.save_precompiled(self.compile_cache[0], self.lm.precompiled,
                                                                        *self.compile_cache[1:]) > 0:
                self._variants_saved = variants
        finally:
            self._saving = False


class KeptEmbedder:
    """A :class:`PageEmbedder` that outlives its job (``--keep-embedders SECONDS``): the next
    job of the same model and settings sends it its batches and skips the start-up (worker,
    imports, model load, compilation). Each call names its job, and each job has its own
    counters (:class:`JobCounters`), also when two jobs' batches interleave: the first job
    served has the model load, the later ones 0. It ends itself once each job it serves has gone its
    own keep-alive without a call (:class:`pipeline.keepalive.KeepAlive`: one job after another,
    the later one's), never during one. The job runs it as
    :class:`pipeline.embed.flow.KeptPageEmbedder`, which fills in the Ray hooks ``_can_keep``
    and ``_end``; tests build it directly."""

    JOBS_REMEMBERED = 64

    def __init__(self, keep_alive_s: float, **embedder_kwargs):
        from pipeline.keepalive import KeepAlive

        self.embedder = PageEmbedder(**embedder_kwargs)
        self._jobs: collections.OrderedDict[str, JobCounters] = collections.OrderedDict()
        self.jobs_served = 0
        self._lock = threading.Lock()
        # started once the model is loaded: the load is never counted as idle time
        self._keep = KeepAlive(keep_alive_s if self._can_keep() else 0.0, self._end, "embedder")

    def ready(self, keep_alive_s: float | None = None, job: str | None = None) -> dict:
        """This actor's process and what it has done (a call: counts as activity); a job
        taking it over, or pinging it while it runs, sets its keep-alive."""
        if keep_alive_s is not None and self._can_keep():
            self._keep.set(keep_alive_s, job)
        else:
            self._keep.touch(job)
        return {"pid": os.getpid(), "jobs_served": self.jobs_served, "model_load_s": self.embedder.loaded_s}

    def embed(self, batch: pa.Table, job: str, keep_alive_s: float) -> pa.Table:
        """:meth:`PageEmbedder.__call__` for ``job`` (a token unique per job run)."""
        with self._keep.call(job, keep_alive_s if self._can_keep() else None):
            with self._lock:
                counts = self._jobs.get(job)
                if counts is None:
                    counts = self._jobs[job] = (self.embedder.counts if not self.jobs_served
                                                else JobCounters(model_load_s=0.0))
                    self.jobs_served += 1
                    while len(self._jobs) > self.JOBS_REMEMBERED:  # ended jobs: forget the oldest
                        self._jobs.popitem(last=False)
            if self._can_keep():
                self._keep.set(keep_alive_s, job)
            return self.embedder(batch, counts)

    # Hooks for the process this runs in (pipeline.embed.flow.KeptPageEmbedder: a Ray actor).
    def _can_keep(self) -> bool:
        return False  # only an actor can end itself (``_end``)

    def _end(self) -> None:
        raise NotImplementedError


shard_name = schema.shard_name  # the file-name rule lives with the other names


def split_stream(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Embedded stream rows -> (pages table, errors table) in the file schemas."""
    is_error = pa.compute.is_valid(table.column(schema.ERROR_TYPE))
    pages = table.filter(pa.compute.invert(is_error))
    errors = table.filter(is_error)
    page_ids = [schema.page_id(d, p) for d, p in zip(pages.column(schema.DOC_ID).to_pylist(),
                                                     pages.column(schema.PAGE_NUMBER).to_pylist())]
    pages = pages.append_column(schema.PAGE_ID, pa.array(page_ids, pa.string()))
    pages = pages.select(schema.PAGES_FILE_SCHEMA.names).cast(schema.PAGES_FILE_SCHEMA)
    errors = errors.select(schema.ERRORS_FILE_SCHEMA.names).cast(schema.ERRORS_FILE_SCHEMA)
    return pages, errors


def write_shard(batch: pa.Table, output: str, metadata: dict, endpoint_url: str | None = None,
                storage_settings: dict | None = None) -> pa.Table:
    """Write a batch as one pages file and one errors file, named by content, atomically.
    Returns one stats row for the driver's progress line and summary.

    Idempotent: the same rows give the same file names and bytes, so the flow lets Ray run
    it again when storage fails (each request is already retried by the client library)."""
    storage.configure(**(storage_settings or {}))
    metadata = {k.encode() if isinstance(k, str) else k: v.encode() if isinstance(v, str) else v
                for k, v in metadata.items()}
    if MODEL_DTYPE in batch.column_names and batch.num_rows:
        used = {d for d in batch.column(MODEL_DTYPE).to_pylist() if d}
        if used:
            metadata[schema.META_DTYPE] = ",".join(sorted(used)).encode()
    pages, errors = split_stream(batch)
    files = []

    def write(uri: str, table: pa.Table) -> None:
        try:
            storage.write_parquet(uri, table, endpoint_url, metadata)
        except OSError as exc:  # named, and left to Ray to retry (the flow's retry_exceptions)
            if storage.is_storage_failure(exc):
                raise storage.storage_unavailable(uri, endpoint_url, exc, "write") from exc
            raise

    if pages.num_rows:
        name = shard_name(pages.column(schema.PAGE_ID).to_pylist())
        write(storage.join_uri(output, schema.PAGES_DIR, name), pages)
        files.append(f"{schema.PAGES_DIR}/{name}")
    if errors.num_rows:
        keys = [f"{d}#{p}" for d, p in zip(errors.column(schema.DOC_ID).to_pylist(),
                                           errors.column(schema.PAGE_NUMBER).to_pylist())]
        name = shard_name(keys)
        write(storage.join_uri(output, schema.ERRORS_DIR, name), errors)
        files.append(f"{schema.ERRORS_DIR}/{name}")
    by_type = collections.Counter(errors.column(schema.ERROR_TYPE).to_pylist())
    actors = counters.actor_records(batch, pa.compute.is_null(batch.column(schema.ERROR_TYPE)))
    return pa.table({
        "pages": [pages.num_rows],
        "error_rows": [errors.num_rows],
        "vectors": [int(pa.compute.sum(pages.column(schema.N_VECTORS)).as_py() or 0)],
        "errors_by_type": [json.dumps(by_type)],
        "retryable_error_rows": [sum(n for t, n in by_type.items() if t in schema.RETRYABLE_ERRORS)],
        "files": [json.dumps(files)],
        "actors": [json.dumps(actors)],
        "render_tasks": [json.dumps(sorted({w for w in batch.column(RENDER_WORKER).to_pylist() if w})
                                      if RENDER_WORKER in batch.column_names else [])],
    })
