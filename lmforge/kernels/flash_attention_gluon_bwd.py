"""A warp-specialised FlashAttention backward for Hopper (sm_90) in Gluon (Triton 3.6's low-level dialect).

Same contract as the dK/dV (+dQ) half of `flash_attention_triton.backward`: it consumes the
forward's base-2 log-sum-exp and `delta = rowsum(dO * O)` (the Triton preprocessing kernel) and
covers the common case only: causal or not, no window, doc_ids or softcap, fp16/bf16, head dims 64
or 128 (value head dim equal), GQA (dK/dV summed over the query heads of a kv head), S >= T when
causal. `unusable_reason` says when it does not apply; `flash_attention_triton.backward` then runs
the Triton kernels, which stay the CPU-tested reference.

Structure (FlashAttention-3's): one program per (key tile of CONSUMERS x 64 keys, batch x kv head).
- a loader partition (1 warp, 24 registers) puts each consumer's K and V rows into shared memory
  once, then streams the Q and dO tiles of every query head of the group by TMA through a ring of
  NUM_STAGES slots ("ready" mbarrier: TMA done; "empty": every consumer released the slot);
- CONSUMERS partitions of one warpgroup each own 64 keys (their dK, dV accumulators stay in
  registers) and share the Q/dO tiles. Per query tile each computes, with asynchronous wgmma,
  S^T = K Q^T and dP^T = V dO^T (both issued before either is awaited), P^T = exp2(S^T c - lse),
  dV += P^T dO (P^T from registers), dS^T = P^T (dP^T - delta), and, through a shared-memory copy
  of dS^T, dK += dS^T Q and (ATOMIC_DQ) dQ_part = dS K, added into an fp32 dQ buffer: 5 matmuls per
  tile pair, where the Triton backward (dK/dV kernel + dQ kernel) does 7. Without ATOMIC_DQ it
  computes dK and dV only (4 matmuls) and the caller runs the Triton dQ kernel: deterministic,
  like the default Triton backward.
- dQ goes into the fp32 buffer by TMA reduce-add from shared memory (Triton 3.6's Gluon builds the
  op but has no Python wrapper: `_tma_reduce_add`), or per element with atomics (a config kept for
  comparison); either way the last bits of dQ vary run to run, as with `deterministic=False` in the
  Triton path. DQ_SHARED (D 128; compiled offline, not yet run on a GPU): the two consumers share
  dS^T through shared memory (an mbarrier pair) and each reduce-adds half of dQ's columns over all
  128 keys, half the reduce traffic.
Measured on an H100 (docs/benchmarks.md): the dK/dV-only form is as fast as the Triton backward's
dK/dV kernel, the 5-matmul form slower (its dQ reduction), so the dispatcher's switches are off.

It does not run anywhere but a Hopper GPU (Gluon kernels have no interpreter mode);
tests/kernels/test_gluon_backward.py checks it on the GPU against the fp32 spec and the Triton
backward.
"""

from __future__ import annotations

import torch
import triton

from lmforge.kernels import flash_attention_gluon as _fwd

IMPORT_ERROR = _fwd.IMPORT_ERROR
if IMPORT_ERROR is None:
    try:  # the TMA reduce-add is reached through the IR builder (no Python wrapper in 3.6): check it exists
        from triton._C.libtriton import gluon_ir, ir

        _REDUCE_ADD = ir.DESCRIPTOR_REDUCE_KIND.ADD
        assert hasattr(gluon_ir.GluonOpBuilder, "create_async_tma_reduce")
    except Exception as e:  # noqa: BLE001
        IMPORT_ERROR = f"this Triton's Gluon builds no TMA reduce-add ({type(e).__name__}: {e})"
if IMPORT_ERROR is None:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language._core import builtin
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    _tma_load = _fwd._tma_load

    @builtin
    def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
        """global[coord box] += shared src, by the TMA unit (cp.reduce.async.bulk.tensor .add). Triton 3.6's
        Gluon builds the op (AsyncTMAReduceOp) but has no Python wrapper for it; `tma.store_wait` waits
        for it like for a TMA store."""
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(_REDUCE_ADD, tensor_desc.handle, coord, src.handle)

    @gluon.jit
    def _loader(k_desc, v_desc, q_desc, do_desc, k_bufs, v_bufs, q_bufs, do_bufs, bars, b, hk, k0, GROUP, m_lo,
                n_m, NUM_STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
        """One warp: K and V rows of every consumer once, then (Q, dO) tile it into slot it % NUM_STAGES as
        soon as every consumer has released the slot."""
        kv_bar, q_ready, q_empty, do_ready, do_empty, ds_ready, ds_free = bars
        ROWS: gl.constexpr = k_desc.block_type.shape[2]
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[2]
        mbarrier.expect(kv_bar, CONSUMERS * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
        for i in gl.static_range(CONSUMERS):
            _tma_load(k_desc, [b, hk, k0 + i * ROWS, 0], kv_bar, k_bufs.index(i))
            _tma_load(v_desc, [b, hk, k0 + i * ROWS, 0], kv_bar, v_bufs.index(i))
        for it in range(GROUP * n_m):
            h = hk * GROUP + it // n_m
            m = (m_lo + it % n_m) * BLOCK_M
            slot = it % NUM_STAGES
            phase = (it // NUM_STAGES) & 1
            # a fresh mbarrier counts as having completed phase 1: the first round does not wait
            mbarrier.wait(q_empty.index(slot), phase ^ 1)
            mbarrier.expect(q_ready.index(slot), q_desc.block_type.nbytes)
            _tma_load(q_desc, [b, h, m, 0], q_ready.index(slot), q_bufs.index(slot))
            mbarrier.wait(do_empty.index(slot), phase ^ 1)
            mbarrier.expect(do_ready.index(slot), do_desc.block_type.nbytes)
            _tma_load(do_desc, [b, h, m, 0], do_ready.index(slot), do_bufs.index(slot))

    @gluon.jit
    def _mask_tile(pT, m, kw0, T, S, s_layout: gl.constexpr, CAUSAL: gl.constexpr, ROWS: gl.constexpr,
                   BLOCK_M: gl.constexpr):
        """Zero P^T where the key is past S or (CAUSAL) after the query; only tiles that need it come here.
        Query rows past T already have p = 0 (their lse is +inf)."""
        kpos = kw0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
        vis = kpos[:, None] < S
        if CAUSAL:
            qpos = m + (S - T) + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
            vis = vis & (kpos[:, None] <= qpos[None, :])
        return gl.where(vis, pT, 0.0)

    @gluon.jit
    def _consumer(k_bufs, v_bufs, q_bufs, do_bufs, ds_bufs, dq_bufs, bars, LSE, DELTA, DQ, dq_desc, DK, DV, pid_kv,
                  b, hk, k0, T, S, HQ, GROUP, m_lo, n_m, sm_scale, WG: gl.constexpr, CAUSAL: gl.constexpr,
                  NUM_STAGES: gl.constexpr, ATOMIC_DQ: gl.constexpr, DQ_SPLIT: gl.constexpr, DQ_TMA: gl.constexpr,
                  DQ_SHARED: gl.constexpr):
        """Consumer WG: keys k0 + WG*64 .. +64 against every query tile of the kv head's query heads."""
        kv_bar, q_ready, q_empty, do_ready, do_empty, ds_ready, ds_free = bars
        ROWS: gl.constexpr = k_bufs.shape[3]
        BLOCK_D: gl.constexpr = k_bufs.shape[4]
        BLOCK_M: gl.constexpr = q_bufs.shape[3]
        DQ_N: gl.constexpr = BLOCK_D // DQ_SPLIT
        dtype: gl.constexpr = q_bufs.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_M, 16])
        d_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_D, 16])
        q_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, DQ_N, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=d_layout, k_width=2)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)

        kw0 = k0 + WG * ROWS
        c = sm_scale * 1.4426950408889634  # scores -> base-2 logits, as in the forward's lse
        k_smem = k_bufs.index(WG).reshape([ROWS, BLOCK_D])
        v_smem = v_bufs.index(WG).reshape([ROWS, BLOCK_D])
        ds_smem = ds_bufs.index(WG)
        dk = gl.zeros([ROWS, BLOCK_D], gl.float32, layout=d_layout)
        dv = gl.zeros([ROWS, BLOCK_D], gl.float32, layout=d_layout)
        s_zero = gl.zeros([ROWS, BLOCK_M], gl.float32, layout=s_layout)
        dq_zero = gl.zeros([BLOCK_M, DQ_N], gl.float32, layout=q_layout)
        # query tiles that start at or after the consumer's last key (and keys all < S) need no mask
        if CAUSAL:
            m_full = kw0 + ROWS - 1 - (S - T)
        else:
            m_full = 0

        mbarrier.wait(kv_bar, 0)
        for it in range(GROUP * n_m):
            h = hk * GROUP + it // n_m
            m = (m_lo + it % n_m) * BLOCK_M
            slot = it % NUM_STAGES
            phase = (it // NUM_STAGES) & 1
            row0 = (b * HQ + h).to(gl.int64) * T
            offs_m = m + gl.arange(0, BLOCK_M, layout=col_s)
            lse = gl.load(LSE + row0 + offs_m, mask=offs_m < T, other=float("inf"))
            delta = gl.load(DELTA + row0 + offs_m, mask=offs_m < T, other=0.0)
            q_smem = q_bufs.index(slot).reshape([BLOCK_M, BLOCK_D])
            do_smem = do_bufs.index(slot).reshape([BLOCK_M, BLOCK_D])

            mbarrier.wait(q_ready.index(slot), phase)
            sT = warpgroup_mma(k_smem, q_smem.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            mbarrier.wait(do_ready.index(slot), phase)
            dpT = warpgroup_mma(v_smem, do_smem.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            sT = warpgroup_mma_wait(1, deps=(sT,))  # dP^T may still run
            pT = gl.exp2(sT * c - lse[None, :])
            if (kw0 + ROWS > S) | (m < m_full):
                pT = _mask_tile(pT, m, kw0, T, S, s_layout, CAUSAL, ROWS, BLOCK_M)
            pa = gl.convert_layout(pT.to(dtype), a_layout)
            dv = warpgroup_mma(pa, do_smem, dv, is_async=True)
            # dV's wgmma completes here too: P^T's registers are free before dS^T needs its own
            dpT, dv, pa = warpgroup_mma_wait(0, deps=(dpT, dv, pa))
            dsT = pT * (dpT - delta[None, :])
            if DQ_SHARED:  # the other consumer's dQ matmul has read this half of the previous tile's dS^T
                mbarrier.wait(ds_free, (it & 1) ^ 1)
            ds_smem.store(dsT.to(dtype))
            fence_async_shared()
            if DQ_SHARED:
                mbarrier.arrive(ds_ready, count=1)
            dk = warpgroup_mma(ds_smem, q_smem, dk, is_async=True)
            if DQ_SHARED:
                # dQ[:, this consumer's D/2 columns] = dS [BLOCK_M x both consumers' keys] K[those keys, columns]:
                # one [BLOCK_M, D/2] partial per consumer, half the reduce traffic of a partial per key half
                tma.store_wait(0)
                mbarrier.wait(ds_ready, it & 1)
                C0: gl.constexpr = WG * DQ_N
                dq = warpgroup_mma(ds_bufs.index(0).permute((1, 0)),
                                   k_bufs.index(0).reshape([ROWS, BLOCK_D]).slice(C0, DQ_N, dim=1), dq_zero,
                                   use_acc=False, is_async=True)
                dq = warpgroup_mma(ds_bufs.index(1).permute((1, 0)),
                                   k_bufs.index(1).reshape([ROWS, BLOCK_D]).slice(C0, DQ_N, dim=1), dq, is_async=True)
                dq = warpgroup_mma_wait(0, deps=(dq,))
                mbarrier.arrive(ds_free, count=1)
                dq_smem = dq_bufs.index(WG)
                dq_smem.store(dq.reshape([1, 1, BLOCK_M, DQ_N]))
                fence_async_shared()
                _tma_reduce_add(dq_desc, [b, h, m, C0], dq_smem)
            elif ATOMIC_DQ and DQ_TMA:
                tma.store_wait(0)  # the last tile's reduce-adds have read their staging buffers
                for half in gl.static_range(DQ_SPLIT):
                    dq = warpgroup_mma(ds_smem.permute((1, 0)), k_smem.slice(half * DQ_N, DQ_N, dim=1), dq_zero,
                                       use_acc=False, is_async=True)
                    dq = warpgroup_mma_wait(0, deps=(dq,))
                    dq_smem = dq_bufs.index(WG * DQ_SPLIT + half)
                    dq_smem.store(dq.reshape([1, 1, BLOCK_M, DQ_N]))
                    fence_async_shared()
                    _tma_reduce_add(dq_desc, [b, h, m, half * DQ_N], dq_smem)  # rows past T are clipped
            elif ATOMIC_DQ:
                dq_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_layout))
                dq_mask = (m + dq_rows)[:, None] < T
                dq_tile = DQ + (row0 + m) * BLOCK_D  # a scalar pointer and int32 offsets: fewer registers
                for half in gl.static_range(DQ_SPLIT):
                    dq = warpgroup_mma(ds_smem.permute((1, 0)), k_smem.slice(half * DQ_N, DQ_N, dim=1), dq_zero,
                                       use_acc=False, is_async=True)
                    dq = warpgroup_mma_wait(0, deps=(dq,))
                    cols = half * DQ_N + gl.arange(0, DQ_N, layout=gl.SliceLayout(0, q_layout))
                    gl.atomic_add(dq_tile + (dq_rows[:, None] * BLOCK_D + cols[None, :]), dq, mask=dq_mask,
                                  sem="relaxed")
            dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
            mbarrier.arrive(q_empty.index(slot), count=1)
            mbarrier.arrive(do_empty.index(slot), count=1)

        rows_n = gl.arange(0, ROWS, layout=gl.SliceLayout(1, d_layout))
        cols_d = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, d_layout))
        base = (pid_kv.to(gl.int64) * S + kw0) * BLOCK_D  # a scalar 64-bit base and int32 offsets: fewer registers
        out = rows_n[:, None] * BLOCK_D + cols_d[None, :]
        nmask = (kw0 + rows_n)[:, None] < S
        gl.store(DK + base + out, (dk * sm_scale).to(dtype), mask=nmask)
        gl.store(DV + base + out, dv.to(dtype), mask=nmask)
        if ATOMIC_DQ and DQ_TMA:
            tma.store_wait(0)

    @gluon.jit
    def _bwd_kernel(k_desc, v_desc, q_desc, do_desc, dq_desc, LSE, DELTA, DQ, DK, DV, sm_scale, T, S, HQ, HKV, GROUP,
                    CAUSAL: gl.constexpr, NUM_STAGES: gl.constexpr, CONSUMERS: gl.constexpr,
                    CONSUMER_REGS: gl.constexpr, ATOMIC_DQ: gl.constexpr, DQ_SPLIT: gl.constexpr,
                    DQ_TMA: gl.constexpr, DQ_SHARED: gl.constexpr, DS_LAYOUT: gl.constexpr):
        """One program per (key tile of CONSUMERS x 64 keys, batch x kv head); the first key tiles (the most
        query tiles under a causal mask) start first."""
        ROWS: gl.constexpr = k_desc.block_type.shape[2]
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[2]
        pid_kv = gl.program_id(0)
        b = pid_kv // HKV
        hk = pid_kv % HKV
        k0 = gl.program_id(1) * (CONSUMERS * ROWS)
        if CAUSAL:  # the first query whose position (offset S - T) reaches the tile's first key
            m_lo = gl.maximum(k0 - (S - T), 0) // BLOCK_M
        else:
            m_lo = 0
        n_m = gl.cdiv(T, BLOCK_M) - m_lo

        k_bufs = gl.allocate_shared_memory(k_desc.dtype, [CONSUMERS] + k_desc.block_type.shape, k_desc.layout)
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [CONSUMERS] + v_desc.block_type.shape, v_desc.layout)
        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [NUM_STAGES] + q_desc.block_type.shape, q_desc.layout)
        do_bufs = gl.allocate_shared_memory(do_desc.dtype, [NUM_STAGES] + do_desc.block_type.shape, do_desc.layout)
        ds_bufs = gl.allocate_shared_memory(q_desc.dtype, [CONSUMERS, ROWS, BLOCK_M], DS_LAYOUT)
        if DQ_SHARED:  # fp32 staging of each consumer's dQ columns for the TMA reduce-add
            dq_bufs = gl.allocate_shared_memory(gl.float32, [CONSUMERS] + dq_desc.block_type.shape, dq_desc.layout)
        elif ATOMIC_DQ and DQ_TMA:  # the same, per consumer and dQ column block
            dq_bufs = gl.allocate_shared_memory(gl.float32, [CONSUMERS * DQ_SPLIT] + dq_desc.block_type.shape,
                                                dq_desc.layout)
        else:
            dq_bufs = gl.allocate_shared_memory(gl.float32, [1, 1, 1, 8, 32], dq_desc.layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        do_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        do_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        ds_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ds_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        mbarrier.init(ds_ready, count=CONSUMERS)  # DQ_SHARED: each consumer's dS^T half is in shared memory
        mbarrier.init(ds_free, count=CONSUMERS)  # DQ_SHARED: each consumer's dQ matmul has read both halves
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=CONSUMERS)  # each consumer releases each slot once
            mbarrier.init(do_ready.index(i), count=1)
            mbarrier.init(do_empty.index(i), count=CONSUMERS)
        bars = (kv_bar, q_ready, q_empty, do_ready, do_empty, ds_ready, ds_free)
        if CONSUMERS == 1:
            gl.warp_specialize([
                (_consumer, (k_bufs, v_bufs, q_bufs, do_bufs, ds_bufs, dq_bufs, bars, LSE, DELTA, DQ, dq_desc, DK, DV,
                             pid_kv, b, hk, k0, T, S, HQ, GROUP, m_lo, n_m, sm_scale, 0, CAUSAL, NUM_STAGES, ATOMIC_DQ,
                             DQ_SPLIT, DQ_TMA, DQ_SHARED)),
                (_loader, (k_desc, v_desc, q_desc, do_desc, k_bufs, v_bufs, q_bufs, do_bufs, bars, b, hk, k0, GROUP,
                           m_lo, n_m, NUM_STAGES, CONSUMERS)),
            ], [1], [24])
        else:
            gl.warp_specialize([
                (_consumer, (k_bufs, v_bufs, q_bufs, do_bufs, ds_bufs, dq_bufs, bars, LSE, DELTA, DQ, dq_desc, DK, DV,
                             pid_kv, b, hk, k0, T, S, HQ, GROUP, m_lo, n_m, sm_scale, 0, CAUSAL, NUM_STAGES, ATOMIC_DQ,
                             DQ_SPLIT, DQ_TMA, DQ_SHARED)),
                (_consumer, (k_bufs, v_bufs, q_bufs, do_bufs, ds_bufs, dq_bufs, bars, LSE, DELTA, DQ, dq_desc, DK, DV,
                             pid_kv, b, hk, k0, T, S, HQ, GROUP, m_lo, n_m, sm_scale, 1, CAUSAL, NUM_STAGES, ATOMIC_DQ,
                             DQ_SPLIT, DQ_TMA, DQ_SHARED)),
                (_loader, (k_desc, v_desc, q_desc, do_desc, k_bufs, v_bufs, q_bufs, do_bufs, bars, b, hk, k0, GROUP,
                           m_lo, n_m, NUM_STAGES, CONSUMERS)),
            ], [4, 1], [CONSUMER_REGS, 24])


HEAD_DIMS = (64, 128)

# (BLOCK_M query rows per tile, NUM_STAGES, CONSUMERS, DQ_SPLIT, DQ_TMA, DQ_SHARED) by head dim: two
# consumers of 64 keys each (a 128-key tile), 64-row query tiles, dQ in DQ_SPLIT column blocks; DQ_TMA:
# atomic dQ by TMA reduce-add from shared memory (else per-element atomics, kept for comparison);
# DQ_SHARED (D 128, two consumers, DQ_SPLIT 2): the consumers share dS^T and each computes and
# reduce-adds half of dQ's columns over all 128 keys (half the traffic; not yet run on a GPU).
DEFAULT_CONFIG = {64: (64, 2, 2, 1, 1, 0), 128: (64, 2, 2, 2, 1, 0)}
CONSUMER_REGS = 240


def unusable_reason(q, k, v, dout, *, window=None, softcap=None, doc_ids=None) -> str | None:
    """None when this kernel can compute dK, dV (and dQ) for these inputs; else why not (one line)."""
    reason = _fwd.unusable_reason(q, k, v, window=window, softcap=softcap, doc_ids=doc_ids)
    if reason is not None:
        return reason
    if dout.stride(-1) != 1 or dout.data_ptr() % 16 or any(s * dout.element_size() % 16 for s in dout.stride()[:-1]):
        return "dout's strides or base pointer are not 16-byte aligned for TMA"
    return None


def dkdv(q, k, v, dout, lse, delta, *, causal, scale, atomic_dq, config=None):
    """(dq or None, dk, dv): dK and dV in k's dtype; with atomic_dq also dQ (q's dtype) from the same pass.

    Call only when `unusable_reason` is None. `delta` [B,Hq,T] fp32 = rowsum(dO * O); `lse` the
    forward's base-2 log-sum-exp. `config`: (BLOCK_M, NUM_STAGES, CONSUMERS, DQ_SPLIT, DQ_TMA, DQ_SHARED) instead of the
    default (benchmarks, tests)."""
    B, HQ, T, D = q.shape
    HKV, S = k.shape[1], k.shape[2]
    BLOCK_M, stages, consumers, dq_split, dq_tma, dq_shared = config or DEFAULT_CONFIG[D]
    dq_shared = bool(dq_shared and atomic_dq)
    if dq_shared and (consumers != 2 or dq_split != 2 or D != 128):
        raise ValueError(f"dq_shared needs two consumers and dq_split 2 at D 128; got config {config}")
    rows = 64
    dk = torch.empty(B, HKV, S, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, HKV, S, D, device=q.device, dtype=v.dtype)
    # without atomic_dq the kernel never touches dq_acc; a small buffer still makes a valid descriptor
    dq_acc = torch.zeros(B, HQ, T, D, device=q.device, dtype=torch.float32) if atomic_dq else \
        torch.empty(1, 1, BLOCK_M, D, device=q.device, dtype=torch.float32)
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16

    def desc(t, n, cols=D, dtype=gdt):
        box = [1, 1, n, cols]
        return TensorDescriptor(t, list(t.shape), list(t.stride()), box,
                                gl.NVMMASharedLayout.get_default_for(box, dtype))

    grid = (B * HKV, triton.cdiv(S, consumers * rows))
    _bwd_kernel[grid](desc(k, rows), desc(v, rows), desc(q, BLOCK_M), desc(dout, BLOCK_M),
                      desc(dq_acc, BLOCK_M, D // dq_split, gl.float32), lse, delta, dq_acc, dk, dv,
                      float(scale), T, S, HQ, HKV, HQ // HKV, CAUSAL=bool(causal), NUM_STAGES=stages,
                      CONSUMERS=consumers, CONSUMER_REGS=CONSUMER_REGS, ATOMIC_DQ=bool(atomic_dq),
                      DQ_SPLIT=dq_split, DQ_TMA=bool(dq_tma), DQ_SHARED=dq_shared,
                      DS_LAYOUT=gl.NVMMASharedLayout.get_default_for([rows, BLOCK_M], gdt), num_warps=4)
    dq = (dq_acc * scale).to(q.dtype) if atomic_dq else None
    return dq, dk, dv
