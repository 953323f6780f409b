"""``load_model`` of a local checkpoint in a fresh process (as a new actor runs it), with the
page cache in three states, this checkout against another (``--old-code``, e.g. a ``git
worktree`` of the commit before), alternating:

- ``warm``: the weights and the Python packages in the page cache (a node's later actors);
- ``weights``: the weight files evicted (``posix_fadvise(DONTNEED)``), packages cached (weights
  on a disk or network filesystem not read since boot, packages in use);
- ``cold``: the whole page cache dropped (``echo 3 > /proc/sys/vm/drop_caches``; needs root):
  a freshly booted node.

    python benchmarks/bench_model_load_cold.py --model /tmp/real --old-code /tmp/vdr-old \
        --rounds 3 --out load.json

``--model``: a checkpoint folder, e.g. the real-size random ColQwen2 (``python -c "from
pipeline.devtools.tiny import build_tiny_model; build_tiny_model('/tmp/real', real_size=True)"``,
4.4 GB bf16). The load runs on the CPU (``device="cpu"``), where transformers maps the weights
and reads only what it touches while loading; on a GPU the copy to the device reads them all,
so each process then reads one byte of every 4 KiB page of the weights (``touch_s``;
``ready_s`` = the load and that): the CPU's stand-in for that copy's reads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOAD = r"""
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
from pipeline.embed.model import load_model
lm = load_model(sys.argv[2], device="cpu", dtype="bfloat16")
t1 = time.perf_counter()
import torch
for p in lm.model.parameters():  # one byte of each 4 KiB page: every page read, as a copy to a GPU reads them
    p.detach().reshape(-1).view(torch.uint8)[::4096].sum()
t2 = time.perf_counter()
print("RESULT " + json.dumps({"load_model_s": round(t1 - t0, 3), "touch_s": round(t2 - t1, 3),
                              "ready_s": round(t2 - t0, 3), "phases": lm.load_phases}))
"""


def evict(model: str, mode: str) -> None:
    if mode == "cold":
        subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, check=True)
    elif mode == "weights":
        for name in os.listdir(model):
            if name.endswith((".safetensors", ".bin")):
                fd = os.open(os.path.join(model, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--old-code", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="warm,weights,cold")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    codes = {"old": os.path.abspath(args.old_code), "new": ROOT}
    rows = []
    for r in range(args.rounds):
        for mode in args.modes.split(","):
            for label in (("old", "new") if r % 2 == 0 else ("new", "old")):
                evict(args.model, mode)
                t0 = time.perf_counter()
                out = subprocess.run([sys.executable, "-c", LOAD, codes[label], args.model], capture_output=True,
                                     text=True, cwd=codes[label], timeout=900,
                                     env=dict(os.environ, VDR_COMPILE_HELPER="0"))
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                if out.returncode or not lines:
                    raise RuntimeError(out.stderr[-3000:])
                row = json.loads(lines[-1][len("RESULT "):])
                row.update(round=r, mode=mode, code=label, process_s=round(time.perf_counter() - t0, 3))
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for mode in args.modes.split(","):
        for label in codes:
            for key in ("load_model_s", "ready_s"):
                vals = [x[key] for x in rows if x["mode"] == mode and x["code"] == label]
                summary[f"{mode}/{label}/{key}"] = {"min": min(vals), "max": max(vals),
                                                    "mean": round(sum(vals) / len(vals), 3)}
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "model_bytes": sum(os.path.getsize(os.path.join(args.model, n))
                                                               for n in os.listdir(args.model)),
                       "old_code": codes["old"], "cpus": os.cpu_count(), "rows": rows, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
