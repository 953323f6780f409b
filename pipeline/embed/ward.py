"""Ward's merge loop and ``fcluster`` for one page's condensed distances: the step of the
token pooling (:mod:`pipeline.embed.pooling`) that runs on the host. Numpy and scipy only, no
torch, so the forkserver that starts the merge workers (:class:`pipeline.embed.pooling.WardMerges`)
preloads nothing heavy of ours. (Python's multiprocessing also imports the parent's ``__main__``
there: in a Ray actor ``default_worker.py``, which imports ``ray``; the first merge in a Ray
actor took 0.77 s on a CPU in review.)"""

from __future__ import annotations

import numpy as np


def labels_from_distances(condensed: np.ndarray, n: int, pool_factor: int) -> np.ndarray:
    """Cluster id (0-based, scipy's order) of each of the n rows whose condensed Euclidean
    distances (float64, scipy's ``pdist`` layout) are given; at most ``max(n // pool_factor, 1)``
    clusters. Ward linkage, then ``fcluster(criterion="maxclust")``, as colpali-engine 0.3.18."""
    from scipy.cluster.hierarchy import fcluster, linkage

    z = linkage(condensed, method="ward")
    return fcluster(z, t=max(n // pool_factor, 1), criterion="maxclust") - 1


def serve(conn) -> None:
    """A merge worker's loop (:class:`pipeline.embed.pooling.WardMerges`), on one end of a
    ``multiprocessing`` pipe, one page per request, so that the worker starts on a batch's first
    page while the next ones are still being sent. ``("merge", i, condensed, n, pool_factor)``
    is answered ``(True, i, labels)``, or ``(False, i, error)`` when the merge raised (bad
    distances); ``("pid",)`` is answered ``(True, -1, pid)``; ``None`` or a closed pipe ends
    the loop.

    A pipe, not a ``ProcessPoolExecutor`` (until 2026-12-05): its queues hold named semaphores
    that multiprocessing's resource tracker follows, and Ray kills an actor's child processes,
    the tracker among them, before the actor's Python exits; each pooled actor then printed
    "resource_tracker: process died unexpectedly ... Some resources might leak" and five
    ``KeyError`` tracebacks at the end of every job (tests/embed/test_pooling.py). A pipe holds
    no such resource."""
    import os

    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        if request[0] == "pid":
            answer = (True, -1, os.getpid())
        else:
            _, i, condensed, n, pool_factor = request
            try:
                answer = (True, i, labels_from_distances(condensed, n, pool_factor))
            except Exception as exc:  # noqa: BLE001 - the caller raises it
                answer = (False, i, exc)
        try:
            conn.send(answer)
        except (EOFError, OSError):
            return
        except Exception:  # noqa: BLE001 - an error that does not pickle
            conn.send((False, answer[1], RuntimeError(f"{type(answer[2]).__name__}: {answer[2]}")))
