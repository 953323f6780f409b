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

# The first batch timed here is the compiled one (cold, warm): a new node's compile helper
# (pipeline.embed.compile_helper) would run it eagerly instead; --cold-env VDR_COMPILE_HELPER=1 times that.
os.environ.setdefault("VDR_COMPILE_HELPER", "0")

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
from pipeline.embed.compile_cache import compile_times
device = sys.argv[4]
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
emb = PageEmbedder(sys.argv[1], device=device, compile_model=True, compile_cache=sys.argv[2] or None)
t2 = time.perf_counter()
out1 = emb(table); sync()
t3 = time.perf_counter()
split = compile_times()
emb(table); sync()
t4 = time.perf_counter()
import numpy as np
first = np.concatenate([np.asarray(v, np.float32).reshape(-1) for v in out1.column("embedding").to_pylist()])
print(json.dumps({"imports_and_pages_s": round(t1 - t0, 2), "actor_init_s": round(t2 - t1, 2),
                  "model_load_s": round(emb.loaded_s, 2), "load_phases": emb.lm.load_phases, "first_batch_s": round(t3 - t2, 2),
                  "first_batch_compile_s": split, "recompiles_after_first": {k: round(v - split.get(k, 0), 2) for k, v in compile_times().items()},
                  "second_batch_s": round(t4 - t3, 3), "loaded_from": emb.compile_cache_from,
                  "precompiled_from": getattr(emb, "precompiled_from", None),
                  "precompiled_load_s": round(getattr(emb, "precompiled_load_s", 0.0), 2),
                  "precompiled": {pf.name: {"loaded": pf.loaded, "compiled": pf.compiled, "compile_s": round(pf.compile_s, 2),
                                            "fallback": pf.fallback_reason} for pf in getattr(emb.lm, "precompiled", [])},
                  "embedding_checksum": [float(first.sum()), float(np.abs(first).sum())]}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="warm_start.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--warm-env", action="append", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                    help="one more warm actor on node 1 with these environment variables (repeatable)")
    ap.add_argument("--cold-env", action="append", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                    help="one more cold actor, on a new node of its own and with no shared cache, with these "
                         "environment variables (repeatable; an A/B of start-up settings, e.g. "
                         "TORCHINDUCTOR_COMPILE_THREADS=1)")
    ap.add_argument("--cold-repeats", type=int, default=1, metavar="N",
                    help="run the --cold-env cases and a cold default actor (no shared cache) N times, alternating")
    ap.add_argument("--only-cold", action="store_true",
                    help="only the --cold-env cases (and no default cold case between them): an A/B of cold starts")
    ap.add_argument("--env", default="", metavar="NAME=VALUE[,NAME=VALUE]",
                    help="environment of every case (VDR_PRECOMPILE=0: torch.compile per block, as before 2026-12-05)")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    from pipeline.devtools.tiny import build_tiny_model

    work = tempfile.mkdtemp(prefix="warm-")
    model = os.path.join(work, "model")
    build_tiny_model(model, max_visual_tokens=768, real_size=args.device.startswith("cuda"), device=args.device)
    shared = os.path.join(work, "shared")
    every_env = dict(kv.split("=", 1) for kv in args.env.split(",") if kv)

    def actor(node: str, shared_cache: str | None = shared, **extra_env) -> dict:
        # each node its own caches, Triton's too (until 2026-12-05 the nodes shared Triton's,
        # so a "new node" had every Triton kernel already built)
        env = dict(os.environ, **every_env, **extra_env,
                   PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
                   VDR_COMPILE_CACHE=os.path.join(work, node, "vdr"),
                   TORCHINDUCTOR_CACHE_DIR=os.path.join(work, node, "inductor"),
                   TRITON_CACHE_DIR=os.path.join(work, node, "triton"))
        p = subprocess.run([sys.executable, "-c", ACTOR, model, shared_cache or "", os.path.join(ROOT, "benchmarks"),
                            args.device],
                           env=env, capture_output=True, text=True, timeout=400)
        if p.returncode:
            raise SystemExit(p.stderr[-3000:])
        return json.loads(p.stdout.strip().splitlines()[-1])

    res: dict = {}

    def save(cases: dict) -> None:  # after each case: a run cut short keeps what it did
        with open(args.out, "w") as f:
            json.dump({"commit": os.environ.get("BENCH_COMMIT"), "command": " ".join(sys.argv), "cases": cases}, f, indent=2)

    if args.only_cold:
        for r in range(args.cold_repeats):
            for i, spec in enumerate(args.cold_env, 1):
                extra = dict(kv.split("=", 1) for kv in spec.split(","))
                res[f"cold, new node, no shared cache, with {spec} (run {r + 1})"] = actor(f"cold-{i}-{r}", None, **extra)
                print(res, flush=True)
                save(res)
        args.cold_env, args.warm_env = [], []
    else:
        res["cold (new node, empty caches)"] = actor("node1")
        print(res, flush=True)
        res["warm, same node (its Inductor and compile caches)"] = actor("node1")
        print(res, flush=True)
        res["warm, new node (empty local caches, shared --compile-cache)"] = actor("node2")
    for i, spec in enumerate(args.warm_env, 1):
        extra = dict(kv.split("=", 1) for kv in spec.split(","))
        res[f"warm, same node, with {spec} (#{i})"] = actor("node1", **extra)
        print(res, flush=True)
    # cold actors on fresh nodes without a shared cache, the default against each --cold-env,
    # alternating
    for r in range(args.cold_repeats if args.cold_env else 0):
        res[f"cold, new node, no shared cache, defaults (run {r + 1})"] = actor(f"cold-default-{r}", None)
        print(res, flush=True)
        for i, spec in enumerate(args.cold_env, 1):
            extra = dict(kv.split("=", 1) for kv in spec.split(","))
            res[f"cold, new node, no shared cache, with {spec} (run {r + 1})"] = actor(f"cold-{i}-{r}", None, **extra)
            print(res, flush=True)
    import torch

    res = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", "torch": torch.__version__,
           "commit": os.environ.get("BENCH_COMMIT"), "command": " ".join(sys.argv), "env": every_env, "cases": res}
    print(json.dumps(res, indent=2))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
