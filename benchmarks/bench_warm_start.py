"""First compiled batch of a new embedding actor: cold, warm on the same node, and warm on a
new node from a shared --compile-cache. Real-size ColQwen2 (random weights), one GPU.

    PYTHONPATH=/tmp/site:$PWD python benchmarks/bench_warm_start.py --out warm.json

Each case is a fresh process (as a new Ray actor is), timed from the actor's construction:
model load, cache load, and the first batch (compilation included), then a second batch.
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
import json, sys, time
t0 = time.perf_counter()
import torch
sys.path.insert(0, sys.argv[3])
from bench_embed import letter_pdf, render_pages, rows_table
from pipeline.embed.stages import PageEmbedder
pages = render_pages(letter_pdf(8, 0), 768) * 2
table = rows_table(pages[:16])
t1 = time.perf_counter()
emb = PageEmbedder(sys.argv[1], device="cuda", compile_model=True, compile_cache=sys.argv[2])
t2 = time.perf_counter()
emb(table); torch.cuda.synchronize()
t3 = time.perf_counter()
emb(table); torch.cuda.synchronize()
t4 = time.perf_counter()
print(json.dumps({"imports_and_pages_s": round(t1 - t0, 2), "actor_init_s": round(t2 - t1, 2),
                  "model_load_s": round(emb.loaded_s, 2), "load_phases": emb.lm.load_phases, "first_batch_s": round(t3 - t2, 2),
                  "second_batch_s": round(t4 - t3, 3), "loaded_from": emb.compile_cache_from}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="warm_start.json")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    from pipeline.devtools.tiny import build_tiny_model

    work = tempfile.mkdtemp(prefix="warm-")
    model = os.path.join(work, "model")
    build_tiny_model(model, max_visual_tokens=768, real_size=True, device="cuda")
    shared = os.path.join(work, "shared")

    def actor(node: str) -> dict:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
                   VDR_COMPILE_CACHE=os.path.join(work, node, "vdr"),
                   TORCHINDUCTOR_CACHE_DIR=os.path.join(work, node, "inductor"))
        p = subprocess.run([sys.executable, "-c", ACTOR, model, shared, os.path.join(ROOT, "benchmarks")],
                           env=env, capture_output=True, text=True, timeout=400)
        if p.returncode:
            raise SystemExit(p.stderr[-3000:])
        return json.loads(p.stdout.strip().splitlines()[-1])

    res = {"cold (new node, empty caches)": actor("node1")}
    print(res, flush=True)
    res["warm, same node (its Inductor and compile caches)"] = actor("node1")
    print(res, flush=True)
    res["warm, new node (empty local caches, shared --compile-cache)"] = actor("node2")
    import torch

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": res}
    print(json.dumps(res, indent=2))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
