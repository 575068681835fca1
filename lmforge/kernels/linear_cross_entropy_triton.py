"""Cross-entropy over one chunk of logits, in place (math in `linear_cross_entropy`). Requires triton.

One program per row: pass 1 walks the vocab in tiles with an online max/sum to get the
log-sum-exp (one exp2 per logit: each tile is rescaled by a scalar, not per element); pass 2
overwrites the logits with the gradient
  (softmax * (1 + 2 z_loss lse) - onehot(target)) * (1 - tanh^2 if softcapped).
Only the first V columns of each row are read or written (the chunk buffer may be wider).
(Holding a whole 50k-column row in registers for a single pass measured slower on an H100: spills.)
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
               SOFTCAP_ON: tl.constexpr, BLOCK: tl.constexpr):
    LOG2E: tl.constexpr = 1.4426950408889634
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    target = tl.load(TARGETS + row)
    valid = target != ignore_index
    cols = tl.arange(0, BLOCK)
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


def ce_chunk(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, softcap, z_loss: float):
    rows, v = logits.shape
    ce = torch.empty(rows, device=logits.device, dtype=torch.float32)
    z = torch.empty(rows, device=logits.device, dtype=torch.float32)
    block = 128 if interpreting() else min(triton.next_power_of_2(v), 8192)
    _ce_kernel[(rows,)](logits, targets, ce, z, v, logits.stride(0), ignore_index,
                        float(softcap or 1.0), float(z_loss), SOFTCAP_ON=softcap is not None, BLOCK=block,
                        num_warps=8 if block >= 4096 else 4)
    return ce, z
