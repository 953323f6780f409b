"""What a runtime env with ``env_vars`` costs a new actor's start (pipeline.cluster.with_worker_env
sends the driver's worker switches that way): a CPU actor started and answering one call, with
and without ``runtime_env={"env_vars": {...}}`` on the actor, alternating, on an embedded local Ray.

    python benchmarks/bench_env_vars_start.py --rounds 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=1, include_dashboard=False)

    @ray.remote(num_cpus=1)
    class Probe:
        def ping(self):
            return 1

    res: dict = {"none": [], "env_vars": []}
    for _ in range(args.rounds):
        for kind in ("none", "env_vars"):
            t = time.perf_counter()
            opts = {"runtime_env": {"env_vars": {"VDR_POOL_PROCESSES": "3"}}} if kind == "env_vars" else {}
            a = Probe.options(**opts).remote()
            ray.get(a.ping.remote())
            res[kind].append(round(time.perf_counter() - t, 3))
            ray.kill(a)
            time.sleep(1)
    print(json.dumps({"starts_s": res, "median_s": {k: statistics.median(v) for k, v in res.items()}}))
    ray.shutdown()


if __name__ == "__main__":
    main()
