"""The vision tower's attention alone, at the model's shape, every kernel side by side.

Qwen2-VL's vision blocks attend over each image's patches: 768 visual tokens are 3,072
patches, 16 heads of size 80. One call of the batched attention (``pipeline.embed.model.
enable_batched_vision_attention``) covers a batch of ``--images`` equal pages. Timed here,
each on the same q, k, v (views of one fused QKV output, as in the model):

* ``sdpa``                what the model runs today: SDPA on the strided views, then the
                          transpose copy to (tokens, heads x dim)
* ``sdpa_cudnn`` / ``sdpa_flash`` / ``sdpa_efficient``: the same, one SDPA backend forced
* ``cudnn_pad96`` / ``cudnn_pad128``: q, k, v zero-padded to that head size, cuDNN, sliced
  back (zeros add nothing to q k^T; the scale stays 1/sqrt(80)); ``*_kernel`` the same
  kernel on pre-padded contiguous inputs, without the pad and slice copies
* ``flex``                torch's FlexAttention (compiled), no mask
* ``triton_BM_BN_W_S``    ``vision_attention_triton.py`` beside this file (head size cut 64 + 16, no
                          padding), for each tile config in ``--configs``
* ``tma_BM_BN_W_S_WS``    the same file's TMA kernel (``attention_tma``: tensor descriptors, key
                          loop warp-specialized when WS is 1), for each config in ``--tma-configs``
                          (default: ``TMA_CONFIGS`` there; ``--tma-configs ""`` skips them)

TFLOP/s count 4 x images x heads x length^2 x 80 (the model's work, not padded work).
Error: max abs difference of the first two images' output from a float32 reference.

    python benchmarks/bench_vision_attention.py --out results/x.json
    TRITON_INTERPRET=1 python benchmarks/bench_vision_attention.py --smoke   # CPU wiring check

(The interpreter runs the TMA kernel's descriptors as bounded loads and stores and ignores
``warp_specialize``: the smoke run checks the wiring and the arithmetic, not TMA or the
warp-specialized schedule, which only a Hopper GPU compiles.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import vision_attention_triton as va  # noqa: E402

CONFIGS = "128_64_8_3,128_64_4_3,128_128_8_3,128_64_8_4,128_32_4_3,64_64_4_3,64_128_4_3,128_128_8_2,256_64_8_3"
TMA_CONFIGS = ",".join("_".join(str(int(x)) for x in c) for c in va.TMA_CONFIGS)


def git_commit() -> str | None:
    """HEAD's short hash, or None where there is no git or no repository (a copied tree)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip() or None
    except OSError:
        return None


def timed(fn, reps: int, dev: str) -> float:
    for _ in range(3):
        fn()
    if dev != "cuda":
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--length", type=int, default=3072, help="patches per image (768 visual tokens x 4)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=80)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--configs", default=CONFIGS)
    ap.add_argument("--tma-configs", default=TMA_CONFIGS, help="BM_BN_WARPS_STAGES_WS, comma-separated")
    ap.add_argument("--out", default="bench_vision_attention.json")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shape (run with TRITON_INTERPRET=1)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    if args.smoke:
        args.images, args.length, args.heads, args.reps, args.configs = 2, 40, 2, 1, "16_16_1_1"
        args.tma_configs = "16_16_1_1_1,16_16_1_1_0"  # length 40: a last tile of 8 rows
    n, L, H, D = args.images, args.length, args.heads, args.dim
    scale = D ** -0.5
    torch.manual_seed(0)
    qkv = torch.randn(n * L, 3, H, D, device=dev, dtype=dtype)
    q, k, v = (t.view(n, L, H, D) for t in qkv.permute(1, 0, 2, 3).unbind(0))
    ref = F.scaled_dot_product_attention(*(t[:2].float().transpose(1, 2) for t in (q, k, v)), scale=scale)
    ref = ref.transpose(1, 2).reshape(2 * L, H * D)
    flops = 4 * n * H * L * L * D
    res: dict = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke)", "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                 "commit": os.environ.get("BENCH_COMMIT") or git_commit(),
                 "shape": {"images": n, "length": L, "heads": H, "dim": D}, "gflop_per_call": round(flops / 1e9, 1),
                 "variants": {}}
    try:
        import triton
        res["triton"] = triton.__version__
    except ImportError:
        pass

    def sdpa(backend=None, pad=None, pre=None):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                    "efficient": SDPBackend.EFFICIENT_ATTENTION}

        def run():
            ctx = sdpa_kernel([backends[backend]]) if backend else torch.enable_grad()  # a no-op context
            with ctx:
                if pre is not None:
                    return F.scaled_dot_product_attention(*pre, scale=scale)
                qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
                if pad:
                    qs, ks, vs = (F.pad(t, (0, pad - D)) for t in (qs, ks, vs))
                o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
                if pad:
                    o = o[..., :D]
                return o.transpose(1, 2).reshape(n * L, H * D)
        return run

    runs = {"sdpa": sdpa(), "sdpa_cudnn": sdpa("cudnn"), "sdpa_flash": sdpa("flash"),
            "sdpa_efficient": sdpa("efficient")}
    if dev == "cuda":
        for pad in (96, 128):
            runs[f"cudnn_pad{pad}"] = sdpa("cudnn", pad=pad)
            padded = tuple(F.pad(t.transpose(1, 2), (0, pad - D)).contiguous() for t in (q, k, v))
            runs[f"cudnn_pad{pad}_kernel"] = sdpa("cudnn", pre=padded)
        runs["cudnn_contiguous_kernel"] = sdpa("cudnn", pre=tuple(t.transpose(1, 2).contiguous() for t in (q, k, v)))
        try:
            from torch.nn.attention.flex_attention import flex_attention

            flex = torch.compile(flex_attention)
            runs["flex"] = lambda: flex(*(t.transpose(1, 2) for t in (q, k, v)), scale=scale).transpose(1, 2).reshape(n * L, H * D)
        except Exception as exc:  # noqa: BLE001
            res["variants"]["flex"] = {"error": repr(exc)[:300]}
    for cfg in args.configs.split(","):
        c = tuple(int(x) for x in cfg.split("_"))
        runs[f"triton_{cfg}"] = (lambda c=c: va.attention(q, k, v, scale, config=c))
    for cfg in filter(None, args.tma_configs.split(",")):
        c = va.parse_tma_config(cfg)
        runs[f"tma_{cfg}"] = (lambda c=c: va.attention_tma(q, k, v, scale, config=c))
    for name, fn in runs.items():
        try:
            out = fn()
            if out.dim() == 4:  # the *_kernel variants: (images, heads, length, padded dim)
                out = out[..., :D].transpose(1, 2).reshape(n * L, H * D)
            err = (out[: 2 * L].float() - ref).abs().max().item()
            sec = timed(fn, args.reps, dev)
            res["variants"][name] = {"ms": round(sec * 1e3, 3), "tflops_at_80": round(flops / sec / 1e12, 1),
                                     "max_abs_err_vs_fp32": round(err, 5)}
        except Exception as exc:  # noqa: BLE001 - a kernel that fails is reported, the others run
            res["variants"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(name, res["variants"][name], flush=True)
        # after each variant: a kernel that kills the process (a compiler abort) or the CUDA context
        # (an illegal address: every later call fails) leaves the rows before it
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
        if dev == "cuda":
            try:
                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - a CUDA context a kernel broke: the rows stay
                pass
    if dev == "cuda":
        from torch.profiler import ProfilerActivity, profile

        try:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                runs["sdpa"]()
                torch.cuda.synchronize()
            res["sdpa_kernels"] = sorted({e.name[:160] for e in prof.events() if e.device_type.name == "CUDA"})[:10]
        except Exception as exc:  # noqa: BLE001
            res["sdpa_kernels"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
