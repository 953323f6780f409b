"""The embedding actor on one GPU: where its time goes, what makes it faster, and what FP8
costs in fidelity. Real-size ColQwen2 with random weights, one run, the same pages for all.

    PYTHONPATH=$PWD python benchmarks/bench_actor.py --out bench_actor.json   # on the GPU machine

1. Variants of the actor (``PageEmbedder.__call__`` on the rows the render stage emits, so
   input building and the copy back are included), each over the same pages and batch size:
   * ``seed``             the seed's forward alone: transformers' plain ``ColQwen2ForRetrieval``
                          forward (bf16, sdpa) on the processor's inputs, made and moved to the
                          device before timing (no actor: the issue's 1.6x baseline);
   * ``eager``            the actor, load_model without compile (sdpa, bf16);
   * ``compiled``         the job's default (per-block torch.compile);
   * ``compiled_cudnn`` / ``compiled_flash``  the same with SDPA's cuDNN (flash) attention
                          backend first. torch.compile picks the attention op when it compiles,
                          so such a variant is built, compiled and run entirely under the
                          preference, after ``torch._dynamo.reset()`` and with Inductor's caches
                          (and the node's compile cache) off; the attention kernel that ran is
                          recorded (``attention_kernel``). Before 2026-12-03's fourth session the
                          preference only wrapped already-compiled blocks and had no effect;
   * ``compiled_oldhost`` the same with the host side of commit 6a80843 undone (float32 copied
                          back and rounded on the CPU, ``pa.array`` over float16, pixels copied
                          to bytes, M-RoPE recomputed); e66a721's later host changes (pixels
                          staged in pinned memory, non-blocking copies, ``index_select`` gather,
                          pinned copy back) stay in, so it is not the whole pre-2026-12-03 path;
   * ``compiled_inflight2``  the same with --batches-in-flight 2: two threads call the actor
                          (as Ray Data does), one batch prepared on the host while the other
                          runs; timed as wall time over batches;
   * ``fp8`` / ``fp8_cudnn``  --precision fp8 (pipeline/embed/fp8.py), compiled;
   * ``*_persistnorm`` / ``*_nopersistnorm``  any of these with Inductor's persistent reductions
                          up to 2,048 per row forced on / off (VDR_PERSISTENT_NORMS=1 / 0; on by
                          default since 2026-12-05; the norm kernels read ``triton_per_...``
                          instead of ``triton_red_...``);
   * ``*_convpatch``      any of these with the patch embedding as transformers' Conv3d (the
                          default since 2026-12-05 runs it as one matmul);
   * ``*_pool3``          any of these with --pool-factor 3 (pipeline/embed/pooling.py): the
                          pooling's distances on the GPU, Ward's merge loop on the host (off
                          the device lock since 2026-12-05; in worker processes since the
                          fifteenth session, ``*_pool3_poolthread``: in the actor's threads,
                          VDR_POOL_PROCESSES=0; ``*_pool3_procsN``: N processes); since the
                          seventeenth session the merge loop runs on the GPU by default
                          (pipeline/embed/ward_triton.py), ``*_pool3_poolhost``: on the host as
                          before (VDR_WARD_ON_DEVICE=0); no fidelity row (other vectors).
   * ``*_maxautotune`` / ``*_cdtune``  any of these compiled with Inductor's ``max_autotune_gemm``
                          (GEMMs autotuned among cuBLAS and Triton templates, bias and activation
                          fused as epilogues) / ``coordinate_descent_tuning``; caches off;
   * ``*_fa4`` / ``*_sdpa``  --vision-attention fa4 / sdpa (pipeline/embed/vision_kernels.py:
                          FlashAttention 4's varlen kernel, head 80 unpadded; flash-attn-4 from
                          /tmp/fa4site, benchmarks/pack_fa4.sh); without either suffix, the job's
                          default, auto (FA4 where installed on a Hopper GPU); timed once FA4 is loaded;
   * ``*_tritonattn`` / ``*_tritontma``  the vision attention as benchmarks/vision_attention_triton.py's
                          pointer kernel / its TMA + warp-specialized kernel (Hopper; config from
                          ``VDR_VISION_TMA_CONFIG=BM_BN_W_S_WS``, recorded with any fallback count);
   pages/s, fraction of the chip (FLOPs per page counted from the architecture, at the
   measured bf16 peak), the forward's GPU-busy fraction of the actor's wall time.
2. Profile of the compiled bf16 actor (torch.profiler, CUDA kernels): GPU time by kernel
   class (GEMM, attention, Inductor's fused kernels split by what they fuse: norms, rotary,
   activations, FP8 quantization; copies), the host gap (wall minus kernel time), and the
   vision tower vs the language model (CUDA events on their forward hooks).
3. Fidelity on ``--fid-pages`` pages and ``--queries`` queries: each variant's page vectors
   against the compiled bf16 actor's (cosine per vector), and the MaxSim top-10 of every
   query (queries embedded once, bf16) against the bf16 corpus's top-10.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

# The compiled variants time the compiled actor from its second batch on: a new node's compile
# helper (pipeline.embed.compile_helper, on by default on a GPU since 2026-12-05) would run those batches
# eagerly until it ends (2026-12-05: a 'compiled' H100 run timed 41.8 pages/s, the eager rate).
os.environ.setdefault("VDR_COMPILE_HELPER", "0")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_embed import letter_pdf, page_flops, render_pages, rows_table  # noqa: E402

from pipeline import schema  # noqa: E402

DEV = "cuda"  # --smoke: "cpu" (the tiny model, to check this script end to end without a GPU)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _render_doc(args):
    seed, tokens = args
    return render_pages(letter_pdf(8, seed), tokens)


def make_pages(n: int, tokens: int) -> list[np.ndarray]:
    with mp.get_context("spawn").Pool(min(16, os.cpu_count() or 1)) as pool:
        docs = pool.map(_render_doc, [(s, tokens) for s in range((n + 7) // 8)])
    return [p for d in docs for p in d][:n]


@contextlib.contextmanager
def cudnn_first(first: str | bool):
    """SDPA's backends with ``first`` ("cudnn" or "flash") tried first; False: torch's order.

    With torch.compile the attention op is chosen when a block compiles, not when it runs, and
    Dynamo's in-memory code, Inductor's on-disk FX graph cache and the node's compile cache
    (pipeline/embed/compile_cache.py) do not key on this preference. So the preference is
    entered for the whole variant (construction, first batch, every call), Dynamo is reset
    before and after, and Inductor's caches and the node's compile cache are off inside it."""
    if not first:
        yield
        return
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pipeline.embed import compile_cache

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if first == "flash":
        order[:2] = order[1::-1]
    saved_caches = inductor_config.force_disable_caches
    saved_env = os.environ.get(compile_cache.LOCAL_ENV)
    torch._dynamo.reset()
    inductor_config.force_disable_caches = True
    os.environ[compile_cache.LOCAL_ENV] = tempfile.mkdtemp(prefix="bench-actor-nocache-")  # nothing loaded or saved
    try:
        with sdpa_kernel(order, set_priority=True):
            yield
    finally:
        torch._dynamo.reset()  # later variants compile under torch's own order again
        inductor_config.force_disable_caches = saved_caches
        if saved_env is None:
            os.environ.pop(compile_cache.LOCAL_ENV, None)
        else:
            os.environ[compile_cache.LOCAL_ENV] = saved_env


# The Triton kernel a *_tritonattn / *_tritontma variant runs (None: SDPA, the op's own body)
_TRITON_ATTEND: dict = {"op": None, "registered": set()}


def _triton_image_attention(q, k, v, lengths, cu_seqlens, scale):
    """``vdr::image_attention``'s kernel for DEV while a Triton variant runs: each run of equal-size
    images through the Triton op, as ``image_attention`` does with SDPA; outside one, the op's own body."""
    from pipeline.embed import model as model_mod

    op = _TRITON_ATTEND["op"]
    if op is None:
        return model_mod.image_attention._init_fn(q, k, v, lengths, cu_seqlens, scale)
    outs, start = [], 0
    for length, count in model_mod._runs(model_mod._image_lengths(lengths, cu_seqlens, q.shape[0])):
        n = length * count
        outs.append(op(*(t[start : start + n].view(count, length, t.shape[1], -1) for t in (q, k, v)), scale))
        start += n
    return outs[0] if len(outs) == 1 else torch.cat(outs)


@contextlib.contextmanager
def triton_vision_attention(on: bool, kernel: str = "pointer"):
    """*_tritonattn: the vision attention as benchmarks/vision_attention_triton.py's kernel (head
    size not padded). Measured slower than SDPA's cuDNN kernel (RESULTS.md, ninth session).
    *_tritontma (``kernel="tma"``): the same file's TMA + warp-specialized kernel
    (``vdr::vision_attention_tma``, config ``VDR_VISION_TMA_CONFIG`` or its default).

    The kernel is swapped in *inside* the opaque ``vdr::image_attention`` op (a kernel for DEV
    registered on it), so the compiled blocks are the default ones (loaded from the compile cache,
    nothing saved under its key differs) and nothing graph-breaks. Through
    ``enable_batched_vision_attention(..., attend=)`` instead, the blocks call ``lengths.tolist()``:
    on CPU (torch 2.13) the precompiled block fell back and Inductor's code then failed with
    ``NameError: name 's10' is not defined``."""
    if not on:
        yield
        return
    from pipeline.embed import model as model_mod
    from vision_attention_triton import vision_attention_op, vision_attention_tma_op

    if DEV not in _TRITON_ATTEND["registered"]:
        model_mod.image_attention.register_kernel(DEV, _triton_image_attention)
        _TRITON_ATTEND["registered"].add(DEV)
    _TRITON_ATTEND["op"] = {"pointer": vision_attention_op, "tma": vision_attention_tma_op}[kernel]
    try:
        yield
    finally:
        _TRITON_ATTEND["op"] = None


@contextlib.contextmanager
def old_host_path(on: bool):
    """Commit 6a80843's host changes undone, for a side-by-side baseline: float32 vectors copied
    back and rounded on the CPU, ``pa.array`` over float16, pixels copied to Python bytes,
    M-RoPE positions computed for every batch. Only those: the later changes of commit e66a721
    (pixels stacked into pinned memory, non-blocking copies to the device, the ``index_select``
    gather of real vectors, the copy back into pinned memory) stay in, because the float32 copy
    back goes through today's ``embed_pages``. It is not the whole host path of before
    2026-12-03."""
    if not on:
        yield
        return
    import pyarrow as pa

    from pipeline.embed import model as M, stages

    saved = schema.embeddings_to_arrow, stages.pixel_views, M.embed_pages, M.LoadedModel.__init__

    def to_arrow(vectors):
        lengths = np.fromiter((len(v) for v in vectors), dtype=np.int64, count=len(vectors))
        offsets = np.zeros(len(vectors) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate([np.asarray(v, dtype=np.float16).reshape(-1) for v in vectors])
        inner = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float16()), 128)
        return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), inner)

    def views(column):
        return [None if b is None else np.frombuffer(b, dtype=np.uint8) for b in column.to_pylist()]

    class NoCache(dict):
        def __setitem__(self, k, v):
            pass

    def embed_pages(lm, images, timer=None, pool_factor=1, out_dtype=None, device_lock=None):
        if not isinstance(lm.rope_cache, NoCache):
            lm.rope_cache = NoCache()
        return saved[2](lm, images, timer, pool_factor)  # float32 back to the host

    schema.embeddings_to_arrow, stages.pixel_views, M.embed_pages = to_arrow, views, embed_pages
    try:
        yield
    finally:
        schema.embeddings_to_arrow, stages.pixel_views, M.embed_pages = saved[:3]


@contextlib.contextmanager
def persistent_norms_variant():
    """Inductor's FX graph cache off while the variant compiles (its kernels would otherwise be
    found under the default heuristics' key), and Inductor's own heuristics back after it."""
    from torch._inductor import config

    from pipeline.embed import inductor_heuristics

    saved = config.fx_graph_cache
    config.fx_graph_cache = False
    try:
        yield
    finally:
        # uninstall first: it restores the cache settings it found at install (this context's
        # False), which would otherwise outlast the variant
        inductor_heuristics.uninstall()
        config.fx_graph_cache = saved


@contextlib.contextmanager
def inductor_settings(**settings):
    """Inductor settings for a whole variant, compiled fresh: Dynamo reset before and after,
    Inductor's caches and the node's compile cache (pipeline/embed/compile_cache.py, whose key
    does not name these settings) off inside it, the settings restored after it. Nothing set:
    a no-op. *_maxautotune: ``max_autotune_gemm`` (each GEMM autotuned among cuBLAS and
    Inductor's Triton templates, which can take the bias and the activation as an epilogue);
    *_cdtune: ``coordinate_descent_tuning`` (the fused pointwise and norm kernels' block sizes)."""
    if not settings:
        yield
        return
    import torch._dynamo
    import torch._inductor.config as inductor_config

    from pipeline.embed import compile_cache

    saved = {k: getattr(inductor_config, k) for k in (*settings, "force_disable_caches")}
    saved_env = os.environ.get(compile_cache.LOCAL_ENV)
    torch._dynamo.reset()
    for k, v in {**settings, "force_disable_caches": True}.items():
        setattr(inductor_config, k, v)
    os.environ[compile_cache.LOCAL_ENV] = tempfile.mkdtemp(prefix="bench-actor-inductor-")  # nothing loaded or saved
    try:
        yield
    finally:
        torch._dynamo.reset()
        for k, v in saved.items():
            setattr(inductor_config, k, v)
        if saved_env is None:
            os.environ.pop(compile_cache.LOCAL_ENV, None)
        else:
            os.environ[compile_cache.LOCAL_ENV] = saved_env


@contextlib.contextmanager
def env_set(name: str, value: str | None):
    """``name=value`` in the environment for the block (None: leave it as it is)."""
    if value is None:
        yield
        return
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _calls(emb, tables):
    """The actor's outputs for ``tables``, in order: one call after another, or from two
    threads when the actor takes two batches in flight (as Ray Data's threads call it)."""
    if getattr(emb, "device_lock", None) is None:
        return [emb(t) for t in tables]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(emb, tables))


def embed_all(emb, pages, bs):
    out = []
    tables = [rows_table(pages[i : i + bs]) for i in range(0, len(pages), bs)]
    for t in _calls(emb, tables):
        out.extend(v.astype(np.float32) for v in schema.arrow_to_embeddings(t.column("embedding")))
    return out


def seed_forward_rate(model_dir, pages, bs):
    """*seed*: the seed's forward alone, as the transformers docs run ColQwen2 and as the project
    started (the issue's "seed's forward, preprocessed inputs", 43.4-43.6 pages/s on an H200,
    2026-11-24): ``ColQwen2ForRetrieval.from_pretrained(dtype=bf16, attn_implementation="sdpa")``,
    the processor's inputs made and moved to the device before timing, ``model(**inputs).embeddings``
    per batch, synchronised. Median seconds per batch after one warm-up batch, the visual tokens
    per page the processor made (they must equal the actor's for a fair comparison), peak GiB."""
    from PIL import Image
    from transformers import ColQwen2ForRetrieval, ColQwen2Processor

    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    model = ColQwen2ForRetrieval.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(DEV).eval()
    processor = ColQwen2Processor.from_pretrained(model_dir)
    batches = []
    for i in range(0, len(pages) - bs + 1, bs):
        inputs = processor(images=[Image.fromarray(p) for p in pages[i : i + bs]], return_tensors="pt")
        batches.append({k: v.to(DEV) for k, v in inputs.items()})
    grid = batches[0]["image_grid_thw"][0].tolist()
    per = []
    with torch.inference_mode():
        model(**batches[0]).embeddings
        sync()
        if DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for b in batches:
            t = time.perf_counter()
            model(**b).embeddings
            sync()
            per.append(time.perf_counter() - t)
    mem = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0
    del model, batches
    return statistics.median(per), grid[0] * grid[1] * grid[2] // 4, mem


def timed_rate(emb, pages, bs, repeats=1):
    """Median seconds per batch over the given pages (after one warm-up batch), and the
    forward's share of that wall time from the actor's own CUDA-event timer."""
    tables = [rows_table(pages[i : i + bs]) for i in range(0, len(pages) - bs + 1, bs)]
    emb(tables[0])
    sync()
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    per, busy0, t0 = [], emb.timer.busy_s, time.perf_counter()
    for _ in range(repeats):
        if getattr(emb, "device_lock", None) is not None:  # two in flight: wall time per batch
            t = time.perf_counter()
            _calls(emb, tables)
            sync()
            per.append((time.perf_counter() - t) / len(tables))
            continue
        for tb in tables:
            t = time.perf_counter()
            emb(tb)
            sync()
            per.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0
    return statistics.median(per), (emb.timer.busy_s - busy0) / wall, mem


KERNEL_CLASSES = (
    ("attention", re.compile(r"flash|fmha|attention|cudnn|sdpa|mha", re.I)),
    # before "gemm": Inductor names the kernels that quantize an activation for FP8 after the
    # matmul they feed (triton_red_fused__scaled_mm__..._amax_clamp_...); until 2026-12-06 they
    # were counted as GEMMs (RESULTS.md, thirtieth session)
    ("fused: fp8 quantize", re.compile(r"^triton.*(amax|clamp).*", re.I)),
    ("gemm", re.compile(r"gemm|gemv|cutlass|nvjet|xmma|cublas|scaled_mm|f8f8|wgmma|sm90_", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy_kernel|CatArrayBatched", re.I)),
    ("fused: norm", re.compile(r"^triton.*(rsqrt|var_mean|native_layer_norm)", re.I)),
    ("fused: rotary", re.compile(r"^triton.*(neg|cat).*", re.I)),
    ("fused: activation", re.compile(r"^triton.*(sigmoid|silu|gelu|mul)", re.I)),
    ("fused: other", re.compile(r"^triton", re.I)),
    ("other", re.compile(r".")),
)


def attention_kernel(emb, table):
    """The attention kernels that ran in one call of the actor (torch.profiler): on CUDA the
    GPU kernels, on CPU (--smoke) the aten ops; the top one by self time first."""
    from torch.profiler import ProfilerActivity, profile

    cuda = DEV == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        emb(table)
        sync()
    found = []
    for ev in prof.key_averages():
        us = (getattr(ev, "self_device_time_total", 0) or getattr(ev, "self_cuda_time_total", 0)) if cuda \
            else ev.self_cpu_time_total
        if us > 0 and KERNEL_CLASSES[0][1].search(ev.key) and not ev.key.startswith("ProfilerStep"):
            found.append((us / 1e6, ev.key[:160], ev.count))
    found.sort(reverse=True)
    return {"activity": "cuda kernels" if cuda else "cpu ops", "top": found[0][1] if found else None,
            "kernels": [{"s": round(s, 5), "name": n, "calls": c} for s, n, c in found[:5]]}


def profile_actor(emb, pages, bs):
    """GPU time by kernel class over 3 batches, the host gap, and vision vs language model."""
    from torch.profiler import ProfilerActivity, profile

    tables = [rows_table(pages[i : i + bs]) for i in range(0, 3 * bs, bs)]
    model = emb.lm.model
    visual = getattr(model.vlm, "visual", None) or model.vlm.model.visual
    text = getattr(model.vlm, "language_model", None) or model.vlm.model.language_model
    events: dict[str, list] = {"vision": [], "language_model": []}

    def hooks(module, name):
        def pre(*_):
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            events[name].append([e, None])

        def post(*_):
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            events[name][-1][1] = e
        return module.register_forward_pre_hook(pre), module.register_forward_hook(post)

    handles = [*hooks(visual, "vision"), *hooks(text, "language_model")] if DEV == "cuda" else []
    emb(tables[0])
    sync()
    for v in events.values():
        v.clear()
    busy0 = emb.timer.busy_s
    with profile(activities=[ProfilerActivity.CUDA if DEV == "cuda" else ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for tb in tables:
            emb(tb)
        sync()
        wall = time.perf_counter() - t
    for h in handles:
        h.remove()
    forward = emb.timer.busy_s - busy0
    classes: dict[str, float] = {}
    top = []
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", 0) or getattr(ev, "self_cuda_time_total", 0)
        if us <= 0 or ev.key.startswith("ProfilerStep"):
            continue
        name = next(c for c, rx in KERNEL_CLASSES if rx.search(ev.key))
        classes[name] = classes.get(name, 0.0) + us / 1e6
        top.append((us / 1e6, ev.key[:120], ev.count))
    kernel_s = sum(classes.values())
    towers = {k: sum(a.elapsed_time(b) for a, b in v if b is not None) / 1000 for k, v in events.items()}
    top.sort(reverse=True)
    return {
        "batches": len(tables), "batch_size": bs, "wall_s": round(wall, 4), "forward_s_cuda_events": round(forward, 4),
        "kernel_s": round(kernel_s, 4), "host_gap_s": round(wall - kernel_s, 4),
        "by_class_s": {k: round(v, 4) for k, v in sorted(classes.items(), key=lambda x: -x[1])},
        "by_class_fraction_of_wall": {k: round(v / wall, 3) for k, v in sorted(classes.items(), key=lambda x: -x[1])},
        "towers_s": {k: round(v, 4) for k, v in towers.items()},
        "top_kernels": [{"s": round(s, 4), "name": n, "calls": c} for s, n, c in top[:25]],
    }


def maxsim_top(queries, pages, k=10):
    """Top-k page indices of every query, exact MaxSim on the GPU in float32."""
    lengths = [len(p) for p in pages]
    P = torch.zeros(len(pages), max(lengths), 128, device=DEV)
    mask = torch.zeros(len(pages), max(lengths), dtype=torch.bool, device=DEV)
    for i, p in enumerate(pages):
        P[i, : len(p)] = torch.from_numpy(p).to(DEV)
        mask[i, : len(p)] = True
    tops = []
    for q in queries:
        s = torch.einsum("qd,pnd->pqn", torch.from_numpy(q).to(DEV), P)
        s = s.masked_fill(~mask[:, None, :], float("-inf")).amax(dim=2).sum(dim=1)
        tops.append(torch.topk(s, k).indices.cpu().numpy())
    return tops


def fidelity(ref_pages, pages, ref_top, queries, k=10):
    """Cosine per vector over the pages both embedded; the rankings when both embedded all."""
    full = len(ref_pages)
    ref_pages = ref_pages[: len(pages)]
    cos = np.concatenate([(a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
                          for a, b in zip(ref_pages, pages)])
    out = {"pages": len(pages), "cosine_mean": round(float(cos.mean()), 5), "cosine_p01": round(float(np.quantile(cos, 0.01)), 5),
            "cosine_min": round(float(cos.min()), 5),
            "max_abs_diff": float(max(np.abs(a - b).max() for a, b in zip(ref_pages, pages)))}
    if ref_top is not None and len(pages) == full:
        top = maxsim_top(queries, pages, k)
        out.update({"queries": len(queries), f"top{k}_overlap_mean": round(float(np.mean(
            [len(set(a) & set(b)) / k for a, b in zip(ref_top, top)])), 4),
            "top1_agreement": round(float(np.mean([a[0] == b[0] for a, b in zip(ref_top, top)])), 4)})
    return out


def _git_commit() -> str | None:
    """HEAD's short hash, or None where there is no git or no repository (a copied tree)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip() or None
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_actor.json")
    ap.add_argument("--tokens", type=int, default=768)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--pages", type=int, default=256, help="pages per timed variant")
    ap.add_argument("--fid-pages", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--variants", default="compiled,compiled_inflight2,compiled_oldhost,compiled_flash,eager,fp8",
                    help="compiled first: the others are compared with it. *_cudnn / *_flash: compiled "
                         "under that SDPA preference (Dynamo reset, caches off); *_oldhost: commit "
                         "6a80843's host changes undone, e66a721's (pinned staging, non-blocking "
                         "copies, index_select gather, pinned copy back) kept")
    ap.add_argument("--profile-variants", default="compiled,fp8,compiled_tritonattn,compiled_tritontma,compiled_persistnorm,compiled_nopersistnorm",
                    help="the variants whose kernels are profiled by class (3 batches, torch.profiler)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, few pages: checks the script runs")
    ap.add_argument("--peak-tflops", type=float, default=770.0, help="measured bf16 matmul peak (FACTS.md)")
    args = ap.parse_args()
    global DEV
    if args.smoke:
        DEV = "cpu"
        args.tokens, args.batch_size, args.pages, args.fid_pages, args.queries = 64, 4, 8, 16, 5
        args.variants = args.variants.replace(",compiled_cudnn", "").replace(",fp8_cudnn", "")
    from pipeline.devtools.tiny import build_tiny_model
    from pipeline.embed.model import embed_queries
    from pipeline.embed.stages import PageEmbedder

    res: dict = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)", "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                 "commit": os.environ.get("BENCH_COMMIT") or _git_commit()}
    work = tempfile.mkdtemp(prefix="bench-actor-")
    model_dir = os.path.join(work, "colqwen2-real-random")
    t = time.perf_counter()
    build_tiny_model(model_dir, max_visual_tokens=args.tokens, real_size=not args.smoke, device=DEV)
    res["build_model_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    pages = make_pages(max(args.fid_pages, args.pages), args.tokens)
    res["render_s"] = round(time.perf_counter() - t, 1)
    h, w = pages[0].shape[:2]
    n_patches = (h // 14) * (w // 14)
    rng = np.random.default_rng(0)
    words = "invoice total revenue chart table figure section energy policy climate report quarter".split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 9)))) + f" {i}" for i in range(args.queries)]
    res.update(pages=len(pages), page_pixels=[h, w], visual_tokens=n_patches // 4, batch_size=args.batch_size)
    print({k: v for k, v in res.items()}, flush=True)

    variants, fid, vectors = {}, {}, {}
    flops_page = None
    queries = ref_top = None
    for name in args.variants.split(","):
        cudnn = "cudnn" if name.endswith("_cudnn") else "flash" if name.endswith("_flash") else False
        precision = "fp8" if name.startswith("fp8") else "default"
        t = time.perf_counter()
        # *_oldhost: the host path before 2026-12-03's changes, swapped in for this variant.
        # (Until 2026-12-03's fourth session this context was defined but never entered, so
        # "compiled_oldhost" ran the same code as "compiled": RESULTS.md says so.)
        host = contextlib.ExitStack()
        host.enter_context(old_host_path(name.endswith("_oldhost")))
        # *_cudnn / *_flash: the SDPA preference holds for the whole variant, from before the
        # model is built and compiled to its last call (see cudnn_first).
        host.enter_context(cudnn_first(cudnn))
        # *_persistnorm: Inductor's persistent reductions up to 2,048 values per row
        # (pipeline.embed.inductor_heuristics, VDR_PERSISTENT_NORMS=1), compiled fresh: the
        # FX graph cache off for the variant, the heuristic undone after it
        # (on by default since 2026-12-05: *_nopersistnorm turns them off). Each variant starts
        # from Inductor's own choices; load_model installs them again where asked.
        from pipeline.embed import inductor_heuristics

        inductor_heuristics.uninstall()
        host.enter_context(env_set("VDR_PERSISTENT_NORMS", "1" if "_persistnorm" in name
                                   else "0" if "_nopersistnorm" in name else None))
        if "_persistnorm" in name:
            host.enter_context(persistent_norms_variant())
        # *_convpatch: the patch embedding as transformers' Conv3d (the default since 2026-12-05
        # is one matmul: pipeline.embed.model.enable_linear_patch_embed), read by load_model
        host.enter_context(env_set("VDR_LINEAR_PATCH_EMBED", "0" if "_convpatch" in name else None))
        # *_maxautotune / *_cdtune: Inductor's GEMM autotuning / coordinate descent, compiled fresh
        host.enter_context(inductor_settings(**({"max_autotune_gemm": True} if "_maxautotune" in name else {}),
                                             **({"coordinate_descent_tuning": True} if "_cdtune" in name else {})))
        # *_poolthread: the pooling's merge loops in the actor's threads, as before the fifteenth
        # session (the default runs them in worker processes: pipeline.embed.pooling.WardMerges)
        # *_procsN: N merge processes (VDR_POOL_PROCESSES=N; the default is 2)
        # *_poolhost: Ward's merge loop on the host (VDR_WARD_ON_DEVICE=0), the default until the
        # seventeenth session; otherwise on the GPU where Triton is installed
        # (*_poolthread and *_procsN are host variants too)
        procs = re.search(r"_procs(\d+)", name)
        host.enter_context(env_set("VDR_WARD_ON_DEVICE", "0" if ("_poolhost" in name or "_poolthread" in name
                                                               or procs) else None))
        host.enter_context(env_set("VDR_POOL_PROCESSES", "0" if "_poolthread" in name else procs.group(1) if procs else None))
        # *_tritonattn / *_tritontma: the vision attention as benchmarks/vision_attention_triton.py's
        # pointer kernel / TMA + warp-specialized kernel
        host.enter_context(triton_vision_attention("tritonattn" in name or "tritontma" in name,
                                                   kernel="tma" if "tritontma" in name else "pointer"))
        if name == "seed":  # the baseline the issue names: no actor, no fidelity row (M-RoPE differs)
            try:
                sec, tokens, mem = seed_forward_rate(model_dir, pages[: args.pages], args.batch_size)
                pps = args.batch_size / sec
                variants[name] = {"pages_per_s": round(pps, 2), "s_per_batch": round(sec, 4),
                                  "visual_tokens_per_page": tokens, "peak_gib": round(mem, 1),
                                  "load_and_run_s": round(time.perf_counter() - t, 1), "what": "forward alone, "
                                  "processor inputs on the device before timing (transformers' plain forward)"}
                if flops_page is not None:
                    variants[name]["chip_fraction_bf16_peak"] = round(pps * flops_page / 1e12 / args.peak_tflops, 3)
            except Exception as exc:  # noqa: BLE001
                variants[name] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            print(name, variants[name], flush=True)
            host.close()
            if DEV == "cuda":
                torch.cuda.empty_cache()
            res["variants"] = variants
            continue
        # *_helper: the compile helper of a new node (VDR_COMPILE_HELPER=1, pipeline.embed.compile_helper),
        # its caches empty (Inductor's and Triton's: a cold compile, not this process's earlier variants'
        # kernels); batches run eagerly until its blocks are loaded, then the timed batches run on the
        # blocks it compiled: are they as fast as the actor's own (a `compiled*` variant beside it)?
        helper_variant = "_helper" in name
        if helper_variant:
            host.enter_context(env_set("VDR_COMPILE_HELPER", "1"))
            host.enter_context(env_set("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench-helper-inductor-")))
            host.enter_context(env_set("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="bench-helper-triton-")))
            # and a node compile cache of its own: an earlier variant saved its blocks in the
            # default one, where this actor would find them (a warm node: no helper at all)
            host.enter_context(env_set("VDR_COMPILE_CACHE", tempfile.mkdtemp(prefix="bench-helper-vdr-")))
        emb = None
        try:
            # --smoke compiles nothing, but for *_helper (the tiny model's helper on the CPU: the wiring)
            emb = PageEmbedder(model_dir, device=DEV, compile_model=name != "eager" and (not args.smoke or helper_variant),
                               precision=precision, batches_in_flight=2 if "inflight2" in name else 1,
                               pool_factor=3 if "_pool3" in name else 1,
                               vision_attention="fa4" if "_fa4" in name else "sdpa" if "_sdpa" in name else "auto")
            load_s = time.perf_counter() - t
            # FlashAttention 4 loads in a thread while the first batches run on SDPA: the timed
            # batches run on one kernel (the job's summary shows the switch; this times the kernel)
            emb.vision.wait(300)
            t = time.perf_counter()
            emb(rows_table(pages[: args.batch_size]))
            sync()
            first = time.perf_counter() - t
            helper_eager = 0
            while helper_variant and emb.helper is not None and emb.helper.pending() \
                    and time.perf_counter() - t < 300:
                emb(rows_table(pages[: args.batch_size]))  # eager, as a job's batches would be
                helper_eager += 1
            sync()
            helper_wait_s = time.perf_counter() - t
            if flops_page is None:
                seq = n_patches // 4 + len(emb.lm.image_prefix_ids) + len(emb.lm.image_suffix_ids)
                flops_page = page_flops(emb.lm.model.config, n_patches, seq)
                res["tflop_per_page"] = round(flops_page / 1e12, 3)
            pool_before = (dict(emb.timer.pool_host_s), emb.timer.passes)  # the timed batches' share only
            sec, busy, mem = timed_rate(emb, pages[: args.pages], args.batch_size)
            pps = args.batch_size / sec
            variants[name] = {"pages_per_s": round(pps, 2), "s_per_batch": round(sec, 4),
                              "chip_fraction_bf16_peak": round(pps * flops_page / 1e12 / args.peak_tflops, 3),
                              "forward_busy_fraction": round(busy, 3), "peak_gib": round(mem, 1),
                              "load_s": round(load_s, 1), "first_batch_s": round(first, 1),
                              "sdpa_first": cudnn or None,
                              "attention_kernel": attention_kernel(emb, rows_table(pages[: args.batch_size])),
                              "vision_attention": emb.vision.summary()}
            if helper_variant:
                variants[name]["compile_helper"] = {
                    "eager_batches_after_the_first": helper_eager, "s_from_first_batch_to_loaded": round(helper_wait_s, 1),
                    "summary": emb.helper.summary(emb.lm.precompiled) if emb.helper is not None else None,
                    "variants_compiled_here": sum(pf.compiled for pf in emb.lm.precompiled)}
            if "_pool3" in name:  # host seconds per timed batch of the pooling's second half (the
                # first batch, where the merge workers start, left out since the fifteenth session's call B)
                batches = max(emb.timer.passes - pool_before[1], 1)
                variants[name]["pool_host_s_per_batch"] = {k: round((v - pool_before[0][k]) / batches, 4)
                                                           for k, v in emb.timer.pool_host_s.items()}
            print(name, variants[name], flush=True)
            if "tritontma" in name:  # which config ran, and whether any call fell back
                import vision_attention_triton as va

                variants[name]["tma_config"] = list(va.TMA_CONFIG)
                variants[name]["tma_fallback_calls"] = va.TMA_FALLBACKS["calls"]
            if name in args.profile_variants.split(","):
                res[f"profile_{name}"] = profile_actor(emb, pages, args.batch_size)
                print(name, "profile", json.dumps({k: v for k, v in res[f"profile_{name}"].items() if k != "top_kernels"}),
                      flush=True)
            # the full fidelity set for bf16 and fp8; the other variants only need the
            # rounding check, on the timed pages
            n_fid = args.fid_pages if name in ("compiled", "fp8") else args.pages
            t = time.perf_counter()
            vectors[name] = embed_all(emb, pages[:n_fid], args.batch_size)
            sync()
            variants[name]["long_run"] = {"pages": n_fid, "s": round(time.perf_counter() - t, 2),
                                          "pages_per_s": round(n_fid / (time.perf_counter() - t), 2)}
            if name == "compiled":
                queries = embed_queries(emb.lm, texts)
                ref_top = maxsim_top(queries, vectors[name])
        except Exception as exc:  # a variant that fails is reported, the others still run
            variants[name] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            print(name, variants[name], flush=True)
        finally:
            host.close()
            if getattr(emb, "merges", None) is not None:  # *_pool3: this variant's merge workers end here
                emb.merges.close()
            emb = None
            if DEV == "cuda":
                torch.cuda.empty_cache()
        # against "compiled"; without it in --variants, against the first variant that ran (the
        # rankings then left out: their reference queries are embedded with "compiled" only)
        ref = "compiled" if "compiled" in vectors else next((n for n in vectors if "_pool3" not in n), None)
        if ref is not None and name in vectors and name != ref and "_pool3" not in name:
            fid[name] = fidelity(vectors[ref], vectors[name], ref_top if ref == "compiled" else None, queries)
            fid[name]["reference"] = ref
            print(name, f"fidelity vs {ref}", fid[name], flush=True)
        res["variants"], res["fidelity_vs_compiled_bf16"] = variants, fid
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    base = variants.get("eager", {}).get("pages_per_s")
    if base:
        res["vs_eager"] = {k: round(v["pages_per_s"] / base, 3) for k, v in variants.items() if "pages_per_s" in v}
    seed = variants.get("seed", {}).get("pages_per_s")
    if seed:  # the target: 1.6x the seed's forward, measured beside it in one run
        res["vs_seed"] = {k: round(v["pages_per_s"] / seed, 3) for k, v in variants.items() if "pages_per_s" in v}
    if flops_page is not None and "seed" in variants and "pages_per_s" in variants["seed"]:
        variants["seed"]["chip_fraction_bf16_peak"] = round(
            variants["seed"]["pages_per_s"] * flops_page / 1e12 / args.peak_tflops, 3)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps({k: v for k, v in res.items() if not k.startswith("profile")}, indent=2))


if __name__ == "__main__":
    main()
