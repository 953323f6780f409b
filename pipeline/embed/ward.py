"""Ward's merge loop and ``fcluster`` for one page's condensed distances: the step of the
token pooling (:mod:`pipeline.embed.pooling`) that runs on the host. Numpy and scipy only, no
torch, so the worker processes that run it (:class:`pipeline.embed.pooling.WardMerges`) start
in a fraction of a second and stay small."""

from __future__ import annotations

import numpy as np


def labels_from_distances(condensed: np.ndarray, n: int, pool_factor: int) -> np.ndarray:
    """Cluster id (0-based, scipy's order) of each of the n rows whose condensed Euclidean
    distances (float64, scipy's ``pdist`` layout) are given; at most ``max(n // pool_factor, 1)``
    clusters. Ward linkage, then ``fcluster(criterion="maxclust")``, as colpali-engine 0.3.18."""
    from scipy.cluster.hierarchy import fcluster, linkage

    z = linkage(condensed, method="ward")
    return fcluster(z, t=max(n // pool_factor, 1), criterion="maxclust") - 1


def labels_from_shared(path: str, start: int, pairs: int, n: int, pool_factor: int) -> np.ndarray:
    """:func:`labels_from_distances` of the ``pairs`` float64 distances at item ``start`` of the
    shared-memory file ``path`` (``/dev/shm/...``, written by the actor for one batch): each
    worker maps the batch's distances instead of receiving its page's ~2.5 MB through a pipe."""
    import mmap

    with open(path, "rb") as f:
        # private copy-on-write: writable for scipy, nothing copied unless written
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        distances = np.frombuffer(mm, dtype=np.float64, count=pairs, offset=start * 8)
        labels = labels_from_distances(distances, n, pool_factor)
        del distances
    finally:
        mm.close()
    return labels
