""":class:`ScorerFront`: the scoring job's actor in front of
:class:`pipeline.score.scorer.ShardScorer`, importing no torch.

A new scoring actor spends seconds importing torch and starting CUDA (3.3-5.9 s on an
H200 node, benchmarks/RESULTS.md) and, until now, read nothing meanwhile: the first shard's
read and decode (1-2.7 s for 20,000 pages) came after it. This front's constructor returns
at once and builds the real scorer on a thread. The driver's question "how much memory
have you" is answered through NVML (:func:`pipeline.cluster.visible_gpu_free_bytes`), and
the first shard is read and decoded (:func:`pipeline.score.corpus.load_shard`, Arrow,
which releases the GIL) while torch imports; only its page-locked buffer waits for torch.
Everything else is the real scorer's.

This module imports neither torch nor Ray (numpy and pyarrow through the corpus module):
:class:`pipeline.score.flow.ShardScorer` adds what needs Ray (which GPU Ray granted, whether
the actor was restarted, ending a kept actor), and Ray imports that flow module in the actor's
process to find the class, before the constructor runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from pipeline.cluster import available_host_bytes, visible_gpu_free_bytes
from pipeline.keepalive import KeepAlive
from pipeline.score.corpus import ShardSpec, load_shard, set_decode_threads

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class ScoringJob:
    """What one scoring job asks of every shard: its queries, k and query batch size, and how
    long the actor should stay after the job's last call (0: the job ends it). Sent with every
    :meth:`ScorerFront.score` call (one ``ray.put`` per job), so an actor kept from an earlier
    job, or restarted by Ray and running its constructor's arguments again, scores this job's
    queries."""

    token: str  # unique per job
    query_flat: object  # (sum(query_lengths), 128) float16
    query_lengths: object  # (n_queries,) int64
    k: int
    query_batch_size: int = 0
    keep_alive_s: float = 0.0


class ScorerFront:
    """The front of :class:`pipeline.score.scorer.ShardScorer` (takes its arguments, plus
    ``keep_alive_s``); the scoring job runs it as :class:`pipeline.score.flow.ShardScorer`,
    which fills in the Ray hooks below (``_granted_gpu``, ``_was_restarted``, ``_can_keep``,
    ``_end``). Tests build it directly.

    Its stats add ``pid``, ``after_actor_restart`` (with one call in flight per actor, the
    first call after a restart is the retry of the call that was running when the actor
    died), ``start_wait_s`` (how long the call waited for the real scorer: torch's import,
    CUDA's start) and, on its first shard, ``scorer_start_s`` (constructor to scorer built)
    and ``scorer_import_s`` (of which importing it: torch).
    """

    def __init__(self, corpus_uri: str, endpoint_url: str | None, query_flat, query_lengths, k: int,
                 **options):
        self.t_init = time.time()
        t0 = time.perf_counter()
        self.corpus_uri, self.endpoint_url = corpus_uri, endpoint_url
        self.cache_uri = options.get("cache_uri")
        self._gpu = self._granted_gpu(options.get("device"))
        set_decode_threads(options.get("cpu_threads"), on_gpu=self._gpu)
        self._restarted = self._was_restarted()
        self._calls = 0
        self._footers: dict = {}
        self._scorer = None
        self._error: BaseException | None = None
        self._built = threading.Event()
        self.scorer_start_s: float | None = None  # constructor to scorer built
        self.scorer_import_s: float | None = None  # of which importing the scorer's module (torch)
        self._reported_start = False
        self._reader: ThreadPoolExecutor | None = None
        self._job: str | None = None  # token of the ScoringJob whose queries the scorer holds
        self.jobs_served = 0
        # --keep-scorers: from the constructor on (a kept actor that never gets a call ends too);
        # each job sets its own keep-alive (ScoringJob). Never ended during a call.
        keep_alive_s = float(options.pop("keep_alive_s", 0.0))
        self._keep = KeepAlive(keep_alive_s if self._can_keep() else 0.0, self._end, "scorer")
        threading.Thread(target=self._build, args=(t0, query_flat, query_lengths, k, options),
                         name="scorer-start", daemon=True).start()

    def _build(self, t0, query_flat, query_lengths, k, options) -> None:
        try:
            from pipeline.score import scorer  # torch, and CUDA's libraries

            self.scorer_import_s = time.perf_counter() - t0
            self._scorer = scorer.ShardScorer(self.corpus_uri, self.endpoint_url, query_flat, query_lengths, k,
                                              **options)
        except BaseException as exc:  # noqa: BLE001 - raised again by the call that needs the scorer
            self._error = exc
        self.scorer_start_s = time.perf_counter() - t0
        self._built.set()

    def _wait(self):
        self._built.wait()
        if self._error is not None:
            raise RuntimeError(f"the shard scorer could not start: {type(self._error).__name__}: {self._error}") \
                from self._error
        return self._scorer

    def ready(self) -> float:
        """Wall-clock time (``time.time()``) this actor's constructor started."""
        self._keep.touch()
        return self.t_init

    def memory_bytes(self) -> int:
        """Memory this worker can give a shard: free GPU memory (through NVML while torch is
        still importing, less a context's reserve), else available RAM."""
        self._keep.touch()
        if not self._gpu:
            return available_host_bytes()
        if not self._built.is_set():
            free = visible_gpu_free_bytes()
            if free is not None:
                return free
        return self._wait().memory_bytes()

    def _pinned(self) -> bool:
        """Page-locked buffers when the scorer, once built, is on a GPU (waits for it: the
        scorer sets how torch page-locks memory before anything is allocated)."""
        return self._wait().device.type == "cuda"

    # Hooks for the process this front runs in (pipeline.score.flow.ShardScorer: a Ray actor).
    def _granted_gpu(self, device: str | None) -> bool:
        """Whether the scorer will be on a GPU, as far as can be told without torch: asked for
        ``"cuda"``, or (``device`` None: CUDA when the process sees one) a GPU is visible."""
        if device is not None:
            return device.startswith("cuda")
        return bool(os.environ.get("CUDA_VISIBLE_DEVICES"))

    def _was_restarted(self) -> bool:
        return False

    def _can_keep(self) -> bool:
        return False  # only an actor can end itself (``_end``)

    def _end(self) -> None:
        raise NotImplementedError

    def score(self, spec: ShardSpec, next_spec: ShardSpec | None = None, job: ScoringJob | None = None):
        """:meth:`pipeline.score.scorer.ShardScorer.score`; the first call reads ``spec``
        while the scorer is still being built. ``job``: the job's queries (and k, batch size,
        keep-alive), given to the scorer when they are not the ones it holds."""
        with self._keep.call(job.token if job is not None else None,
                             job.keep_alive_s if job is not None and self._can_keep() else None):
            return self._score(spec, next_spec, job)

    def _score(self, spec: ShardSpec, next_spec: ShardSpec | None, job: ScoringJob | None):
        t0 = time.perf_counter()
        early = None
        if not self._built.is_set():
            if self._reader is None:
                self._reader = ThreadPoolExecutor(1, thread_name_prefix="first-shard")
            early = self._reader.submit(load_shard, spec, self.corpus_uri, self.endpoint_url,
                                        cache_uri=self.cache_uri, footers=self._footers,
                                        pinned=self._pinned if self._gpu else False)
        try:
            scorer = self._wait()
        except BaseException:
            if early is not None:
                early.cancel()
            raise
        start_wait = time.perf_counter() - t0
        if job is not None and job.token != self._job:
            scorer.set_queries(job.query_flat, job.query_lengths, job.k, job.query_batch_size)
            self._job = job.token
            self.jobs_served += 1
        if job is not None and self._can_keep():
            self._keep.set(job.keep_alive_s, job.token)
        if early is not None:
            scorer._footers = self._footers  # the same dict: the load may still be adding to it
            scorer.preload(spec, early)
            self._reader.shutdown(wait=False)  # the load finishes; no thread is left behind for good
        out, stats = scorer.score(spec, next_spec)
        self._calls += 1
        stats["actor_reused"] = self.jobs_served > 1  # this actor had served an earlier job (--keep-scorers)
        stats["pid"] = os.getpid()
        stats["after_actor_restart"] = self._restarted and self._calls == 1
        stats["start_wait_s"] = start_wait
        if not self._reported_start:
            stats["scorer_start_s"], self._reported_start = self.scorer_start_s, True
            stats["scorer_import_s"] = self.scorer_import_s
        return out, stats
