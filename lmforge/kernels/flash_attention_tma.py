"""FlashAttention-2 forward kernel that reads Q/K/V and writes O through tensor descriptors (TMA).

Same algorithm, masks and outputs (O and the base-2 LSE) as `_fwd_kernel` in
`flash_attention_triton`, whose range helpers it reuses; only the memory access differs. Each of
Q, K, V, O is described once on the host as a 4-D `TensorDescriptor` [B, H, T, D] with its real
strides, so a tile load is one bulk copy (on Hopper: the TMA engine, completing on an mbarrier)
instead of per-thread address arithmetic and `cp.async`; rows past T (or S) and columns past D read
as zeros and are not written, so no load or store needs a mask. That frees about a third of the
registers of the pointer kernel (offline sm_90 compile with Triton 3.6: 164 instead of 252 per
thread at 128x64 tiles, D=128; 127 instead of 173 at D=64, which lets two programs share an SM).

Scores are not pre-scaled: Q goes straight from shared memory into the tensor cores (both wgmma
operands in shared memory), and scale * log2(e) is applied in the exp2 argument (one FMA per
score) and to the row maximum (scale > 0, so max(s) * c = max(s * c)).

It runs where TMA can describe the tensors (`usable`): 16-byte aligned base pointers and strides,
unit stride in the head dimension, on a GPU of compute capability >= 9 (or under the interpreter,
which emulates descriptors, for the CPU tests); otherwise the pointer kernel runs. It does not do
the backward pass (the pointer kernels in `flash_attention_triton` do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmforge.kernels.flash_attention_triton import _common, _kv_ranges, _tanh, _visible
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
def _fwd_kernel_tma(Q, K, V, O, LSE, DOC, sdb, sm_scale, softcap, window, T, S, HQ, GROUP,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr,
                    WINDOW_ON: tl.constexpr, HAS_DOC: tl.constexpr, SOFTCAP_ON: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # heaviest (last) query tiles first
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    off = S - T
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    qpos = offs_m + off
    q = _tile(Q, b, h, m0, BLOCK_M, BLOCK_D)
    doc_ptr = DOC + b.to(tl.int64) * sdb
    doc_q = qpos
    if HAS_DOC:
        doc_q = tl.load(doc_ptr + qpos, mask=offs_m < T, other=-2)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: fully masked tiles give p = 0, not NaN
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    p0 = m0 + off
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


def _set_blocks(nargs):
    """Give each descriptor the box of the config about to run (host descriptors carry their box)."""
    bm, bn, bd, bdv = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_D"], nargs["BLOCK_DV"]
    nargs["Q"].block_shape = [1, 1, bm, bd]
    nargs["K"].block_shape = [1, 1, bn, bd]
    nargs["V"].block_shape = [1, 1, bn, bdv]
    nargs["O"].block_shape = [1, 1, bm, bdv]


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

    def __init__(self, kernel, configs, key, fixed):
        super().__init__(_BoxedKernel(kernel), configs, key, fixed)

    def _tuned(self):
        if self._autotuned is None:
            cfgs = [triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                                  num_warps=c.get("num_warps", 4), num_stages=c.get("num_stages", 2),
                                  pre_hook=_set_blocks) for c in self.configs]
            self._autotuned = triton.autotune(configs=cfgs, key=self.key)(self.kernel.kernel)
        return self._autotuned


def _cfg(m, n, warps, stages):
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)


# Hopper candidates (first = the default when tuning is off), timed by
# `benchmarks/kernels_attention.py --sweep` (kernel "fwd_tma").
FWD_TMA = DescTunable(_fwd_kernel_tma, [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 2), _cfg(128, 64, 8, 2),
                                        _cfg(128, 32, 4, 4), _cfg(64, 64, 4, 3)],
                      ["T", "S", "BLOCK_D", "BLOCK_DV", "CAUSAL", "WINDOW_ON", "HAS_DOC", "SOFTCAP_ON"],
                      dict(BLOCK_M=16, BLOCK_N=16))


def usable(*tensors: torch.Tensor) -> bool:
    """True when every tensor can be described for TMA (and the device has it)."""
    if TensorDescriptor is None:
        return False
    if not interpreting():
        if tensors[0].device.type != "cuda" or torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
            return False
        if tensors[0].dtype not in (torch.float16, torch.bfloat16):  # fp32 (exact ieee dot) stays on pointers
            return False
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[:-1]):
            return False
    return True


def forward(q, k, v, *, causal, window, softcap, scale, doc_ids):
    """Same contract as `flash_attention_triton.forward`; call only when `usable(q, k, v, out)`."""
    B, HQ, HKV, T, S, D, DV, doc, meta, scalars, strides = _common(q, k, v, softcap, scale, window, doc_ids)
    out = torch.empty(B, HQ, T, DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, HQ, T, device=q.device, dtype=torch.float32)
    descs = {name: TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, 16])
             for name, t in (("Q", q), ("K", k), ("V", v), ("O", out))}
    grid = lambda m: (B * HQ, triton.cdiv(T, m["BLOCK_M"]))
    FWD_TMA[grid](**descs, LSE=lse, DOC=doc, sdb=strides[-1], sm_scale=scalars[0], softcap=scalars[1],
                  window=scalars[2], T=T, S=S, HQ=HQ, GROUP=HQ // HKV, BLOCK_D=meta["BLOCK_D"],
                  BLOCK_DV=meta["BLOCK_DV"], CAUSAL=causal, WINDOW_ON=meta["WINDOW_ON"], HAS_DOC=meta["HAS_DOC"],
                  SOFTCAP_ON=meta["SOFTCAP_ON"], PRECISION=meta["PRECISION"])
    return out, lse
