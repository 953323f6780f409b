"""Corpus embedding on one GPU: the job's actor vs the transformers-docs loop, the whole
job vs the actor alone, and CPU cost per page. Real-size ColQwen2 with random weights.

    python benchmarks/bench_embed.py --out results.json     # on the GPU machine

Questions, all answered in one run on the same GPU and the same pages:
1. plain loop (``processor(images=batch)`` then ``model(**inputs).embeddings``, sdpa, bf16)
   vs ``PageEmbedder`` (the actor's __call__ on the rows the render stage emits), pages/s;
2. the whole job (read -> render -> embed -> Parquet, Ray Data) vs the actor alone: pages
   over the whole job's wall time (Ray start, model load and compilation included), and
   each actor's rate and GPU-busy fraction from its own counters in the job's summary;
3. CPU milliseconds per page of rendering + preprocessing, one core, on image-only pages
   (see ``letter_pdf``: a picture of text, like a scan; no text objects). Vector-text pages
   cost far less: ``benchmarks/bench_render.py``, RESULTS.md "CPU cost of rendering";
with FLOPs per page (torch's FlopCounterMode), the fraction of the chip, peak memory.
The actor's model load and its first call (compilation inside, for the compiled actor) are
timed apart, the first call on a batch of the first timed size.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402


# page sizes at 150 dpi for letter_pdf(size=...): a mixed corpus's shapes
PAGE_SIZES = {"letter": (1275, 1650), "a4": (1240, 1754), "letter_landscape": (1650, 1275),
              "slide_16x9": (2000, 1125), "square": (1400, 1400), "legal": (1275, 2100)}


def letter_pdf(n_pages: int, seed: int, size: str = "letter") -> bytes:
    """An image-only ("scanned") US-letter PDF: each page is one 1275x1650 picture of lines of
    digits and a rectangle, drawn with Pillow and saved as PDF, so each page holds one image
    object and no text. Rendering it decodes and downsamples that image; it is not what a
    vector-text page costs (bench_render.py measures both kinds). ``size``: another page
    shape of :data:`PAGE_SIZES` (each renders to another grid of the model)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    width, height = PAGE_SIZES[size]
    pages = []
    for i in range(n_pages):
        img = Image.new("RGB", (width, height), "white")
        d = ImageDraw.Draw(img)
        for y in range(80, height - 100, 24):
            d.text((90, y), " ".join(str(x) for x in rng.integers(0, 10**6, 12)), fill=(0, 0, 0))
        d.rectangle((100, 600 + 10 * i, min(1100, width - 100), 900), outline=(20, 40, 200), width=5)
        pages.append(img)
    buf = io.BytesIO()
    pages[0].save(buf, format="PDF", save_all=True, append_images=pages[1:], resolution=150.0)
    return buf.getvalue()


def render_pages(pdf: bytes, tokens: int):
    from pipeline.embed.rasterize import PageItem, RenderSpec, iter_document

    return [i.image for i in iter_document(pdf, RenderSpec(max_visual_tokens=tokens)) if isinstance(i, PageItem)]


def rows_table(images):
    import pyarrow as pa

    from pipeline.embed.stages import PIXELS, STREAM_SCHEMA

    n = len(images)
    cols = {f.name: [None] * n for f in STREAM_SCHEMA}
    cols["doc_id"] = [f"d{i}.pdf" for i in range(n)]
    cols["page_number"] = [1] * n
    cols["source_uri"] = cols["doc_id"]
    cols["doc_pages"] = [1] * n
    cols["height"] = [im.shape[0] for im in images]
    cols["width"] = [im.shape[1] for im in images]
    cols[PIXELS] = [np.ascontiguousarray(im).tobytes() for im in images]
    return pa.table(cols, schema=STREAM_SCHEMA)


def page_flops(config, n_patches: int, seq_len: int) -> float:
    """Matmul + attention FLOPs of one page (2 per multiply-add)."""
    v, t = config.vlm_config.vision_config, config.vlm_config.text_config
    d, n = v.embed_dim, n_patches
    vision = 2 * n * (3 * v.temporal_patch_size * v.patch_size**2) * d  # patch embedding
    vision += v.depth * (2 * n * d * (3 * d + d + 2 * int(d * v.mlp_ratio)) + 4 * n * n * d)
    m, dm = n // v.spatial_merge_size**2, d * v.spatial_merge_size**2
    vision += 2 * m * dm * dm + 2 * m * dm * v.hidden_size  # patch merger MLP
    h, L = t.hidden_size, seq_len
    kv = 2 * t.num_key_value_heads * (h // t.num_attention_heads)
    text = t.num_hidden_layers * (2 * L * h * (2 * h + kv) + 6 * L * h * t.intermediate_size + 2 * L * L * h)
    return float(vision + text + 2 * L * h * config.embedding_dim)


def timed(fn, batches, warmup=2):
    for b in batches[:warmup]:
        fn(b)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    per = []
    for b in batches:
        t = time.perf_counter()
        fn(b)
        torch.cuda.synchronize()
        per.append(time.perf_counter() - t)
    return statistics.median(per), torch.cuda.max_memory_allocated() / 2**30


def run_job_rates(args, res, work, model_dir, best_actor, flops_page):
    """The whole job, from its own summary: pages over the job's seconds (start-up included),
    and each actor's pages, forward time and wall time from the actors' own counters
    (pipeline/embed/counters.py). No figure here can exceed what the actors did."""
    import logging

    from jobs import embed_corpus

    logging.getLogger("pipeline.embed.flow").setLevel(logging.DEBUG)  # Ray Data's per-operator stats
    job = {}
    sizes = [int(x) for x in args.job_pages.split(",")]
    # 8 distinct documents, repeated under other names (the job renders every file): 40 took
    # ~45 s of the GPU machine's time per run to generate (2026-12-03), before the job started
    docs = [letter_pdf(8, d) for d in range(min(int(os.environ.get("BENCH_DISTINCT_DOCS", "8")), max(sizes) // 8))]
    # BENCH_JOB_ENVS="A=1;A=0,B=2": one job per setting, one after another on the same corpus
    # (each starts its own local Ray, whose workers inherit the setting); default: one job.
    settings = [dict(kv.split("=", 1) for kv in e.split(",") if kv) for e in os.environ.get("BENCH_JOB_ENVS", "").split(";")]
    runs = [(n, env) for n in sizes for env in settings]
    for i, (n_pages, env) in enumerate(runs):
        corpus = os.path.join(work, f"corpus{n_pages}")
        if not os.path.isdir(corpus):
            os.makedirs(corpus)
            for d in range(n_pages // 8):
                with open(os.path.join(corpus, f"doc{d:05d}.pdf"), "wb") as f:
                    f.write(docs[d % len(docs)])
        out = os.path.join(work, f"out{n_pages}_{i}")
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        t = time.perf_counter()
        try:
            rc = embed_corpus.main(["--input", corpus, "--output", out, "--model", model_dir,
                                    "--batch-size", os.environ.get("BENCH_JOB_BATCH", "32"),
                                    "--max-visual-tokens", str(args.tokens)]
                                   + ["--compile", os.environ.get("BENCH_COMPILE", "auto")]
                                   + os.environ.get("BENCH_JOB_EXTRA", "").split())
        finally:
            import ray

            ray.shutdown()  # the next job starts its own local Ray, whose workers see its setting
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        wall = time.perf_counter() - t
        with open(os.path.join(out, "summary.json")) as f:
            s = json.load(f)
        run = s["this_run"]
        entry = {"rc": rc, "wall_s_from_main": round(wall, 2), "pages": run["pages"], "job_seconds": run["seconds"],
                 "job_pages_per_s_whole": round(run["pages"] / wall, 2),
                 "actors_pages_per_s": run.get("actor_pages_per_second"),
                 "gpu_busy_fraction": run.get("gpu_busy_fraction"), "actors": run.get("actors")}
        if best_actor:
            entry["job_whole_vs_actor_alone"] = round(entry["job_pages_per_s_whole"] / best_actor, 3)
            if entry["actors_pages_per_s"]:
                per_gpu = entry["actors_pages_per_s"] / max(1, len(run.get("actors") or []))
                entry["actor_in_job_vs_actor_alone"] = round(per_gpu / best_actor, 3)
                # An actor inside the job cannot be faster than the same actor alone.
                entry["consistent"] = per_gpu <= 1.05 * best_actor
        if flops_page:
            entry["job_whole_chip_fraction"] = round(entry["job_pages_per_s_whole"] * flops_page / 1e12 / args.peak_tflops, 3)
        if env:
            entry["env"] = env
        job[n_pages if len(settings) == 1 else f"{n_pages}#{i}"] = entry
        print("job", n_pages, {k: v for k, v in entry.items() if k != "actors"}, flush=True)
    res["job"] = job


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_embed.json")
    ap.add_argument("--tokens", type=int, default=768)
    ap.add_argument("--batch-sizes", default="16,32")
    ap.add_argument("--pages", type=int, default=160, help="pages per timed variant")
    ap.add_argument("--job-pages", default="3000", help="corpus size(s) for the whole-job run, comma-separated")
    ap.add_argument("--skip-job", action="store_true")
    ap.add_argument("--job-only", action="store_true", help="only the whole-job rate (e.g. on several GPUs)")
    ap.add_argument("--peak-tflops", type=float, default=770.0, help="measured bf16 matmul peak (FACTS.md)")
    args = ap.parse_args()
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import transformers

    res["transformers"] = transformers.__version__
    from PIL import Image

    from pipeline.embed.stages import PageEmbedder
    from pipeline.embed.model import load_model
    from pipeline.devtools.tiny import build_tiny_model

    work = tempfile.mkdtemp(prefix="bench-")
    model_dir = os.path.join(work, "colqwen2-real-random")
    t = time.time()
    build_tiny_model(model_dir, max_visual_tokens=args.tokens, real_size=True, device="cuda")
    torch.cuda.empty_cache()
    res["build_model_s"] = round(time.time() - t, 1)

    if args.job_only:
        res["gpus"] = torch.cuda.device_count()
        run_job_rates(args, res, work, model_dir, best_actor=None, flops_page=None)
        print(json.dumps(res, indent=2))
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
        return

    # 3. CPU cost per page (one core): render + resize to the model grid, image-only pages
    pdf = letter_pdf(8, 0)
    t = time.process_time()
    images = render_pages(pdf, args.tokens)
    res["cpu_ms_per_page_render_preprocess"] = round(1000 * (time.process_time() - t) / len(images), 2)
    h, w = images[0].shape[:2]
    res["page_pixels"] = [h, w]
    res["visual_tokens_per_page"] = (h // 28) * (w // 28)
    pages = [images[i % len(images)] for i in range(args.pages)]
    pil_pages = [Image.fromarray(p) for p in pages]

    # The processor's share, one core and all cores, for the plain loop's CPU side
    lm_plain = load_model(model_dir, device="cuda", batched_vision_attention=False)
    proc = lm_plain.processor
    t = time.perf_counter()
    proc(images=pil_pages[:16], return_tensors="pt")
    res["processor_ms_per_page_wall"] = round(1000 * (time.perf_counter() - t) / 16, 2)

    # FLOPs per page, counted from the architecture (matmuls and attention; torch's
    # FlopCounterMode cannot count SDPA with grouped KV heads)
    inputs = proc(images=pil_pages[:1], return_tensors="pt").to("cuda")
    flops_page = page_flops(lm_plain.model.config, h // 14 * (w // 14), int(inputs["input_ids"].shape[1]))
    res["tflop_per_page"] = round(flops_page / 1e12, 3)
    res["sequence_length"] = int(inputs["input_ids"].shape[1])

    def rate(sec_per_batch, bs):
        pps = bs / sec_per_batch
        return {"pages_per_s": round(pps, 2), "chip_fraction": round(pps * flops_page / 1e12 / args.peak_tflops, 3)}

    variants = {}
    for bs in [16]:
        pil_batches = [pil_pages[i : i + bs] for i in range(0, len(pil_pages) - bs + 1, bs)]

        def plain(batch, model=lm_plain.model):
            with torch.no_grad():
                x = proc(images=batch, return_tensors="pt").to("cuda")
                return model(**x).embeddings

        sec, mem = timed(plain, pil_batches)
        variants[f"plain_loop_bs{bs}"] = {**rate(sec, bs), "s_per_batch": round(sec, 4), "peak_gib": round(mem, 1)}
        print(variants, flush=True)
    del lm_plain
    torch.cuda.empty_cache()

    reference = None
    for compile_model, sizes in ((False, [16]), (True, [int(x) for x in args.batch_sizes.split(",")])):
        tag = "_compiled" if compile_model else ""
        # Model load and the first call timed apart (until 2026-12-03's fourth session one
        # timer covered both, on an 8-page batch: "first_batch_s" in older JSON).
        t = time.perf_counter()
        # the compiled actor from its first batch: no compile helper, whose eager batches would be timed
        # instead (the job below keeps the default)
        saved_helper = os.environ.get("VDR_COMPILE_HELPER")
        os.environ["VDR_COMPILE_HELPER"] = "0"
        try:
            emb = PageEmbedder(model_dir, device="cuda", compile_model=compile_model)
        finally:
            if saved_helper is None:
                os.environ.pop("VDR_COMPILE_HELPER")
            else:
                os.environ["VDR_COMPILE_HELPER"] = saved_helper
        torch.cuda.synchronize()
        res[f"model_load_s{tag}"] = round(time.perf_counter() - t, 1)
        first_table = rows_table(pages[: sizes[0]])  # a batch of the (first) timed size
        t = time.perf_counter()
        out = emb(first_table)  # the first call compiles
        torch.cuda.synchronize()
        res[f"first_call_s{tag}"] = round(time.perf_counter() - t, 1)
        res[f"first_call_pages{tag}"] = first_table.num_rows
        vecs = [np.asarray(x, dtype=np.float32) for x in out.column("embedding").to_pylist()]
        if reference is None:
            reference = vecs
        else:  # the pages both first calls embedded (the same pages, in the same order)
            res["compiled_vs_eager_max_abs_diff"] = float(max(np.abs(a - b).max() for a, b in zip(vecs, reference)))
        for bs in sizes:
            tables = [rows_table(pages[i : i + bs]) for i in range(0, len(pages) - bs + 1, bs)]
            sec, mem = timed(emb, tables, warmup=2)
            name = f"actor{'_compiled' if compile_model else ''}_bs{bs}"
            variants[name] = {**rate(sec, bs), "s_per_batch": round(sec, 4), "peak_gib": round(mem, 1)}
            print(name, variants[name], flush=True)
        del emb
        torch.cuda.empty_cache()
    res["variants"] = variants
    best_plain = max(v["pages_per_s"] for k, v in variants.items() if k.startswith("plain"))
    best_actor = max(v["pages_per_s"] for k, v in variants.items() if k.startswith("actor"))
    res["actor_vs_plain"] = round(best_actor / best_plain, 3)

    # 2. The whole job on a generated corpus, two sizes
    if not args.skip_job:
        run_job_rates(args, res, work, model_dir, best_actor, flops_page)
    print(json.dumps(res, indent=2))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
