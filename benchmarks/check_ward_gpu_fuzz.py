"""Ward's merge loop and the pooling distances on a GPU against scipy, on inputs made to break
them (written by the seventeenth session's review, 2026-12-05):

A. ~900 pages of 2-60 points in one launch per round, with pages of 0/1 vectors between them:
   random, integer-grid, repeated, simplex-like and 0/1 points, and non-metric condensed
   matrices with many equal values; plus pages of 600 and 1,500 grid points. Each page's
   linkage from the kernel's merges must equal scipy's ``linkage(method="ward")`` bit for bit.
B. The actor's path (tiled distances, the merge kernel on a side stream, device_labels) on
   pages of up to 4,100 vectors with repeated vectors, while the main stream allocates and
   frees 800 MB: distances equal scipy's ``pdist`` (pages under 2,100 vectors), linkage and
   labels equal scipy's.

    PYTHONPATH=$PWD python3 benchmarks/check_ward_gpu_fuzz.py      # prints A/B lines, then DONE
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import pdist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.embed import ward_triton as W  # noqa: E402
from pipeline.embed.model import ward_on_side_stream  # noqa: E402
from pipeline.embed.pooling import device_labels  # noqa: E402
from pipeline.embed.ward import labels_from_distances  # noqa: E402

rng = np.random.default_rng(7)


def gen():
    k, n = rng.integers(0, 6), int(rng.integers(2, 60))
    if k == 0:
        p = rng.standard_normal((n, 3))
    elif k == 1:
        p = rng.integers(0, 3, size=(n, int(rng.integers(1, 4)))).astype(float)
    elif k == 2:
        p = np.repeat(rng.standard_normal((n, 2)), 3, 0)[:n]
    elif k == 3:
        m = int(rng.integers(2, 6))
        p = np.eye(m)[rng.integers(0, m, size=n)] * rng.choice([1, 0.1, 3, 1 / 3])
    elif k == 4:
        p = rng.integers(0, 2, size=(n, 6)) * 0.7
    else:  # not a Euclidean matrix at all, many ties
        return np.round(rng.random(n * (n - 1) // 2) * 4) / 4 + 0.5, n
    return pdist(p), n


def main() -> None:
    print(torch.__version__, __import__("triton").__version__, torch.cuda.get_device_name(), flush=True)
    for rep in range(3):
        ds, ns = [], []
        for _ in range(300):
            d, n = gen()
            ds.append(d)
            ns.append(n)
        for n in (600, 1500)[: rep + 1]:
            ds.append(pdist(rng.integers(0, 3, size=(n, 3)).astype(float)))
            ns.append(n)
        lengths = []
        for n in ns:
            lengths += [n, int(rng.integers(0, 2))]
        t = time.time()
        z, f = W.ward_merges(torch.from_numpy(np.concatenate(ds)).cuda(), lengths)
        z = z.cpu().numpy()
        dt = time.time() - t
        bad, s = 0, 0
        for d, n in zip(ds, ns):
            bad += not np.array_equal(W.linkage_from_merges(z[s : s + n - 1], n), linkage(d, method="ward"))
            s += n - 1
        print("A", rep, "pages", len(ns), "linkage_not_equal", bad, "flagged", int(f.sum()), "s", round(dt, 2), flush=True)
    for lengths in ([4100, 0, 1, 2, 3, 755, 64, 2049], [4099, 17, 1, 1500]):
        g = torch.Generator().manual_seed(len(lengths))
        x = torch.nn.functional.normalize(torch.randn(sum(lengths), 128, generator=g), dim=-1)
        x[1::7] = x[0::7][: len(x[1::7])]
        flat = x.to(torch.bfloat16).cuda()
        ref = W.pooling_distances(flat, lengths).cpu().numpy()
        torch.cuda.synchronize()
        t = time.time()
        d = W.pooling_distances(flat, lengths)
        merges, flags, done = ward_on_side_stream(d, lengths)
        del d
        junk = [torch.full((1 << 25,), 7.0, dtype=torch.float64, device="cuda") for _ in range(3)]
        del junk
        done.synchronize()
        dt = time.time() - t
        labels = device_labels(merges.numpy(), flags.numpy(), lengths, 3)
        s = c = st = 0
        rows = []
        for i, n in enumerate(lengths):
            if n > 1:
                v = flat[s : s + n].float()
                sim = (1 - v @ v.T).double().cpu().numpy()
                dd = ref[c : c + n * (n - 1) // 2]
                c += n * (n - 1) // 2
                rows.append({"n": n, "pdist_equal": bool(np.array_equal(dd, pdist(sim))) if n < 2100 else None,
                             "linkage_equal": bool(np.array_equal(W.linkage_from_merges(merges.numpy()[st : st + n - 1], n),
                                                                  linkage(dd, method="ward"))),
                             "labels_equal": bool(np.array_equal(labels[i], labels_from_distances(dd, n, 3)))})
                st += n - 1
            else:
                rows.append({"n": n, "left_alone": labels[i] is None})
            s += n
        print("B", rows, "s", round(dt, 2), flush=True)
    print("DONE")


if __name__ == "__main__":
    main()
