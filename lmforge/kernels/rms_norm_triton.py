"""RMSNorm Triton kernels and launchers (the math is documented in `rms_norm`). Requires triton.

Forward: one program per row (the whole row fits one tile). Backward: a grid of a few programs
per SM, each walking its share of row tiles (several rows per tile for narrow rows) and
accumulating its partial dweight in registers; the partials ([programs, N] fp32) are summed by
torch, so no atomics and deterministic results.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmforge.kernels.runtime import interpreting


@triton.jit
def _fwd_kernel(X, W, Y, RSTD, N, eps, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
    y = x * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _bwd_kernel(DY, X, W, RSTD, DX, DW_PART, n_rows, N, HAS_W: tl.constexpr, NEED_DW: tl.constexpr,
                ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Each program walks row tiles pid, pid + nprog, ...; ROWS rows at a time keep several rows'
    loads in flight (one row of a narrow width is too little work to hide memory latency)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    cmask = cols < N
    w = tl.zeros([BLOCK], dtype=tl.float32) + 1.0
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for r0 in range(pid * ROWS, n_rows, nprog * ROWS):
        rows = r0 + tl.arange(0, ROWS)
        rmask = rows < n_rows
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, 1) / N)[:, None])
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw += dy * xhat
    if NEED_DW:
        tl.store(DW_PART + pid.to(tl.int64) * N + cols, tl.sum(dw, 0), mask=cmask)


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def forward(x2: torch.Tensor, weight: torch.Tensor | None, eps: float):
    rows, n = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(rows, device=x2.device, dtype=torch.float32)
    block = triton.next_power_of_2(n)
    _fwd_kernel[(rows,)](x2, weight if weight is not None else x2, y, rstd, n, eps, HAS_W=weight is not None,
                         BLOCK=block, num_warps=_warps(block))
    return y, rstd


# Backward launch shape: about `ROW_ELEMENTS` elements per row tile and `PROGRAMS_PER_SM` programs
# per SM (each program's partial dweight row is then summed by torch).
# (H100, 16384 rows of width 2048 and 4096: 8 programs per SM and one row per tile at these widths
# were fastest among the shapes benchmarks/kernels_ops.py times, by 5-15%.)
ROW_ELEMENTS = 2048
PROGRAMS_PER_SM = 8


def backward(dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor, need_dw: bool):
    rows, n = x2.shape
    dx = torch.empty_like(x2)
    block = triton.next_power_of_2(n)
    tile_rows = 2 if interpreting() else max(1, min(16, ROW_ELEMENTS // block))
    tiles = triton.cdiv(rows, tile_rows)
    if interpreting() or x2.device.type != "cuda":
        programs = min(tiles, 3)
    else:
        programs = min(tiles, PROGRAMS_PER_SM * torch.cuda.get_device_properties(x2.device).multi_processor_count)
    part = torch.empty(programs if need_dw else 1, n, device=x2.device, dtype=torch.float32)
    _bwd_kernel[(programs,)](dy, x2, weight if weight is not None else x2, rstd, dx, part, rows, n,
                             HAS_W=weight is not None, NEED_DW=need_dw, ROWS=tile_rows, BLOCK=block,
                             num_warps=_warps(block * tile_rows))
    dw = part.sum(0).to(weight.dtype) if need_dw else None
    return dx, dw
