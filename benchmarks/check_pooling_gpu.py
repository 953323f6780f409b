"""--pool-factor on a GPU: pool_embeddings on CUDA against colpali-engine's reference
(tests/data/pooling_reference.npz, made on CPU), and its cost per 755-token page by step;
the pooling distances in a tiled Triton kernel against torch's pdist and scipy's (bit for bit,
time per batch by tile config), and Ward's merge loop on the GPU against scipy's on the same
distances (bit for bit, and time).

    PYTHONPATH=$PWD python3 benchmarks/check_pooling_gpu.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.embed.pooling import cluster_labels, pool_embeddings, ward_on_device  # noqa: E402

REFERENCE = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "pooling_reference.npz")


def device_merges(pages: list) -> dict:
    """Ward's merge loop on the GPU (pipeline/embed/ward_triton.py) against scipy's on the host,
    on the same GPU distances of a batch of pages: linkage matrices equal bit for bit (page
    count), and the time of each per batch: the kernel alone (CUDA events, median of 5), the
    host's sort + labels + fcluster after it, and scipy's linkage + fcluster on one core."""
    from scipy.cluster.hierarchy import linkage

    from pipeline.embed import ward_triton
    from pipeline.embed.pooling import device_labels
    from pipeline.embed.ward import labels_from_distances
    from pipeline.embed.ward_triton import linkage_from_merges, ward_merges

    lengths = [p.shape[0] for p in pages]
    dist = ward_triton.pooling_distances(torch.cat(pages), lengths)  # the actor's distances
    host = dist.cpu().numpy()
    made, flags = ward_merges(dist.clone(), lengths)
    made = made.cpu().numpy()
    equal, start, cstart = 0, 0, 0
    for n in lengths:
        c = host[cstart : cstart + n * (n - 1) // 2]
        equal += bool(np.array_equal(linkage_from_merges(made[start : start + n - 1], n), linkage(c, method="ward")))
        start += n - 1
        cstart += n * (n - 1) // 2
    kernel_ms = []
    for _ in range(5):
        work = dist.clone()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        ward_merges(work, lengths)
        b.record()
        b.synchronize()
        kernel_ms.append(a.elapsed_time(b))
    t = time.perf_counter()
    device_labels(made, flags.cpu().numpy(), lengths, 3)
    labels_s = time.perf_counter() - t
    t = time.perf_counter()
    cstart = 0
    for n in lengths:
        labels_from_distances(host[cstart : cstart + n * (n - 1) // 2], n, 3)
        cstart += n * (n - 1) // 2
    scipy_s = time.perf_counter() - t
    return {"pages": len(pages), "linkage_bit_equal_pages": equal, "kernel_ms_per_batch_median": round(statistics.median(kernel_ms), 2),
            "kernel_ms_per_batch_all": [round(v, 2) for v in kernel_ms],
            "host_labels_ms_per_batch": round(1000 * labels_s, 2), "scipy_linkage_fcluster_ms_per_batch": round(1000 * scipy_s, 1)}


def cuda_ms(fn, repeats: int = 5) -> list[float]:
    fn()  # compiles the kernel, fills the allocator
    out = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(round(a.elapsed_time(b), 3))
    return out


def device_distances(pages: list) -> dict:
    """The pooling distances of a batch of pages: torch's pdist per page (the host path's, and
    the device path's until the seventeenth session) against the tiled Triton kernel
    (pipeline/embed/ward_triton.py) in several (tile, warps) configs; each against scipy's
    ``pdist`` of the same float64 matrix copied to the host (bit for bit: pages equal)."""
    from scipy.spatial.distance import pdist

    from pipeline.embed import ward_triton
    from pipeline.embed.model import pooling_distances as torch_distances

    lengths = [p.shape[0] for p in pages]
    flat = torch.cat(pages)
    want = [pdist((1 - p.float() @ p.float().T).double().cpu().numpy()) for p in pages]

    def pages_equal(got: torch.Tensor) -> int:
        got, start, equal = got.cpu().numpy(), 0, 0
        for w in want:
            equal += bool(np.array_equal(got[start : start + len(w)], w))
            start += len(w)
        return equal

    out = {"pages": len(pages), "torch_pdist": {"ms": cuda_ms(lambda: torch_distances(flat, lengths)),
                                                "pages_equal_scipy": pages_equal(torch_distances(flat, lengths))}}
    for config in ((32, 4), (64, 4), (64, 8), (64, 16), (128, 16)):
        key = "triton_{}x{}_w{}".format(config[0], config[0], config[1])
        try:
            out[key] = {"ms": cuda_ms(lambda: ward_triton.pooling_distances(flat, lengths, config=config)),
                        "pages_equal_scipy": pages_equal(ward_triton.pooling_distances(flat, lengths, config=config))}
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is a result too
            out[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    out["default_config"] = list(ward_triton.PDIST_CONFIG)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = "cuda"
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "reference": {}}
    ref = np.load(REFERENCE)
    for case in ("random_96", "structured_420", "tiny_model_page"):
        x = torch.from_numpy(ref[f"{case}/input"].astype(np.float32)).to(dev)
        for f in (2, 3):
            labels = cluster_labels(x, f)
            pooled = pool_embeddings(x, f).cpu().numpy()
            want = ref[f"{case}/f{f}/pooled"].astype(np.float32)
            same = pooled.shape == want.shape
            out["reference"][f"{case}/f{f}"] = {
                "labels_equal": bool(np.array_equal(labels, ref[f"{case}/f{f}/labels"])),
                "shape_equal": same, "max_abs_diff": float(np.abs(pooled - want).max()) if same else None}
    g = torch.Generator(device=dev).manual_seed(0)
    pages = [torch.nn.functional.normalize(torch.randn(755, 128, generator=g, device=dev), dim=-1) for _ in range(32)]
    from scipy.cluster.hierarchy import fcluster, linkage

    steps = {"gpu_similarity_pdist_copy": [], "cpu_ward_fcluster": [], "pool_embeddings": []}
    for p in pages[:3]:
        pool_embeddings(p, 3)  # warm-up
    for p in pages:
        torch.cuda.synchronize()
        t = time.perf_counter()
        condensed = torch.nn.functional.pdist((1 - p @ p.T).double()).cpu().numpy()
        t1 = time.perf_counter()
        fcluster(linkage(condensed, method="ward"), t=755 // 3, criterion="maxclust")
        t2 = time.perf_counter()
        pool_embeddings(p, 3)
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        steps["gpu_similarity_pdist_copy"].append(t1 - t)
        steps["cpu_ward_fcluster"].append(t2 - t1)
        steps["pool_embeddings"].append(t3 - t2)
    out["per_page_ms_median_755_tokens_f3"] = {k: round(1000 * statistics.median(v), 2) for k, v in steps.items()}
    out["ward_on_device"] = ward_on_device(dev)
    out["device_distances"] = device_distances(pages)
    out["device_merges"] = device_merges(pages)
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
