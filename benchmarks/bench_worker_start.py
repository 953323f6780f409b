"""How long Ray takes from asking for a model actor to running its constructor: the part of a
job's start-up before the actor imports torch (measured in a 3,000-page job on an H200,
2026-12-04: 2.6 s of the 18.6 s before the GPU starts).

    PYTHONPATH=/tmp/site:$PWD python benchmarks/bench_worker_start.py --out worker_start.json

One Ray head started here (``ray start --head``, as the job benchmarks run, with one GPU
declared: the actor asks for it). Each case is a
fresh driver process (run from ``/``, so that Ray's default of putting the driver's directory
on its workers' path does not hide a missing package) that asks for one actor (one GPU when
there is one, else one CPU), which imports ``pipeline.embed.stages`` as the job's embedding
actor does; the time from asking to the constructor (wall clock, same machine). Cases
alternate, ``--reps`` each:

* ``py_modules``: the job's runtime env (:func:`pipeline.cluster.code_runtime_env`), what
  ``python -m jobs.embed_corpus`` gives its workers.
* ``no runtime env``: what a cluster image with the package installed runs.

Each driver exits before the next starts: Ray starts each job's workers anew.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


DRIVER = r"""
import json, os, sys, time
import ray
from pipeline.cluster import code_runtime_env
env = code_runtime_env() if sys.argv[1] == "py_modules" else None
ray.init(address=sys.argv[2], runtime_env=env, include_dashboard=False, log_to_driver=False)

@ray.remote
class Probe:
    def __init__(self):
        import pipeline.embed.stages  # noqa: F401 - the embedding actor's module tree
        self.started = time.time()

    def started_at(self):
        return self.started

opts = {"num_gpus": 1}
t = time.time()
a = Probe.options(**opts).remote()
started = ray.get(a.started_at.remote())
print(json.dumps({"to_constructor_s": round(started - t, 3), "to_ready_s": round(time.time() - t, 3)}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="worker_start.json")
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    sys.path.insert(0, ROOT)
    from two_nodes_one_gpu import env as cluster_env, start_cluster, stop_cluster

    from pipeline.devtools.local_cluster import free_port

    port = free_port()
    env = cluster_env()
    dirs = start_cluster("vdr-wstart", 1, port, os.cpu_count() or 2)
    cases = ("py_modules", "no runtime env")
    res: dict[str, list] = {k: [] for k in cases}
    try:
        for rep in range(args.reps + 1):  # round 0 warms the package upload and the page cache
            for name in cases:
                p = subprocess.run([sys.executable, "-c", DRIVER, name, f"127.0.0.1:{port}"], env=env, cwd="/",
                                   capture_output=True, text=True, timeout=120)
                if p.returncode:
                    raise SystemExit(p.stderr[-3000:])
                r = json.loads(p.stdout.strip().splitlines()[-1])
                print(name, rep, r, flush=True)
                if rep:
                    res[name].append(r)
    finally:
        stop_cluster(dirs)
    summary = {k: {"median_to_constructor_s": statistics.median(r["to_constructor_s"] for r in v), "runs": v}
               for k, v in res.items()}
    out = {"cases": summary, "cpus": os.cpu_count(), "commit": os.environ.get("BENCH_COMMIT"),
           "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(out, indent=1))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
