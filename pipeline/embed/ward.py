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

