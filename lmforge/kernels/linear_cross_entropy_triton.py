"""Cross-entropy over one chunk of logits, in place (math in `linear_cross_entropy`). Requires triton.

One program per row. A row of up to SINGLE_PASS_MAX columns is loaded once into registers;
a longer one takes two passes: pass 1 walks the vocab in tiles with an online max/sum to get the
log-sum-exp (one exp2 per logit: each tile is rescaled by a scalar, not per element), pass 2
re-reads it. Either way the logits are then overwritten with the gradient
  (softmax * (1 + 2 z_loss lse) - onehot(target)) * (1 - tanh^2 if softcapped).
Only the first V columns of each row are read or written (the chunk buffer may be wider).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmforge.kernels.runtime import interpreting


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _ce_kernel(LOGITS, TARGETS, CE, Z, V, stride, ignore_index, softcap, z_loss,
               SOFTCAP_ON: tl.constexpr, SINGLE: tl.constexpr, BLOCK: tl.constexpr):
    LOG2E: tl.constexpr = 1.4426950408889634
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    target = tl.load(TARGETS + row)
    valid = target != ignore_index
    cols = tl.arange(0, BLOCK)
    if SINGLE:  # the whole row fits one tile: read it once, keep it in registers, write the gradient
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        t = x
        if SOFTCAP_ON:
            t = _tanh(x / softcap)
            x = tl.where(mask, softcap * t, float("-inf"))
        x2 = x * LOG2E
        m = tl.max(x2, 0)
        lse2 = m + tl.math.log2(tl.sum(tl.math.exp2(x2 - m), 0))
        lse = lse2 / LOG2E
        x_t = tl.sum(tl.where(cols == target, x, 0.0), 0)
        tl.store(CE + row, tl.where(valid, lse - x_t, 0.0))
        tl.store(Z + row, tl.where(valid, lse * lse, 0.0))
        scale = tl.where(valid, 1.0 + 2.0 * z_loss * lse, 0.0)
        g = tl.math.exp2(x2 - lse2) * scale - tl.where((cols == target) & valid, 1.0, 0.0)
        if SOFTCAP_ON:
            g = g * (1.0 - t * t)
        tl.store(base + cols, g.to(LOGITS.dtype.element_ty), mask=mask)
    else:
        m = tl.full([], float("-inf"), dtype=tl.float32)  # running max and sum, in log2 units
        s = tl.full([], 0.0, dtype=tl.float32)
        for v0 in range(0, V, BLOCK):
            mask = v0 + cols < V
            x = tl.load(base + v0 + cols, mask=mask, other=float("-inf")).to(tl.float32)
            if SOFTCAP_ON:
                x = tl.where(mask, softcap * _tanh(x / softcap), float("-inf"))
            x = x * LOG2E
            m_new = tl.maximum(m, tl.max(x, 0))  # finite: every tile has at least one real column
            s = s * tl.math.exp2(m - m_new) + tl.sum(tl.math.exp2(x - m_new), 0)
            m = m_new
        lse2 = m + tl.math.log2(s)
        lse = lse2 / LOG2E
        x_t = tl.load(base + tl.where(valid, target, 0)).to(tl.float32)
        if SOFTCAP_ON:
            x_t = softcap * _tanh(x_t / softcap)
        tl.store(CE + row, tl.where(valid, lse - x_t, 0.0))
        tl.store(Z + row, tl.where(valid, lse * lse, 0.0))
        scale = tl.where(valid, 1.0 + 2.0 * z_loss * lse, 0.0)
        for v0 in range(0, V, BLOCK):
            idx = v0 + cols
            mask = idx < V
            x = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32)
            t = x
            if SOFTCAP_ON:
                t = _tanh(x / softcap)
                x = softcap * t
            g = tl.math.exp2(x * LOG2E - lse2) * scale - tl.where((idx == target) & valid, 1.0, 0.0)
            if SOFTCAP_ON:
                g = g * (1.0 - t * t)
            tl.store(base + idx, g.to(LOGITS.dtype.element_ty), mask=mask)


# Rows up to this many columns (rounded up to a power of two) are processed in one pass from
# registers; longer rows take two passes over memory with tiles of TILE columns.
SINGLE_PASS_MAX = 65536
TILE = 8192


def ce_chunk(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, softcap, z_loss: float):
    rows, v = logits.shape
    ce = torch.empty(rows, device=logits.device, dtype=torch.float32)
    z = torch.empty(rows, device=logits.device, dtype=torch.float32)
    single = triton.next_power_of_2(v) <= SINGLE_PASS_MAX
    if single:
        block = triton.next_power_of_2(v)
    else:
        block = 128 if interpreting() else min(triton.next_power_of_2(v), TILE)
    warps = 4 if block < 4096 else 8 if block <= 8192 else 16 if block <= 16384 else 32
    _ce_kernel[(rows,)](logits, targets, ce, z, v, logits.stride(0), ignore_index,
                        float(softcap or 1.0), float(z_loss), SOFTCAP_ON=softcap is not None, SINGLE=single,
                        BLOCK=block, num_warps=warps)
    return ce, z
