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
"""

from __future__ import annotations

import math

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
