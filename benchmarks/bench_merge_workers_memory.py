"""How much host memory the pooling's merge workers take (``--pool-factor``, ``VDR_POOL_PROCESSES``).

The merge workers (:class:`pipeline.embed.pooling.WardMerges`) are a forkserver and its worker
processes beside each embedding actor; an operator sizing a GPU node's host memory needs what
they cost. This runs batches of the actor's shape through them (pages of ``--vectors`` vectors:
790 for a letter page at 768 visual tokens) and reads, after the batches, each process's
resident set and proportional set (``/proc/<pid>/smaps_rollup``: PSS splits the pages the
workers share with the forkserver they were forked from, so the PSS sum is what they cost
together) and its peak resident set (``VmHWM``). The processes hold no torch and no model: the
figure does not depend on the GPU, so a CPU machine measures it.

    python benchmarks/bench_merge_workers_memory.py --processes 2 --batches 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing.forkserver
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.embed.pooling import WardMerges  # noqa: E402


def memory_kib(pid: int) -> dict:
    """Resident, proportional and peak resident set of one process, KiB (Linux /proc)."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                out[key.lower()] = int(rest.split()[0])
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                out["peak_rss"] = int(line.split()[1])
    return out


def measure(args: argparse.Namespace) -> dict:
    """Batches through the merge workers, then the memory of every process involved."""
    rng = np.random.default_rng(0)
    n = args.vectors
    pairs = n * (n - 1) // 2
    # distances of real vectors: Euclidean distances of random unit vectors (the merge's cost
    # depends on n, not on the values)
    from scipy.spatial.distance import pdist

    pages = [pdist(v / np.linalg.norm(v, axis=1, keepdims=True))
             for v in (rng.standard_normal((n, 128)) for _ in range(args.pages))]
    condensed = np.concatenate(pages)
    assert condensed.size == pairs * args.pages

    merges = WardMerges(args.processes)
    parent_before = memory_kib(os.getpid())
    times = []
    for _ in range(args.batches):
        t0 = time.perf_counter()
        labels = merges.labels(condensed, [n] * args.pages, args.pool_factor)
        times.append(round(time.perf_counter() - t0, 3))
    assert len(labels) == args.pages and all(lab.max() + 1 <= max(n // args.pool_factor, 1) for lab in labels)

    procs = {}
    pool = merges._pool
    if pool is not None:
        for w in pool:
            procs[f"worker {w.process.pid}"] = memory_kib(w.process.pid)
        server = multiprocessing.forkserver._forkserver._forkserver_pid
        if server:
            procs[f"forkserver {server}"] = memory_kib(server)
    total_pss = sum(p["pss"] for p in procs.values())
    result = {
        "where": "a Ray actor (the workers import Ray's default_worker.py as __main__)" if args.in_ray_actor
                 else "this script's process (the workers import this script, and with it torch, as __main__)",
        "processes": args.processes, "pages_per_batch": args.pages, "vectors_per_page": n,
        "batch_distances_mib": round(condensed.nbytes / 2**20, 1),
        "batch_seconds": times,
        "processes_kib": procs,
        "workers_and_server_pss_mib": round(total_pss / 1024, 1),
        "workers_and_server_rss_mib": round(sum(p["rss"] for p in procs.values()) / 1024, 1),
        "caller_rss_mib_before_after": [round(parent_before["rss"] / 1024, 1),
                                        round(memory_kib(os.getpid())["rss"] / 1024, 1)],
    }
    merges.close()
    return result


class Probe:
    def run(self, args: argparse.Namespace) -> dict:
        return measure(args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=2, help="merge worker processes (the default of VDR_POOL_PROCESSES)")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--pages", type=int, default=32, help="pages per batch (the actor's batch size)")
    ap.add_argument("--vectors", type=int, default=790, help="vectors per page (790: a letter page at 768 tokens)")
    ap.add_argument("--pool-factor", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--in-ray-actor", action="store_true",
                    help="run the merges inside a Ray actor on a new local Ray (as the embedding actor does)")
    args = ap.parse_args()

    if args.in_ray_actor:
        import ray

        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 1), include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
        try:
            body = ray.get(ray.remote(num_cpus=1)(Probe).remote().run.remote(args))
        finally:
            ray.shutdown()
    else:
        body = measure(args)
    result = {
        "bench": "merge_workers_memory",
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=Path(__file__).resolve().parents[1]).stdout.strip(),
        "host": f"{platform.node()} ({os.cpu_count()} CPUs), Python {platform.python_version()}",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        **body,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
