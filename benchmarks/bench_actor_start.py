"""Where a GPU actor's start-up goes before it loads any weights: the imports and CUDA's
start, each in a fresh Python process, alone and beside N busy CPU processes (what the
render tasks of a job are doing while the actor starts).

    python benchmarks/bench_actor_start.py --busy 0,15 --out actor_start.json

Each step is timed inside one fresh interpreter, in the order an embedding actor runs them:
``import ray``, ``import pyarrow``, ``import torch``, CUDA's start (when a GPU is present),
the ColQwen2 classes from transformers, and torch's compiler (``torch._dynamo`` +
``torch._inductor``, which ``nn.Module.compile`` imports). The busy processes spin in pure
Python, one per core asked for.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

CHILD = r"""
import json, time
t = [time.perf_counter()]
out = {}
def mark(name):
    now = time.perf_counter(); out[name] = round(now - t[0], 3); t[0] = now
import ray; mark("ray")
import pyarrow, numpy; mark("pyarrow")
import torch; mark("torch")
if torch.cuda.is_available():
    torch.zeros(1, device="cuda"); torch.cuda.synchronize(); mark("cuda_init")
from transformers import ColQwen2ForRetrieval, ColQwen2Processor; mark("transformers_colqwen2")
import torch._dynamo, torch._inductor.compile_fx; mark("torch_compiler")
print(json.dumps(out))
"""


def spin(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x += 1


def run_child() -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_total"] = round(time.perf_counter() - t, 3)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--busy", default="0,15", help="numbers of busy CPU processes to run beside, comma-separated")
    ap.add_argument("--reps", type=int, default=2, help="fresh processes per setting (the first warms the file cache)")
    ap.add_argument("--out", default="actor_start.json")
    args = ap.parse_args()
    res: dict = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d"),
                 "commit": os.environ.get("BENCH_COMMIT"), "command": " ".join(sys.argv), "runs": {}}
    run_child()  # file cache warm for every setting
    for n in [int(x) for x in args.busy.split(",")]:
        stop_at = time.time() + 3600
        procs = [mp.Process(target=spin, args=(stop_at,), daemon=True) for _ in range(n)]
        for p in procs:
            p.start()
        try:
            res["runs"][f"busy_{n}"] = [run_child() for _ in range(args.reps)]
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.join()
        print(n, res["runs"][f"busy_{n}"], flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
