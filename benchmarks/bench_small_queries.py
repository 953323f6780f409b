"""Kernel configs for small query sets (scoring-scale issue, part 3): which
(BLOCK_M, BLOCK_N, num_warps, num_stages, pages_per_group, split) is fastest for 1, 10, 100
and 1,000 queries of 25 vectors against 20,000 pages of 600-768 vectors x 128 float16.

The corpus is built once on the device (random unit-ish float16 vectors, packed as the
scorer packs them: pages padded with their own first vector to a multiple of
CUDA_PAD_MULTIPLE=64). For each query count a pruned candidate list is swept (ordered by
priority; ``--budget-s`` stops a sweep early and reports what it skipped): each config is
timed on the kernel alone (``page_maxima_triton``: CUDA events, warm-up, median of
``--reps``) and its float32 maxima must equal the current default config's bit for bit
(configs that differ are reported and never chosen; configs that do not compile or launch
are reported and skipped). Per query count: the best config and the default side by side,
ms, TB/s of packed page bytes read, TFLOP/s (2 x query rows x real page vectors x 128),
fractions of 792 TFLOP/s and 4.8 TB/s, and the end-to-end time (kernel + in-order sum +
top-10) of both. At the end it prints a CONFIG_TABLE for pipeline/score/triton_kernel.py.

GPU (one H200, well under 3 minutes):
    PYTHONPATH=$PWD python3 benchmarks/bench_small_queries.py --out small_queries.json
CPU dry run of the whole script (Triton's interpreter, a few pages):
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/bench_small_queries.py --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.score.packing import CUDA_PAD_MULTIPLE, pack_flat  # noqa: E402
from pipeline.score.maxsim import topk_desc  # noqa: E402

DIM, LQ, K = 128, 25, 10
PEAK_TFLOPS, PEAK_TBPS = 792.0, 4.8  # FACTS.md (bf16 matmul measured), H200 HBM3e spec

# Candidates per query count, most promising first (the sweep may stop early). Tuples are
# (BLOCK_M, BLOCK_N, num_warps, num_stages, pages_per_group, split); the default config of
# each size is always timed first and is the reference. BLOCK_N must divide 64 (the layout).
CANDIDATES = {
    1: [(32, 64, 4, 4, 1), (32, 64, 4, 3, 1), (32, 64, 4, 5, 1), (32, 64, 2, 4, 1), (32, 32, 2, 6, 1),
        (32, 32, 4, 4, 1), (16, 64, 2, 4, 1), (32, 64, 4, 4, 1, 2), (32, 64, 4, 4, 4), (64, 64, 4, 4, 1),
        (32, 64, 8, 4, 1), (16, 32, 1, 6, 1), (32, 64, 4, 4, 2), (64, 64, 4, 3, 4), (32, 64, 4, 6, 1)],
    10: [(256, 64, 8, 3, 1), (128, 64, 8, 3, 1), (128, 64, 4, 4, 1), (256, 64, 8, 3, 4), (64, 64, 4, 4, 1),
         (128, 64, 8, 4, 4), (256, 64, 8, 4, 1), (128, 32, 4, 5, 1), (256, 32, 8, 4, 1), (128, 64, 8, 3, 16),
         (64, 64, 4, 3, 4), (256, 64, 8, 2, 1)],
    100: [(256, 64, 8, 3, 4), (256, 64, 8, 4, 16), (128, 64, 8, 3, 16), (256, 64, 8, 3, 1), (128, 64, 8, 4, 4),
          (256, 64, 8, 3, 64), (256, 32, 8, 4, 16)],
    1000: [(256, 64, 8, 3, 4), (256, 64, 8, 4, 16), (256, 64, 8, 3, 64), (128, 64, 8, 3, 16)],
}
TINY_CANDIDATES = {
    1: [(32, 64, 4, 4, 1), (16, 32, 1, 2, 1), (32, 64, 4, 4, 1, 2), (16, 64, 1, 2, 4)],
    3: [(64, 64, 4, 3, 1), (32, 32, 4, 4, 1, 3), (16, 64, 2, 4, 2)],
}


def log(*a) -> None:
    print(*a, flush=True)


class Timer:
    """Median time of a callable: CUDA events on a GPU, perf_counter on CPU (interpreter)."""

    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup

    def __call__(self, fn):
        out = None
        for _ in range(self.warmup):
            out = fn()
        times = []
        for _ in range(self.reps):
            out = None  # free the last output before the next call allocates
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times), out


def make_corpus(n_pages: int, device: torch.device, seed: int = 0):
    """(flat float16 (n_vectors, 128), lengths): 600-768 vectors per page, a shared direction
    plus noise, normalized: bench_maxsim.py's corpus."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_maxsim import make_corpus as maxsim_corpus

    return maxsim_corpus(n_pages, seed=seed, device=device)


def make_queries(nq: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((nq, LQ, DIM), generator=g, device=device)
    x[..., 0] += 2.0
    return torch.nn.functional.normalize(x, dim=-1).half()


def figures(t: float, rows: int, real_vectors: int, nbytes: int) -> dict:
    tflops = 2.0 * rows * real_vectors * DIM / t / 1e12
    tbps = nbytes / t / 1e12
    return {"ms": round(t * 1e3, 4), "tflops": round(tflops, 2), "tbps": round(tbps, 3),
            "frac_792_tflops": round(tflops / PEAK_TFLOPS, 4), "frac_4p8_tbps": round(tbps / PEAK_TBPS, 4)}


def sweep(nq: int, candidates, pk, real_vectors: int, timer: Timer, deadline: float) -> dict:
    """Time the default config, then each candidate; compare maxima with the default's."""
    from pipeline.score import triton_kernel as tk

    Q = make_queries(nq, pk.device)
    Qflat = Q.reshape(-1, DIM)
    rows = Qflat.shape[0]
    default = tk.choose_config(rows)
    t_def, ref = timer(lambda: tk.page_maxima_triton(Qflat, pk, config=default))
    res = {"nq": nq, "rows": rows, "default": {"config": list(default), **figures(t_def, rows, real_vectors, pk.nbytes())},
           "configs": [], "failed": [], "not_equal": [], "skipped": []}
    log(f"nq={nq:5d} default {tuple(default)}: {res['default']}")
    best = (t_def, default)
    for cand in candidates:
        cfg = tk.as_config(cand)
        if cfg == default:
            continue
        if time.perf_counter() > deadline:
            res["skipped"].append(list(cfg))
            continue
        try:
            t, got = timer(lambda: tk.page_maxima_triton(Qflat, pk, config=cfg))
        except Exception as exc:  # noqa: BLE001 - a config that does not compile or launch is reported
            res["failed"].append({"config": list(cfg), "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            log(f"  {tuple(cfg)}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
            continue
        equal = bool(torch.equal(got, ref))
        row = {"config": list(cfg), "equal_to_default": equal, **figures(t, rows, real_vectors, pk.nbytes())}
        if not equal:
            row["max_abs_diff"] = float((got - ref).abs().max())
            res["not_equal"].append(list(cfg))
        del got
        res["configs"].append(row)
        log(f"  {tuple(cfg)}: {row['ms']:.3f} ms, {row['tbps']:.2f} TB/s, {row['tflops']:.0f} TFLOP/s"
            f"{'' if equal else '  NOT EQUAL to default: ' + str(row['max_abs_diff'])}")
        if equal and t < best[0]:
            best = (t, cfg)
    del ref
    res["best"] = {"config": list(best[1]), **figures(best[0], rows, real_vectors, pk.nbytes())}
    res["speedup_vs_default"] = round(t_def / best[0], 3)
    # End to end as the scorer runs a batch: kernel, in-order float32 sum, exact top-k.
    for name, cfg in (("default", default), ("best", best[1])):
        t, _ = timer(lambda: topk_desc(tk.maxsim_scores_triton(Q, pk, config=cfg), K))
        res[f"end_to_end_{name}_ms"] = round(t * 1e3, 4)
    # the same with the in-order sum as one Triton launch (must give the same scores)
    t, fused = timer(lambda: tk.maxsim_scores_triton(Q, pk, config=best[1], fused_sum=True))
    plain = tk.maxsim_scores_triton(Q, pk, config=best[1])
    res["fused_sum_equal"] = bool(torch.equal(fused, plain))
    t, _ = timer(lambda: topk_desc(tk.maxsim_scores_triton(Q, pk, config=best[1], fused_sum=True), K))
    res["end_to_end_best_fused_sum_ms"] = round(t * 1e3, 4)
    del fused, plain
    log(f"nq={nq:5d} BEST {tuple(best[1])}: {res['best']['ms']:.3f} ms ({res['speedup_vs_default']}x default); "
        f"end to end {res['end_to_end_best_ms']:.3f} ms vs default {res['end_to_end_default_ms']:.3f} ms; with the "
        f"fused sum {res['end_to_end_best_fused_sum_ms']:.3f} ms (equal: {res['fused_sum_equal']})")
    return res


def suggested_table(results: list[dict]) -> str:
    """CONFIG_TABLE text: each measured size's best config up to its row count (the last
    size's best for everything larger). The bounds between measured sizes are a choice."""
    from pipeline.score.triton_kernel import KernelConfig

    lines = ["CONFIG_TABLE: tuple[tuple[int | None, KernelConfig], ...] = ("]
    for i, r in enumerate(sorted(results, key=lambda r: r["rows"])):
        bound = "None" if i == len(results) - 1 else str(r["rows"])
        lines.append(f"    ({bound}, {KernelConfig(*r['best']['config'])!r}),  # {r['best']['ms']} ms at {r['nq']} queries")
    lines.append(")")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pages", type=int, default=20000)
    ap.add_argument("--nq", type=int, nargs="+", default=None, help="query counts (default 1 10 100 1000)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop sweeping (not timing defaults) after this")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: a few pages, Triton interpreter")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    t_start = time.perf_counter()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("no GPU: run with TRITON_INTERPRET=1 --tiny")
    candidates = TINY_CANDIDATES if args.tiny else CANDIDATES
    n_pages = 4 if args.tiny else args.pages
    nqs = args.nq or sorted(candidates)
    reps, warmup = (2, 1) if args.tiny else (max(10, args.reps), 2)
    import triton

    info = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (TRITON_INTERPRET=1)",
            "torch": torch.__version__, "triton": triton.__version__, "pages": n_pages, "reps": reps}
    t0 = time.perf_counter()
    flat, lengths = make_corpus(n_pages, device)
    pk = pack_flat(flat, lengths, device=device, dtype=torch.float16, pad_multiple=CUDA_PAD_MULTIPLE)
    del flat
    real_vectors = int(lengths.sum())
    info.update(real_vectors=real_vectors, packed_rows=int(pk.vectors.shape[0]), packed_bytes=pk.nbytes(),
                corpus_build_s=round(time.perf_counter() - t0, 2))
    if device.type == "cuda":
        x = torch.empty(1 << 31, dtype=torch.uint8, device=device)
        y = torch.empty_like(x)
        t, _ = Timer(device, 10, 2)(lambda: y.copy_(x))
        info["copy_read_tbps"] = round(x.numel() / t / 1e12, 3)  # bytes read per second by a d2d copy
        del x, y
    log(json.dumps(info))
    if device.type == "cpu":
        log("interpreter: numpy's matmul rounds differently per BLOCK_M, so 'NOT EQUAL' is expected here")
    deadline = t_start + args.budget_s
    timer = Timer(device, reps, warmup)
    results = []
    for nq in nqs:
        results.append(sweep(nq, candidates.get(nq, []), pk, real_vectors, timer, deadline))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    log("\nSUMMARY (kernel alone; end to end = kernel + sum + top-10)")
    log(f"{'nq':>5} {'default':>26} {'ms':>8} {'TB/s':>6} {'%peak':>6} | {'best':>26} {'ms':>8} {'TB/s':>6} "
        f"{'TFLOP/s':>7} {'%792':>5} {'%4.8TB':>6} | e2e def/best ms")
    for r in results:
        d, b = r["default"], r["best"]
        log(f"{r['nq']:5d} {str(tuple(d['config'])):>26} {d['ms']:8.3f} {d['tbps']:6.2f} {100 * d['frac_792_tflops']:5.1f}% | "
            f"{str(tuple(b['config'])):>26} {b['ms']:8.3f} {b['tbps']:6.2f} {b['tflops']:7.1f} "
            f"{100 * b['frac_792_tflops']:4.1f}% {100 * b['frac_4p8_tbps']:5.1f}% | "
            f"{r['end_to_end_default_ms']:.3f} / {r['end_to_end_best_ms']:.3f}")
    table = suggested_table(results)
    log("\nSuggested (pipeline/score/triton_kernel.py; bounds between measured sizes are a choice):\n" + table)
    info["wall_s"] = round(time.perf_counter() - t_start, 1)
    log(f"wall {info['wall_s']} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**info, "results": results, "suggested_table": table,
                       "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}, f, indent=1)


if __name__ == "__main__":
    main()
