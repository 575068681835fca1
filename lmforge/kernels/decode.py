"""Fused decode-step kernels for small batches of a dense Llama-family block, with their torch specs.

A decode step at batch 1-16 is made of matrix-vector products (GEMVs) that each read a weight once:
it is bound by memory bandwidth, or, for small models, by the latency of many tiny kernels. These
kernels cut one layer from ~15 kernels to four:
  1. `norm_qkv_rope`: RMSNorm of the residual stream (recomputed by every program: a row is a few
     KB) -> packed q/k/v GEMV -> RoPE on q and k -> k and v written into the static cache at each
     row's position; q out;
  2. `decode_attention` (in decode_attention.py, re-exported here): each row's query heads over
     its cached keys 0..position in one kernel, split over keys when that pays (the splits
     combined by the last one to finish); variant, splits and warps tuned per shape;
  3. `gemv_residual`: o-projection GEMV + the residual add (into a second buffer, see below);
  4. `norm_swiglu`: RMSNorm -> packed gate/up GEMV -> silu(gate) * up;
  5. `gemv_residual` again for the down projection;
plus `norm_gemv` (final norm + LM head; for greedy decoding also the argmax of each row, folded
into the same kernel by a packed (value, index) int64 atomic max, so no logits are written).

GEMVs: a program owns BLOCK_N output rows (a weight tile [BLOCK_N, BLOCK_K] per step of the
reduction, wide coalesced loads), keeps the weight tile in registers and multiplies it with every
batch row in turn (a static loop over rows, so register use does not grow with the batch), fp32
accumulation, `tl.sum` reductions (no `tl.dot`: M is 1-16, and bf16 `tl.dot` is wrong under the
interpreter). Rounding mirrors the model's modules (RMSNorm's cast before the gain, the linear's
output cast before RoPE / SiLU / the residual add), so in fp32 the kernels equal the model up to
summation order, and in bf16 to one rounding here and there.

Tests run fp32 under TRITON_INTERPRET=1: the interpreter truncates fp32 -> bf16 casts instead of
rounding them, so bf16 is checked on the GPU (benchmarks/inference_fused_decode.py).

Every kernel is idempotent (running it twice gives the same buffers): the residual add writes a
second buffer instead of updating in place, so autotuning (which runs a kernel many times) and
a warm-up run before CUDA-graph capture change nothing. The atomic counters of the split attention
and of the argmax are left at zero by each launch; two launches sharing one scratch must not run
concurrently (on different streams).

Each `*_ref` function is the readable torch spec the kernel is tested against (and the reference
against the model's own modules). Not here: biases, LayerNorm, GELU, QK-norm, soft-capping,
sliding windows, MLA or MoE (inference/fused_decode.py falls back to the model for those).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from lmforge.kernels.decode_attention import (  # noqa: F401  (re-exported: one module for the step's kernels)
    ATTN_IMPLS,
    MAX_SPLITS,
    attention_candidates,
    attention_choices,
    attention_scratch,
    attention_splits,
    decode_attention,
    decode_attention_ref,
    tuning_length,
)
from lmforge.kernels.runtime import Tunable

# -- torch references (the specs) ---------------------------------------------------------------


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """model.layers.RMSNorm: fp32 statistics, cast back, then the gain in x's dtype."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def norm_qkv_rope_ref(x, norm_w, eps, w_qkv, cos, sin, pos, k_cache, v_cache, n_heads: int) -> torch.Tensor:
    """x [M, d] -> q [M, Hq, D] (rotated); writes rotated k and v [M, Hkv, D] into
    k_cache/v_cache [>= M, Hkv, S, D] at slot pos[m] of row m. cos/sin: [S, D/2] fp32 tables."""
    M = x.shape[0]
    Hkv, D = k_cache.shape[1], k_cache.shape[3]
    qkv = F.linear(rms_norm_ref(x, norm_w, eps), w_qkv).view(M, n_heads + 2 * Hkv, D)
    c, s = cos[pos][:, None], sin[pos][:, None]  # [M, 1, D/2]
    qk = qkv[:, :n_heads + Hkv].float()
    lo, hi = qk[..., :D // 2], qk[..., D // 2:]
    qk = torch.cat((lo * c - hi * s, hi * c + lo * s), dim=-1).to(x.dtype)
    rows = torch.arange(M, device=x.device)
    k_cache[rows, :, pos] = qk[:, n_heads:].to(k_cache.dtype)
    v_cache[rows, :, pos] = qkv[:, n_heads + Hkv:].to(v_cache.dtype)
    return qk[:, :n_heads]


def gemv_residual_ref(y, w, x) -> torch.Tensor:
    """x + linear(y, w), the linear's output cast to x's dtype first (as `x + self.o(y)`)."""
    return x + F.linear(y, w)


def norm_swiglu_ref(x, norm_w, eps, w_gate_up) -> torch.Tensor:
    """silu(gate) * up of RMSNorm(x), w_gate_up = [gate; up] rows: [M, d] -> [M, d_ff]."""
    g, u = F.linear(rms_norm_ref(x, norm_w, eps), w_gate_up).chunk(2, dim=-1)
    return g * torch.sigmoid(g) * u


def norm_gemv_ref(x, norm_w, eps, w) -> torch.Tensor:
    """linear(RMSNorm(x), w): the final norm and the LM head."""
    return F.linear(rms_norm_ref(x, norm_w, eps), w)


# -- shared pieces of the kernels ---------------------------------------------------------------


@triton.jit
def _rstd(X, stride_xm, M, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """1/sqrt(mean(x²) + eps) of rows 0..M of X [M, K] -> [BLOCK_M] fp32."""
    rows = tl.arange(0, BLOCK_M)
    ss = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K),
                    other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    return 1.0 / tl.sqrt(ss / K + eps)


@triton.jit
def _gemv(X, stride_xm, NW, rstd, W, rows_a, rows_b, row_mask, M, K,
          NORM: tl.constexpr, TWO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, DEFER: tl.constexpr):
    """acc_a[m, j] = sum_k h[m, k] · W[rows_a[j], k] (and acc_b for rows_b when TWO), h = x or,
    with NORM, RMSNorm(x) rounded as the model rounds it. Each weight tile is loaded once and used
    for every batch row (static loop over rows: registers do not grow with the batch). With DEFER
    and one row, products accumulate elementwise in a [BLOCK_N, BLOCK_K] tile and are reduced once
    after the loop (no cross-thread reduction per step); autotuning picks either way per shape."""
    ms = tl.arange(0, BLOCK_M)
    dt = X.dtype.element_ty
    if DEFER and BLOCK_M == 1:
        pa = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        pb = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            wmask = row_mask[:, None] & kmask[None, :]
            h = tl.load(X + ks, mask=kmask, other=0.0).to(tl.float32)
            if NORM:
                g = tl.load(NW + ks, mask=kmask, other=0.0).to(tl.float32)
                h = ((h * tl.sum(rstd, axis=0)).to(dt).to(tl.float32) * g).to(dt).to(tl.float32)
            wa = tl.load(W + rows_a[:, None].to(tl.int64) * K + ks[None, :], mask=wmask, other=0.0)
            pa += wa.to(tl.float32) * h[None, :]
            if TWO:
                wb = tl.load(W + rows_b[:, None].to(tl.int64) * K + ks[None, :], mask=wmask, other=0.0)
                pb += wb.to(tl.float32) * h[None, :]
        acc_a = tl.sum(pa, axis=1)[None, :]
        acc_b = tl.sum(pb, axis=1)[None, :]
    else:
        acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            wmask = row_mask[:, None] & kmask[None, :]
            wa = tl.load(W + rows_a[:, None].to(tl.int64) * K + ks[None, :], mask=wmask, other=0.0).to(tl.float32)
            if TWO:
                wb = tl.load(W + rows_b[:, None].to(tl.int64) * K + ks[None, :], mask=wmask, other=0.0).to(tl.float32)
            if NORM:
                g = tl.load(NW + ks, mask=kmask, other=0.0).to(tl.float32)
            for mi in tl.static_range(BLOCK_M):
                h = tl.load(X + mi * stride_xm + ks, mask=kmask & (ks * 0 + mi < M), other=0.0).to(tl.float32)
                if NORM:
                    r = tl.sum(tl.where(ms == mi, rstd, 0.0), axis=0)
                    h = ((h * r).to(dt).to(tl.float32) * g).to(dt).to(tl.float32)
                acc_a = tl.where(ms[:, None] == mi, acc_a + tl.sum(wa * h[None, :], axis=1)[None, :], acc_a)
                if TWO:
                    acc_b = tl.where(ms[:, None] == mi, acc_b + tl.sum(wb * h[None, :], axis=1)[None, :], acc_b)
    return acc_a, acc_b


# -- 1. RMSNorm -> packed q/k/v -> RoPE -> cache write ----------------------------------------------


@triton.jit
def _norm_qkv_rope_kernel(X, NW, W, COS, SIN, POS, Q, KC, VC, M, K, eps, stride_xm, stride_cb, stride_ch,
                          stride_cs, HQ, HKV, HALF, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, DEFER: tl.constexpr):
    """Program (head, pair block): head indexes the packed rows [q heads; k heads; v heads], each
    head D = 2·HALF rows; it computes output dims p and p + HALF of that head (the pairs RoPE
    rotates together: HF's rotate-half layout)."""
    head = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    pmask = p < HALF
    rows_lo = head * 2 * HALF + p
    rstd = _rstd(X, stride_xm, M, K, eps, BLOCK_M, BLOCK_K)
    lo, hi = _gemv(X, stride_xm, NW, rstd, W, rows_lo, rows_lo + HALF, pmask, M, K,
                   True, True, BLOCK_M, BLOCK_N, BLOCK_K, DEFER)
    dt = X.dtype.element_ty
    lo = lo.to(dt).to(tl.float32)  # the linear's output dtype, as the model has it before RoPE
    hi = hi.to(dt).to(tl.float32)
    ms = tl.arange(0, BLOCK_M)
    mmask = ms < M
    pos = tl.load(POS + ms, mask=mmask, other=0)
    mask = mmask[:, None] & pmask[None, :]
    if head < HQ + HKV:  # q and k heads rotate
        c = tl.load(COS + pos[:, None] * HALF + p[None, :], mask=mask, other=1.0)
        s = tl.load(SIN + pos[:, None] * HALF + p[None, :], mask=mask, other=0.0)
        lo, hi = lo * c - hi * s, hi * c + lo * s
    if head < HQ:
        dst = Q + ms[:, None] * (HQ * 2 * HALF) + head * 2 * HALF + p[None, :]
        tl.store(dst, lo.to(Q.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, hi.to(Q.dtype.element_ty), mask=mask)
    else:
        is_k = head < HQ + HKV
        kvh = tl.where(is_k, head - HQ, head - HQ - HKV)
        off = ms[:, None].to(tl.int64) * stride_cb + kvh * stride_ch + pos[:, None] * stride_cs + p[None, :]
        if is_k:
            tl.store(KC + off, lo.to(KC.dtype.element_ty), mask=mask)
            tl.store(KC + off + HALF, hi.to(KC.dtype.element_ty), mask=mask)
        else:
            tl.store(VC + off, lo.to(VC.dtype.element_ty), mask=mask)
            tl.store(VC + off + HALF, hi.to(VC.dtype.element_ty), mask=mask)


# -- 3./5. GEMV + residual, 4. RMSNorm -> gate/up -> SwiGLU, head: RMSNorm -> GEMV ------------------


@triton.jit
def _gemv_residual_kernel(Y, W, X, OUT, M, N, K, stride_ym, stride_xm, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DEFER: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    acc, _ = _gemv(Y, stride_ym, Y, Y, W, n, n, nmask, M, K, False, False, BLOCK_M, BLOCK_N, BLOCK_K, DEFER)
    ms = tl.arange(0, BLOCK_M)
    mask = (ms[:, None] < M) & nmask[None, :]
    x = tl.load(X + ms[:, None] * stride_xm + n[None, :], mask=mask, other=0.0)
    out = x.to(tl.float32) + acc.to(x.dtype).to(tl.float32)
    tl.store(OUT + ms[:, None] * stride_xm + n[None, :], out.to(x.dtype), mask=mask)


@triton.jit
def _norm_swiglu_kernel(X, NW, W, H, M, K, F_, eps, stride_xm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, DEFER: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < F_
    rstd = _rstd(X, stride_xm, M, K, eps, BLOCK_M, BLOCK_K)
    g, u = _gemv(X, stride_xm, NW, rstd, W, n, n + F_, nmask, M, K, True, True, BLOCK_M, BLOCK_N, BLOCK_K, DEFER)
    dt = X.dtype.element_ty
    g = g.to(dt).to(tl.float32)
    u = u.to(dt).to(tl.float32)
    a = (g * (1.0 / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)).to(dt).to(tl.float32)  # silu, rounded as torch
    ms = tl.arange(0, BLOCK_M)
    tl.store(H + ms[:, None] * F_ + n[None, :], (a * u).to(H.dtype.element_ty),
             mask=(ms[:, None] < M) & nmask[None, :])


@triton.jit
def _norm_gemv_kernel(X, NW, W, OUT, BEST, CNT, TOK, M, N, K, eps, stride_xm, STORE: tl.constexpr,
                      ARGMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      DEFER: tl.constexpr):
    """OUT (when STORE) = the products rounded to X's dtype (so fp32 logits equal the model's bf16
    ones upcast). ARGMAX: each program folds its columns into one int64 key per row, (value as an
    order-preserving int32) << 32 | (2³² - 1 - column), and atomic-maxes it into BEST[m]: the
    largest value wins, ties go to the lowest column (torch.argmax's rule); the last program to
    finish (an atomic counter) writes the winning columns to TOK and resets BEST and the counter."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    rstd = _rstd(X, stride_xm, M, K, eps, BLOCK_M, BLOCK_K)
    acc, _ = _gemv(X, stride_xm, NW, rstd, W, n, n, nmask, M, K, True, False, BLOCK_M, BLOCK_N, BLOCK_K, DEFER)
    ms = tl.arange(0, BLOCK_M)
    mmask = ms < M
    mask = mmask[:, None] & nmask[None, :]
    val = acc.to(X.dtype.element_ty).to(tl.float32)
    if STORE:
        tl.store(OUT + ms[:, None] * N + n[None, :], val.to(OUT.dtype.element_ty), mask=mask)
    if ARGMAX:
        val = tl.where(val == 0.0, 0.0, val)  # -0.0 ties with +0.0, as in torch
        val = tl.where(val != val, float("nan"), val)  # every NaN positive: torch.argmax takes NaN as the max
        bits = val.to(tl.int32, bitcast=True)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # negative floats: larger magnitude, smaller
        key = ordered.to(tl.int64) * 4294967296 + (4294967295 - n.to(tl.int64))[None, :]
        key = tl.where(mask, key, -9223372036854775807)
        tl.atomic_max(BEST + ms, tl.max(key, axis=1), mask=mmask, sem="acq_rel")
        tl.debug_barrier()  # every thread's atomic is done before the counter says so
        done = tl.atomic_add(CNT, 1, sem="acq_rel")
        if done == tl.num_programs(0) - 1:
            won = tl.atomic_xchg(BEST + ms, tl.full([BLOCK_M], -9223372036854775807, tl.int64), mask=mmask)
            tl.store(TOK + ms, 4294967295 - (won & 4294967295), mask=mmask)
            tl.atomic_xchg(CNT, 0)  # ready for the next call (and for CUDA-graph replays)


# -- launchers -----------------------------------------------------------------------------------

# GEMV tiles (rows per program, reduction step, warps, deferred reduction). Small row blocks give
# many programs (a 2048-row weight in blocks of 4 is 512 programs for 132 SMs); wide K steps give
# each thread several 16-byte loads in flight; DEFER (one batch row only) reduces once after the
# loop instead of every step. The first eight DEFER=False configs (seven dual) are the ones measured
# on the H100 for docs/benchmarks.md (2026-11-26); the DEFER=True ones and the 1024-wide 8-warp
# tiles (more bytes in flight per program, for the 1.1B shapes) were added after that run and
# compete with them in the autotuning (per shape on the GPU: do_bench flushes the L2, so weights
# are timed streaming from memory as in a real step); the interpreter runs `fixed`.
_GEMV_CONFIGS = [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, DEFER=False) for n, k, w in (
    (2, 1024, 4), (4, 512, 4), (4, 1024, 4), (8, 256, 4), (8, 512, 4), (8, 512, 8), (16, 256, 4), (16, 512, 8),
    (8, 1024, 8), (16, 1024, 8))] + [
    dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, DEFER=True) for n, k, w in (
        (2, 1024, 4), (4, 512, 4), (8, 512, 4), (8, 1024, 8), (16, 256, 4), (32, 256, 8))]
_DUAL_CONFIGS = [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, DEFER=False) for n, k, w in (
    (2, 512, 4), (2, 1024, 4), (4, 256, 4), (4, 512, 4), (8, 256, 4), (8, 512, 8), (16, 256, 8),
    (4, 1024, 8), (8, 1024, 8))] + [
    dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, DEFER=True) for n, k, w in (
        (2, 1024, 4), (4, 256, 4), (4, 512, 4), (8, 256, 4), (8, 512, 8))]
_FIXED = dict(BLOCK_N=16, BLOCK_K=32, DEFER=True)  # the interpreter: few programs (its cost is per program)

norm_qkv_rope_tunable = Tunable(_norm_qkv_rope_kernel, _DUAL_CONFIGS, key=["M", "K", "HALF", "HQ", "HKV"], fixed=_FIXED)
gemv_residual_tunable = Tunable(_gemv_residual_kernel, _GEMV_CONFIGS, key=["M", "N", "K"], fixed=_FIXED)
norm_swiglu_tunable = Tunable(_norm_swiglu_kernel, _DUAL_CONFIGS, key=["M", "K", "F_"], fixed=_FIXED)
norm_gemv_tunable = Tunable(_norm_gemv_kernel, _GEMV_CONFIGS, key=["M", "N", "K"], fixed=_FIXED)


def _block_m(M: int) -> int:
    return triton.next_power_of_2(M)


def norm_qkv_rope(x, norm_w, eps, w_qkv, cos, sin, pos, k_cache, v_cache, n_heads: int, q_out) -> torch.Tensor:
    """The kernel of `norm_qkv_rope_ref`: q into q_out [M, Hq, D]; k/v into the caches (rows 0..M).
    pos: [M] int64 positions."""
    M, K = x.shape
    Hkv, D = k_cache.shape[1], k_cache.shape[3]
    half = D // 2
    grid = lambda meta: (n_heads + 2 * Hkv, triton.cdiv(half, meta["BLOCK_N"]))
    norm_qkv_rope_tunable[grid](x, norm_w, w_qkv, cos, sin, pos, q_out, k_cache, v_cache, M, K, eps, x.stride(0),
                                k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), n_heads, Hkv, half,
                                BLOCK_M=_block_m(M))
    return q_out


def gemv_residual(y, w, x, out) -> torch.Tensor:
    """out = x + linear(y, w) (the kernel of `gemv_residual_ref`); out must not be x."""
    M, K = y.shape
    N = w.shape[0]
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
    gemv_residual_tunable[grid](y, w, x, out, M, N, K, y.stride(0), x.stride(0), BLOCK_M=_block_m(M))
    return out


def norm_swiglu(x, norm_w, eps, w_gate_up, out) -> torch.Tensor:
    """The kernel of `norm_swiglu_ref` into out [M, d_ff]."""
    M, K = x.shape
    F_ = w_gate_up.shape[0] // 2
    grid = lambda meta: (triton.cdiv(F_, meta["BLOCK_N"]),)
    norm_swiglu_tunable[grid](x, norm_w, w_gate_up, out, M, K, F_, eps, x.stride(0), BLOCK_M=_block_m(M))
    return out


def argmax_scratch(rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Work buffers of `norm_gemv(..., tokens=...)`: per-row best keys (at their reset value) and the counter."""
    return (torch.full((rows,), -(2 ** 63 - 1), dtype=torch.int64, device=device),
            torch.zeros(1, dtype=torch.int32, device=device))


def norm_gemv(x, norm_w, eps, w, out, tokens=None, scratch=None) -> torch.Tensor:
    """The kernel of `norm_gemv_ref` into out [M, N] (any float dtype; the values are rounded to x's
    dtype first). With `tokens` ([M] int64): also the argmax of each row into it (greedy decoding,
    first index on ties as torch.argmax), in the same kernel; out may then be None (not written).
    `scratch`: `argmax_scratch(M, ...)` (allocated when not given)."""
    M, K = x.shape
    N = w.shape[0]
    if N >= 2 ** 31:
        raise ValueError(f"norm_gemv: {N} output columns; the argmax packs indices in 32 bits")
    greedy = tokens is not None
    if greedy and scratch is None:
        scratch = argmax_scratch(M, x.device)
    best, cnt = scratch if greedy else (x, x)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
    norm_gemv_tunable[grid](x, norm_w, w, x if out is None else out, best, cnt, x if tokens is None else tokens,
                            M, N, K, eps, x.stride(0), STORE=out is not None, ARGMAX=greedy, BLOCK_M=_block_m(M))
    return tokens if greedy else out
