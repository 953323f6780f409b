"""benchmarks/vision_attention_triton.py's TMA kernel (``attention_tma``, op
``vdr::vision_attention_tma``) against SDPA, run by Triton's CPU interpreter
(TRITON_INTERPRET=1, set before triton is imported: a subprocess, as tests/score does).

The interpreter runs the tensor descriptors as bounded block loads and stores (rows past a
descriptor's shape read as zeros and are not written, as TMA does) and ignores
``warp_specialize``: it checks the kernel's arithmetic and its bounds, not TMA or the
warp-specialized schedule, which only a Hopper GPU compiles. Should an interpreter not run
descriptors, the kernel tests skip and only the pointer-kernel fallback is tested.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton not installed (pip install -e .[dev])")

PRELUDE = (
    "import math, sys, torch, torch.nn.functional as F\n"
    "import triton.language as tl\n"
    "import vision_attention_triton as va\n"
    "def ref(q, k, v):\n"
    "    n, L, H, D = q.shape\n"
    "    o = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)), scale=D ** -0.5)\n"
    "    return o.transpose(1, 2).reshape(n * L, H * D)\n"
    "def fused(n, L, H, D, pad=0, dtype=torch.float32, seed=0):\n"
    # q, k, v as the model has them: strided views of one QKV output; ``pad`` NaN rows after
    # each image's rows, so any read past an image's length poisons the output
    "    g = torch.Generator().manual_seed(seed)\n"
    "    qkv = torch.full((n, L + pad, 3, H, D), float('nan'))\n"
    "    qkv[:, :L] = torch.randn(n, L, 3, H, D, generator=g)\n"
    "    qkv = qkv.to(dtype)\n"
    "    return tuple(qkv[:, :L, i] for i in range(3))\n"
)


def _interpret(code: str) -> str:
    path = os.pathsep.join([ROOT, f"{ROOT}/benchmarks", os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", PRELUDE + code], env=env, capture_output=True, text=True,
                          timeout=300)
    if "NO_TMA" in proc.stdout:
        pytest.skip("this Triton's interpreter has no tensor descriptors (tl.make_tensor_descriptor)")
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


NEED_TMA = "if not hasattr(tl, 'make_tensor_descriptor'):\n    print('NO_TMA'); sys.exit(0)\n"


def test_tma_kernel_equals_sdpa_on_fused_qkv_views():
    """The model's layout (2 images x 128 patches, 2 heads of 80 cut 64 + 16), float32: tile
    configs with and without warp specialization, 128 and 64 rows, all equal SDPA."""
    _interpret(
        NEED_TMA
        + "q, k, v = fused(2, 128, 2, 80)\n"
        "assert q.stride() == (128 * 3 * 2 * 80, 3 * 2 * 80, 80, 1)\n"
        "want = ref(q, k, v)\n"
        "for cfg in [(64, 64, 4, 2, True), (128, 32, 4, 3, False), (32, 128, 8, 4, True), (64, 32, 4, 2)]:\n"
        "    got = va.attention_tma(q, k, v, config=cfg)\n"
        "    assert got.shape == (2 * 128, 2 * 80) and got.is_contiguous()\n"
        "    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5, msg=str(cfg))\n"
        "print('OK')\n"
    )


def test_tma_kernel_lengths_not_a_multiple_of_the_tiles_stay_in_their_image():
    """Length 72 with 32-row tiles (and 40 with 64, shorter than one tile): the last tiles run
    past the image. NaN rows follow each image's rows in q, k, v, and the output buffer has
    sentinel rows after the last image: both untouched (TMA's bounds, per image), and the
    result equals SDPA. Also head size 64 alone (no second part)."""
    _interpret(
        NEED_TMA
        + "for n, L, H, D, cfg in [(2, 72, 2, 80, (32, 32, 4, 2, True)), (3, 40, 1, 80, (64, 64, 4, 3, True)),\n"
        "                        (2, 40, 2, 64, (32, 16, 4, 2, False))]:\n"
        "    q, k, v = fused(n, L, H, D, pad=24, seed=L)\n"
        "    big = torch.full((n * L + 40, H * D), 7.0)\n"
        "    got = va.attention_tma(q, k, v, config=cfg, out=big[: n * L])\n"
        "    assert not got.isnan().any(), (n, L, cfg)\n"
        "    torch.testing.assert_close(got, ref(q, k, v), atol=2e-5, rtol=1e-5, msg=str((n, L, cfg)))\n"
        "    assert (big[n * L:] == 7.0).all(), 'wrote past the last image'\n"
        "print('OK')\n"
    )


def test_tma_kernel_16_bit_operands_and_the_op():
    """16-bit operands (P rounded to the operand dtype before P V, float32 sums): within
    rounding of the float32 reference, and equal to the pointer kernel's result. float16, not
    the model's bf16: Triton 3.9's interpreter gets bf16 dots wrong (errors ~1e9 for the
    pointer kernel too), so bf16 is checked only on the GPU (bench_vision_attention.py's
    error column). The torch op ``vdr::vision_attention_tma`` gives the kernel's output (its
    default config, a tile longer than the image), and its fake gives the shape."""
    _interpret(
        NEED_TMA
        + "q, k, v = fused(2, 96, 2, 80, dtype=torch.float16)\n"
        "want = ref(q, k, v)\n"
        "got = va.attention_tma(q, k, v, config=(32, 32, 4, 2, True))\n"
        "assert got.dtype == torch.float16\n"
        "err = (got.float() - want).abs().max().item()\n"
        "assert err < 2e-3, err\n"
        "old = va.attention(q, k, v, config=(32, 32, 4, 2)).float()\n"
        "assert (got.float() - old).abs().max().item() < 1e-3\n"
        "op = torch.ops.vdr.vision_attention_tma(q, k, v, 80 ** -0.5)\n"
        "assert va.TMA_FALLBACKS['calls'] == 0\n"
        "assert (op.float() - want).abs().max().item() < 2e-3\n"
        "from torch._subclasses.fake_tensor import FakeTensorMode\n"
        "with FakeTensorMode() as mode:\n"
        "    fq = mode.from_tensor(q)\n"
        "    assert torch.ops.vdr.vision_attention_tma(fq, fq, fq, 0.1).shape == (2 * 96, 2 * 80)\n"
        "print('OK')\n"
    )


def test_op_falls_back_to_the_pointer_kernel_where_tma_cannot_read():
    """Rows 81 floats apart (324 bytes, not a multiple of 16): ``attention_tma`` refuses them,
    the op runs the pointer kernel instead (counted, warned once) and still equals SDPA."""
    _interpret(
        "import warnings\n"
        "g = torch.Generator().manual_seed(3)\n"
        "base = torch.randn(2 * 48, 3, 1, 81, generator=g)\n"
        "q, k, v = (base[:, i, :, :80].view(2, 48, 1, 80) for i in range(3))\n"
        "assert va.tma_unreadable(q, k, v, torch.empty(96, 80).view(2, 48, 1, 80))\n"
        "try:\n"
        "    va.attention_tma(q, k, v)\n"
        "    raise SystemExit('accepted an unaligned stride')\n"
        "except ValueError as exc:\n"
        "    assert 'TMA cannot read' in str(exc)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    got = va.vision_attention_tma_op(q, k, v, 80 ** -0.5)\n"
        "    got = va.vision_attention_tma_op(q, k, v, 80 ** -0.5)\n"
        "assert va.TMA_FALLBACKS['calls'] == 2 and len(caught) == 1, (va.TMA_FALLBACKS, caught)\n"
        "torch.testing.assert_close(got, ref(q, k, v), atol=2e-5, rtol=1e-5)\n"
        "print('OK')\n"
    )


def test_tma_configs_and_their_names():
    """The configs the GPU session sweeps follow the tutorial's Hopper rule (8 warps only for
    tiles of at least 128 x 128) and parse back from the benchmark's names."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import vision_attention_triton as va

    assert va.parse_tma_config("128_64_4_3_0") == (128, 64, 4, 3, False)
    assert va.parse_tma_config("128_128_8_2") == (128, 128, 8, 2, True)
    with pytest.raises(ValueError, match="BM_BN"):
        va.parse_tma_config("128_64")
    assert va.DEFAULT_TMA_CONFIG in va.TMA_CONFIGS
    for bm, bn, warps, stages, ws in va.TMA_CONFIGS:
        assert bm == 128 and bn in (64, 128) and warps in (4, 8) and 2 <= stages <= 4
        assert not (warps == 8 and bm * bn < 128 * 128)
        assert va.parse_tma_config("_".join(str(int(x)) for x in (bm, bn, warps, stages, ws))) == (bm, bn, warps, stages, ws)
    assert va.head_parts(80) == (64, 16)
