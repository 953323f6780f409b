"""fp8-exact-topk (pipeline.score.fp8): how many pages the FP8 error bound makes us re-score,
and (on a GPU) what the FP8 candidate pass + exact re-scoring costs against the exact kernel.

CPU mode (default): synthetic pages of 600-768 unit vectors, queries of 25 unit vectors,
k=10, two data models:
  * random - i.i.d. unit vectors (no page stands out: the worst case for pruning);
  * topics - pages in topics of 20 (half of a page's vectors are noisy copies of its
             topic's 32 vectors, half random), each query noisy copies of one topic's
             vectors: ~20 pages clearly above the rest, as relevant pages are.
Pages are generated and scored in chunks (the FP8 candidate pass is emulated in float32,
exactly as pipeline.score.fp8 does on CPU); the candidate set per query is the one
fp8_topk would re-score. Reported per query: candidates (mean, max) and fraction of
pages, with the bound of the CPU path and with the bound the GPU path would use (FP8
accumulation assumed at 2^-13, exact path fp16 -> fp32). With --verify, fp8_topk's top-k is
also compared with the exact path's at the smallest size.

    PYTHONPATH=$PWD python benchmarks/bench_fp8_topk.py [--pages 2000 20000] [--queries 8] [--json OUT]

GPU mode (--gpu, next session on an H200): 20,000 pages x 1,000 queries, the layout of the
Triton kernel. Times (median of 5, synchronized): exact = score_batch (Triton, fp16) +
topk_desc; for each FP8 candidate pass, "scaled_mm" (torch._scaled_mm blocks) and "fused"
(the Triton kernel on FP8 operands, no similarity matrix): the candidate pass alone, and
fp8_topk = quantize queries + candidate pass + bounds + exact re-scoring with the Triton
kernel; checks that each top-k equals the exact one bit for bit; and measures the FP8
accumulation error of both passes against float64 on the same FP8 values (scaled_mm per dot
/ ||a|| ||b||; fused per page maximum / ||a|| max ||b||), next to the gamma_128 the bound assumes.

    PYTHONPATH=$PWD python3 benchmarks/bench_fp8_topk.py --gpu [--gpu-pages 20000 --gpu-queries 1000] [--json OUT.json]

Shard quantization (in --gpu, or alone with --quant-only): fp8.quantize_rows on the shard's
rows (one scale per page), its torch path (blocks of float64 temporaries) and the fused
Triton kernel side by side on the same shard, median times (synchronized), Fp8Pages.from_packed
with each (what the scoring job pays per shard), the kernel's passes alone; checks that the
FP8 values and scales are equal bit for bit, err/norm within 1e-9 of each other and never
below the float64 values recomputed from the kernel's FP8 values. --exhaustive-rounding
also runs the kernel on every float32 in [-512, 512] (scale 1) against torch's conversion.

    PYTHONPATH=$PWD python3 benchmarks/bench_fp8_topk.py --gpu --quant-only [--exhaustive-rounding] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.score import fp8  # noqa: E402
from pipeline.score.packing import CUDA_PAD_MULTIPLE, pack_flat, pad_queries  # noqa: E402
from pipeline.score.maxsim import maxsim_scores, topk_desc  # noqa: E402

DIM, LQ, K = 128, 25, 10


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def make_queries(model: str, n: int, n_topics: int, gen: torch.Generator) -> list[torch.Tensor]:
    if model == "random":
        return [unit(torch.randn(LQ, DIM, generator=gen)).half() for _ in range(n)]
    out = []
    for i in range(n):
        base = topic_base(i % n_topics)
        out.append(unit(base[torch.randint(32, (LQ,), generator=gen)] + 0.3 * torch.randn(LQ, DIM, generator=gen)
                        / math.sqrt(DIM)).half())
    return out


def topic_base(t: int) -> torch.Tensor:
    return unit(torch.randn(32, DIM, generator=torch.Generator().manual_seed(10_000 + t)))


def make_pages(model: str, first: int, n: int, n_topics: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pages ``first .. first+n``: (flat float16 vectors, lengths). Deterministic per page range."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + first)
    lengths = torch.randint(600, 769, (n,), generator=gen)
    flat = unit(torch.randn(int(lengths.sum()), DIM, generator=gen))
    if model == "topics":
        start = 0
        for i, n_vec in enumerate(lengths.tolist()):
            half = n_vec // 2
            base = topic_base((first + i) % n_topics)
            rows = base[torch.randint(32, (half,), generator=gen)]
            flat[start : start + half] = unit(rows + 0.5 * torch.randn(half, DIM, generator=gen) / math.sqrt(DIM))
            start += n_vec
    return flat.half(), lengths


def cpu_fractions(model: str, n_pages: int, n_queries: int, chunk: int, verify: bool) -> dict:
    n_topics = max(1, n_pages // 20)
    gen = torch.Generator().manual_seed(7)
    queries = make_queries(model, n_queries, n_topics, gen)
    Q, _ = pad_queries(queries, dtype=torch.float64)
    qq = fp8.quantize_rows(Q.reshape(-1, DIM))
    approx, b_cpu, b_gpu = [], [], []
    t_cand = 0.0
    for first in range(0, n_pages, chunk):
        flat, lengths = make_pages(model, first, min(chunk, n_pages - first), n_topics, seed=1)
        shard = fp8.Fp8Pages.from_packed(pack_flat(flat, lengths))
        t0 = time.perf_counter()
        a, u = fp8.candidate_scores(Q, qq, shard)
        t_cand += time.perf_counter() - t0
        approx.append(a)
        b_cpu.append(fp8.score_bounds(qq, n_queries, LQ, shard, u))
        b_gpu.append(fp8.score_bounds(qq, n_queries, LQ, shard, fp8.FP8_ACCUM_UNIT_ROUNDOFF + 2 * fp8.U32, "cuda"))
        del shard, flat
    approx = torch.cat(approx, 1)
    row = {"model": model, "pages": n_pages, "queries": n_queries, "k": K, "candidate_pass_cpu_s": round(t_cand, 2)}
    for name, bound in (("cpu", torch.cat(b_cpu, 1)), ("gpu_bound", torch.cat(b_gpu, 1))):
        cand = fp8.select_candidates(approx, bound, K).sum(1).double()
        row[f"{name}_candidates_mean"] = round(cand.mean().item(), 1)
        row[f"{name}_candidates_max"] = int(cand.max().item())
        row[f"{name}_fraction"] = round(cand.mean().item() / n_pages, 4)
        row[f"{name}_bound_mean"] = round(bound.mean().item(), 4)
    top = torch.topk(approx, K + 1, dim=1).values
    row["score_kth"] = round(top[:, K - 1].mean().item(), 3)
    row["score_median"] = round(approx.median(dim=1).values.mean().item(), 3)
    if verify:
        flat, lengths = torch.cat([make_pages(model, f, min(chunk, n_pages - f), n_topics, 1)[0]
                                   for f in range(0, n_pages, chunk)]), None
        lengths = torch.cat([make_pages(model, f, min(chunk, n_pages - f), n_topics, 1)[1]
                             for f in range(0, n_pages, chunk)])
        pages = pack_flat(flat, lengths)
        t0 = time.perf_counter()
        ev, ei = topk_desc(maxsim_scores(Q, pages), K)
        t_exact = time.perf_counter() - t0
        v, i, st = fp8.fp8_topk(Q, fp8.Fp8Pages.from_packed(pages), K, maxsim_scores)
        row["verified_equal_to_exact"] = bool(torch.equal(v, ev) and torch.equal(i, ei))
        row["exact_cpu_s"] = round(t_exact, 2)
        row["fp8_cpu_candidate_s"], row["fp8_cpu_rescore_s"] = round(st["candidate_s"], 2), round(st["rescore_s"], 2)
        row["fp8_rescored_pairs_per_query"] = st["rescored_pairs"] / n_queries
    return row


def gpu_bench(n_pages: int, n_queries: int, model: str, reps: int = 5, fp8_configs=(), quant_only: bool = False,
              exhaustive: bool = False) -> dict:
    from pipeline.score.scorer import exact_subset, score_batch
    from pipeline.score.triton_kernel import page_maxima_fp8_triton

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--gpu without a GPU: only as a dry run, TRITON_INTERPRET=1 ... --gpu --tiny")
    assert dev.type == "cpu" or fp8.fp8_supported(dev), "needs CUDA sm89+ with float8"
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    n_topics = max(1, n_pages // 20)
    t0 = time.perf_counter()
    flat, lengths = make_pages(model, 0, n_pages, n_topics, seed=1)
    pages = pack_flat(flat, lengths, device=dev, dtype=torch.float16, pad_multiple=CUDA_PAD_MULTIPLE)
    Q, _ = pad_queries(make_queries(model, n_queries, n_topics, torch.Generator().manual_seed(7)),
                       device=dev, dtype=torch.float16)
    t_make = time.perf_counter() - t0
    useful = 2.0 * n_queries * LQ * int(lengths.sum()) * DIM

    def med(fn, reps=reps):
        return _median_time(fn, reps, sync)

    def exact_fn(q, p):
        return score_batch(q, p, "triton")

    inplace_fn = exact_subset(pages, "triton")

    row = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)", "torch": torch.__version__, "model": model,
           "pages": n_pages, "queries": n_queries, "k": K, "data_make_s": round(t_make, 2)}
    quant, shard = quantization_compare(pages, reps, sync, exhaustive)
    row.update(quant)
    if quant_only:
        return row
    t_exact, (ev, ei) = med(lambda: topk_desc(score_batch(Q, pages, "triton"), K))
    qq = fp8.quantize_rows(Q.reshape(-1, DIM))
    row.update({"exact_s": t_exact, "exact_tflops": useful / t_exact / 1e12})
    approx = {}
    for cand in ("scaled_mm", "fused"):
        try:
            t_c, (a, _) = med(lambda: fp8.candidate_scores(Q, qq, shard, cand))
            t_f, (v, i, st) = med(lambda: fp8.fp8_topk(Q, shard, K, exact_fn, candidate=cand, exact_subset=inplace_fn))
            # the same with the candidates copied out (the re-scoring before page_index), side by side
            t_copy, (vc, ic, stc) = med(lambda: fp8.fp8_topk(Q, shard, K, exact_fn, candidate=cand))
        except Exception as exc:  # noqa: BLE001 - report a pass that does not compile/run, keep the other
            row[f"{cand}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(f"{cand}: FAILED {row[f'{cand}_error']}", flush=True)
            continue
        approx[cand] = a
        row.update({
            f"{cand}_candidate_pass_s": t_c, f"{cand}_candidate_tflops": useful / t_c / 1e12,
            f"{cand}_candidate_frac_1447": useful / t_c / 1e12 / 1447.0,
            f"{cand}_fp8_topk_s": t_f, f"{cand}_candidate_s": st["candidate_s"], f"{cand}_rescore_s": st["rescore_s"],
            f"{cand}_speedup_vs_exact": t_exact / t_f,
            f"{cand}_fp8_topk_copied_s": t_copy, f"{cand}_rescore_copied_s": stc["rescore_s"],
            f"{cand}_copied_equal": bool(torch.equal(vc, ev) and torch.equal(ic, ei)),
            f"{cand}_candidates_mean": float(st["candidates"].mean()), f"{cand}_candidates_max": int(st["candidates"].max()),
            f"{cand}_rescored_pairs_per_query": st["rescored_pairs"] / n_queries,
            f"{cand}_equal_to_exact": bool(torch.equal(v, ev) and torch.equal(i, ei)),
        })
        del v, i
    for cfg in fp8_configs:  # the fused candidate kernel alone, by tile (FP8_CONFIG_TABLE)
        try:
            t_k, _ = med(lambda: page_maxima_fp8_triton(qq.values, qq.scales, pages, shard.q.values,
                                                        shard.page_scale, config=cfg))
            row[f"fused_kernel_{'_'.join(map(str, cfg))}_s"] = t_k
            row[f"fused_kernel_{'_'.join(map(str, cfg))}_tflops"] = useful / t_k / 1e12
        except Exception as exc:  # noqa: BLE001
            row[f"fused_kernel_{'_'.join(map(str, cfg))}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    if len(approx) == 2:
        row["fused_vs_scaled_mm_max_abs_diff"] = float((approx["fused"] - approx["scaled_mm"]).abs().max())
    del approx
    row.update(accumulation_errors(Q, pages, shard))
    row["assumed_gamma_128"] = fp8.gamma(DIM, fp8.FP8_ACCUM_UNIT_ROUNDOFF)
    return row


def _median_time(fn, reps: int, sync):
    out = fn()  # warm-up (compiles the kernels)
    sync()
    ts = []
    for _ in range(reps):
        out = None
        t0 = time.perf_counter()
        out = fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def quantization_compare(pages, reps: int, sync, exhaustive: bool = False) -> tuple[dict, "fp8.Fp8Pages"]:
    """The shard's quantization by fp8.quantize_rows' torch path and by the fused Triton kernel,
    on the same rows: times and checks (see the module docstring). Returns (row entries, the
    Fp8Pages built with the kernel). ``fp8_quantize_shard_s``: Fp8Pages.from_packed as the job
    calls it (the kernel where it runs)."""
    from pipeline.score.triton_kernel import quantize_rows_triton, row_absmax_triton

    x = pages.vectors
    dev = x.device
    row_page = torch.repeat_interleave(torch.arange(pages.n_pages, device=dev),
                                       (pages.offsets[1:] - pages.offsets[:-1]).to(dev))
    out = {"quant_rows": int(x.shape[0]), "quant_bytes_in": x.numel() * x.element_size(),
           "quant_default_backend": fp8.quantize_backend(x)}
    t_torch, qt = _median_time(lambda: fp8.quantize_rows(x, groups=row_page, backend="torch"), min(reps, 3), sync)
    qt = fp8.Quantized(qt.values.clone(), qt.scales, qt.err, qt.norm)
    t_tri, qk = _median_time(lambda: fp8.quantize_rows(x, groups=row_page, backend="triton"), reps, sync)
    t_absmax, amax = _median_time(lambda: row_absmax_triton(x), reps, sync)
    scales = qk.scales
    t_kernel, _ = _median_time(lambda: quantize_rows_triton(x, scales), reps, sync)
    t_fp_torch, shard_t = _median_time(lambda: fp8.Fp8Pages.from_packed(pages, backend="torch"), min(reps, 3), sync)
    t_fp_tri, shard = _median_time(lambda: fp8.Fp8Pages.from_packed(pages), reps, sync)
    out.update({
        "quantize_rows_torch_s": t_torch, "quantize_rows_triton_s": t_tri,
        "quantize_rows_speedup": t_torch / t_tri,
        "quant_absmax_kernel_s": t_absmax, "quant_kernel_s": t_kernel,
        "quant_kernel_gb_s": (x.numel() * (x.element_size() + 1) + x.shape[0] * 20) / t_kernel / 1e9,
        "fp8_quantize_shard_torch_s": t_fp_torch, "fp8_quantize_shard_s": t_fp_tri,
        "fp8_quantize_shard_default_backend": fp8.quantize_backend(x),
    })
    u8t, u8k = qt.values.view(torch.uint8), qk.values.view(torch.uint8)
    out["quant_values_equal"] = bool(torch.equal(u8t, u8k))
    out["quant_values_differing"] = int((u8t != u8k).sum())
    out["quant_scales_equal"] = bool(torch.equal(qt.scales, qk.scales))
    out["quant_absmax_equal"] = all(bool(torch.equal(amax[a : a + (1 << 16)], x[a : a + (1 << 16)].float().abs().amax(dim=1)))
                                    for a in range(0, x.shape[0], 1 << 16))
    tiny = torch.finfo(torch.float64).tiny
    out["quant_err_max_rel_diff"] = ((qk.err - qt.err).abs() / qt.err.clamp_min(tiny)).max().item()
    out["quant_norm_max_rel_diff"] = ((qk.norm - qt.norm).abs() / qt.norm.clamp_min(tiny)).max().item()
    ok_e = ok_n = True
    for a in range(0, x.shape[0], 1 << 16):  # the bound's premise, recomputed in float64 from the kernel's values
        b = min(x.shape[0], a + (1 << 16))
        s = qk.scales[a:b]
        x64 = x[a:b].double()
        deq64 = qk.values[a:b].double() * s.double()[:, None]
        deq32 = (qk.values[a:b].float() * s[:, None]).double()
        e = torch.linalg.vector_norm(x64 - deq64, dim=1) + torch.linalg.vector_norm(deq64 - deq32, dim=1)
        nm = torch.stack([torch.linalg.vector_norm(t, dim=1) for t in (x64, deq64, deq32)]).amax(0)
        ok_e &= bool((qk.err[a:b] >= e).all())
        ok_n &= bool((qk.norm[a:b] >= nm).all())
    out["quant_err_bounds_recomputed"], out["quant_norm_bounds_recomputed"] = ok_e, ok_n
    out["quant_page_scales_equal"] = bool(torch.equal(shard.page_scale, shard_t.page_scale))
    out["quant_page_bounds_max_rel_diff"] = max(
        ((a - b).abs() / b.clamp_min(tiny)).max().item() if b.numel() else 0.0
        for a, b in ((shard.page_norm, shard_t.page_norm), (shard.page_err, shard_t.page_err)))
    del qt, qk, shard_t
    if exhaustive and dev.type == "cuda":
        out.update(exhaustive_rounding(dev))
    print(json.dumps(out), flush=True)
    return out, shard


def exhaustive_rounding(dev, chunk: int = 1 << 28) -> dict:
    """The kernel's float32 -> e4m3 rounding (scale 1) on every float32 of magnitude <= 512
    (bits 0 .. 0x44000000, both signs: denormals, every e4m3 tie, saturation above 448)
    against torch's ``clamp(-448, 448).to(float8_e4m3fn)`` on the same device."""
    from pipeline.score.triton_kernel import quantize_rows_triton

    t0 = time.perf_counter()
    top = 0x44000000
    bad = 0
    for sign in (0, -(1 << 31)):
        for a in range(0, top, chunk):
            bits = torch.arange(a, min(top, a + chunk), dtype=torch.int64, device=dev) + sign
            n = bits.numel() // DIM * DIM
            x = bits.to(torch.int32)[:n].view(torch.float32).view(-1, DIM)
            v, _, _ = quantize_rows_triton(x, torch.ones(x.shape[0], dtype=torch.float32, device=dev))
            want = x.clamp(-448, 448).to(torch.float8_e4m3fn)
            bad += int((v.view(torch.uint8) != want.view(torch.uint8)).sum())
            del bits, x, v, want
    return {"exhaustive_rounding_mismatches": bad, "exhaustive_rounding_values": 2 * (top // DIM * DIM),
            "exhaustive_rounding_s": time.perf_counter() - t0}


def accumulation_errors(Q: torch.Tensor, pages, shard, n_rows: int = 4096, n_pages: int = 500) -> dict:
    """Measured FP8 accumulation error against float64 on the same FP8 values, relative to the
    norms the bound uses: ``torch._scaled_mm`` raw dots (per dot, / ||a|| ||b||), and the fused
    kernel's per-page maxima (per query row and page, / ||a|| max_j ||b_j||; the scales are
    applied as in the kernel), each to compare with gamma_128(FP8_ACCUM_UNIT_ROUNDOFF)."""
    from pipeline.score.triton_kernel import page_maxima_fp8_triton

    dev = Q.device
    out = {}
    qq = fp8.quantize_rows(Q.reshape(-1, DIM)[:n_rows])
    try:
        b = shard.q.values[:65536]
        one = torch.ones((), device=dev)
        raw = torch._scaled_mm(qq.values, b.t(), scale_a=one, scale_b=one, out_dtype=torch.float32).double()
        ref = qq.values.double() @ b.double().T
        norms = (torch.linalg.vector_norm(qq.values.double(), dim=1)[:, None]
                 * torch.linalg.vector_norm(b.double(), dim=1)[None])
        out["scaled_mm_max_rel_accum_error"] = ((raw - ref).abs() / norms.clamp_min(1e-30)).max().item()
        del raw, ref, norms
    except Exception as exc:  # noqa: BLE001
        out["scaled_mm_accum_error_failed"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    try:
        sub = fp8.Fp8Pages.from_packed(fp8.subset_pages(pages, torch.arange(min(n_pages, pages.n_pages))))
        got = page_maxima_fp8_triton(qq.values, qq.scales, sub.pages, sub.q.values, sub.page_scale).double()
        qd = qq.values.double() * qq.scales.double()[:, None]
        pd = sub.q.values.double() * sub.q.scales.double()[:, None]
        sims = qd @ pd.T  # (rows, packed page rows), padding rows are copies
        row_page = torch.repeat_interleave(torch.arange(sub.pages.n_pages, device=dev),
                                           (sub.pages.offsets[1:] - sub.pages.offsets[:-1]).to(dev))
        want = torch.full((qd.shape[0], sub.pages.n_pages), float("-inf"), dtype=torch.float64, device=dev)
        want.scatter_reduce_(1, row_page.expand(qd.shape[0], -1), sims, "amax")
        scale = torch.linalg.vector_norm(qd, dim=1)[:, None] * sub.page_norm[None, :]
        out["fused_max_rel_accum_error"] = ((got.T - want).abs() / scale.clamp_min(1e-30)).max().item()
    except Exception as exc:  # noqa: BLE001
        out["fused_accum_error_failed"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pages", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--models", nargs="+", default=["random", "topics"])
    ap.add_argument("--chunk", type=int, default=500)
    ap.add_argument("--verify", action="store_true", help="compare with the exact path at the smallest size")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--gpu-pages", type=int, default=20000)
    ap.add_argument("--gpu-queries", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=5, help="--gpu: timed runs per variant (median)")
    ap.add_argument("--fp8-configs", default="",
                    help="--gpu: also time the fused FP8 kernel alone for these tiles, e.g. "
                         "'256,64,8,3;128,64,4,4;256,64,8,4,32' (BLOCK_M,BLOCK_N,warps,stages[,pages per group])")
    ap.add_argument("--tiny", action="store_true", help="with --gpu: CPU dry run (TRITON_INTERPRET=1), 30 pages x 3 queries")
    ap.add_argument("--quant-only", action="store_true", help="with --gpu: the shard quantization comparison only")
    ap.add_argument("--exhaustive-rounding", action="store_true",
                    help="with --gpu: also check the kernel's rounding on every float32 of magnitude <= 512")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    if args.gpu:
        for model in args.models:
            cfgs = [tuple(int(x) for x in c.split(",")) for c in args.fp8_configs.split(";") if c.strip()]
            kw = {"quant_only": args.quant_only, "exhaustive": args.exhaustive_rounding}
            rows.append(gpu_bench(30, 3, model, reps=1, fp8_configs=cfgs, **kw) if args.tiny
                        else gpu_bench(args.gpu_pages, args.gpu_queries, model, args.reps, cfgs, **kw))
            print(json.dumps(rows[-1]), flush=True)
    else:
        for model in args.models:
            for n in args.pages:
                rows.append(cpu_fractions(model, n, args.queries, args.chunk, args.verify and n == min(args.pages)))
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "threads": torch.get_num_threads()}, f, indent=1)


if __name__ == "__main__":
    main()
