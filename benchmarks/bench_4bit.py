"""`--load-in-4bit` (bitsandbytes NF4) against bf16 on one GPU: speed and fidelity on the
same pages, with a real-size ColQwen2 of random weights.

    PYTHONPATH=/path/to/bitsandbytes:. python benchmarks/bench_4bit.py --out 4bit.json

Measured in one run, same pages, same batches:
- pages/s of the embedding path (``embed_pages``, eager, batch 16) in bf16 and in NF4
  with bf16 compute, and the bf16 path compiled as the job runs it;
- fidelity of NF4 against bf16: cosine of each page vector and query vector with its bf16
  twin, and the top-10 agreement of MaxSim rankings (queries x pages, each precision
  scoring its own query and page vectors);
- peak GPU memory of each.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_embed import letter_pdf, render_pages, timed  # noqa: E402


def maxsim(qs, ps):
    return np.array([[float((q @ p.T).max(axis=1).sum()) for p in ps] for q in qs])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_4bit.json")
    ap.add_argument("--tokens", type=int, default=768)
    ap.add_argument("--pages", type=int, default=160, help="pages per timed variant")
    ap.add_argument("--fidelity-pages", type=int, default=96)
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    import bitsandbytes
    import transformers

    from pipeline.devtools.tiny import build_tiny_model
    from pipeline.embed.model import embed_pages, embed_queries, load_model

    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__}
    work = tempfile.mkdtemp(prefix="bench4-")
    model_dir = os.path.join(work, "colqwen2-real-random")
    build_tiny_model(model_dir, max_visual_tokens=args.tokens, real_size=True, device="cuda")
    torch.cuda.empty_cache()

    # Distinct pages for fidelity, repeated pages for timing.
    fid_pages = []
    seed = 0
    while len(fid_pages) < args.fidelity_pages:
        fid_pages += render_pages(letter_pdf(8, seed), args.tokens)
        seed += 1
    fid_pages = fid_pages[: args.fidelity_pages]
    timing_pages = [fid_pages[i % len(fid_pages)] for i in range(args.pages)]
    bs = args.batch_size
    batches = [timing_pages[i : i + bs] for i in range(0, len(timing_pages) - bs + 1, bs)]
    rng = np.random.default_rng(0)
    words = ["revenue", "table", "figure", "total", "2019", "report", "chart", "growth", "invoice", "summary",
             "page", "section", "energy", "policy", "results", "budget", "loss", "annual", "data", "method"]
    queries = [" ".join(rng.choice(words, size=6)) for _ in range(args.queries)]

    out = {}
    for name, kwargs in (("bf16", {}), ("nf4", {"load_in_4bit": True}), ("bf16_compiled", {"compile_model": True})):
        t = time.perf_counter()
        lm = load_model(model_dir, device="cuda", dtype="bfloat16", **kwargs)
        embed_pages(lm, batches[0])
        torch.cuda.synchronize()
        first = time.perf_counter() - t
        sec, mem = timed(functools.partial(embed_pages, lm), batches)
        entry = {"pages_per_s": round(bs / sec, 2), "s_per_batch": round(sec, 4), "peak_gib": round(mem, 2),
                 "load_and_first_batch_s": round(first, 1),
                 "weights_gib": round(torch.cuda.memory_allocated() / 2**30, 2)}
        if name != "bf16_compiled":
            pv = []
            for i in range(0, len(fid_pages), bs):
                pv += [np.asarray(v, np.float32) for v in embed_pages(lm, fid_pages[i : i + bs])]
            qv = [np.asarray(v, np.float32) for v in embed_queries(lm, queries)]
            out[name] = (pv, qv)
        res[name] = entry
        print(name, entry, flush=True)
        del lm
        torch.cuda.empty_cache()

    (pb, qb), (p4, q4) = out["bf16"], out["nf4"]

    def cosines(a, b):
        c = np.concatenate([(x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)) for x, y in zip(a, b)])
        return {"mean": round(float(c.mean()), 4), "p1": round(float(np.percentile(c, 1)), 4),
                "min": round(float(c.min()), 4)}

    sb, s4 = maxsim(qb, pb), maxsim(q4, p4)
    top = 10
    overlap = [len(set(np.argsort(-sb[i])[:top]) & set(np.argsort(-s4[i])[:top])) / top for i in range(len(queries))]
    res["fidelity_nf4_vs_bf16"] = {
        "page_vector_cosine": cosines(pb, p4),
        "query_vector_cosine": cosines(qb, q4),
        f"top{top}_overlap_mean": round(float(np.mean(overlap)), 3),
        "top1_same": round(float(np.mean([np.argmax(sb[i]) == np.argmax(s4[i]) for i in range(len(queries))])), 3),
        "pages": len(pb), "queries": len(queries),
    }
    res["nf4_vs_bf16_speed"] = round(res["nf4"]["pages_per_s"] / res["bf16"]["pages_per_s"], 3)
    print(json.dumps(res, indent=2))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
