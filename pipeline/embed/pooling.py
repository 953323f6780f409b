"""Hierarchical token pooling of a page's vectors (``--pool-factor N``), equal to
colpali-engine 0.3.18's ``HierarchicalTokenPooler`` (colpali_engine/compression/token_pooling/
hierarchical_token_pooling.py), computed on the tensor's own device except for one step.

What colpali's pooler does, for one page's (n, d) vectors E and a factor f > 1:

1. ``S = E @ E.T`` in float32 (on CPU there), ``D = 1 - S``.
2. ``scipy.cluster.hierarchy.linkage(D, metric="euclidean", method="ward")``. D is passed as
   a 2-D array, so scipy takes its *rows as observations* (n points in n dimensions) and
   computes their Euclidean ``pdist`` in float64; it is not used as a precomputed distance
   matrix. Ward linkage then runs on those distances.
3. ``fcluster(Z, t=max(n // f, 1), criterion="maxclust") - 1``: at most n // f clusters
   (fewer when merge heights tie), ids 0, 1, ... in scipy's tree order.
4. For each cluster id in increasing order, the mean of its vectors (float32), L2-normalised
   (``F.normalize``, eps 1e-12), stacked; cast back to the input's dtype and device.

No token is protected: prompt and image tokens are pooled alike (the caller gives the page's
real tokens; colpali trims all-zero padding rows of a padded batch before pooling). f = 1
returns the vectors unchanged; n = 1 raises there and is returned unchanged here.

Where each step runs here (:func:`pool_embeddings`): 1 and the row distances of 2
(``torch.nn.functional.pdist`` in float64, bit-equal to scipy's pdist on CPU) on the vectors'
device; Ward's merge loop and fcluster (scipy, O(n^2), 3-13 ms for 755 tokens on one core) on
CPU, on the condensed distances copied back (n(n-1)/2 float64); 4 on the vectors' device.
Inside the embedding actor (:func:`pipeline.embed.model.launch_embeddings`) 1-2's distances are
queued on the GPU with the forward pass, and 2's merge loop, 3 and 4 run on the host after the
copy back, outside the device lock, so the GPU runs the next batch meanwhile. The merge loop runs
in worker processes (:class:`WardMerges`): scipy's ``linkage`` holds the GIL, and in the actor's
own threads one batch's merges (~0.5 s a batch of 32 on an H200 host) slowed the other thread's
kernel launches, so the GPU waited (2026-12-05: pooled actor at 89-90% of the unpooled one).
On a GPU the float32 matmul may round differently from CPU's, so a near-tie in the
clustering can go the other way there; the tests compare with colpali on CPU.

Since 2026-12-05's seventeenth session, on a CUDA device with Triton installed
(:func:`ward_on_device`), step 2 runs on the device whole (:mod:`pipeline.embed.ward_triton`):
the distances in a tiled kernel that sums in scipy's ``pdist`` order (bit for bit; torch's CUDA
``pdist`` reduces in its own order, though on an H100's 32 test pages it matched too), and the
merge loop (scipy's loop, bit for bit on the same distances), on
a side stream beside the next batch's forward, and the host does only the stable sort, the
clusters' names and step 3 (:func:`device_labels`, ~0.4 ms a page on the dev CPU);
no merge worker process starts. ``VDR_WARD_ON_DEVICE=0`` keeps the loop on the host.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import multiprocessing.connection as mp_connection
import os
import threading

import numpy as np
import torch

from pipeline.embed import ward
from pipeline.embed.ward import labels_from_distances  # steps 2's merge loop and 3, on CPU

log = logging.getLogger(__name__)

# Worker processes for Ward's merge loop in each pooling actor ($VDR_POOL_PROCESSES; 0: in the
# calling thread, the only way until 2026-12-05's fifteenth session; see WardMerges).
DEFAULT_PROCESSES = 2


def condensed_distances(vectors: torch.Tensor) -> torch.Tensor:
    """Steps 1 and 2's row distances, on ``vectors``' device: the (n(n-1)/2,) float64 condensed
    Euclidean distances between the rows of ``1 - E @ E.T`` (float32), what colpali's
    ``linkage(D, metric="euclidean")`` computes first. Queued only: no host sync."""
    x = vectors.to(torch.float32)
    distances = 1 - x @ x.T  # float32, as colpali's 1 - similarities
    # scipy's linkage(2-D D, metric="euclidean") = linkage(pdist(float64(D))): the pdist on the device.
    return torch.nn.functional.pdist(distances.to(torch.float64))


_DEVICE_POOLING_ERRORS: list = []  # what made this process give the device path up (give_up_device_pooling)


def give_up_device_pooling(exc: BaseException) -> None:
    """The pooling kernels could not be queued (a Triton that cannot compile for this GPU, for
    one): log it once, and pool on the host in this process from now on."""
    if not _DEVICE_POOLING_ERRORS:
        log.warning("--pool-factor: the pooling kernels failed on this device (%s: %s); this process pools "
                    "on the host from now on (the same labels; VDR_WARD_ON_DEVICE=0 does so from the start)",
                    type(exc).__name__, str(exc)[:500])
    _DEVICE_POOLING_ERRORS.append(f"{type(exc).__name__}: {exc}"[:500])


def ward_on_device(device) -> bool:
    """Whether Ward's merge loop runs on ``device`` (:mod:`pipeline.embed.ward_triton`, a Triton
    kernel) rather than on the host. ``$VDR_WARD_ON_DEVICE``: unset or ``auto``, on CUDA devices
    when Triton is installed (the ``gpu`` extra); ``0``: on the host (scipy, as before
    2026-12-05's seventeenth session); ``1``: on CUDA devices, an error without Triton; on a CPU
    device only under Triton's interpreter (``TRITON_INTERPRET=1``: the tests), else on the
    host (Triton has no CPU driver, and the switch reaches every worker, CPU actors too). After
    the kernels failed once in this process (:func:`give_up_device_pooling`): on the host."""
    value = os.environ.get("VDR_WARD_ON_DEVICE", "").strip().lower()
    cuda = str(device).startswith("cuda")
    if value in ("", "auto"):
        on = cuda and _triton_installed()
    else:
        from pipeline.config import env_flag

        if not env_flag("VDR_WARD_ON_DEVICE", True):  # a misspelt value is refused here
            return False
        if not _triton_installed():
            raise RuntimeError("VDR_WARD_ON_DEVICE=1 needs Triton (pip install -e '.[gpu]'); unset it to merge on the host")
        on = cuda or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return on and not _DEVICE_POOLING_ERRORS


@functools.lru_cache(maxsize=1)
def _triton_installed() -> bool:  # asked once per batch: looked up once per process
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def device_labels(merges: np.ndarray, flags: np.ndarray, lengths: list[int], pool_factor: int) -> list:
    """Each row's cluster ids from Ward's merges made on the device
    (:func:`pipeline.embed.ward_triton.ward_merges`: ``merges`` and ``flags`` copied back), as
    :meth:`WardMerges.labels` gives them from the distances; None for rows of one vector. A row
    whose distances were not all finite raises scipy's ``ValueError``."""
    from pipeline.embed.ward_triton import labels_from_merges

    out, start, page = [], 0, 0
    for n in lengths:
        if n <= 1:
            out.append(None)
            continue
        if flags[page]:
            raise ValueError("The condensed distance matrix must contain only finite values.")
        out.append(labels_from_merges(merges[start : start + n - 1], n, pool_factor))
        start += n - 1
        page += 1
    return out


def cluster_labels(vectors: torch.Tensor, pool_factor: int) -> np.ndarray:
    """Cluster id (0-based, scipy's order) of each of ``vectors``' rows, as colpali's pooler
    assigns them; at most ``max(n // pool_factor, 1)`` clusters. Ward's merge loop on
    ``vectors``' device where :func:`ward_on_device` says so, else scipy's on the host."""
    n = vectors.shape[0]
    if n > 1 and ward_on_device(vectors.device):
        from pipeline.embed import ward_triton

        merges, flags = ward_triton.ward_merges(ward_triton.pooling_distances(vectors, [n]), [n])
        return device_labels(merges.cpu().numpy(), flags.cpu().numpy(), [n], pool_factor)[0]
    return labels_from_distances(condensed_distances(vectors).cpu().numpy(), n, pool_factor)


def pool_by_labels(vectors: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    """Step 4: the L2-normalised float32 mean of each cluster's rows, clusters in increasing id
    order (empty ids skipped, as colpali's loop over range(max_clusters)), on ``vectors``' device."""
    labels = torch.from_numpy(np.asarray(labels).astype(np.int64)).to(vectors.device)
    _, inverse = torch.unique(labels, sorted=True, return_inverse=True)
    k = int(inverse.max()) + 1
    x = vectors.to(torch.float32)
    sums = torch.zeros((k, x.shape[1]), dtype=torch.float32, device=x.device).index_add_(0, inverse, x)
    counts = torch.bincount(inverse, minlength=k).to(torch.float32)
    return torch.nn.functional.normalize(sums / counts[:, None], p=2, dim=-1)


def _labels_here(condensed: np.ndarray, spans: list[tuple[int, int, int]], pool_factor: int) -> list:
    return [labels_from_distances(condensed[s : s + p], n, pool_factor) if n > 1 else None for s, p, n in spans]


class MergeWorkerLost(RuntimeError):
    """A merge worker died (killed, out of memory) or its pipe broke."""


class _MergeWorker:
    """One merge process, started by the forkserver, and the parent's end of its pipe
    (:func:`pipeline.embed.ward.serve`)."""

    def __init__(self, ctx):
        here, there = ctx.Pipe()
        self.process = ctx.Process(target=ward.serve, args=(there,), daemon=True, name="vdr-ward-merges")
        try:
            self.process.start()
        except BaseException:
            here.close()
            raise
        finally:
            there.close()
        self.conn = here

    def send(self, request) -> None:
        try:
            self.conn.send(request)
        except (EOFError, OSError) as exc:  # BrokenPipeError: the worker is gone
            raise MergeWorkerLost(f"merge worker {self.process.pid} is gone ({type(exc).__name__}: {exc})") from exc

    def receive(self) -> tuple:
        try:
            return self.conn.recv()
        except (EOFError, OSError) as exc:
            self.process.join(1)
            raise MergeWorkerLost(f"merge worker {self.process.pid} died (exit code {self.process.exitcode})") from exc

    def end(self) -> None:
        """End the process now (a batch failed). A sender thread blocked on its pipe then gets
        EPIPE; the pipe itself stays open until the senders are joined (:meth:`close`)."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)

    def close(self, wait: bool) -> None:
        """``wait``: ask the worker to end and give it 5 s (no batch may be in flight); then
        end it if need be, and close the pipe."""
        if wait:
            try:
                self.conn.send(None)
            except (EOFError, OSError):
                pass
            self.process.join(5)
        self.end()
        self.conn.close()


class WardMerges:
    """Ward's merge loop and ``fcluster`` (:func:`labels_from_distances`) of many rows at once,
    in ``processes`` worker processes (0: in the calling thread). Same function, same float64
    distances: the labels are the same either way (tested).

    Why processes: scipy's ``linkage`` holds the GIL, so in threads it runs one page at a time
    and stalls the thread that queues the next batch's kernels. The workers are started by
    ``forkserver`` (a clean single-threaded server, not a fork of the actor with its CUDA
    context and Ray's threads), lazily at the first call. Each takes a share of the batch's
    pages (balanced by distance count, the merge loop's cost) through its own pipe: each page's
    condensed distances (n(n-1)/2 float64, ~2.5 MB for 790 vectors) are pickled to it (a
    shared-memory block per batch was tried: 59.35 against 59.02 pages/s on an H200,
    2026-12-05, no measurable gain, so removed). Pipes, not a ``ProcessPoolExecutor`` (used
    until 2026-12-05): see :func:`pipeline.embed.ward.serve`. A worker that dies (killed, out
    of memory) loses no row: that batch's merges run again here, and the next call starts new
    workers; after ``GIVE_UP_AFTER`` failures in a row (workers that cannot start:
    multiprocessing imports the parent's ``__main__`` file in each, which must exist) every merge
    runs in the calling thread. Thread-safe: two batches in flight share the workers, one batch
    at a time (tested)."""

    GIVE_UP_AFTER = 3

    def __init__(self, processes: int = DEFAULT_PROCESSES):
        if processes < 0:
            raise ValueError(f"processes must be >= 0, got {processes}")
        self.processes = processes
        self._pool: list[_MergeWorker] | None = None
        self._broken = 0  # worker failures in a row (a batch merged in workers resets it)
        self._lock = threading.Lock()  # the pool's state
        self._batch = threading.Lock()  # one batch at a time through the pipes

    @classmethod
    def from_env(cls) -> WardMerges:
        raw = os.environ.get("VDR_POOL_PROCESSES", "").strip()
        if not raw:
            return cls()
        try:
            processes = int(raw)
            if processes < 0:
                raise ValueError
            return cls(processes)
        except ValueError:
            raise ValueError(f"VDR_POOL_PROCESSES must be a whole number of worker processes (0: merge "
                             f"in the actor's own thread), got {raw!r}") from None

    def _workers(self) -> list[_MergeWorker] | None:
        """The workers (started at the first call); None once given up (merge in this thread)."""
        with self._lock:
            if self.processes == 0:
                return None
            if self._pool is None:
                ctx = multiprocessing.get_context("forkserver")
                # the server imports the merge code (numpy, scipy, no torch) once; each worker
                # it forks has it already
                ctx.set_forkserver_preload(["pipeline.embed.ward", "scipy.cluster.hierarchy"])
                pool: list[_MergeWorker] = []
                try:
                    for _ in range(self.processes):
                        pool.append(_MergeWorker(ctx))
                except BaseException:
                    for w in pool:
                        w.close(wait=False)
                    raise
                self._pool = pool
            return self._pool

    def worker_pids(self) -> list[int]:
        """The process id each worker reports (starting them if need be): they answer."""
        pool = self._workers() or []
        with self._batch:
            for w in pool:
                w.send(("pid",))
            return [w.receive()[2] for w in pool]

    def _lost(self, pool: list[_MergeWorker] | None, exc: BaseException) -> None:
        """Workers that died, failed or could not start (``pool`` None): ended and dropped;
        after ``GIVE_UP_AFTER`` such failures in a row, no more workers. Their pipes are left
        open for the batch's sender threads; the caller closes them after joining those."""
        with self._lock:
            if pool is None:  # a start that failed; a pool another thread started meanwhile is kept
                self._broken += 1
            elif self._pool is pool:
                self._pool = None
                self._broken += 1
            if self._broken >= self.GIVE_UP_AFTER:
                self.processes = 0  # a pool still held is ended by close()
            gave_up = self.processes == 0
        for w in pool or []:
            w.end()
        log.warning("the pooling's merge workers failed (%s: %s); this batch's merges run in the actor's thread, %s",
                    type(exc).__name__, exc,
                    "and so will every later batch's (%d failures in a row, each in a warning like this one; "
                    "VDR_POOL_PROCESSES=0 runs them here from the start)" % self._broken
                    if gave_up else "the next batch starts new workers")

    def labels(self, condensed: np.ndarray, lengths: list[int], pool_factor: int) -> list[np.ndarray | None]:
        """Cluster labels of each row whose condensed distances lie one after another in
        ``condensed`` (rows of one vector have none: ``None``). An error of the merge itself
        (scipy's, on bad distances) is raised as it is; a failure of the workers (one died,
        none could start) is not: the batch's merges then run in this thread."""
        spans, start = [], 0
        for n in lengths:
            pairs = n * (n - 1) // 2 if n > 1 else 0
            spans.append((start, pairs, n))
            start += pairs
        if all(n <= 1 for n in lengths):
            return [None] * len(lengths)
        pool = None
        try:
            pool = self._workers()
        except Exception as exc:  # noqa: BLE001 - workers that cannot start: merge here
            self._lost(None, exc)
        if pool is None:
            return _labels_here(condensed, spans, pool_factor)
        # each worker's share: the rows, largest first, to the least loaded worker
        shares: list[list[int]] = [[] for _ in pool]
        load = [0] * len(pool)
        for i in sorted((i for i, (_, _, n) in enumerate(spans) if n > 1), key=lambda i: -spans[i][1]):
            k = load.index(min(load))
            shares[k].append(i)
            load[k] += spans[i][1]
        labels: list[np.ndarray | None] = [None] * len(spans)
        errors: list[BaseException] = []
        lost: list[BaseException] = []

        def send(w: _MergeWorker, share: list[int]) -> None:
            # one page per request: the worker starts on the first while the rest are sent
            try:
                for i in share:
                    s, p, n = spans[i]
                    w.send(("merge", i, condensed[s : s + p], n, pool_factor))
            except BaseException as exc:  # noqa: BLE001 - ends the batch's workers: the reader sees EOF
                lost.append(exc)
                w.end()

        with self._batch:
            senders: list[threading.Thread] = []
            interrupted = None
            try:
                busy = {w.conn: w for w, share in zip(pool, shares) if share}
                waiting = {w.conn: len(share) for w, share in zip(pool, shares) if share}
                for w, share in zip(pool, shares):
                    if share:
                        t = threading.Thread(target=send, args=(w, share), daemon=True, name="vdr-ward-send")
                        t.start()
                        senders.append(t)  # only a started thread is joined
                while waiting:  # every answer read, so that the pipes stay in step
                    for conn in mp_connection.wait(list(waiting)):
                        ok, i, value = busy[conn].receive()
                        if ok:
                            labels[i] = value
                        else:
                            errors.append(value)
                        waiting[conn] -= 1
                        if not waiting[conn]:
                            del waiting[conn]
            except Exception as exc:  # noqa: BLE001 - a worker died, a pipe closed, a thread did not start
                lost.append(exc)
            except BaseException as exc:  # KeyboardInterrupt: end the workers, then raise it
                lost.append(exc)
                interrupted = exc
            if lost:  # workers ended first, so that a sender blocked on one stops; pipes closed last
                self._lost(pool, lost[0])
            for t in senders:
                t.join()
            if lost:
                for w in pool:
                    w.conn.close()
                if interrupted is not None:
                    raise interrupted
                return _labels_here(condensed, spans, pool_factor)
        if errors:
            raise errors[0]
        with self._lock:
            self._broken = 0  # failures count in a row
        return labels

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        with self._batch:
            for w in pool or []:
                w.close(wait=True)


def check_pool_factor(pool_factor: int) -> None:
    if pool_factor < 1:
        raise ValueError(f"pool_factor must be >= 1, got {pool_factor}")


def pool_embeddings(vectors: torch.Tensor, pool_factor: int) -> torch.Tensor:
    """(n, d) vectors -> (m, d) pooled vectors, m <= max(n // pool_factor, 1), on the same
    device and in the same dtype; equal to colpali-engine 0.3.18's
    ``HierarchicalTokenPooler().pool_embeddings([vectors], pool_factor=pool_factor)[0]``
    (see the module docstring). Pass float32 to keep float32 means."""
    check_pool_factor(pool_factor)
    if vectors.dim() != 2:
        raise ValueError(f"expected (n, d) vectors, got shape {tuple(vectors.shape)}")
    if pool_factor == 1 or vectors.shape[0] <= 1:
        return vectors
    return pool_by_labels(vectors, cluster_labels(vectors, pool_factor)).to(vectors.dtype)
