"""The vision attention alone: SDPA as the actor calls it against FlashAttention 4, at the model's shapes.

Qwen2-VL's vision blocks attend within each image: a letter page at 768 visual tokens is 3,072
patches, 16 heads of size 80. Timed on the same q, k, v (q and k contiguous, as the rotary
embedding leaves them; v a strided view of the fused QKV output, as in the model):

* ``sdpa``        ``pipeline.embed.model.image_attention`` (what the actor runs: SDPA per run of
                  equal-size images, cut into powers of two; cuDNN's flash kernel on Hopper)
* ``fa4_varlen``  ``flash_attn.cute.flash_attn_varlen_func`` over the whole batch with the
                  model's ``cu_seqlens`` (benchmarks/vision_attention_fa4.py)
* ``fa4_batched`` ``flash_attn.cute.flash_attn_func`` on (images, length, heads, dim) views
                  (equal sizes only)

for a batch of 32 and of 16 letter pages, and a batch of 16 mixed page sizes. TFLOP/s count the
model's work (4 x heads x length^2 x 80 per image), not padded work. Error: max abs difference
from a float32 reference on the first two images. ``first_call_s``: the first call, FA4's JIT
compile inside.

    PYTHONPATH=/tmp/fa4site:$PWD python benchmarks/bench_fa4_attention.py --out x.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from pipeline.embed import model as model_mod  # noqa: E402
import vision_attention_fa4 as fa4  # noqa: E402
from bench_vision_attention import timed  # noqa: E402  (median of CUDA-event timings after 3 warm-up calls)

# patches per image of a mixed batch of 16 (multiples of 4: 2x2 merged into one visual token)
MIXED = [3072] * 6 + [2304] * 3 + [4096] * 2 + [1536] * 2 + [3600, 2880, 1024]


def case(lengths: list[int], H: int, D: int, reps: int) -> dict:
    dev, dtype = "cuda", torch.bfloat16
    total = sum(lengths)
    scale = D ** -0.5
    torch.manual_seed(0)
    qkv = torch.randn(total, 3, H, D, device=dev, dtype=dtype)
    q, k, v = qkv.permute(1, 0, 2, 3).unbind(0)
    q, k = q.contiguous(), k.contiguous()  # the rotary embedding's outputs are new tensors
    host_lengths = torch.tensor(lengths, dtype=torch.int64)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(host_lengths, 0)
    cu = cu.to(dev)
    first = lengths[0] + lengths[1]
    ref = torch.cat([F.scaled_dot_product_attention(*(t[s:s + n].float().view(1, n, H, D).transpose(1, 2)
                                                      for t in (q, k, v)), scale=scale).transpose(1, 2).reshape(n, H * D)
                     for s, n in ((0, lengths[0]), (lengths[0], lengths[1]))])
    flops = sum(4 * H * n * n * D for n in lengths)
    runs = {"sdpa": lambda: model_mod.image_attention(q, k, v, host_lengths, cu, scale),
            "fa4_varlen": lambda: fa4.fa4_image_attention(q, k, v, host_lengths, cu, scale)}
    if len(set(lengths)) == 1:
        n, L = len(lengths), lengths[0]
        runs["fa4_batched"] = lambda: fa4.fa4_batched(q.view(n, L, H, D), k.view(n, L, H, D), v.view(n, L, H, D),
                                                      scale).reshape(total, H * D)
    out: dict = {"images": len(lengths), "lengths": sorted(set(lengths)), "gflop": round(flops / 1e9, 1), "kernels": {}}
    for name, fn in runs.items():
        try:
            torch.cuda.synchronize()
            t = time.perf_counter()
            o = fn()
            torch.cuda.synchronize()
            first_s = time.perf_counter() - t
            err = (o[:first].float() - ref).abs().max().item()
            sec = timed(fn, reps, "cuda")
            out["kernels"][name] = {"ms": round(sec * 1e3, 3), "tflops_at_80": round(flops / sec / 1e12, 1),
                                    "max_abs_err_vs_fp32": round(err, 5), "first_call_s": round(first_s, 2)}
        except Exception as exc:  # noqa: BLE001 - a kernel that fails is reported, the others run
            out["kernels"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:600]}"}
        print(name, out["kernels"][name], flush=True)
    if "ms" in out["kernels"].get("sdpa", {}) and "ms" in out["kernels"].get("fa4_varlen", {}):
        out["fa4_varlen_speedup"] = round(out["kernels"]["sdpa"]["ms"] / out["kernels"]["fa4_varlen"]["ms"], 3)
        with torch.no_grad():
            a = runs["sdpa"]().float()
            b = runs["fa4_varlen"]().float()
        out["fa4_vs_sdpa_max_abs_diff"] = round((a - b).abs().max().item(), 5)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=80)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="bench_fa4_attention.json")
    args = ap.parse_args()
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                 "commit": os.environ.get("BENCH_COMMIT"), "cases": {}}
    t = time.perf_counter()
    try:
        fa4.fa4_import()
        import flash_attn.cute as fc
        res["fa4"] = getattr(fc, "__version__", None)
        res["fa4_import_s"] = round(time.perf_counter() - t, 2)
    except Exception as exc:  # noqa: BLE001
        res["fa4_import_error"] = f"{type(exc).__name__}: {str(exc)[:800]}"
    for name, lengths in (("letter_x32", [3072] * 32), ("letter_x16", [3072] * 16), ("mixed_x16", MIXED)):
        res["cases"][name] = case(lengths, args.heads, args.dim, args.reps)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
