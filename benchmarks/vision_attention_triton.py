"""Attention for the vision tower's head size (Qwen2-VL: 80) as one Triton kernel: an
experiment, measured slower than what the pipeline runs, so kept here and not in ``pipeline/``.

SDPA's fastest backend on an H200 (cuDNN's flash fprop) runs head size 80 in a tile padded
to 128 (kernel ``..._64x128x128_...``), so 37.5% of its tensor-core work multiplies zeros.
Here the head is cut into parts whose sizes are powers of two (80 = 64 + 16) and each part
is its own ``tl.dot``: no padding. It is the FlashAttention forward (online softmax, float32
accumulators, probabilities rounded to the operand dtype before the second product, as
FlashAttention and cuDNN do), non-causal, no mask, over equal-length images: q, k, v
``(images, length, heads, dim)`` as views of the fused QKV output (any strides, dim
contiguous). It writes ``(images * length, heads * dim)``, the layout the output projection
reads, so the transpose copy after SDPA goes away too.

Measured on an H200 (2026-12-04, ``bench_vision_attention.py``; benchmarks/RESULTS.md, ninth
session), 32 images x 3,072 patches x 16 heads: the best of 21 tile configs (128x64, 4 warps,
3-4 stages) reached 388-399 TFLOP/s counted at head size 80, against 408-426 for SDPA as the
model calls it (cuDNN, with the copy after it), and in the actor 57.6 against 60.7 pages/s with
the 8-warp config. Without warp specialization or TMA it does not beat cuDNN's padded kernel.
``benchmarks/bench_actor.py`` runs it in the model as the ``*_tritonattn`` variants, through
``pipeline.embed.model.enable_batched_vision_attention(..., attend=vision_attention_op)``.

A second kernel, :func:`attention_tma` (op ``vdr::vision_attention_tma``, actor variants
``*_tritontma``), is the same arithmetic in the form of Triton's fused-attention tutorial's
Hopper path (``python/tutorials/06-fused-attention.py``, Triton 3.6): every tile moved by TMA
through tensor descriptors made on the device (``tl.make_tensor_descriptor``, one per image and
head, as the tutorial does on Hopper with warp specialization), and the key loop a
``tl.range(..., warp_specialize=True)`` so the compiler splits it into a TMA producer and
wgmma/softmax consumers. Not yet run on a GPU (written 2026-12-04 on a CPU machine, checked
only by Triton's CPU interpreter, in float32 and float16).
"""

from __future__ import annotations

import math
import os
import warnings

import torch

try:  # Triton ships with CUDA builds of torch; the CPU build used in CI installs it for tests
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    triton = None

# (BLOCK_M, BLOCK_N, num_warps, num_stages): the best on an H200 in bench_vision_attention.py's sweep
# (2026-12-04; the actor variant of that day ran (128, 64, 8, 3), 306 TFLOP/s alone).
DEFAULT_CONFIG = (128, 64, 4, 4)


def head_parts(dim: int) -> tuple[int, int]:
    """``dim`` as two powers of two, larger first (80 -> (64, 16); 128 -> (128, 0)).

    ``tl.dot`` needs each operand dimension a power of two and at least 16."""
    d0 = 1 << (dim.bit_length() - 1)
    d1 = dim - d0
    if d0 < 16 or (d1 and (d1 < 16 or d1 & (d1 - 1))):
        raise ValueError(f"head size {dim} is not a power of two >= 16, or one plus another such")
    return d0, d1


if triton is not None:

    @triton.jit
    def _attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr,
        qk_scale,  # softmax scale x log2(e): the exponentials are exp2
        s_qz, s_qm, s_qh,
        s_kz, s_kn, s_kh,
        s_vz, s_vn, s_vh,
        s_oz, s_om, s_oh,
        heads, length,
        D0: tl.constexpr, D1: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        EVEN_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        zh = tl.program_id(1)
        z = (zh // heads).to(tl.int64)
        h = (zh % heads).to(tl.int64)
        q_base = q_ptr + z * s_qz + h * s_qh
        k_base = k_ptr + z * s_kz + h * s_kh
        v_base = v_ptr + z * s_vz + h * s_vh
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < length
        cols = tl.arange(0, BLOCK_N)
        d0 = tl.arange(0, D0)
        q0 = tl.load(q_base + rows[:, None] * s_qm + d0[None, :], mask=row_ok[:, None], other=0.0)
        acc0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
        if D1 > 0:
            d1 = D0 + tl.arange(0, D1)
            q1 = tl.load(q_base + rows[:, None] * s_qm + d1[None, :], mask=row_ok[:, None], other=0.0)
            acc1 = tl.zeros((BLOCK_M, D1), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for start in range(0, length, BLOCK_N):
            n = start + cols
            n_ok = n < length
            k0 = tl.load(k_base + n[None, :] * s_kn + d0[:, None], mask=n_ok[None, :], other=0.0)  # (D0, BLOCK_N)
            s = tl.dot(q0, k0)
            if D1 > 0:
                k1 = tl.load(k_base + n[None, :] * s_kn + d1[:, None], mask=n_ok[None, :], other=0.0)
                s = tl.dot(q1, k1, s)
            s = s * qk_scale
            if not EVEN_N:
                s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            p = p.to(q0.dtype)
            v0 = tl.load(v_base + n[:, None] * s_vn + d0[None, :], mask=n_ok[:, None], other=0.0)  # (BLOCK_N, D0)
            acc0 = tl.dot(p, v0, acc0 * alpha[:, None])
            if D1 > 0:
                v1 = tl.load(v_base + n[:, None] * s_vn + d1[None, :], mask=n_ok[:, None], other=0.0)
                acc1 = tl.dot(p, v1, acc1 * alpha[:, None])
            m_i = m_new
        o_base = o_ptr + z * s_oz + h * s_oh
        inv = 1.0 / l_i
        tl.store(o_base + rows[:, None] * s_om + d0[None, :], (acc0 * inv[:, None]).to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
        if D1 > 0:
            tl.store(o_base + rows[:, None] * s_om + d1[None, :], (acc1 * inv[:, None]).to(o_ptr.dtype.element_ty),
                     mask=row_ok[:, None])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              config: tuple[int, int, int, int] = DEFAULT_CONFIG, out: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T x scale) v per image and head, for q, k, v of shape (images, length, heads, dim).

    Returns ``(images * length, heads * dim)`` (or fills ``out`` of that shape)."""
    if triton is None:
        raise RuntimeError("the Triton vision attention needs the triton package (it ships with CUDA builds of torch)")
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 4:
        raise ValueError(f"q, k, v must be (images, length, heads, dim) of one shape: {q.shape} {k.shape} {v.shape}")
    if not (q.stride(-1) == k.stride(-1) == v.stride(-1) == 1):
        raise ValueError("the last dimension of q, k, v must be contiguous")
    images, length, heads, dim = q.shape
    d0, d1 = head_parts(dim)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    if out is None:
        out = torch.empty(images * length, heads * dim, dtype=q.dtype, device=q.device)
    o = out.view(images, length, heads, dim)
    block_m, block_n, warps, stages = config
    grid = (triton.cdiv(length, block_m), images * heads)
    _attention_kernel[grid](
        q, k, v, o, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        heads, length,
        D0=d0, D1=d1, BLOCK_M=block_m, BLOCK_N=block_n, EVEN_N=length % block_n == 0,
        num_warps=warps, num_stages=stages,
    )
    return out


@torch.library.custom_op("vdr::vision_attention", mutates_args=())
def vision_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`attention` as a torch operator, so that ``torch.compile`` calls the kernel
    as it is instead of tracing into Triton's launcher."""
    return attention(q, k, v, scale)


@vision_attention_op.register_fake
def _(q, k, v, scale):
    images, length, heads, dim = q.shape
    return q.new_empty(images * length, heads * dim)


# ---------------------------------------------------------------------------------------------
# The TMA + warp-specialized variant (Hopper), after Triton's fused-attention tutorial
# ---------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages, warp_specialize) to try on an H200: the tutorial's
# Hopper space (stages 2-4, warps 4/8, 8 warps only for tiles of >= 128x128: its ``keep``) at
# BLOCK_M 128, BLOCK_N 64/128, with warp specialization on, plus two without it (TMA alone).
TMA_CONFIGS = (
    (128, 64, 4, 2, True), (128, 64, 4, 3, True), (128, 64, 4, 4, True),
    (128, 128, 4, 2, True), (128, 128, 4, 3, True), (128, 128, 4, 4, True),
    (128, 128, 8, 2, True), (128, 128, 8, 3, True), (128, 128, 8, 4, True),
    (128, 64, 4, 3, False), (128, 128, 8, 3, False),
)
# Not measured: a guess (the tutorial's shape for head 128 on Hopper), until a GPU session
# picks the best of TMA_CONFIGS. ``VDR_VISION_TMA_CONFIG=128_64_4_3_1`` (read at import)
# overrides it for the op, so the actor variant can run the measured best.
DEFAULT_TMA_CONFIG = (128, 128, 8, 3, True)


def parse_tma_config(text: str) -> tuple[int, int, int, int, bool]:
    """``"128_128_8_3_1"`` -> (128, 128, 8, 3, True): BLOCK_M, BLOCK_N, warps, stages, warp
    specialization (1/0; left out: on)."""
    parts = [int(x) for x in text.split("_")]
    if len(parts) == 4:
        parts.append(1)
    if len(parts) != 5:
        raise ValueError(f"a TMA config is BM_BN_WARPS_STAGES[_WS], not {text!r}")
    return parts[0], parts[1], parts[2], parts[3], bool(parts[4])


TMA_CONFIG = parse_tma_config(os.environ["VDR_VISION_TMA_CONFIG"]) if os.environ.get(
    "VDR_VISION_TMA_CONFIG") else DEFAULT_TMA_CONFIG

# How often vdr::vision_attention_tma ran the pointer kernel instead (inputs TMA cannot read:
# a base or a stride not a multiple of 16 bytes); bench_actor.py reports it.
TMA_FALLBACKS = {"calls": 0}


# Triton 3.6.0 (the H200's) has all of this, checked in its wheel: ``tl.make_tensor_descriptor``
# (language/core.py; base 16-byte aligned, last stride 1, >= 16 bytes per block row), descriptor
# ``.load`` / ``.store``, ``tl.range(..., warp_specialize=)`` (core.py ``class range``),
# ``triton.set_allocator`` (runtime/_allocation.py, a ContextVar) and the Hopper pass that
# splits a warp-specialized loop (backends/nvidia/compiler.py, ``add_hopper_warpspec``).
if triton is not None:

    @triton.jit
    def _attention_tma_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr,
        qk_scale,  # softmax scale x log2(e): the exponentials are exp2
        s_qz, s_qm, s_qh,
        s_kz, s_kn, s_kh,
        s_vz, s_vn, s_vh,
        s_oz, s_om, s_oh,
        heads, length,
        D0: tl.constexpr, D1: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        EVEN_N: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    ):
        D: tl.constexpr = D0 + D1
        pid_m = tl.program_id(0)
        zh = tl.program_id(1)
        z = (zh // heads).to(tl.int64)
        h = (zh % heads).to(tl.int64)
        # One descriptor per operand, image and head, over that image's (length, D) rows: TMA
        # fills rows past ``length`` with zeros on load and drops them on store, so a tile
        # never reads or writes another image's rows, whatever the length. Two block shapes
        # per operand (D0 and D1 columns wide): the head cut into powers of two, no padding.
        q_base = q_ptr + z * s_qz + h * s_qh
        k_base = k_ptr + z * s_kz + h * s_kh
        v_base = v_ptr + z * s_vz + h * s_vh
        o_base = o_ptr + z * s_oz + h * s_oh
        q0_desc = tl.make_tensor_descriptor(q_base, shape=[length, D], strides=[s_qm, 1], block_shape=[BLOCK_M, D0])
        k0_desc = tl.make_tensor_descriptor(k_base, shape=[length, D], strides=[s_kn, 1], block_shape=[BLOCK_N, D0])
        v0_desc = tl.make_tensor_descriptor(v_base, shape=[length, D], strides=[s_vn, 1], block_shape=[BLOCK_N, D0])
        o0_desc = tl.make_tensor_descriptor(o_base, shape=[length, D], strides=[s_om, 1], block_shape=[BLOCK_M, D0])
        start_m = pid_m * BLOCK_M
        q0 = q0_desc.load([start_m, 0])
        acc0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
        if D1 > 0:
            q1_desc = tl.make_tensor_descriptor(q_base, shape=[length, D], strides=[s_qm, 1], block_shape=[BLOCK_M, D1])
            k1_desc = tl.make_tensor_descriptor(k_base, shape=[length, D], strides=[s_kn, 1], block_shape=[BLOCK_N, D1])
            v1_desc = tl.make_tensor_descriptor(v_base, shape=[length, D], strides=[s_vn, 1], block_shape=[BLOCK_N, D1])
            o1_desc = tl.make_tensor_descriptor(o_base, shape=[length, D], strides=[s_om, 1], block_shape=[BLOCK_M, D1])
            q1 = q1_desc.load([start_m, D0])
            acc1 = tl.zeros((BLOCK_M, D1), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        cols = tl.arange(0, BLOCK_N)
        for start_n in tl.range(0, length, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            # -- S = q k^T over the two head parts, one float32 accumulator --
            k0 = k0_desc.load([start_n, 0]).T  # (D0, BLOCK_N)
            s = tl.dot(q0, k0)
            if D1 > 0:
                k1 = k1_desc.load([start_n, D0]).T
                s = tl.dot(q1, k1, s)
            if not EVEN_N:  # the last tile's rows past ``length`` are TMA's zeros: not keys
                s = tl.where((start_n + cols)[None, :] < length, s, float("-inf"))
            # -- online softmax (exp2; the scale folded into one multiply-add, as the tutorial) --
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_ij = tl.sum(p, 1)
            # -- O += P V, P rounded to the operand dtype (as FlashAttention and cuDNN do) --
            p = p.to(q0.dtype)
            v0 = v0_desc.load([start_n, 0])  # (BLOCK_N, D0)
            acc0 = tl.dot(p, v0, acc0 * alpha[:, None])
            if D1 > 0:
                v1 = v1_desc.load([start_n, D0])
                acc1 = tl.dot(p, v1, acc1 * alpha[:, None])
            # l and m last, to shorten their live ranges (the tutorial's order)
            l_i = l_i * alpha + l_ij
            m_i = m_new
        inv = 1.0 / l_i
        o0_desc.store([start_m, 0], (acc0 * inv[:, None]).to(o_ptr.dtype.element_ty))
        if D1 > 0:
            o1_desc.store([start_m, D0], (acc1 * inv[:, None]).to(o_ptr.dtype.element_ty))


def tma_unreadable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> str | None:
    """Why TMA cannot read these (images, length, heads, dim) views or write ``out``
    ((images * length, heads * dim)), or None: each (image, head) base and each row stride
    must be a multiple of 16 bytes (the fused QKV output in bf16 at head size 80 is: 160-byte
    head offsets, 128 bytes to the second part)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        size = t.element_size()
        if t.data_ptr() % 16:
            return f"{name}: base address not 16-byte aligned"
        strides = t.stride()[:-1]
        if any(s * size % 16 for s in strides):
            return f"{name}: strides {t.stride()} x {size} bytes not all multiples of 16"
    d0, d1 = head_parts(q.shape[-1])
    if d0 * q.element_size() % 16 or (d1 and d1 * q.element_size() < 16):
        return "a head part narrower than 16 bytes"
    return None


def attention_tma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                  config: tuple = DEFAULT_TMA_CONFIG, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`attention` with TMA tensor descriptors and a warp-specialized key loop (Hopper).

    Same contract as :func:`attention`: q, k, v ``(images, length, heads, dim)`` (any strides,
    dim contiguous), returns ``(images * length, heads * dim)``. ``config`` is (BLOCK_M,
    BLOCK_N, warps, stages, warp_specialize) (a 4-tuple: warp specialization on).

    Lengths that are not a multiple of BLOCK_M / BLOCK_N are handled, not refused: the
    descriptors are per image and head with the image's length as their row count, so TMA
    zero-fills the rows past it on load (those keys are masked to -inf) and drops them on
    store; no fallback. Inputs TMA cannot address (see :func:`tma_unreadable`) raise ValueError.
    ``warp_specialize=False`` is the same kernel with TMA alone (and how the CPU interpreter,
    which ignores the flag, runs it either way)."""
    if triton is None:
        raise RuntimeError("the Triton vision attention needs the triton package (it ships with CUDA builds of torch)")
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 4:
        raise ValueError(f"q, k, v must be (images, length, heads, dim) of one shape: {q.shape} {k.shape} {v.shape}")
    if not (q.stride(-1) == k.stride(-1) == v.stride(-1) == 1):
        raise ValueError("the last dimension of q, k, v must be contiguous")
    images, length, heads, dim = q.shape
    d0, d1 = head_parts(dim)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    if out is None:
        out = torch.empty(images * length, heads * dim, dtype=q.dtype, device=q.device)
    o = out.view(images, length, heads, dim)
    why = tma_unreadable(q, k, v, o)
    if why:
        raise ValueError(f"TMA cannot read these tensors: {why}")
    block_m, block_n, warps, stages, *ws = config
    ws = bool(ws[0]) if ws else True
    if q.is_cuda:
        # a ContextVar: set in the calling thread (the actor calls from two threads in flight)
        # (device-made descriptors live in a global scratch buffer Triton asks for at each launch)
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=q.device))
    grid = (triton.cdiv(length, block_m), images * heads)
    _attention_tma_kernel[grid](
        q, k, v, o, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        heads, length,
        D0=d0, D1=d1, BLOCK_M=block_m, BLOCK_N=block_n, EVEN_N=length % block_n == 0,
        WARP_SPECIALIZE=ws, num_warps=warps, num_stages=stages,
    )
    return out


@torch.library.custom_op("vdr::vision_attention_tma", mutates_args=())
def vision_attention_tma_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`attention_tma` (config ``TMA_CONFIG``) as a torch operator, opaque to
    ``torch.compile``. Inputs TMA cannot address run the pointer kernel instead, counted in
    ``TMA_FALLBACKS`` (warned once)."""
    out = torch.empty(q.shape[0] * q.shape[1], q.shape[2] * q.shape[3], dtype=q.dtype, device=q.device)
    why = tma_unreadable(q, k, v, out.view(q.shape))
    if why:
        if not TMA_FALLBACKS["calls"]:
            warnings.warn(f"vdr::vision_attention_tma: {why}; running the pointer kernel", stacklevel=2)
        TMA_FALLBACKS["calls"] += 1
        return attention(q, k, v, scale, out=out)
    return attention_tma(q, k, v, scale, config=TMA_CONFIG, out=out)


@vision_attention_tma_op.register_fake
def _(q, k, v, scale):
    images, length, heads, dim = q.shape
    return q.new_empty(images * length, heads * dim)
