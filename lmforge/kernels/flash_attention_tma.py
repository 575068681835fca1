"""FlashAttention-2 kernels (forward, dK/dV, dQ) that move tiles through tensor descriptors (TMA).

Same algorithm, masks, work split and outputs (O and the base-2 LSE; dQ, dK, dV) as the pointer
kernels in `flash_attention_triton`, whose range and mask helpers they reuse; only the memory
access differs. Each of Q, K, V, O (dO, dQ, dK, dV) is described once on the host as a 4-D
`TensorDescriptor` [B, H, T, D] with its real strides, so a tile load is one bulk copy (on Hopper:
the TMA engine, completing on an mbarrier) instead of per-thread address arithmetic and
`cp.async`; rows past T (or S) and columns past D read as zeros and stores past them are dropped,
so no tile load or store needs a mask. Tiles that stay put for a whole program (Q in the forward
and dQ kernels, K and V in the dK/dV kernel) stay in shared memory as wgmma operands: nothing is
pre-scaled into a register copy; scale * log2(e) goes into the exp2 argument (one FMA per score)
and onto the row maximum (scale > 0, so max(s) * c = max(s * c)). Offline sm_90 compiles (Triton
3.6) show the registers this frees: forward 164 instead of 252 per thread at 128x64 tiles, D=128
(127 instead of 173 at D=64, two programs per SM); dQ 180 instead of 255. The dK/dV kernel still
spills at D=128. `deterministic=False` adds dQ inside the dK/dV kernel with one bulk reduce-add
per tile (`desc.atomic_add`); it measured slower than the separate dQ kernel on an H100.

They run where TMA can describe the tensors (`usable`): 16-byte aligned base pointers, strides
and output rows, unit stride in the head dimension, fp16/bf16 on a GPU of compute capability >= 9
(any dtype under the interpreter, which emulates descriptors, for the CPU tests); otherwise
`flash_attention_triton`'s pointer kernels run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmforge.kernels.flash_attention_triton import (
    _common,
    _kv_ranges,
    _q_ranges,
    _tanh,
    _visible,
    _visible_rows,
)
from lmforge.kernels.runtime import Tunable, interpreting

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton < 3.3: the pointer kernel runs
    TensorDescriptor = None


@triton.jit
def _tile(desc, b, h, row, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows row..row+BLOCK_R of head (b, h): one bulk copy of a [1, 1, BLOCK_R, BLOCK_C] box."""
    return desc.load([b, h, row, 0]).reshape(BLOCK_R, BLOCK_C)


@triton.jit
def _tiles(acc, l_i, m_i, q, K, V, b, hk, doc_ptr, doc_q, qpos, start, end, S, window, sm_scale, softcap,
           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr,
           CAUSAL: tl.constexpr, WINDOW_ON: tl.constexpr, HAS_DOC: tl.constexpr, SOFTCAP_ON: tl.constexpr,
           PRECISION: tl.constexpr):
    """Online softmax over key tiles start..end (masked: edge tiles; unmasked: interior tiles)."""
    for n in range(start, end, BLOCK_N):
        k = _tile(K, b, hk, n, BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if SOFTCAP_ON:  # s becomes log2 units here, so the exp2 argument needs no further scale
            s = _tanh(s * sm_scale / softcap) * (softcap * 1.4426950408889634)
            c = 1.0
        else:
            c = sm_scale * 1.4426950408889634
        if MASKED:
            vis = _visible(qpos, n + tl.arange(0, BLOCK_N), S, window, doc_q, doc_ptr, CAUSAL, WINDOW_ON, HAS_DOC)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * c)
        p = tl.math.exp2(s * c - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _tile(V, b, hk, n, BLOCK_N, BLOCK_DV)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_tile(HQ, GROUP, T, S, BLOCK_M: tl.constexpr):
    """This program's (batch x query head) row, batch, query head, kv head, and query tile: its first
    row, row offsets and absolute positions (the last T of S). Heaviest (last) tiles run first."""
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    return pid_bh, b, h, h // GROUP, m0, offs_m, offs_m + (S - T)


@triton.jit
def _query_docs(DOC, sdb, b, offs_m, qpos, T, HAS_DOC: tl.constexpr):
    """The batch row's document ids and those of the tile's queries (positions when there are none)."""
    doc_ptr = DOC + b.to(tl.int64) * sdb
    doc_q = qpos
    if HAS_DOC:
        doc_q = tl.load(doc_ptr + qpos, mask=offs_m < T, other=-2)
    return doc_ptr, doc_q


@triton.jit
def _fwd_kernel_tma(Q, K, V, O, LSE, DOC, sdb, sm_scale, softcap, window, T, S, HQ, GROUP,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr,
                    WINDOW_ON: tl.constexpr, HAS_DOC: tl.constexpr, SOFTCAP_ON: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh, b, h, hk, m0, offs_m, qpos = _query_tile(HQ, GROUP, T, S, BLOCK_M)
    q = _tile(Q, b, h, m0, BLOCK_M, BLOCK_D)
    doc_ptr, doc_q = _query_docs(DOC, sdb, b, offs_m, qpos, T, HAS_DOC)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: fully masked tiles give p = 0, not NaN
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    p0 = m0 + (S - T)  # the tile's first query position
    lo, pre, full, hi = _kv_ranges(p0, p0 + BLOCK_M - 1, S, window, BLOCK_N, CAUSAL, WINDOW_ON, HAS_DOC)
    if WINDOW_ON or HAS_DOC:  # otherwise lo == pre: no leading masked tiles
        acc, l_i, m_i = _tiles(acc, l_i, m_i, q, K, V, b, hk, doc_ptr, doc_q, qpos, lo, pre, S, window, sm_scale,
                               softcap, BLOCK_N, BLOCK_D, BLOCK_DV, True, CAUSAL, WINDOW_ON, HAS_DOC, SOFTCAP_ON,
                               PRECISION)
    acc, l_i, m_i = _tiles(acc, l_i, m_i, q, K, V, b, hk, doc_ptr, doc_q, qpos, pre, full, S, window, sm_scale,
                           softcap, BLOCK_N, BLOCK_D, BLOCK_DV, False, CAUSAL, WINDOW_ON, HAS_DOC, SOFTCAP_ON,
                           PRECISION)
    acc, l_i, m_i = _tiles(acc, l_i, m_i, q, K, V, b, hk, doc_ptr, doc_q, qpos, full, hi, S, window, sm_scale,
                           softcap, BLOCK_N, BLOCK_D, BLOCK_DV, True, CAUSAL, WINDOW_ON, HAS_DOC, SOFTCAP_ON,
                           PRECISION)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows past T see no key; keep them finite
    acc = acc / l_i[:, None]
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < T)
    O.store([b, h, m0, 0], acc.to(O.dtype).reshape(1, 1, BLOCK_M, BLOCK_DV))


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, DQACC, dq_ptr, b, h, lse_base, delta_base, doc_ptr, kpos, start, end, T, S,
                window, sm_scale, softcap, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW_ON: tl.constexpr, HAS_DOC: tl.constexpr,
                SOFTCAP_ON: tl.constexpr, PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                TMA_REDUCE: tl.constexpr):
    """dK, dV of one key tile from query tiles start..end of head (b, h) (transposed: keys are rows);
    with ATOMIC_DQ also adds this tile's share dS K of dQ into the fp32 DQACC."""
    for m in range(start, end, BLOCK_M):
        offs_m = m + tl.arange(0, BLOCK_M)
        q = _tile(Q, b, h, m, BLOCK_M, BLOCK_D)
        lse = tl.load(lse_base + offs_m, mask=offs_m < T, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        if SOFTCAP_ON:
            capT = _tanh(sT * sm_scale / softcap)
            pT = tl.math.exp2(capT * (softcap * 1.4426950408889634) - lse[None, :])
        else:
            pT = tl.math.exp2(sT * (sm_scale * 1.4426950408889634) - lse[None, :])
        if MASKED:
            vis = _visible_rows(offs_m, T, S, kpos, window, doc_ptr, CAUSAL, WINDOW_ON, HAS_DOC)
            pT = tl.where(tl.trans(vis), pT, 0.0)
        do = _tile(DO, b, h, m, BLOCK_M, BLOCK_DV)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        delta = tl.load(delta_base + offs_m, mask=offs_m < T, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP_ON:
            dsT = dsT * (1.0 - capT * capT)
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
        if ATOMIC_DQ:  # the launcher multiplies by the scale once at the end
            dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=PRECISION)
            if TMA_REDUCE:  # one bulk reduce-add of the tile (rows past T are dropped by the descriptor)
                DQACC.atomic_add([b, h, m, 0], dq.reshape(1, 1, BLOCK_M, BLOCK_D))
            else:  # the interpreter has no bulk reduce: per-element atomics, same sums
                offs_d = tl.arange(0, BLOCK_D)
                tl.atomic_add(dq_ptr + offs_m[:, None] * BLOCK_D + offs_d[None, :], dq, mask=offs_m[:, None] < T,
                              sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_kernel_tma(Q, K, V, DO, DK, DV_, DQACC, DQ_PTR, LSE, DELTA, DOC, sdb, sm_scale, softcap, window, T, S,
                     HQ, HKV, GROUP, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr,
                     WINDOW_ON: tl.constexpr, HAS_DOC: tl.constexpr, SOFTCAP_ON: tl.constexpr,
                     PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr, TMA_REDUCE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (key tile, batch x KV head); K and V stay in shared memory (no pre-scaling).
    DQACC/DQ_PTR: the fp32 dQ accumulator [B, HQ, T, BLOCK_D] as descriptor and as pointer (ATOMIC_DQ)."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = _tile(K, b, hk, n0, BLOCK_N, BLOCK_D)
    v = _tile(V, b, hk, n0, BLOCK_N, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    doc_ptr = DOC + b.to(tl.int64) * sdb
    lo, pre, full, hi = _q_ranges(n0, n0 + BLOCK_N - 1, T, S, window, BLOCK_M, CAUSAL, WINDOW_ON, HAS_DOC)
    for g in range(GROUP):
        h = hk * GROUP + g
        row0 = (b.to(tl.int64) * HQ + h) * T
        dq_ptr = DQ_PTR + row0 * BLOCK_D
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, DQACC, dq_ptr, b, h, LSE + row0, DELTA + row0, doc_ptr, offs_n,
                             lo, pre, T, S, window, sm_scale, softcap, BLOCK_M, BLOCK_D, BLOCK_DV, True, CAUSAL,
                             WINDOW_ON, HAS_DOC, SOFTCAP_ON, PRECISION, ATOMIC_DQ, TMA_REDUCE)
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, DQACC, dq_ptr, b, h, LSE + row0, DELTA + row0, doc_ptr, offs_n,
                             pre, full, T, S, window, sm_scale, softcap, BLOCK_M, BLOCK_D, BLOCK_DV, False, CAUSAL,
                             WINDOW_ON, HAS_DOC, SOFTCAP_ON, PRECISION, ATOMIC_DQ, TMA_REDUCE)
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, DQACC, dq_ptr, b, h, LSE + row0, DELTA + row0, doc_ptr, offs_n,
                             full, hi, T, S, window, sm_scale, softcap, BLOCK_M, BLOCK_D, BLOCK_DV, True, CAUSAL,
                             WINDOW_ON, HAS_DOC, SOFTCAP_ON, PRECISION, ATOMIC_DQ, TMA_REDUCE)
    DK.store([b, hk, n0, 0], (dk * sm_scale).to(DK.dtype).reshape(1, 1, BLOCK_N, BLOCK_D))
    DV_.store([b, hk, n0, 0], dv.to(DV_.dtype).reshape(1, 1, BLOCK_N, BLOCK_DV))


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, K, V, b, hk, doc_ptr, doc_q, qpos, start, end, S, window, sm_scale, softcap,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, WINDOW_ON: tl.constexpr, HAS_DOC: tl.constexpr, SOFTCAP_ON: tl.constexpr,
              PRECISION: tl.constexpr):
    for n in range(start, end, BLOCK_N):
        k = _tile(K, b, hk, n, BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if SOFTCAP_ON:
            cap = _tanh(s * sm_scale / softcap)
            p = tl.math.exp2(cap * (softcap * 1.4426950408889634) - lse[:, None])
        else:
            p = tl.math.exp2(s * (sm_scale * 1.4426950408889634) - lse[:, None])
        if MASKED:
            vis = _visible(qpos, n + tl.arange(0, BLOCK_N), S, window, doc_q, doc_ptr, CAUSAL, WINDOW_ON, HAS_DOC)
            p = tl.where(vis, p, 0.0)
        v = _tile(V, b, hk, n, BLOCK_N, BLOCK_DV)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP_ON:
            ds = ds * (1.0 - cap * cap)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_kernel_tma(Q, K, V, DO, DQ, LSE, DELTA, DOC, sdb, sm_scale, softcap, window, T, S, HQ, GROUP,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, WINDOW_ON: tl.constexpr,
                   HAS_DOC: tl.constexpr, SOFTCAP_ON: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (query tile, batch x query head); Q and dO stay in shared memory."""
    pid_bh, b, h, hk, m0, offs_m, qpos = _query_tile(HQ, GROUP, T, S, BLOCK_M)
    q = _tile(Q, b, h, m0, BLOCK_M, BLOCK_D)
    do = _tile(DO, b, h, m0, BLOCK_M, BLOCK_DV)
    row = pid_bh.to(tl.int64) * T + offs_m
    lse = tl.load(LSE + row, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + row, mask=offs_m < T, other=0.0)
    doc_ptr, doc_q = _query_docs(DOC, sdb, b, offs_m, qpos, T, HAS_DOC)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    p0 = m0 + (S - T)  # the tile's first query position
    lo, pre, full, hi = _kv_ranges(p0, p0 + BLOCK_M - 1, S, window, BLOCK_N, CAUSAL, WINDOW_ON, HAS_DOC)
    if WINDOW_ON or HAS_DOC:  # otherwise lo == pre
        dq = _dq_tiles(dq, q, do, lse, delta, K, V, b, hk, doc_ptr, doc_q, qpos, lo, pre, S, window, sm_scale,
                       softcap, BLOCK_N, BLOCK_D, BLOCK_DV, True, CAUSAL, WINDOW_ON, HAS_DOC, SOFTCAP_ON, PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, b, hk, doc_ptr, doc_q, qpos, pre, full, S, window, sm_scale,
                   softcap, BLOCK_N, BLOCK_D, BLOCK_DV, False, CAUSAL, WINDOW_ON, HAS_DOC, SOFTCAP_ON, PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, b, hk, doc_ptr, doc_q, qpos, full, hi, S, window, sm_scale,
                   softcap, BLOCK_N, BLOCK_D, BLOCK_DV, True, CAUSAL, WINDOW_ON, HAS_DOC, SOFTCAP_ON, PRECISION)
    DQ.store([b, h, m0, 0], (dq * sm_scale).to(DQ.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))


# Which descriptor argument tiles rows by BLOCK_M or BLOCK_N, and columns by BLOCK_D or BLOCK_DV.
_BOXES = {"Q": ("BLOCK_M", "BLOCK_D"), "DO": ("BLOCK_M", "BLOCK_DV"), "O": ("BLOCK_M", "BLOCK_DV"),
          "DQ": ("BLOCK_M", "BLOCK_D"), "K": ("BLOCK_N", "BLOCK_D"), "V": ("BLOCK_N", "BLOCK_DV"),
          "DK": ("BLOCK_N", "BLOCK_D"), "DV_": ("BLOCK_N", "BLOCK_DV"), "DQACC": ("BLOCK_M", "BLOCK_D")}


def _set_blocks(nargs):
    """Give each descriptor the box of the config about to run (host descriptors carry their box)."""
    for name, (rows, cols) in _BOXES.items():
        if name in nargs:
            nargs[name].block_shape = [1, 1, nargs[rows], nargs[cols]]


class _BoxedKernel:
    """A jit kernel launched only after `_set_blocks` (the launcher passes every argument by name)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(**kwargs):
            _set_blocks(kwargs)
            return self.kernel[grid](**kwargs)
        return launch


class DescTunable(Tunable):
    """`Tunable` for a kernel with descriptor arguments: every path (interpreter, forced config,
    first fitting config, autotuning) sets the descriptors' boxes from the config that runs."""

    def __init__(self, kernel, configs, key, fixed, reset_to_zero=None):
        super().__init__(_BoxedKernel(kernel), configs, key, fixed, reset_to_zero)

    def _tuned(self):
        if self._autotuned is None:
            cfgs = [triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                                  num_warps=c.get("num_warps", 4), num_stages=c.get("num_stages", 2),
                                  pre_hook=_set_blocks) for c in self.configs]
            self._autotuned = triton.autotune(configs=cfgs, key=self.key,
                                              reset_to_zero=self.reset_to_zero)(self.kernel.kernel)
        return self._autotuned


def _cfg(m, n, warps, stages):
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)


# Hopper candidates (first = the default when tuning is off): the per-kernel winners of
# `benchmarks/kernels_attention.py --sweep` (kernels "fwd_tma", "dkdv_tma", "dq_tma") at
# B x 16 x {2048, 4096, 8192, 16384} x 128 and B x 32 x {1024, 2048} x 64 on an H100 (2026-11-26).
_KEY = ["T", "S", "BLOCK_D", "BLOCK_DV", "CAUSAL", "WINDOW_ON", "HAS_DOC", "SOFTCAP_ON"]
_FIXED = dict(BLOCK_M=16, BLOCK_N=16)  # under the interpreter: tiny tiles keep CPU tests fast
FWD_TMA = DescTunable(_fwd_kernel_tma, [_cfg(128, 128, 8, 3), _cfg(128, 64, 8, 3), _cfg(128, 32, 4, 4),
                                        _cfg(128, 64, 4, 3)], _KEY, _FIXED)
DKDV_TMA = DescTunable(_dkdv_kernel_tma, [_cfg(64, 128, 8, 2), _cfg(64, 128, 8, 3), _cfg(32, 64, 4, 4),
                                          _cfg(64, 64, 4, 3)], _KEY + ["ATOMIC_DQ"], _FIXED,
                       reset_to_zero=["DQ_PTR"])
DQ_TMA = DescTunable(_dq_kernel_tma, [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 2), _cfg(128, 32, 4, 3)], _KEY,
                     _FIXED)


def usable(*tensors: torch.Tensor) -> bool:
    """True when every tensor, and a contiguous tensor of its last dim (the outputs O, dQ, dK, dV),
    can be described for TMA, and the device has it."""
    if TensorDescriptor is None:
        return False
    if not interpreting():
        if tensors[0].device.type != "cuda" or torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
            return False
        if tensors[0].dtype not in (torch.float16, torch.bfloat16):  # fp32 (exact ieee dot) stays on pointers
            return False
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in (*t.stride()[:-1], t.shape[-1])):
            return False
    return True


def _descs(**tensors):
    """4-D descriptors with the tensors' own shapes and strides (boxes are set per config at launch)."""
    return {name: TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, 16]) for name, t in tensors.items()}


def _shared_args(doc, meta, scalars, strides, HQ, HKV):
    """The arguments every kernel here takes besides its tensors (from `flash_attention_triton._common`)."""
    return dict(DOC=doc, sdb=strides[-1], sm_scale=scalars[0], softcap=scalars[1], window=scalars[2], T=scalars[3],
                S=scalars[4], HQ=HQ, GROUP=HQ // HKV, BLOCK_D=meta["BLOCK_D"], BLOCK_DV=meta["BLOCK_DV"],
                CAUSAL=meta["CAUSAL"], WINDOW_ON=meta["WINDOW_ON"], HAS_DOC=meta["HAS_DOC"],
                SOFTCAP_ON=meta["SOFTCAP_ON"], PRECISION=meta["PRECISION"])


def forward(q, k, v, *, causal, window, softcap, scale, doc_ids):
    """Same contract as `flash_attention_triton.forward`; call only when `usable(q, k, v)`."""
    B, HQ, HKV, T, S, D, DV, doc, meta, scalars, strides = _common(q, k, v, softcap, scale, window, doc_ids)
    meta["CAUSAL"] = causal
    out = torch.empty(B, HQ, T, DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, HQ, T, device=q.device, dtype=torch.float32)
    grid = lambda m: (B * HQ, triton.cdiv(T, m["BLOCK_M"]))
    FWD_TMA[grid](**_descs(Q=q, K=k, V=v, O=out), LSE=lse, **_shared_args(doc, meta, scalars, strides, HQ, HKV))
    return out, lse


def dkdv(q, k, v, dout, lse, delta, dk, dv, doc, meta, scalars, strides, dq_acc=None):
    """The dK/dV kernel into dk, dv; arguments as prepared by `flash_attention_triton.backward`.
    With `dq_acc` (zeroed fp32 [B, HQ, T, BLOCK_D]) it also adds dS K into it: dQ = dq_acc * scale."""
    B, HQ, HKV, S = q.shape[0], q.shape[1], k.shape[1], k.shape[2]
    atomic = dq_acc is not None
    if not atomic:  # never touched: any fp32 tensor of the right rank will do
        dq_acc = torch.empty(1, 1, 1, meta["BLOCK_D"], device=q.device, dtype=torch.float32)
    grid = lambda m: (B * HKV, triton.cdiv(S, m["BLOCK_N"]))
    DKDV_TMA[grid](**_descs(Q=q, K=k, V=v, DO=dout, DK=dk, DV_=dv, DQACC=dq_acc), DQ_PTR=dq_acc, LSE=lse,
                   DELTA=delta, HKV=HKV, ATOMIC_DQ=atomic, TMA_REDUCE=not interpreting(),
                   **_shared_args(doc, meta, scalars, strides, HQ, HKV))


def dq(q, k, v, dout, lse, delta, dq_out, doc, meta, scalars, strides):
    """The dQ kernel into dq_out."""
    B, HQ, HKV, T = q.shape[0], q.shape[1], k.shape[1], q.shape[2]
    grid = lambda m: (B * HQ, triton.cdiv(T, m["BLOCK_M"]))
    DQ_TMA[grid](**_descs(Q=q, K=k, V=v, DO=dout, DQ=dq_out), LSE=lse, DELTA=delta,
                 **_shared_args(doc, meta, scalars, strides, HQ, HKV))
