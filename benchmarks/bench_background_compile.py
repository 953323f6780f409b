"""An embedding actor's first batches: compiled from the first (``--wait-for-compile``),
eager while the blocks compile in the background (the job's default since 2026-12-04), and
eager only. Real-size ColQwen2 (random weights), one GPU, each case a fresh process timed
from the end of the model load, with two threads calling the actor as Ray Data does at
``--batches-in-flight 2``.

    PYTHONPATH=/tmp/site:$PWD python benchmarks/bench_background_compile.py --out bg.json

Per case: each batch's start and end (seconds after the model load), whether it ran
compiled, when the background compilation ended, and when the last of the ``--batches``
batches ended: the time a fresh actor needs for that many pages, start-up excluded.
The first case compiles cold and fills this node's caches; the others are warm.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ACTOR = r"""
import json, os, sys, threading, time
import torch
sys.path.insert(0, sys.argv[3])
from concurrent.futures import ThreadPoolExecutor
from bench_embed import letter_pdf, render_pages, rows_table
from pipeline.embed.stages import PageEmbedder
mode, n_batches, bs = sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
if os.environ.get("BENCH_SWITCH_INTERVAL"):
    sys.setswitchinterval(float(os.environ["BENCH_SWITCH_INTERVAL"]))
pages = render_pages(letter_pdf(8, 0), 768) * (bs // 8 + 1)
table = rows_table(pages[:bs])
emb = PageEmbedder(sys.argv[1], device=sys.argv[7], compile_model=mode != "eager", compile_cache=sys.argv[2],
                   batches_in_flight=2, compile_in_background=mode == "background")
t0 = time.time()
comp = emb.lm.compiler
batches = []
def one(i):
    start = time.time()
    compiled = comp is None or comp.ready
    emb(table)
    batches.append({"i": i, "start": round(start - t0, 3), "end": round(time.time() - t0, 3),
                    "compiled": bool(compiled and comp is not None)})
with ThreadPoolExecutor(2) as ex:
    list(ex.map(one, range(n_batches)))
end = time.time() - t0
if comp is not None:
    comp.wait(120)
from pipeline.embed.compile_cache import compile_times
print(json.dumps({"mode": mode, "model_load_s": round(emb.loaded_s, 2), "load_phases": emb.lm.load_phases,
                  "batches": sorted(batches, key=lambda b: b["start"]), "all_batches_end_s": round(end, 3),
                  "pages": n_batches * bs, "pages_per_s_from_load": round(n_batches * bs / end, 2),
                  "compiled_at_s": (round(comp.started_at + comp.seconds - t0, 3) if comp is not None and comp.background
                                    and comp.seconds else None),
                  "eager_passes": comp.eager_passes if comp is not None else n_batches,
                  "forward_busy_s": round(emb.timer.busy_s, 3), "compile_times": compile_times(), "loaded_from": getattr(emb, "compile_cache_from", None),
                  "switch_interval": sys.getswitchinterval()}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bg.json")
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cuda", help="cpu: the tiny model, to check the wiring")
    ap.add_argument("--cases", default="background,wait,background,wait,eager,background:0.0005",
                    help="after a cold first case (background): MODE[:SWITCH_INTERVAL], comma-separated")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    from pipeline.devtools.tiny import build_tiny_model

    work = tempfile.mkdtemp(prefix="bgc-")
    model = os.path.join(work, "model")
    cuda = args.device.startswith("cuda")
    build_tiny_model(model, max_visual_tokens=768, real_size=cuda, device=args.device)
    shared = os.path.join(work, "shared")
    res = {"commit": os.environ.get("BENCH_COMMIT"), "batches": args.batches, "batch_size": args.batch_size,
           "command": " ".join(sys.argv), "cases": []}
    for n, case in enumerate(args.cases.split(",")):
        mode, _, interval = case.partition(":")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
                   VDR_COMPILE_CACHE=os.path.join(work, "vdr"), TORCHINDUCTOR_CACHE_DIR=os.path.join(work, "inductor"))
        if interval:
            env["BENCH_SWITCH_INTERVAL"] = interval
        p = subprocess.run([sys.executable, "-c", ACTOR, model, shared, os.path.join(ROOT, "benchmarks"), mode,
                            str(args.batches), str(args.batch_size), args.device], env=env, capture_output=True, text=True, timeout=300 if cuda else 900)
        if p.returncode:
            res["cases"].append({"case": case, "rc": p.returncode, "stderr": p.stderr[-3000:]})
        else:
            r = json.loads(p.stdout.strip().splitlines()[-1])
            r["case"] = case + (" (cold)" if n == 0 else "")
            res["cases"].append(r)
            print({k: v for k, v in r.items() if k not in ("batches", "load_phases")}, flush=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
