"""The vision attention through FlashAttention 4 (flash-attn-4's CuTe-DSL kernels), for benchmarks.

cuDNN's flash kernel (what SDPA picks for the vision tower on Hopper) computes head size 80 as
128 wide (RESULTS.md, ninth and fourteenth sessions). FA4's Hopper forward pads the head only to
a multiple of 16 (``flash_attn.cute.config``: ``round_up(head_dim, 16)``), so at 80 it does 80/128
of cuDNN's arithmetic. Its varlen form takes the model's ``cu_seqlens`` as they are: one call for
a whole batch of any mix of page sizes, with no per-shape plan.

Not a dependency of the pipeline: flash-attn-4 is a beta, ~70 MB compressed with its compiler
(benchmarks/pack_fa4.sh). ``fa4_image_attention`` has the signature of
``pipeline.embed.model.image_attention`` and is registered as that op's CUDA kernel by
``bench_actor.py``'s ``*_fa4`` variants, so the compiled blocks stay the default ones.
"""

from __future__ import annotations

import os

import torch


# equal-size batches through flash_attn_func (VDR_FA4_BATCHED=0: always the varlen kernel)
FA4_BATCHED_EQUAL = os.environ.get("VDR_FA4_BATCHED", "1") != "0"


def fa4_import():
    """flash_attn.cute's varlen and batched functions (ImportError when not installed)."""
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

    return flash_attn_func, flash_attn_varlen_func


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def fa4_varlen(q, k, v, cu_seqlens, max_len: int, scale: float):
    """q, k, v: (tokens, heads, dim); cu_seqlens: int32 (images + 1,). Returns (tokens, heads, dim)."""
    _, varlen = fa4_import()
    return _first(varlen(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                         max_seqlen_q=max_len, max_seqlen_k=max_len, softmax_scale=scale))


def fa4_batched(q, k, v, scale: float):
    """q, k, v: (images, length, heads, dim). Returns the same shape."""
    dense, _ = fa4_import()
    return _first(dense(q, k, v, softmax_scale=scale))


def fa4_image_attention(q, k, v, lengths, cu_seqlens, scale):
    """``vdr::image_attention`` through FA4's varlen kernel: (patches, heads, dim) in,
    (patches, heads * dim) out."""
    from pipeline.embed import model as model_mod

    ls = model_mod._image_lengths(lengths, cu_seqlens, q.shape[0])
    if FA4_BATCHED_EQUAL and len(set(ls)) == 1:  # one page size: the dense kernel (faster at equal lengths)
        n, L, H = len(ls), ls[0], q.shape[1]
        return fa4_batched(*(t.view(n, L, H, -1) for t in (q, k, v)), scale).reshape(q.shape[0], -1)
    max_len = max(ls)
    cu = cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)
    return fa4_varlen(q, k, v, cu, max_len, scale).reshape(q.shape[0], -1)
