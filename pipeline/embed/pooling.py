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
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import torch

from pipeline.embed.ward import labels_from_distances, labels_from_shared  # steps 2's merge loop and 3, on CPU

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


def cluster_labels(vectors: torch.Tensor, pool_factor: int) -> np.ndarray:
    """Cluster id (0-based, scipy's order) of each of ``vectors``' rows, as colpali's pooler
    assigns them; at most ``max(n // pool_factor, 1)`` clusters."""
    return labels_from_distances(condensed_distances(vectors).cpu().numpy(), vectors.shape[0], pool_factor)


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


SHM_DIR = "/dev/shm"


def _shared_copy(condensed: np.ndarray):
    """The batch's condensed distances copied into a new shared-memory block (``SHM_DIR``), for
    the workers to map; None where there is no ``/dev/shm`` or it has less than twice the room
    (a container's default is 64 MiB; writing past a full tmpfs would kill the actor with
    SIGBUS): the distances then go through the pool's pipe, as Python pickles them."""
    from multiprocessing import shared_memory

    size = condensed.nbytes
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    if size == 0 or st.f_bavail * st.f_frsize < 2 * size:
        return None
    try:
        block = shared_memory.SharedMemory(create=True, size=size)
    except OSError:
        return None
    np.copyto(np.ndarray(condensed.shape, dtype=np.float64, buffer=block.buf), condensed, casting="no")
    return block


def _labels_here(condensed: np.ndarray, spans: list[tuple[int, int, int]], pool_factor: int) -> list:
    return [labels_from_distances(condensed[s : s + p], n, pool_factor) if n > 1 else None for s, p, n in spans]


class WardMerges:
    """Ward's merge loop and ``fcluster`` (:func:`labels_from_distances`) of many rows at once,
    in ``processes`` worker processes (0: in the calling thread). Same function, same float64
    distances: the labels are the same either way (tested).

    Why processes: scipy's ``linkage`` holds the GIL, so in threads it runs one page at a time
    and stalls the thread that queues the next batch's kernels. The workers are started by
    ``forkserver`` (a clean single-threaded server, not a fork of the actor with its CUDA
    context and Ray's threads), lazily at the first call; each page's condensed distances
    (n(n-1)/2 float64, ~2.5 MB for 790 vectors) are copied once per batch into shared memory that
    the workers map (through the pool's pipe, pickled, where ``/dev/shm`` is missing or small:
    32 such pages took 0.14 s a batch of round trips on a dev machine's CPU). A worker that dies (killed,
    out of memory) loses no row: that batch's merges run again here, and the next call starts
    a new pool; after ``GIVE_UP_AFTER`` lost pools (workers that cannot start: multiprocessing
    imports the parent's ``__main__`` file in each, which must exist) every merge runs in the
    calling thread. Thread-safe: two batches in flight share one pool."""

    GIVE_UP_AFTER = 3

    def __init__(self, processes: int = DEFAULT_PROCESSES):
        if processes < 0:
            raise ValueError(f"processes must be >= 0, got {processes}")
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._broken = 0  # pools lost to a dead worker
        self._lock = threading.Lock()

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

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                ctx = multiprocessing.get_context("forkserver")
                # the server imports the merge code (numpy, scipy, no torch) once; each worker
                # it forks has it already
                ctx.set_forkserver_preload(["pipeline.embed.ward", "scipy.cluster.hierarchy"])
                self._pool = ProcessPoolExecutor(max_workers=self.processes, mp_context=ctx)
            return self._pool

    def labels(self, condensed: np.ndarray, lengths: list[int], pool_factor: int) -> list[np.ndarray | None]:
        """Cluster labels of each row whose condensed distances lie one after another in
        ``condensed`` (rows of one vector have none: ``None``)."""
        spans, start = [], 0
        for n in lengths:
            pairs = n * (n - 1) // 2 if n > 1 else 0
            spans.append((start, pairs, n))
            start += pairs
        if self.processes == 0:
            return _labels_here(condensed, spans, pool_factor)
        pool = self._executor()
        shared = _shared_copy(condensed)
        try:
            if shared is not None:  # the workers map the batch's distances
                path = os.path.join(SHM_DIR, shared.name)
                futures = [pool.submit(labels_from_shared, path, s, p, n, pool_factor) if n > 1 else None
                           for s, p, n in spans]
            else:  # each page's distances pickled through the pool's pipe
                futures = [pool.submit(labels_from_distances, condensed[s : s + p], n, pool_factor) if n > 1 else None
                           for s, p, n in spans]
            return [f.result() if f is not None else None for f in futures]
        except BrokenProcessPool as exc:
            with self._lock:
                if self._pool is pool:
                    self._pool = None
                    self._broken += 1
                    if self._broken >= self.GIVE_UP_AFTER:
                        self.processes = 0
            pool.shutdown(wait=False, cancel_futures=True)
            log.warning("a pooling worker process died (%s); this batch's merges run in the actor's thread, %s",
                        exc, "and so will every later batch's (workers died %d times: see the worker's "
                        "traceback above; VDR_POOL_PROCESSES=0 runs them here from the start)" % self._broken
                        if self.processes == 0 else "the next batch starts new workers")
            return _labels_here(condensed, spans, pool_factor)
        finally:
            if shared is not None:
                shared.close()
                shared.unlink()

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


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
