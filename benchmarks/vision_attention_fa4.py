"""FlashAttention 4's two forms at the vision tower's shapes, for bench_fa4_attention.py.

The actor's path is ``pipeline.embed.vision_kernels.fa4_attention`` (the varlen kernel over the
whole batch, ``--vision-attention``); ``fa4_batched`` is the dense kernel on (images, length,
heads, dim) views of equal-size images, timed beside it: 2.855 against 3.118 ms for 32 letter
pages alone on an H100, but no faster in the actor (67.8 against 68.5 pages/s, 2026-12-06,
benchmarks/RESULTS.md), so the actor keeps the varlen kernel, which takes any mix of sizes.
"""

from __future__ import annotations

from pipeline.embed.vision_kernels import fa4_attention as fa4_image_attention  # noqa: F401


def fa4_import():
    """flash_attn.cute's dense and varlen functions (ImportError when not installed)."""
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

    return flash_attn_func, flash_attn_varlen_func


def fa4_batched(q, k, v, scale: float):
    """q, k, v: (images, length, heads, dim). Returns the same shape."""
    dense, _ = fa4_import()
    out = dense(q, k, v, softmax_scale=scale)
    return out[0] if isinstance(out, tuple) else out
