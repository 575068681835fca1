"""A warp-specialised FlashAttention forward for Hopper (sm_90) in Gluon (Triton 3.6's low-level dialect).

Same contract as `flash_attention_triton.forward` (O and the base-2 log-sum-exp [B, Hq, T], so the
Triton backward consumes it unchanged), for the common case only: causal or not, no window,
doc_ids or softcap, fp16/bf16, head dims 64 or 128 (value head dim equal), GQA through the kv
head index, S >= T when causal. `unusable_reason` says when it does not apply; the dispatcher in
`flash_attention_triton.forward` then runs the Triton kernels (and uses this one only for the
head dims where it measured faster, `GLUON_HEAD_DIMS` there).

Why it exists: Triton 3.6 on sm_90 waits for each QK^T wgmma before the softmax and has no working
warp specialisation, so the tensor cores idle during every softmax. Gluon exposes the controls
that FlashAttention-3 uses, and this kernel uses them:
- a loader partition (1 warp, 24 registers) streams each consumer's Q rows once, then K and V
  tiles with TMA through a ring of NUM_STAGES shared-memory slots, each with a "ready" mbarrier
  (TMA completion) and an "empty" mbarrier (every consumer has released the slot);
- CONSUMERS partitions of one warpgroup each (4 warps, 64 query rows; the default partition is
  one of them) share the K/V tiles and run independently. Each computes S = Q K^T and O += P V
  with asynchronous wgmma, software-pipelined inside the warpgroup: it issues S_{j+1} = Q K_{j+1}^T
  and O += P_j V_j, waits only for S_{j+1}, runs the softmax of tile j+1 while P_j V_j is still on
  the tensor cores, then waits for it and rescales O. With PINGPONG the two consumers take turns
  issuing their matmuls (an mbarrier pair), so one's softmax overlaps the other's matmuls.
  CONSUMERS = 1 is the first version: one 8-warp default partition whose two warpgroups meet at a
  partition-wide barrier at every mbarrier arrive (kept for comparison in the benchmarks);
- the softmax works in base 2 with scale * log2(e) folded into one multiply-add; only the tiles
  that cross the causal diagonal or the key end S are masked; the output tile goes out through
  the Q buffer with a TMA store.

It does not run anywhere but a Hopper GPU (Gluon kernels have no interpreter mode): the Triton
kernel is the CPU-tested reference, and tests/kernels/test_gluon_attention.py checks this one
on the GPU against the fp32 spec and SDPA.
"""

from __future__ import annotations

import torch
import triton

try:  # Gluon's API moves between Triton versions: anything missing means "not usable"
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # Triton 3.6 names the TMA copies async_copy_global_to_shared / async_copy_shared_to_global;
    # later releases renamed them async_load / async_store (same arguments) and made the old names raise
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    IMPORT_ERROR = None
except Exception as e:  # noqa: BLE001  (any failure: the Triton path runs, with this reason logged)
    IMPORT_ERROR = f"triton.experimental.gluon (Hopper) is not importable ({type(e).__name__}: {e})"

if IMPORT_ERROR is None:

    @gluon.jit
    def _loader(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, bars, b, h, hk, m0, n_tiles,
                BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
        """One warp: each consumer's Q rows once, then K_j and V_j into slot j % NUM_STAGES as soon as
        every consumer has released the slot."""
        q_bars, k_ready, k_empty, v_ready, v_empty, turns = bars
        ROWS: gl.constexpr = q_desc.block_type.shape[2]
        for i in gl.static_range(CONSUMERS):
            mbarrier.expect(q_bars.index(i), q_desc.block_type.nbytes)
            _tma_load(q_desc, [b, h, m0 + i * ROWS, 0], q_bars.index(i), q_bufs.index(i))
        for j in range(n_tiles):
            slot = j % NUM_STAGES
            phase = (j // NUM_STAGES) & 1
            # a fresh mbarrier counts as having completed phase 1: the first round does not wait
            mbarrier.wait(k_empty.index(slot), phase ^ 1)
            mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
            _tma_load(k_desc, [b, hk, j * BLOCK_N, 0], k_ready.index(slot), k_bufs.index(slot))
            mbarrier.wait(v_empty.index(slot), phase ^ 1)
            mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
            _tma_load(v_desc, [b, hk, j * BLOCK_N, 0], v_ready.index(slot), v_bufs.index(slot))

    @gluon.jit
    def _softmax_step(s, m_i, l_i, j, n_full, qpos, S, c, s_layout: gl.constexpr, CAUSAL: gl.constexpr,
                      BLOCK_N: gl.constexpr):
        """Online-softmax update with scores s of key tile j; returns (p, alpha, m, l).

        Tiles j >= n_full are the masked ones: keys past S, and with CAUSAL keys after the query."""
        if j >= n_full:
            kpos = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            vis = kpos[None, :] < S
            if CAUSAL:
                vis = vis & (kpos[None, :] <= qpos[:, None])
            s = gl.where(vis, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * c)
        p = gl.exp2(s * c - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, alpha, m_new, l_i

    @gluon.jit
    def _take_turn(turns, t, WG: gl.constexpr, PINGPONG: gl.constexpr):
        """Ping-pong: consumer WG issues its t-th group of wgmmas only after the other consumer issued its
        previous group, so one warpgroup's softmax runs while the other's matmuls hold the tensor cores."""
        if PINGPONG:  # consumer 0 starts: a fresh mbarrier counts as having completed phase 1
            mbarrier.wait(turns.index(WG), (t & 1) ^ (1 - WG))

    @gluon.jit
    def _pass_turn(turns, WG: gl.constexpr, PINGPONG: gl.constexpr):
        if PINGPONG:
            mbarrier.arrive(turns.index(1 - WG), count=1)

    @gluon.jit
    def _consumer(q_bufs, k_bufs, v_bufs, bars, o_desc, LSE, pid_bh, b, h, m0, T, S, n_tiles, sm_scale,
                  WG: gl.constexpr, WARPS: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                  NUM_STAGES: gl.constexpr, PINGPONG: gl.constexpr):
        """Consumer WG: query rows m0 + WG*ROWS .. +ROWS (ROWS = 64 per warpgroup of its WARPS warps)."""
        q_bars, k_ready, k_empty, v_ready, v_empty, turns = bars
        ROWS: gl.constexpr = q_bufs.shape[3]
        BLOCK_D: gl.constexpr = q_bufs.shape[4]
        BLOCK_DV: gl.constexpr = v_bufs.shape[4]
        dtype: gl.constexpr = q_bufs.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                           instr_shape=[16, BLOCK_DV, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

        r0 = m0 + WG * ROWS
        c = sm_scale * 1.4426950408889634  # scores -> base-2 logits (scale > 0, so max(s)*c = max(s*c))
        offs_m = r0 + gl.arange(0, ROWS, layout=row_s)
        qpos = offs_m + (S - T)
        if CAUSAL:  # unmasked: key tiles wholly at or before this consumer's first query position
            n_full = (r0 + (S - T) + 1) // BLOCK_N
        else:
            n_full = S // BLOCK_N
        m_i = gl.full([ROWS], -1.0e30, gl.float32, layout=row_s)  # finite: masked rows give p = 0
        l_i = gl.full([ROWS], 0.0, gl.float32, layout=row_s)
        acc = gl.zeros([ROWS, BLOCK_DV], gl.float32, layout=o_layout)
        s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
        q_smem = q_bufs.index(WG)
        q = q_smem.reshape([ROWS, BLOCK_D])

        mbarrier.wait(q_bars.index(WG), 0)
        mbarrier.wait(k_ready.index(0), 0)
        _take_turn(turns, 0, WG, PINGPONG)
        s = warpgroup_mma(q, k_bufs.index(0).reshape([BLOCK_N, BLOCK_D]).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
        _pass_turn(turns, WG, PINGPONG)
        s = warpgroup_mma_wait(0, deps=(s,))
        mbarrier.arrive(k_empty.index(0), count=1)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, 0, n_full, qpos, S, c, s_layout, CAUSAL, BLOCK_N)
        for j in range(1, n_tiles):
            slot = j % NUM_STAGES
            prev = (j - 1) % NUM_STAGES
            mbarrier.wait(k_ready.index(slot), (j // NUM_STAGES) & 1)
            mbarrier.wait(v_ready.index(prev), ((j - 1) // NUM_STAGES) & 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            _take_turn(turns, j, WG, PINGPONG)
            s = warpgroup_mma(q, k_bufs.index(slot).reshape([BLOCK_N, BLOCK_D]).permute((1, 0)), s_zero,
                              use_acc=False, is_async=True)
            acc = warpgroup_mma(p_op, v_bufs.index(prev).reshape([BLOCK_N, BLOCK_DV]), acc, is_async=True)
            _pass_turn(turns, WG, PINGPONG)
            s = warpgroup_mma_wait(1, deps=(s,))  # S_j is done; P_{j-1} V_{j-1} may still run
            mbarrier.arrive(k_empty.index(slot), count=1)
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, j, n_full, qpos, S, c, s_layout, CAUSAL, BLOCK_N)
            acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
            mbarrier.arrive(v_empty.index(prev), count=1)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        last = (n_tiles - 1) % NUM_STAGES
        mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // NUM_STAGES) & 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        _take_turn(turns, n_tiles, WG, PINGPONG)
        acc = warpgroup_mma(p_op, v_bufs.index(last).reshape([BLOCK_N, BLOCK_DV]), acc, is_async=True)
        _pass_turn(turns, WG, PINGPONG)
        acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
        mbarrier.arrive(v_empty.index(last), count=1)

        l_i = gl.where(l_i == 0.0, 1.0, l_i)  # only padding rows past T see no key; keep them finite
        gl.store(LSE + pid_bh.to(gl.int64) * T + offs_m, m_i + gl.log2(l_i), mask=offs_m < T)
        out = acc / gl.convert_layout(l_i, row_o)[:, None]
        # every wgmma reading Q has completed: its buffer takes the output rows (D == DV) for the TMA store
        q_smem.store(out.to(dtype).reshape([1, 1, ROWS, BLOCK_DV]))
        fence_async_shared()
        _tma_store(o_desc, [b, h, r0, 0], q_smem)
        tma.store_wait(0)

    @gluon.jit
    def _fwd_kernel(q_desc, k_desc, v_desc, o_desc, LSE, sm_scale, T, S, HQ, GROUP, CAUSAL: gl.constexpr,
                    NUM_STAGES: gl.constexpr, CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                    PINGPONG: gl.constexpr, num_warps: gl.constexpr):
        """One program per (query tile of CONSUMERS x ROWS rows, batch x query head). CONSUMERS == 1: the
        default partition (num_warps = 8: two warpgroups in lockstep) takes all rows; 2: the default
        partition and a worker partition (4 warps each) take 64 rows each and run independently."""
        ROWS: gl.constexpr = q_desc.block_type.shape[2]
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
        pid_bh = gl.program_id(0)
        pid_m = gl.num_programs(1) - 1 - gl.program_id(1)  # heaviest (last) causal tiles first
        b = pid_bh // HQ
        h = pid_bh % HQ
        hk = h // GROUP
        m0 = pid_m * (CONSUMERS * ROWS)
        if CAUSAL:  # keys up to the tile's last query position
            n_tiles = gl.cdiv(gl.minimum(S, m0 + CONSUMERS * ROWS + (S - T)), BLOCK_N)
        else:
            n_tiles = gl.cdiv(S, BLOCK_N)

        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
        k_bufs = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
        q_bars = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(CONSUMERS):
            mbarrier.init(q_bars.index(i), count=1)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=CONSUMERS)  # each consumer releases each slot once
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(v_empty.index(i), count=CONSUMERS)
        turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(turns.index(i), count=1)
        bars = (q_bars, k_ready, k_empty, v_ready, v_empty, turns)
        if CONSUMERS == 1:
            gl.warp_specialize([
                (_consumer, (q_bufs, k_bufs, v_bufs, bars, o_desc, LSE, pid_bh, b, h, m0, T, S, n_tiles, sm_scale,
                             0, num_warps, BLOCK_N, CAUSAL, NUM_STAGES, False)),
                (_loader, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, bars, b, h, hk, m0, n_tiles, BLOCK_N,
                       NUM_STAGES, CONSUMERS)),
            ], [1], [24])
        elif CONSUMERS == 3:
            gl.warp_specialize([
                (_consumer, (q_bufs, k_bufs, v_bufs, bars, o_desc, LSE, pid_bh, b, h, m0, T, S, n_tiles, sm_scale,
                             0, 4, BLOCK_N, CAUSAL, NUM_STAGES, PINGPONG)),
                (_consumer, (q_bufs, k_bufs, v_bufs, bars, o_desc, LSE, pid_bh, b, h, m0, T, S, n_tiles, sm_scale,
                             1, 4, BLOCK_N, CAUSAL, NUM_STAGES, PINGPONG)),
                (_consumer, (q_bufs, k_bufs, v_bufs, bars, o_desc, LSE, pid_bh, b, h, m0, T, S, n_tiles, sm_scale,
                             2, 4, BLOCK_N, CAUSAL, NUM_STAGES, PINGPONG)),
                (_loader, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, bars, b, h, hk, m0, n_tiles, BLOCK_N,
                           NUM_STAGES, CONSUMERS)),
            ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, 24])
        else:
            gl.warp_specialize([
                (_consumer, (q_bufs, k_bufs, v_bufs, bars, o_desc, LSE, pid_bh, b, h, m0, T, S, n_tiles, sm_scale,
                             0, 4, BLOCK_N, CAUSAL, NUM_STAGES, PINGPONG)),
                (_consumer, (q_bufs, k_bufs, v_bufs, bars, o_desc, LSE, pid_bh, b, h, m0, T, S, n_tiles, sm_scale,
                             1, 4, BLOCK_N, CAUSAL, NUM_STAGES, PINGPONG)),
                (_loader, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, bars, b, h, hk, m0, n_tiles, BLOCK_N,
                       NUM_STAGES, CONSUMERS)),
            ], [4, 1], [CONSUMER_REGS, 24])


HEAD_DIMS = (64, 128)


def config_for(D: int, S: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, NUM_STAGES, CONSUMERS, PINGPONG) for head dim D and S keys; BLOCK_M = CONSUMERS x
    64 rows; PINGPONG (two consumers): they take turns issuing their matmuls.

    The winners of `benchmarks/kernels_attention.py --gluon-sweep` on an H100 (2026-11-26, causal bf16):
    three consumers of 192x64 tiles for short sequences (S 2048: 392 TFLOP/s against 319 for two),
    two ping-pong consumers of 128x128 tiles from S = 4096 on (S 16384: 605 against 534)."""
    if S < 4096:
        return (192, 64, 3, 3, 0)
    return (128, 128, 2, 2, 1)


# setmaxnreg of each worker consumer's warpgroup by consumer count (the loader's warp gets 24)
CONSUMER_REGS = {1: 24, 2: 240, 3: 160}


def unusable_reason(q, k, v, *, window=None, softcap=None, doc_ids=None, causal=False) -> str | None:
    """None when this kernel can compute attention of q over k, v; else why not (one line)."""
    if IMPORT_ERROR is not None:
        return IMPORT_ERROR
    if causal and k.shape[2] < q.shape[2]:  # the last query rows would see no key tile: the loader would stall
        return f"causal with fewer keys ({k.shape[2]}) than queries ({q.shape[2]})"
    if q.device.type != "cuda":
        return f"tensors are on {q.device.type}, not a CUDA GPU"
    if torch.version.hip is not None:
        return "this is a ROCm build of torch (the Gluon kernel is for NVIDIA Hopper)"
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return f"the GPU is sm_{''.join(map(str, torch.cuda.get_device_capability(q.device)))}, not Hopper sm_90"
    if window is not None or softcap is not None or doc_ids is not None:
        return "window/softcap/doc_ids are not implemented in the Gluon kernel"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (the Gluon kernel takes fp16/bf16)"
    D, DV = q.shape[-1], v.shape[-1]
    if D != DV or D not in HEAD_DIMS:
        return f"head dims {D}/{DV} (the Gluon kernel takes equal q/k and v head dims in {HEAD_DIMS})"
    for t in (q, k, v):
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[:-1]):
            return "a tensor's strides or base pointer are not 16-byte aligned for TMA"
    return None


def forward(q, k, v, *, causal, scale, config=None):
    """(out [B,Hq,T,D] contiguous, lse [B,Hq,T] fp32 base 2); call only when `unusable_reason` is None.
    `config`: (BLOCK_M, BLOCK_N, NUM_STAGES, CONSUMERS, PINGPONG) instead of `config_for` (benchmarks, tests)."""
    B, HQ, T, D = q.shape
    HKV, S = k.shape[1], k.shape[2]
    BLOCK_M, BLOCK_N, stages, consumers, pingpong = config or config_for(D, S)
    rows = BLOCK_M // consumers
    if consumers not in (1, 2, 3) or BLOCK_M % consumers or rows % 64 or (consumers > 1 and rows != 64):
        raise ValueError(f"Gluon forward config {config}: consumers must be 1-3, each owning 64 query rows "
                         f"(BLOCK_M = 64 x consumers; one consumer may own 128)")
    out = torch.empty(B, HQ, T, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, HQ, T, device=q.device, dtype=torch.float32)
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16

    def desc(t, rows):
        box = [1, 1, rows, D]
        return TensorDescriptor(t, list(t.shape), list(t.stride()), box, gl.NVMMASharedLayout.get_default_for(box, gdt))

    grid = (B * HQ, triton.cdiv(T, BLOCK_M))
    _fwd_kernel[grid](desc(q, rows), desc(k, BLOCK_N), desc(v, BLOCK_N), desc(out, rows), lse,
                      float(scale), T, S, HQ, HQ // HKV, CAUSAL=bool(causal), NUM_STAGES=stages, CONSUMERS=consumers,
                      CONSUMER_REGS=CONSUMER_REGS[consumers],
                      PINGPONG=bool(pingpong) and consumers == 2, num_warps=4 * rows // 64)
    return out, lse
