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
copy back, outside the device lock, so the GPU runs the next batch meanwhile.
On a GPU the float32 matmul may round differently from CPU's, so a near-tie in the
clustering can go the other way there; the tests compare with colpali on CPU.
"""

from __future__ import annotations

import numpy as np
import torch


def condensed_distances(vectors: torch.Tensor) -> torch.Tensor:
    """Steps 1 and 2's row distances, on ``vectors``' device: the (n(n-1)/2,) float64 condensed
    Euclidean distances between the rows of ``1 - E @ E.T`` (float32), what colpali's
    ``linkage(D, metric="euclidean")`` computes first. Queued only: no host sync."""
    x = vectors.to(torch.float32)
    distances = 1 - x @ x.T  # float32, as colpali's 1 - similarities
    # scipy's linkage(2-D D, metric="euclidean") = linkage(pdist(float64(D))): the pdist on the device.
    return torch.nn.functional.pdist(distances.to(torch.float64))


def labels_from_distances(condensed: np.ndarray, n: int, pool_factor: int) -> np.ndarray:
    """Steps 2 (Ward's merge loop) and 3 on CPU: cluster id (0-based, scipy's order) of each of
    the n rows whose :func:`condensed_distances` are given; at most ``max(n // pool_factor, 1)``
    clusters."""
    from scipy.cluster.hierarchy import fcluster, linkage

    z = linkage(condensed, method="ward")
    return fcluster(z, t=max(n // pool_factor, 1), criterion="maxclust") - 1


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
