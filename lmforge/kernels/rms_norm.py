"""Fused RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, forward and backward in one kernel each.

`rms_norm_reference` is the spec (fp32 math, output in x's dtype). `rms_norm` dispatches to the
Triton kernels (`rms_norm_triton`) on CUDA / under TRITON_INTERPRET=1, else to the reference, and
`FusedRMSNorm` is a drop-in module. The kernels save only the per-row 1/rms (fp32) for backward:
  dx = rstd * (g - xhat * mean(g * xhat)),  g = dy * weight,  dweight = sum_rows dy * xhat.
Not here: LayerNorm, or norms over other than the last dimension.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.kernels.runtime import KernelInputError, choose_impl

MAX_WIDTH = 65536


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


class RMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        from lmforge.kernels import rms_norm_triton as kt

        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        y, rstd = kt.forward(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        from lmforge.kernels import rms_norm_triton as kt

        x2, weight, rstd = ctx.saved_tensors
        dx, dw = kt.backward(dy.reshape(x2.shape).contiguous(), x2, weight, rstd,
                             need_dw=weight is not None and ctx.needs_input_grad[1])
        return dx.view(dy.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, impl: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dim of x [..., N] with an optional weight [N]."""
    n = x.shape[-1]
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != n):
        raise KernelInputError(f"rms_norm: weight shape {tuple(weight.shape)} does not match width {n} of x")
    if n > MAX_WIDTH:
        raise KernelInputError(f"rms_norm: row width {n} > {MAX_WIDTH} does not fit one kernel tile")
    if not x.dtype.is_floating_point:
        raise KernelInputError(f"rms_norm: x must be floating point; got {x.dtype}")
    tensors = (x,) if weight is None else (x, weight)
    if choose_impl("rms_norm", impl, *tensors) == "torch":
        return rms_norm_reference(x, weight, eps)
    return RMSNormTriton.apply(x, weight, float(eps))


class FusedRMSNorm(nn.Module):
    """RMSNorm module over the last dim (weight initialised to ones) using the fused kernels."""

    def __init__(self, dim: int, eps: float = 1e-6, impl: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.impl = eps, impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.impl)
