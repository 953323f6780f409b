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


def kernel_class(name: str) -> str:
    n = name.lower()
    if "gemm" in n or "nvjet" in n or "cutlass" in n or "matmul" in n or "mm_" in n:
        return "gemm"
    if "flash" in n or "fmha" in n or "attention" in n or "sdpa" in n or "efficient" in n:
        return "attention"
    if "norm" in n:
        return "norms (fused)"
    if "triton" in n:
        return "other fused (Triton)"
    if "copy" in n or "cat" in n or "index" in n or "elementwise" in n or "fill" in n:
        return "copies, indexing, elementwise"
    return "other"


def profile_batch(M, lm, images, cuda: bool) -> dict:
    """Device time of one batch by kernel class, its wall time and the host gap (wall minus kernels)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    # GPU activity only, each kernel's own time (as bench_actor.py): with CPU activity too, CPU rows
    # carry their kernels' time again (Inductor's "## Call CompiledFxGraph ... ##" range, the launch
    # record named like each Triton kernel), so kernels were counted two or three times
    acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        M.embed_pages(lm, images)
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - t
    by_class: dict[str, float] = {}
    top: dict[str, float] = {}
    for ev in prof.key_averages():
        if not cuda or getattr(ev, "is_user_annotation", False) or str(getattr(ev, "device_type", "")).endswith("CPU"):
            continue
        dev = getattr(ev, "self_device_time_total", 0) or getattr(ev, "self_cuda_time_total", 0)
        if dev <= 0 or ev.key.startswith("ProfilerStep"):
            continue
        by_class[kernel_class(ev.key)] = by_class.get(kernel_class(ev.key), 0.0) + dev / 1e6
        top[ev.key[:120]] = dev / 1e6
    kernels = sum(by_class.values())
    return {"wall_s": round(wall, 4), "kernels_s": round(kernels, 4), "host_gap_s": round(wall - kernels, 4),
            "by_class_s": {k: round(v, 4) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
            "top_kernels_s": {k: round(v, 4) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:15]}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="mixed.json")
    ap.add_argument("--model", help="a saved model (default: build the real-size random one)")
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compare-uniform", action="store_true",
                    help="then as many batches of one page size (letter, 64x48 patches) in the same process: "
                         "the mixed corpus's cost against pages of one size, side by side")
    ap.add_argument("--random-mixes", action="store_true",
                    help="each mixed batch a random draw of the page grids (as a real corpus reaches the "
                         "actor), instead of the fixed pattern of 4 or 8 sizes in equal numbers")
    ap.add_argument("--split", choices=["runs", "pow2"], default=None,
                    help="how the vision attention groups equal-size images into SDPA calls "
                         "(pipeline.embed.model.IMAGE_ATTENTION_SPLIT; pow2 bounds the call shapes)")
    ap.add_argument("--profile", action="store_true",
                    help="profile one more mixed batch (and one uniform with --compare-uniform): device time "
                         "by kernel class (GEMM, attention, ...) and the host gap")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    import torch
    from torch._dynamo.utils import counters

    from pipeline.embed import model as M
    from pipeline.embed.compile_cache import compile_times

    cuda = args.device.startswith("cuda")

    def compiling() -> float:
        """Seconds compiled so far: Dynamo's (torch.compile) and the precompiled blocks' own."""
        return compile_times().get("compile", 0.0) + sum(pf.compile_s for pf in lm.precompiled)
    model = args.model
    if model is None:
        from pipeline.devtools.tiny import build_tiny_model

        model = build_tiny_model(os.path.join(tempfile.mkdtemp(prefix="mixed-"), "model"), max_visual_tokens=768,
                                 real_size=cuda, device=args.device)
    lm = M.load_model(model, device=args.device, compile_model=True)
    if args.split is not None:
        M.IMAGE_ATTENTION_SPLIT = args.split
    args.split = M.IMAGE_ATTENTION_SPLIT
    rng = np.random.default_rng(0)
    grids = GRIDS if cuda else [(h // 8 * 2, w // 8 * 2) for h, w in GRIDS]  # the tiny model on CPU: small pages
    res = {"commit": os.environ.get("BENCH_COMMIT"), "device": torch.cuda.get_device_name() if cuda else "cpu",
           "command": " ".join(sys.argv), "batch_size": args.batch_size, "split": args.split,
           "random_mixes": args.random_mixes, "batches": []}
    def pages(picks):
        return [rng.integers(0, 255, (h * 14, w * 14, 3), dtype=np.uint8) for h, w in picks]

    def mixed_picks(i):
        if args.random_mixes:
            draw = np.random.default_rng(1000 + i)
            return [grids[int(x)] for x in draw.integers(0, len(grids), args.batch_size)]
        return [grids[(i * 3 + j * (1 + i % 3)) % len(grids)] for j in range(args.batch_size)]

    uniform = [grids[0]] * args.batch_size

    def run(key, picks_of):
        """Time ``args.batches`` batches (their page grids from ``picks_of(i)``) into ``res[key]``."""
        res[key] = []
        for i in range(args.batches):
            picks = picks_of(i)
            images = pages(picks)
            before = compiling()
            shapes_before = len(M.IMAGE_ATTENTION_SHAPES)
            t = time.perf_counter()
            M.embed_pages(lm, images)
            if cuda:
                torch.cuda.synchronize()
            res[key].append({"s": round(time.perf_counter() - t, 3), "sizes": len(set(picks)),
                             "compile_s": round(compiling() - before, 2),
                             # SDPA call shapes (images, patches) this batch met for the first time
                             "new_attention_shapes": len(M.IMAGE_ATTENTION_SHAPES) - shapes_before,
                             "graphs": int(counters["stats"]["unique_graphs"])})
            print(key, res[key][-1], flush=True)
            with open(args.out, "w") as f:
                json.dump(res, f, indent=2)
        steady = [b["s"] for b in res[key][2:] if b["compile_s"] == 0]
        return round(args.batch_size * len(steady) / sum(steady), 2) if steady else None

    res["steady_pages_per_s"] = run("batches", mixed_picks)
    if args.compare_uniform:
        res["uniform_steady_pages_per_s"] = run("uniform_batches", lambda i: uniform)
    if args.profile:
        res["profile"] = {"mixed": profile_batch(M, lm, pages(mixed_picks(args.batches)), cuda)}
        if args.compare_uniform:
            res["profile"]["uniform"] = profile_batch(M, lm, pages(uniform), cuda)
        print(res["profile"], flush=True)
    res.update(unique_graphs=int(counters["stats"]["unique_graphs"]), frames=dict(counters["frames"]),
               compile_times=compile_times(),
               precompiled={pf.name: {"variants": len(pf.variants), "fallback": pf.fallback_reason}
                            for pf in lm.precompiled})
    print({k: v for k, v in res.items() if k != "batches"}, flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
