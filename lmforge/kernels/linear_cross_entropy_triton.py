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
def _store_grad(base, start, end, target, valid, lse2, scale, softcap,
                SOFTCAP_ON: tl.constexpr, BLOCK: tl.constexpr):
    """Overwrite columns [start, end) of one row of logits with d(loss)/d(logits):
    softmax · scale − one-hot(target), times the soft-cap's derivative when it is on (lse2: the
    row's log-sum-exp in log2 units; scale carries the z-loss term and is 0 on ignored rows)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    cols = tl.arange(0, BLOCK)
    for v0 in range(start, end, BLOCK):
        idx = v0 + cols
        mask = idx < end
        x = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32)
        t = x
        if SOFTCAP_ON:
            t = _tanh(x / softcap)
            x = softcap * t
        g = tl.math.exp2(x * LOG2E - lse2) * scale - tl.where((idx == target) & valid, 1.0, 0.0)
        if SOFTCAP_ON:
            g = g * (1.0 - t * t)
        tl.store(base + idx, g.to(base.dtype.element_ty), mask=mask)


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
    _store_grad(base, 0, V, target, valid, lse2, scale, softcap, SOFTCAP_ON, BLOCK)


@triton.jit
def _split_stats_kernel(LOGITS, TARGETS, PM, PS, XT, V, stride, softcap, SPLIT, NS,
                        SOFTCAP_ON: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, s): max and sum of exp2 (log2 units) over columns [s*SPLIT, (s+1)*SPLIT), and
    the target's logit if it falls in this slice (read here, before any slice is overwritten)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    row = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    base = LOGITS + row * stride
    start = sp * SPLIT
    end = tl.minimum(start + SPLIT, V)
    cols = tl.arange(0, BLOCK)
    m = tl.full([], float("-inf"), dtype=tl.float32)
    s = tl.full([], 0.0, dtype=tl.float32)
    for v0 in range(start, end, BLOCK):
        mask = v0 + cols < end
        x = tl.load(base + v0 + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if SOFTCAP_ON:
            x = tl.where(mask, softcap * _tanh(x / softcap), float("-inf"))
        x = x * LOG2E
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.math.exp2(m - m_new) + tl.sum(tl.math.exp2(x - m_new), 0)
        m = m_new
    tl.store(PM + row * NS + sp, m)
    tl.store(PS + row * NS + sp, s)
    target = tl.load(TARGETS + row)
    mine = (target >= start) & (target < end)
    x_t = tl.load(base + tl.where(mine, target, start)).to(tl.float32)
    if SOFTCAP_ON:
        x_t = softcap * _tanh(x_t / softcap)
    tl.store(XT + row, x_t, mask=mine)


@triton.jit
def _split_grad_kernel(LOGITS, TARGETS, PM, PS, XT, CE, Z, V, stride, ignore_index, softcap, z_loss, SPLIT, NS,
                       SOFTCAP_ON: tl.constexpr, BLOCK: tl.constexpr, NS_P2: tl.constexpr):
    """Program (row, s): combine the row's partial sums into the log-sum-exp, write the gradient
    over this slice (slice 0 also writes the row's loss terms)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    row = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    base = LOGITS + row * stride
    k = tl.arange(0, NS_P2)
    pm = tl.load(PM + row * NS + k, mask=k < NS, other=float("-inf"))
    ps = tl.load(PS + row * NS + k, mask=k < NS, other=0.0)
    m = tl.max(pm, 0)
    lse2 = m + tl.math.log2(tl.sum(ps * tl.math.exp2(pm - m), 0))
    lse = lse2 / LOG2E
    target = tl.load(TARGETS + row)
    valid = target != ignore_index
    first = sp == 0
    x_t = tl.load(XT + row, mask=valid & first, other=0.0)
    tl.store(CE + row, tl.where(valid, lse - x_t, 0.0), mask=first)
    tl.store(Z + row, tl.where(valid, lse * lse, 0.0), mask=first)
    scale = tl.where(valid, 1.0 + 2.0 * z_loss * lse, 0.0)
    start = sp * SPLIT
    _store_grad(base, start, tl.minimum(start + SPLIT, V), target, valid, lse2, scale, softcap, SOFTCAP_ON, BLOCK)


# 0: one program per row (`_ce_kernel`). N > 0: each row is split into slices of N columns, one
# program per (row, slice), in two launches (partial max/sum; combine + gradient), for more loads in
# flight than one program per row gives. On an H100 (2026-11-26, 8192 tokens, H 2048) the whole fused
# loss took 9.14 ms with 8192 vs 9.64 ms with 0 at vocab 50257 and 20.35 vs 20.62 ms at 128256.
VOCAB_SPLIT = 8192


def ce_chunk(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, softcap, z_loss: float):
    rows, v = logits.shape
    ce = torch.empty(rows, device=logits.device, dtype=torch.float32)
    z = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if VOCAB_SPLIT:
        return _ce_split(logits, targets, ignore_index, softcap, z_loss, ce, z, VOCAB_SPLIT)
    block = 128 if interpreting() else min(triton.next_power_of_2(v), 8192)
    _ce_kernel[(rows,)](logits, targets, ce, z, v, logits.stride(0), ignore_index,
                        float(softcap or 1.0), float(z_loss), SOFTCAP_ON=softcap is not None, BLOCK=block,
                        num_warps=8 if block >= 4096 else 4)
    return ce, z


def _ce_split(logits, targets, ignore_index, softcap, z_loss, ce, z, split):
    rows, v = logits.shape
    ns = triton.cdiv(v, split)
    pm = torch.empty(rows, ns, device=logits.device, dtype=torch.float32)
    ps = torch.empty_like(pm)
    xt = torch.zeros(rows, device=logits.device, dtype=torch.float32)
    block = min(triton.next_power_of_2(split), 64 if interpreting() else 4096)
    warps = 8 if block >= 4096 else 4
    cap = float(softcap or 1.0)
    _split_stats_kernel[(rows, ns)](logits, targets, pm, ps, xt, v, logits.stride(0), cap, split, ns,
                                    SOFTCAP_ON=softcap is not None, BLOCK=block, num_warps=warps)
    _split_grad_kernel[(rows, ns)](logits, targets, pm, ps, xt, ce, z, v, logits.stride(0), ignore_index, cap,
                                   float(z_loss), split, ns, SOFTCAP_ON=softcap is not None, BLOCK=block,
                                   NS_P2=max(2, triton.next_power_of_2(ns)), num_warps=warps)
    return ce, z
