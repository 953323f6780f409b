"""``--precision fp8``: the model's large matmuls in FP8 (e4m3), opt-in.

Every ``nn.Linear`` inside the vision blocks, the patch merger and the language-model
layers becomes an :class:`Fp8Linear`: its weight is quantized once, per output channel
(scale = the row's max |w| / 448), and each input row is quantized on the fly with its own
scale (max |x| / 448). The product runs as ``torch._scaled_mm`` with those row-wise scales,
float32 accumulation and a bfloat16 result, cast to the model's dtype (CUDA compute
capability 8.9+: L4, L40S, H100, H200). Everything else (patch embedding, norms, rotary, attention, the 128-d projection
that makes the stored vectors, the L2 normalisation) stays in the model's dtype.

On a CPU (tests) the same FP8 values are multiplied in float32 (dequantize, then matmul):
the values and scales are exactly the GPU path's; only the summation order differs.

Fidelity on the same pages against bf16 is measured by ``benchmarks/bench_actor.py``
(benchmarks/RESULTS.md); the precision is stored as ``vdr.precision`` in every Parquet
file, and the scoring job refuses a corpus that mixes precisions unless allowed.
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
PRECISIONS = ("default", "fp8")  # default: every matmul in the model's dtype (--dtype)


def fp8_matmul_supported(device: str | torch.device) -> bool:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> FP8 values (M, K) and float32 scales (M, 1), x ~= values * scales.
    An all-zero row gets scale 1 (its values are zeros)."""
    amax = x.abs().amax(dim=1, keepdim=True).float()  # exact in x's own dtype
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Linear(nn.Module):
    """``y = x W^T + b`` with W and x rounded to FP8 per row (see the module docstring)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if self.in_features % 16 or self.out_features % 16:
            raise ValueError(f"FP8 matmuls need dimensions divisible by 16, got {self.in_features}x{self.out_features}")
        w, w_scale = quantize_rows(linear.weight.detach())  # (out, in), (out, 1)
        # _scaled_mm wants its second operand column-major: the transpose of a row-major (out, in).
        self.register_buffer("weight_t", w.t(), persistent=False)
        self.register_buffer("weight_scale", w_scale.t().contiguous(), persistent=False)  # (1, out)
        bias = linear.bias.detach() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)
        self.out_dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, x_scale = quantize_rows(x.reshape(-1, shape[-1]))
        if xq.is_cuda:
            # Row-wise scaling gives a bfloat16 result on every FP8 GPU (float32 and float16
            # outputs depend on the chip and the cuBLAS version): cast to the model's dtype after.
            y = torch._scaled_mm(xq, self.weight_t, scale_a=x_scale, scale_b=self.weight_scale,
                                 out_dtype=torch.bfloat16).to(self.out_dtype)
        else:  # the same FP8 values and scales, multiplied in float32
            y = ((xq.float() * x_scale) @ (self.weight_t.float() * self.weight_scale)).to(self.out_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3 rowwise"


def fp8_targets(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of every Linear to convert: inside the vision blocks, the
    merger and the language-model layers; not the 128-d embedding projection."""
    vlm = model.vlm
    visual = getattr(vlm, "visual", None) or vlm.model.visual
    text = getattr(vlm, "language_model", None) or vlm.model.language_model
    roots = list(visual.blocks) + [visual.merger] + list(text.layers)
    found = []
    for root in roots:
        for parent in root.modules():
            for name, child in parent.named_children():
                if type(child) is nn.Linear:
                    found.append((parent, name, child))
    return found


def convert_to_fp8(model: nn.Module) -> int:
    """Replace the target Linear layers in place; returns how many were converted."""
    targets = fp8_targets(model)
    for parent, name, layer in targets:
        setattr(parent, name, Fp8Linear(layer))
    return len(targets)
