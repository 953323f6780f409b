"""What a new SDPA call shape costs: the first call of each (images, patches) shape of the
vision attention against its later calls, per SDPA backend. Kernel + host, one GPU.

Why: the actor's vision attention (pipeline.embed.model.image_attention) makes one SDPA call
per run of equal-size images in a batch, its batch dimension the run's length. On pages of one
size every batch has the same call shapes; on a mixed corpus the shapes change from batch to
batch, and SDPA's cuDNN backend builds an execution plan for each new shape (torch keeps them
in a per-process cache). The eleventh session's mixed-size batches took 0.36-0.47 s where batches
of shapes already met took 0.27-0.28 s (batch 16; results/bench_mixed_sizes_h200_2026-12-04_s11d.json).
This measures the first-call cost directly:

    PYTHONPATH=$PWD python benchmarks/bench_sdpa_shapes.py --out sdpa_shapes.json

For each backend (default: the one SDPA picks, then cuDNN, flash, efficient forced) and each
shape (images 1..--max-images, patches from --lengths), in a fresh order: the wall time of the
first call (synchronized) and the median of --reps later calls. q, k, v are (images, heads,
patches, 80) bf16 views of one fused QKV tensor, as in the model. --smoke runs tiny shapes on
the CPU to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def views(images: int, length: int, heads: int, dim: int, dtype, device):
    qkv = torch.randn(images * length, 3, heads, dim, dtype=dtype, device=device)
    q, k, v = qkv.unbind(1)
    return [t.view(images, length, heads, dim).transpose(1, 2) for t in (q, k, v)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="3072,3036,3024,3000", help="patches per image, comma-separated")
    ap.add_argument("--max-images", type=int, default=8, help="images per call: 1..N (default 8)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=80)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backends", default="default,cudnn,flash,efficient")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes")
    ap.add_argument("--out", default="sdpa_shapes.json")
    args = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.smoke:
        lengths, args.max_images, args.heads, args.reps, args.backends = [40, 36], 3, 2, 2, "default"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    named = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "torch": torch.__version__,
           "commit": os.environ.get("BENCH_COMMIT"), "command": " ".join(sys.argv), "backends": {}}
    for b, backend in enumerate(args.backends.split(",")):
        ctx = sdpa_kernel([named[backend]]) if backend in named else None
        rows = []
        try:
            if ctx is not None:
                ctx.__enter__()
            # one call at a shape not measured: the backend's library and handle set-up is no shape's first call
            F.scaled_dot_product_attention(*views(1, 64, args.heads, args.dim, dtype, device))
            sync()
            for images in range(1, args.max_images + 1):
                # each backend its own shapes (4 patches shorter per backend before it): cuDNN's execution
                # plans are kept per process, and the default backend (cuDNN on an H200) met the same shapes
                for length in (n - 4 * b for n in lengths):
                    q, k, v = views(images, length, args.heads, args.dim, dtype, device)
                    sync()
                    t = time.perf_counter()
                    F.scaled_dot_product_attention(q, k, v)
                    sync()
                    first = time.perf_counter() - t
                    later = []
                    for _ in range(args.reps):
                        t = time.perf_counter()
                        F.scaled_dot_product_attention(q, k, v)
                        sync()
                        later.append(time.perf_counter() - t)
                    rows.append({"images": images, "patches": length, "first_ms": round(1000 * first, 3),
                                 "later_ms": round(1000 * statistics.median(later), 3)})
            extra = [r["first_ms"] - r["later_ms"] for r in rows]
            res["backends"][backend] = {"calls": rows, "first_call_extra_ms_median": round(statistics.median(extra), 2),
                                        "first_call_extra_ms_max": round(max(extra), 2)}
            print(backend, {k: v for k, v in res["backends"][backend].items() if k != "calls"}, flush=True)
        except Exception as exc:  # a backend that cannot run this shape is reported, the others still run
            res["backends"][backend] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}", "calls": rows}
            print(backend, res["backends"][backend]["error"], flush=True)
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
