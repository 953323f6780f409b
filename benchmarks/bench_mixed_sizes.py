"""The compiled actor on a mixed corpus: every batch another mix of page sizes (letter,
A4, landscape slides, square scans... each rendered to ~768 visual tokens). Counts torch's
compiled graphs and recompilations, and times each batch. Real-size ColQwen2 (random
weights) on one GPU; ``--device cpu`` runs the tiny model, to check the wiring.

    PYTHONPATH=/tmp/site:$PWD python benchmarks/bench_mixed_sizes.py --out mixed.json

Until 2026-12-04 each new mix recompiled the vision blocks (they specialized on the pages'
patch counts) until torch's limit of 8 versions, after which they ran eagerly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (height, width) in patches of 14 px, each ~3,072 patches (768 tokens), multiples of 2
GRIDS = [(64, 48), (48, 64), (66, 46), (56, 54), (72, 42), (42, 72), (60, 50), (52, 58)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="mixed.json")
    ap.add_argument("--model", help="a saved model (default: build the real-size random one)")
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    import torch
    from torch._dynamo.utils import counters

    from pipeline.embed import model as M
    from pipeline.embed.compile_cache import compile_times

    cuda = args.device.startswith("cuda")
    model = args.model
    if model is None:
        from pipeline.devtools.tiny import build_tiny_model

        model = build_tiny_model(os.path.join(tempfile.mkdtemp(prefix="mixed-"), "model"), max_visual_tokens=768,
                                 real_size=cuda, device=args.device)
    lm = M.load_model(model, device=args.device, compile_model=True)
    rng = np.random.default_rng(0)
    grids = GRIDS if cuda else [(h // 8 * 2, w // 8 * 2) for h, w in GRIDS]  # the tiny model on CPU: small pages
    res = {"commit": os.environ.get("BENCH_COMMIT"), "device": torch.cuda.get_device_name() if cuda else "cpu",
           "command": " ".join(sys.argv), "batch_size": args.batch_size, "batches": []}
    for i in range(args.batches):
        picks = [grids[(i * 3 + j * (1 + i % 3)) % len(grids)] for j in range(args.batch_size)]
        images = [rng.integers(0, 255, (h * 14, w * 14, 3), dtype=np.uint8) for h, w in picks]
        before = dict(compile_times())
        t = time.perf_counter()
        M.embed_pages(lm, images)
        if cuda:
            torch.cuda.synchronize()
        res["batches"].append({"s": round(time.perf_counter() - t, 3), "sizes": len(set(picks)),
                               "compile_s": round(compile_times().get("compile", 0.0) - before.get("compile", 0.0), 2),
                               "graphs": int(counters["stats"]["unique_graphs"])})
        print(res["batches"][-1], flush=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    steady = [b["s"] for b in res["batches"][2:] if b["compile_s"] == 0]
    res.update(unique_graphs=int(counters["stats"]["unique_graphs"]), frames=dict(counters["frames"]),
               compile_times=compile_times(),
               steady_pages_per_s=round(args.batch_size * len(steady) / sum(steady), 2) if steady else None)
    print({k: v for k, v in res.items() if k != "batches"}, flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
