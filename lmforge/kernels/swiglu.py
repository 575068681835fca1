"""Fused SwiGLU gate: y = silu(a) * b, with a backward that recomputes silu instead of saving it.

`swiglu_reference` is the spec; `swiglu` dispatches to the Triton kernels (`swiglu_triton`) on CUDA
or under TRITON_INTERPRET=1, else to the reference. Backward (s = sigmoid(a)):
  da = dy * b * s * (1 + a * (1 - s)),  db = dy * a * s.
Only the two inputs are saved; the projections around it (the MLP's matmuls) are not fused here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.kernels.runtime import KernelInputError, choose_impl


def swiglu_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (F.silu(a.float()) * b.float()).to(a.dtype)


class SwiGLUTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        from lmforge.kernels import swiglu_triton as kt

        a, b = a.contiguous(), b.contiguous()
        ctx.save_for_backward(a, b)
        return kt.forward(a, b)

    @staticmethod
    def backward(ctx, dy):
        from lmforge.kernels import swiglu_triton as kt

        a, b = ctx.saved_tensors
        return kt.backward(dy.contiguous(), a, b)


def swiglu(a: torch.Tensor, b: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """silu(a) * b for two tensors of the same shape and dtype (the gate and up projections)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise KernelInputError(f"swiglu: a {a.dtype}{tuple(a.shape)} and b {b.dtype}{tuple(b.shape)} must "
                               f"have the same shape and dtype")
    if not a.dtype.is_floating_point:
        raise KernelInputError(f"swiglu: inputs must be floating point; got {a.dtype}")
    if choose_impl("swiglu", impl, a, b) == "torch":
        return swiglu_reference(a, b)
    return SwiGLUTriton.apply(a, b)
