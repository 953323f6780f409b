"""Where a new scoring actor's start goes, each step in a fresh process (as a new Ray worker
sees it): import torch, start CUDA, import Triton, import the scorer's module, build
``ShardScorer`` and wait for its warm-up (the first use of the scoring kernels; with
``--precision fp8-exact-topk`` its FP8 kernels too). The first process on a machine compiles the
Triton kernels (an empty ~/.triton cache); the later ones load them.

    PYTHONPATH=$PWD python3 benchmarks/bench_scorer_start.py --reps 3 [--precision fp8-exact-topk] --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, sys, time
t0 = time.perf_counter(); out = {}
def mark(name):
    global t0
    now = time.perf_counter(); out[name] = round(now - t0, 4); t0 = now
import numpy as np, pyarrow
mark("import_numpy_pyarrow")
import torch
mark("import_torch")
torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
mark("cuda_start")
import triton
mark("import_triton")
from pipeline.score import scorer, triton_kernel
mark("import_scorer_modules")
rng = np.random.default_rng(0)
q = (rng.standard_normal((25 * 8, 128)) / 11).astype(np.float16)
s = scorer.ShardScorer("unused", None, q, np.full(8, 25), 10, device="cuda", precision=sys.argv[1])
mark("scorer_init")
s._warm.join()
mark("warm_up_after_init")
out["warm_up_s"] = round(s.warm_up_s, 4)
out["warmed_up"] = s.warmed_up
print("RESULT " + json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--precision", default="exact", choices=["exact", "fp8-exact-topk"])
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    runs = []
    for r in range(args.reps):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, args.precision], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))})
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"rep {r} failed (rc {proc.returncode})")
        res = json.loads(line[0][7:])
        res["process_s"] = round(time.perf_counter() - t, 3)
        runs.append(res)
        print(json.dumps(res), flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "precision": args.precision,
              "commit": os.environ.get("BENCH_COMMIT", ""), "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "runs": runs}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
