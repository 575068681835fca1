"""FlashAttention-2 Triton kernels (forward, backward preprocess, dK/dV, dQ) and their launchers.

The algorithm is the one `flash_attention_torch.tiled_forward/tiled_backward` spell out with torch
ops; the masking rules are documented there. Scores are kept in log2 units (scaled by log2(e)) so
the kernels can use exp2; the saved LSE is therefore base 2 and private to these kernels.

Work split (no atomics by default, so results are deterministic):
- forward: one program per (query tile, batch x query head), looping over the visible key tiles;
- dK/dV: one program per (key tile, batch x KV head), looping over the query heads of its group and
  their visible query tiles, so GQA/MQA never materialise repeated K/V;
- dQ: one program per (query tile, batch x query head), looping over visible key tiles; or, with
  deterministic=False, no dQ kernel: the dK/dV kernel adds dS K into an fp32 dQ with atomics.
Query-tile programs run the heaviest (last, under a causal mask) tiles first.
Each loop is split into masked edge tiles and unmasked interior tiles so that only the tiles on
the causal diagonal, the window edge or the sequence end pay for masking.

The kernels here use plain pointer arithmetic (no block pointers), so they run on Triton 3.6 (GPU)
and 3.9 (CPU interpreter) for any strides. The launchers `forward`/`backward` call the
tensor-descriptor (TMA) twins in `flash_attention_tma` instead wherever the strides allow
(`USE_TMA`, `USE_TMA_BWD`). Importing this module requires triton.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from lmforge.kernels.runtime import Tunable, interpreting, log

LOG2E = 1.4426950408889634


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _kv_ranges(p0, p1, S, window, BLOCK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW_ON: tl.constexpr,
               HAS_DOC: tl.constexpr):
    """Key-index loop bounds for query positions p0..p1: [lo, pre) masked, [pre, full) unmasked,
    [full, hi) masked."""
    zero = tl.full([], 0, tl.int32)
    lo = zero
    hi = zero + S
    full_lo = zero
    full_hi = zero + S
    if CAUSAL:
        hi = tl.minimum(hi, p1 + 1)
        full_hi = tl.minimum(full_hi, p0 + 1)
    if WINDOW_ON:
        lo = tl.maximum(lo, p0 - window + 1)
        full_lo = tl.maximum(full_lo, p1 - window + 1)
        if not CAUSAL:
            hi = tl.minimum(hi, p1 + window)
            full_hi = tl.minimum(full_hi, p0 + window)
    full_lo = tl.maximum(full_lo, lo)
    full_hi = tl.minimum(full_hi, hi)
    if HAS_DOC:
        pre = hi
        full = hi
    else:
        pre = tl.minimum(lo + tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK) * BLOCK, hi)
        full = pre + (tl.maximum(full_hi - pre, 0) // BLOCK) * BLOCK
    return lo, pre, full, hi


@triton.jit
def _q_ranges(k0, k1, T, S, window, BLOCK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW_ON: tl.constexpr,
              HAS_DOC: tl.constexpr):
    """Query-row loop bounds for key indices k0..k1 (same split as _kv_ranges)."""
    off = S - T
    zero = tl.full([], 0, tl.int32)
    lo = zero
    hi = zero + T
    full_lo = zero
    full_hi = zero + T
    if CAUSAL:
        lo = tl.maximum(lo, k0 - off)
        full_lo = tl.maximum(full_lo, k1 - off)
    if WINDOW_ON:
        hi = tl.minimum(hi, k1 + window - off)
        full_hi = tl.minimum(full_hi, k0 + window - off)
        if not CAUSAL:
            lo = tl.maximum(lo, k0 - window + 1 - off)
            full_lo = tl.maximum(full_lo, k1 - window + 1 - off)
    full_lo = tl.maximum(full_lo, lo)
    full_hi = tl.minimum(full_hi, hi)
    if HAS_DOC:
        pre = hi
        full = hi
    else:
        pre = tl.minimum(lo + tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK) * BLOCK, hi)
        full = pre + (tl.maximum(full_hi - pre, 0) // BLOCK) * BLOCK
        pre = tl.where(k1 >= S, hi, pre)  # a key tile past the end needs its column mask everywhere
        full = tl.where(k1 >= S, hi, full)
    return lo, pre, full, hi


@triton.jit
def _visible(qpos, kpos, S, window, doc_q, doc_ptr, CAUSAL: tl.constexpr, WINDOW_ON: tl.constexpr,
             HAS_DOC: tl.constexpr):
    """[len(qpos), len(kpos)] visibility (qpos/kpos are absolute key positions)."""
    mask = (kpos[None, :] + 0 * qpos[:, None]) < S  # broadcast to [rows, keys]
    if CAUSAL:
        mask &= kpos[None, :] <= qpos[:, None]
    if WINDOW_ON:
        mask &= (qpos[:, None] - kpos[None, :]) < window
        if not CAUSAL:
            mask &= (kpos[None, :] - qpos[:, None]) < window
    if HAS_DOC:
        doc_k = tl.load(doc_ptr + kpos, mask=kpos < S, other=-1)
        mask &= doc_q[:, None] == doc_k[None, :]
    return mask


@triton.jit
def _visible_rows(offs_m, T, S, kpos, window, doc_ptr, CAUSAL: tl.constexpr, WINDOW_ON: tl.constexpr,
                  HAS_DOC: tl.constexpr):
    """Visibility of a key tile for query rows offs_m (the last T of S positions), rows past T
    hidden: the backward's masked tiles, where each program loads its query tile's documents."""
    qpos = offs_m + (S - T)
    doc_q = qpos
    if HAS_DOC:
        doc_q = tl.load(doc_ptr + qpos, mask=offs_m < T, other=-2)
    vis = _visible(qpos, kpos, S, window, doc_q, doc_ptr, CAUSAL, WINDOW_ON, HAS_DOC)
    return vis & (offs_m[:, None] < T)


@triton.jit
def _prescale(x, sm_scale, SOFTCAP_ON: tl.constexpr):
    """Without a softcap, fold scale * log2(e) into one operand once per program instead of into
    every score (one multiply fewer per score element in the inner loops)."""
    if SOFTCAP_ON:
        return x
    return (x * (sm_scale * 1.4426950408889634)).to(x.dtype)


@triton.jit
def _scores(q, kT, sm_scale, softcap, SOFTCAP_ON: tl.constexpr, PRECISION: tl.constexpr):
    """Scores in log2 units (one operand already _prescale'd when there is no softcap), plus
    tanh(score / softcap) for the softcap's backward."""
    s = tl.dot(q, kT, input_precision=PRECISION)
    if SOFTCAP_ON:
        t = _tanh(s * sm_scale / softcap)
        return t * (softcap * 1.4426950408889634), t
    return s, s


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, doc_ptr, doc_q, qpos, start, end,
               S, window, sm_scale, softcap, D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW_ON: tl.constexpr, HAS_DOC: tl.constexpr, SOFTCAP_ON: tl.constexpr,
               PRECISION: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for n in range(start, end, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        kmask = offs_d[:, None] < D
        vmask = offs_dv[None, :] < DV
        if MASKED:
            kmask &= offs_n[None, :] < S
            vmask &= offs_n[:, None] < S
        kT = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=kmask, other=0.0)
        s, _ = _scores(q, kT, sm_scale, softcap, SOFTCAP_ON, PRECISION)
        if MASKED:
            vis = _visible(qpos, offs_n, S, window, doc_q, doc_ptr, CAUSAL, WINDOW_ON, HAS_DOC)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :], mask=vmask, other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, DOC, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb,
                sm_scale, softcap, window, T, S, HQ, GROUP,
                D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOW_ON: tl.constexpr, HAS_DOC: tl.constexpr,
                SOFTCAP_ON: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    # Last query tiles first: under a causal mask they have the most key tiles, so the lightest
    # programs form the final wave (less idle tail). Programs launch with axis 0 fastest.
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    off = S - T
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    qpos = offs_m + off
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :],
                mask=(offs_m[:, None] < T) & (offs_d[None, :] < D), other=0.0)
    q = _prescale(q, sm_scale, SOFTCAP_ON)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    doc_ptr = DOC + b.to(tl.int64) * sdb
    doc_q = qpos
    if HAS_DOC:
        doc_q = tl.load(doc_ptr + qpos, mask=offs_m < T, other=-2)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: fully masked tiles give p = 0, not NaN
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    p0 = pid_m * BLOCK_M + off
    lo, pre, full, hi = _kv_ranges(p0, p0 + BLOCK_M - 1, S, window, BLOCK_N, CAUSAL, WINDOW_ON, HAS_DOC)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skt, svt, doc_ptr, doc_q, qpos, lo, pre,
                               S, window, sm_scale, softcap, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, True,
                               CAUSAL, WINDOW_ON, HAS_DOC, SOFTCAP_ON, PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skt, svt, doc_ptr, doc_q, qpos, pre, full,
                               S, window, sm_scale, softcap, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, False,
                               CAUSAL, WINDOW_ON, HAS_DOC, SOFTCAP_ON, PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skt, svt, doc_ptr, doc_q, qpos, full, hi,
                               S, window, sm_scale, softcap, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, True,
                               CAUSAL, WINDOW_ON, HAS_DOC, SOFTCAP_ON, PRECISION)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows past T see no key; keep them finite
    acc = acc / l_i[:, None]
    row = pid_bh.to(tl.int64) * T + offs_m
    tl.store(LSE + row, m_i + tl.math.log2(l_i), mask=offs_m < T)
    tl.store(O + row[:, None] * DV + offs_dv[None, :], acc.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < T) & (offs_dv[None, :] < DV))


@triton.jit
def _bwd_preprocess(O, DO, DELTA, n_rows, DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """DELTA[row] = sum_d dO[row, d] * O[row, d] (both contiguous [rows, DV])."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_DV)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < DV)
    idx = rows.to(tl.int64)[:, None] * DV + cols[None, :]
    o = tl.load(O + idx, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1), mask=rows < n_rows)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, sqt, doc_ptr, kpos, start, end,
                T, S, window, sm_scale, softcap, D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOW_ON: tl.constexpr, HAS_DOC: tl.constexpr,
                SOFTCAP_ON: tl.constexpr, PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for m in range(start, end, BLOCK_M):
        offs_m = m + tl.arange(0, BLOCK_M)
        qmask = offs_d[:, None] < D
        domask = offs_dv[None, :] < DV
        if MASKED:
            qmask &= offs_m[None, :] < T
            domask &= offs_m[:, None] < T
        qT = tl.load(q_base + offs_m[None, :] * sqt + offs_d[:, None], mask=qmask, other=0.0)
        lse = tl.load(lse_base + offs_m, mask=offs_m < T, other=0.0)
        sT, capT = _scores(k, qT, sm_scale, softcap, SOFTCAP_ON, PRECISION)  # [BLOCK_N, BLOCK_M]
        pT = tl.math.exp2(sT - lse[None, :])
        if MASKED:
            vis = _visible_rows(offs_m, T, S, kpos, window, doc_ptr, CAUSAL, WINDOW_ON, HAS_DOC)
            pT = tl.where(tl.trans(vis), pT, 0.0)
        do = tl.load(do_base + offs_m[:, None] * DV + offs_dv[None, :], mask=domask, other=0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        delta = tl.load(delta_base + offs_m, mask=offs_m < T, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP_ON:
            dsT = dsT * (1.0 - capT * capT)
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PRECISION)
        if ATOMIC_DQ:  # dQ += dS K here (k is pre-scaled; the launcher rescales), no second pass
            dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=PRECISION)
            dq_mask = offs_d[None, :] < D
            if MASKED:
                dq_mask &= offs_m[:, None] < T
            tl.atomic_add(dq_base + offs_m[:, None] * D + offs_d[None, :], dq, mask=dq_mask, sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_, DQACC, DOC, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb,
                 sm_scale, softcap, window, T, S, HQ, HKV, GROUP,
                 D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 CAUSAL: tl.constexpr, WINDOW_ON: tl.constexpr, HAS_DOC: tl.constexpr,
                 SOFTCAP_ON: tl.constexpr, PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)  # key tiles in order: under a causal mask the first ones have most work
    b = pid_bh // HKV
    hk = pid_bh % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    k = tl.load(k_base + offs_n[:, None] * skt + offs_d[None, :],
                mask=(offs_n[:, None] < S) & (offs_d[None, :] < D), other=0.0)
    v = tl.load(v_base + offs_n[:, None] * svt + offs_dv[None, :],
                mask=(offs_n[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)
    k = _prescale(k, sm_scale, SOFTCAP_ON)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    doc_ptr = DOC + b.to(tl.int64) * sdb
    k0 = pid_n * BLOCK_N
    lo, pre, full, hi = _q_ranges(k0, k0 + BLOCK_N - 1, T, S, window, BLOCK_M, CAUSAL, WINDOW_ON, HAS_DOC)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        row0 = (b.to(tl.int64) * HQ + h) * T
        do_base = DO + row0 * DV
        lse_base = LSE + row0
        delta_base = DELTA + row0
        dq_base = DQACC + row0 * D
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, sqt, doc_ptr, offs_n,
                             lo, pre, T, S, window, sm_scale, softcap, D, DV, BLOCK_M, BLOCK_D, BLOCK_DV, True,
                             CAUSAL, WINDOW_ON, HAS_DOC, SOFTCAP_ON, PRECISION, ATOMIC_DQ)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, sqt, doc_ptr, offs_n,
                             pre, full, T, S, window, sm_scale, softcap, D, DV, BLOCK_M, BLOCK_D, BLOCK_DV, False,
                             CAUSAL, WINDOW_ON, HAS_DOC, SOFTCAP_ON, PRECISION, ATOMIC_DQ)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, sqt, doc_ptr, offs_n,
                             full, hi, T, S, window, sm_scale, softcap, D, DV, BLOCK_M, BLOCK_D, BLOCK_DV, True,
                             CAUSAL, WINDOW_ON, HAS_DOC, SOFTCAP_ON, PRECISION, ATOMIC_DQ)
    row = pid_bh.to(tl.int64) * S + offs_n
    nmask = offs_n[:, None] < S
    tl.store(DK + row[:, None] * D + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=nmask & (offs_d[None, :] < D))
    tl.store(DV_ + row[:, None] * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=nmask & (offs_dv[None, :] < DV))


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skt, svt, doc_ptr, doc_q, qpos, start, end, S, window,
              sm_scale, softcap, D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              WINDOW_ON: tl.constexpr, HAS_DOC: tl.constexpr, SOFTCAP_ON: tl.constexpr,
              PRECISION: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for n in range(start, end, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        kmask = offs_d[None, :] < D
        vmask = offs_dv[:, None] < DV
        if MASKED:
            kmask &= offs_n[:, None] < S
            vmask &= offs_n[None, :] < S
        k = tl.load(k_base + offs_n[:, None] * skt + offs_d[None, :], mask=kmask, other=0.0)
        vT = tl.load(v_base + offs_n[None, :] * svt + offs_dv[:, None], mask=vmask, other=0.0)
        s, cap = _scores(q, tl.trans(k), sm_scale, softcap, SOFTCAP_ON, PRECISION)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            vis = _visible(qpos, offs_n, S, window, doc_q, doc_ptr, CAUSAL, WINDOW_ON, HAS_DOC)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP_ON:
            ds = ds * (1.0 - cap * cap)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DOC, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb,
               sm_scale, softcap, window, T, S, HQ, GROUP,
               D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               CAUSAL: tl.constexpr, WINDOW_ON: tl.constexpr, HAS_DOC: tl.constexpr,
               SOFTCAP_ON: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # heaviest tiles first, as in _fwd_kernel
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    off = S - T
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    qpos = offs_m + off
    rmask = offs_m < T
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                mask=rmask[:, None] & (offs_d[None, :] < D), other=0.0)
    q = _prescale(q, sm_scale, SOFTCAP_ON)
    row = pid_bh.to(tl.int64) * T + offs_m
    do = tl.load(DO + row[:, None] * DV + offs_dv[None, :], mask=rmask[:, None] & (offs_dv[None, :] < DV),
                 other=0.0)
    lse = tl.load(LSE + row, mask=rmask, other=0.0)
    delta = tl.load(DELTA + row, mask=rmask, other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    doc_ptr = DOC + b.to(tl.int64) * sdb
    doc_q = qpos
    if HAS_DOC:
        doc_q = tl.load(doc_ptr + qpos, mask=rmask, other=-2)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    p0 = pid_m * BLOCK_M + off
    lo, pre, full, hi = _kv_ranges(p0, p0 + BLOCK_M - 1, S, window, BLOCK_N, CAUSAL, WINDOW_ON, HAS_DOC)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skt, svt, doc_ptr, doc_q, qpos, lo, pre, S, window,
                   sm_scale, softcap, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, True, CAUSAL, WINDOW_ON, HAS_DOC,
                   SOFTCAP_ON, PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skt, svt, doc_ptr, doc_q, qpos, pre, full, S,
                   window, sm_scale, softcap, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, False, CAUSAL, WINDOW_ON,
                   HAS_DOC, SOFTCAP_ON, PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skt, svt, doc_ptr, doc_q, qpos, full, hi, S,
                   window, sm_scale, softcap, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, True, CAUSAL, WINDOW_ON,
                   HAS_DOC, SOFTCAP_ON, PRECISION)
    tl.store(DQ + row[:, None] * D + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=rmask[:, None] & (offs_d[None, :] < D))


def _cfg(m, n, warps, stages):
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)


# Candidates for Hopper (first = the default when tuning is off); autotuned per shape key on GPU.
# They are the winners per kernel of `benchmarks/kernels_attention.py --sweep` (a wider space) at
# B x 16 x {2048, 4096, 16384} x 128 and 16 x 32 x 1024 x 64 on an H100 (2026-11-26).
_KEY = ["T", "S", "D", "DV", "CAUSAL", "WINDOW_ON", "HAS_DOC", "SOFTCAP_ON"]
_FIXED = dict(BLOCK_M=16, BLOCK_N=16)  # under the interpreter: tiny tiles keep CPU tests fast
FWD = Tunable(_fwd_kernel, [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(128, 32, 4, 4),
                            _cfg(128, 64, 4, 3), _cfg(64, 64, 4, 3)], _KEY, _FIXED)
DKDV = Tunable(_dkdv_kernel, [_cfg(64, 128, 8, 3), _cfg(32, 64, 4, 4), _cfg(64, 64, 4, 3),
                              _cfg(32, 64, 4, 5)], _KEY + ["ATOMIC_DQ"], _FIXED, reset_to_zero=["DQACC"])
DQ = Tunable(_dq_kernel, [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 2), _cfg(128, 32, 4, 3),
                          _cfg(64, 32, 4, 4)], _KEY, _FIXED)


def _common(q, k, v, softcap, scale, window, doc_ids):
    B, HQ, T, D = q.shape
    HKV, S, DV = k.shape[1], k.shape[2], v.shape[-1]
    doc = doc_ids if doc_ids is not None else q  # any tensor: never read when HAS_DOC is False
    meta = dict(D=D, DV=DV, BLOCK_D=max(16, triton.next_power_of_2(D)),
                BLOCK_DV=max(16, triton.next_power_of_2(DV)), CAUSAL=False, WINDOW_ON=window is not None,
                HAS_DOC=doc_ids is not None, SOFTCAP_ON=softcap is not None,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    scalars = (float(scale if scale is not None else 1.0 / math.sqrt(D)),
               float(softcap if softcap is not None else 1.0), int(window or 0), T, S)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], doc.stride(0) if doc_ids is not None else 0)
    return B, HQ, HKV, T, S, D, DV, doc, meta, scalars, strides


def forward(q, k, v, *, causal, window, softcap, scale, doc_ids):
    """Returns (out [B,Hq,T,Dv] contiguous, lse [B,Hq,T] fp32, base 2)."""
    from lmforge.kernels import flash_attention_tma as tma

    if USE_TMA and gluon_reason(q, k, v, window=window, softcap=softcap, doc_ids=doc_ids, causal=causal) is None:
        from lmforge.kernels import flash_attention_gluon as gluon

        try:
            return gluon.forward(q, k, v, causal=causal, scale=scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
        except Exception as e:  # noqa: BLE001  (e.g. a Triton whose Gluon API differs: a host-side compile error)
            _gluon_failed["forward"] = f"the Gluon kernel failed to compile or launch ({type(e).__name__}: {e})"
            log.warning("flash_attention forward: Gluon kernel switched off, Triton kernels from now on: %s",
                        _gluon_failed["forward"])
    if USE_TMA and tma.usable(q, k, v):
        return tma.forward(q, k, v, causal=causal, window=window, softcap=softcap, scale=scale, doc_ids=doc_ids)
    B, HQ, HKV, T, S, D, DV, doc, meta, scalars, strides = _common(q, k, v, softcap, scale, window, doc_ids)
    meta["CAUSAL"] = causal
    out = torch.empty(B, HQ, T, DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, HQ, T, device=q.device, dtype=torch.float32)
    grid = lambda m: (B * HQ, triton.cdiv(T, m["BLOCK_M"]))
    FWD[grid](q, k, v, out, lse, doc, *strides, *scalars, HQ, HQ // HKV, **meta)
    return out, lse


def backward(q, k, v, out, lse, dout, *, causal, window, softcap, scale, doc_ids, deterministic=True):
    """Returns (dq, dk, dv); `out` and `dout` must be contiguous [B,Hq,T,Dv].

    deterministic=False adds dQ into an fp32 buffer with atomics inside the dK/dV kernel (5 matmuls
    per tile pair instead of 7, but the summation order, hence the last bits, vary run to run).
    """
    B, HQ, HKV, T, S, D, DV, doc, meta, scalars, strides = _common(q, k, v, softcap, scale, window, doc_ids)
    meta["CAUSAL"] = causal
    delta = torch.empty(B, HQ, T, device=q.device, dtype=torch.float32)
    rows, block = B * HQ * T, 64
    _bwd_preprocess[(triton.cdiv(rows, block),)](out, dout, delta, rows, DV=DV, BLOCK_DV=meta["BLOCK_DV"],
                                                 BLOCK_M=block)
    dk = torch.empty(B, HKV, S, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, HKV, S, DV, device=q.device, dtype=v.dtype)
    from lmforge.kernels import flash_attention_tma as tma

    atomic = not deterministic
    if USE_TMA_BWD and gluon_bwd_reason(q, k, v, dout, atomic, window=window, softcap=softcap,
                                        doc_ids=doc_ids) is None:
        try:
            return _gluon_backward(q, k, v, dout, lse, delta, doc, meta, scalars, strides, causal, atomic)
        except Exception as e:  # noqa: BLE001  (as in forward: fall back, once and for all, with the reason)
            _gluon_failed["backward"] = f"the Gluon kernel failed to compile or launch ({type(e).__name__}: {e})"
            log.warning("flash_attention backward: Gluon kernel switched off, Triton kernels from now on: %s",
                        _gluon_failed["backward"])
    use_tma = USE_TMA_BWD and tma.usable(q, k, v, dout)
    # with atomics, dQ accumulates in fp32 rows of BLOCK_D (the descriptor kernel's padded head dim)
    dq_acc = torch.zeros(B, HQ, T, meta["BLOCK_D"] if use_tma else D, device=q.device, dtype=torch.float32) \
        if atomic else dk.new_empty(1)
    dq = None if atomic else torch.empty(B, HQ, T, D, device=q.device, dtype=q.dtype)
    side = _side_stream(q.device) if not atomic else None
    if side is not None:  # inputs (delta included) are ready once the work queued so far is done
        side.wait_stream(torch.cuda.current_stream(q.device))
    grid_kv = lambda m: (B * HKV, triton.cdiv(S, m["BLOCK_N"]))
    if use_tma:
        tma.dkdv(q, k, v, dout, lse, delta, dk, dv, doc, meta, scalars, strides, dq_acc if atomic else None)
    else:
        DKDV[grid_kv](q, k, v, dout, lse, delta, dk, dv, dq_acc, doc, *strides, *scalars, HQ, HKV, HQ // HKV,
                      ATOMIC_DQ=atomic, **meta)
    if atomic:
        # dq_acc holds dS @ K' with K' = K for the descriptor kernel; the pointer kernel pre-scales,
        # K' = K * scale * log2(e) (K itself with a softcap)
        factor = scalars[0] if use_tma or softcap is not None else 1.0 / LOG2E
        return (dq_acc[..., :D] * factor).to(q.dtype), dk, dv
    grid_q = lambda m: (B * HQ, triton.cdiv(T, m["BLOCK_M"]))
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        if use_tma:
            tma.dq(q, k, v, dout, lse, delta, dq, doc, meta, scalars, strides)
        else:
            DQ[grid_q](q, k, v, dout, lse, delta, dq, doc, *strides, *scalars, HQ, HQ // HKV, **meta)
    if side is not None:  # everything the side stream touched is released only after it finished
        torch.cuda.current_stream(q.device).wait_stream(side)
    return dq, dk, dv


# The launchers use the tensor-descriptor kernels (flash_attention_tma) where the strides allow:
# the forward with USE_TMA, the backward with USE_TMA_BWD. Off: always the pointer kernels here.
USE_TMA = True
USE_TMA_BWD = True

# The forward runs the warp-specialised Gluon kernel (flash_attention_gluon) on Hopper for the head
# dims in GLUON_HEAD_DIMS, where it measured faster than the autotuned descriptor kernel (H100,
# causal bf16, D 128: 1.12-1.27x; D 64: 0.92x at T 1024, 1.05x at 2048, so D 64 stays on Triton);
# elsewhere, or when Gluon is missing, the Triton kernels run and the reason is logged once.
# It is a descriptor (TMA) kernel too: USE_TMA = False switches it off with the others.
GLUON_HEAD_DIMS = {128}
_gluon_logged: set[str] = set()
# "forward"/"backward" -> why the Gluon kernel failed once (it then stays off for the process)
_gluon_failed: dict[str, str] = {}


def gluon_reason(q, k, v, *, window=None, softcap=None, doc_ids=None, causal=False) -> str | None:
    """None when the forward would run the Gluon kernel on these inputs, else why not (logged once)."""
    reason = _gluon_failed.get("forward")
    if reason is not None:
        return reason
    if q.shape[-1] not in GLUON_HEAD_DIMS:
        reason = f"head dim {q.shape[-1]} is not in GLUON_HEAD_DIMS {sorted(GLUON_HEAD_DIMS)}"
    else:
        try:
            from lmforge.kernels import flash_attention_gluon as gluon
        except Exception as e:  # noqa: BLE001  (a broken Gluon must never break the Triton path)
            reason = f"lmforge.kernels.flash_attention_gluon failed to import ({type(e).__name__}: {e})"
    if reason is None and interpreting():
        reason = "TRITON_INTERPRET is set (Gluon kernels have no interpreter)"
    if reason is None:
        reason = gluon.unusable_reason(q, k, v, window=window, softcap=softcap, doc_ids=doc_ids, causal=causal)
    if reason is not None and "fwd " + reason not in _gluon_logged:
        _gluon_logged.add("fwd " + reason)
        log.info("flash_attention forward: Triton kernels instead of the Gluon kernel because %s", reason)
    return reason


# The backward runs the warp-specialised Gluon dK/dV kernel (flash_attention_gluon_bwd) on Hopper for the
# head dims in GLUON_BWD_HEAD_DIMS (deterministic: the Triton dQ kernel runs beside it on the side
# stream) and GLUON_BWD_ATOMIC_HEAD_DIMS (deterministic=False: dQ from the same pass, added with
# atomics), where it measured faster than the Triton dK/dV kernel (see docs/kernels.md); elsewhere
# the Triton kernels run and the reason is logged once.
GLUON_BWD_HEAD_DIMS: set[int] = set()
GLUON_BWD_ATOMIC_HEAD_DIMS: set[int] = set()


def gluon_bwd_reason(q, k, v, dout, atomic, *, window=None, softcap=None, doc_ids=None) -> str | None:
    """None when the backward would run the Gluon dK/dV kernel on these inputs, else why not (logged once)."""
    dims = GLUON_BWD_ATOMIC_HEAD_DIMS if atomic else GLUON_BWD_HEAD_DIMS
    reason = _gluon_failed.get("backward")
    if reason is not None:
        return reason
    if q.shape[-1] not in dims:
        name = "GLUON_BWD_ATOMIC_HEAD_DIMS" if atomic else "GLUON_BWD_HEAD_DIMS"
        reason = f"head dim {q.shape[-1]} is not in {name} {sorted(dims)}"
    elif interpreting():
        reason = "TRITON_INTERPRET is set (Gluon kernels have no interpreter)"
    else:
        try:
            from lmforge.kernels import flash_attention_gluon_bwd as gluon_bwd
        except Exception as e:  # noqa: BLE001  (a broken Gluon must never break the Triton path)
            reason = f"lmforge.kernels.flash_attention_gluon_bwd failed to import ({type(e).__name__}: {e})"
        else:
            reason = gluon_bwd.unusable_reason(q, k, v, dout, window=window, softcap=softcap, doc_ids=doc_ids)
    if reason is not None and "bwd " + reason not in _gluon_logged:
        _gluon_logged.add("bwd " + reason)
        log.info("flash_attention backward: Triton kernels instead of the Gluon kernel because %s", reason)
    return reason


def _gluon_backward(q, k, v, dout, lse, delta, doc, meta, scalars, strides, causal, atomic):
    """dK, dV (and with `atomic` dQ) from the Gluon kernel; else dQ from the Triton dQ kernel on the side stream."""
    from lmforge.kernels import flash_attention_gluon_bwd as gluon_bwd
    from lmforge.kernels import flash_attention_tma as tma

    scale = scalars[0]
    if atomic:
        return gluon_bwd.dkdv(q, k, v, dout, lse, delta, causal=causal, scale=scale, atomic_dq=True)
    B, HQ, T, D = q.shape
    dq = torch.empty(B, HQ, T, D, device=q.device, dtype=q.dtype)
    side = _side_stream(q.device)
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(q.device))
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        if tma.usable(q, k, v, dout):
            tma.dq(q, k, v, dout, lse, delta, dq, doc, meta, scalars, strides)
        else:
            grid_q = lambda m: (B * HQ, triton.cdiv(T, m["BLOCK_M"]))
            DQ[grid_q](q, k, v, dout, lse, delta, dq, doc, *strides, *scalars, HQ, HQ // k.shape[1], **meta)
    try:
        _, dk, dv = gluon_bwd.dkdv(q, k, v, dout, lse, delta, causal=causal, scale=scale, atomic_dq=False)
    finally:  # also when dkdv fails: dq's memory must not be reused while the side stream writes it
        if side is not None:
            torch.cuda.current_stream(q.device).wait_stream(side)
    return dq, dk, dv


# The dQ kernel does not depend on the dK/dV kernel; on a GPU it runs on a second stream so that
# each kernel's tail (the light causal tiles at the end) overlaps the other's work.
CONCURRENT_DQ = True
_side_streams: dict = {}


def _side_stream(device):
    if not CONCURRENT_DQ or device.type != "cuda" or interpreting():
        return None
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]
