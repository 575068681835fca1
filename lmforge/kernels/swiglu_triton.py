"""SwiGLU Triton kernels and launchers (math in `swiglu`). Requires triton. Elementwise, 1-D grid."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmforge.kernels.runtime import interpreting


@triton.jit
def _fwd_kernel(A, B, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (a * tl.sigmoid(a) * b).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(DY, A, B, DA, DB, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    tl.store(DA + offs, (dy * b * s * (1.0 + a * (1.0 - s))).to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + offs, (dy * a * s).to(DB.dtype.element_ty), mask=mask)


def _block() -> int:
    return 256 if interpreting() else 1024


def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(a)
    n, block = a.numel(), _block()
    _fwd_kernel[(triton.cdiv(n, block),)](a, b, y, n, BLOCK=block, num_warps=4)
    return y


def backward(dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    da, db = torch.empty_like(a), torch.empty_like(b)
    n, block = a.numel(), _block()
    _bwd_kernel[(triton.cdiv(n, block),)](dy, a, b, da, db, n, BLOCK=block, num_warps=4)
    return da, db
