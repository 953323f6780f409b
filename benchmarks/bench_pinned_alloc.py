"""Time one page-locked host buffer of a shard's size, each way torch can make it, each in
a fresh process (the allocator's settings are per process):

- ``default``: one ``cudaHostAlloc`` (torch's pinned allocator as it comes);
- ``env``: ``PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:...`` in the environment
  (malloc + ``cudaHostRegister`` on 8 threads);
- ``scorer``: what the scoring actor does, :func:`pipeline.score.scorer.use_registered_pinned_memory`,
  called *after* CUDA is initialised (so the settings are applied to a running allocator,
  not read from the environment).

    PYTHONPATH=$PWD python benchmarks/bench_pinned_alloc.py [--gb 3.5] [--out OUT.json]

GPU only. The figure covers the allocation alone (what ``host_alloc_s`` in a scoring job's
summary times), not the read into it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import os, sys, time, torch
mode, n = sys.argv[1], int(sys.argv[2])
torch.cuda.init(); torch.empty(1, device="cuda")
if mode == "scorer":
    from pipeline.score.scorer import use_registered_pinned_memory
    use_registered_pinned_memory()
t = time.perf_counter()
x = torch.empty(n, dtype=torch.uint8, pin_memory=True)
alloc = time.perf_counter() - t
t = time.perf_counter()
y = x.to("cuda", non_blocking=True); torch.cuda.synchronize()
print(alloc, time.perf_counter() - t, x.is_pinned())
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=3.5)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    n = int(args.gb * 1e9)
    rows = []
    for rep in range(args.reps):
        for mode in ("default", "env", "scorer"):
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
            env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
            env.pop("PYTORCH_ALLOC_CONF", None)  # torch's newer name: either would change the default row
            if mode == "env":
                env["PYTORCH_CUDA_ALLOC_CONF"] = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"
            p = subprocess.run([sys.executable, "-c", CHILD, mode, str(n)], env=env, capture_output=True, text=True)
            if p.returncode:
                rows.append({"mode": mode, "rep": rep, "error": p.stderr[-500:]})
            else:
                alloc, h2d, pinned = p.stdout.split()[-3:]
                rows.append({"mode": mode, "rep": rep, "alloc_s": float(alloc), "h2d_s": float(h2d),
                             "h2d_GBps": n / float(h2d) / 1e9, "pinned": pinned == "True"})
            print(json.dumps(rows[-1]), flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "bytes": n, "commit": os.environ.get("BENCH_COMMIT", ""),
              "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
