"""Context parallelism: ring attention over the sequence dimension, forward and backward written here.

Each rank of a context-parallel group holds 1/W of the sequence (queries, keys and values). The
key/value blocks travel around the ring (rank r sends to r+1, receives from r-1, W-1 hops) while each
rank attends its queries to the block it holds; partial results are merged with the online-softmax
rule using each block's log-sum-exp (LSE):
    lse = logaddexp(lse_a, lse_b);  out = out_a·exp(lse_a − lse) + out_b·exp(lse_b − lse).
The next block's send/recv is started before the current block is computed, so communication
overlaps compute (on NCCL it runs on its own stream). K/V travel with their own (kv) heads: under
GQA the query heads sharing a kv head are served by the kernel (or, for the reference, expanded
just before the block), never repeated on the wire.

Causal load balancing (zig-zag): the sequence is cut into 2W chunks and rank r holds chunks r and
2W−1−r (`zigzag_shard`). Then at every ring step each rank does the same work, half a block:
- its own block: ordinary causal attention (its two chunks are in increasing order);
- a block from a lower rank j < r: all local queries × the block's first chunk (the second is later
  than every local query);
- a block from a higher rank j > r: the local second chunk × the whole block (the first local chunk
  is earlier than every key of that block).
Without causality the plain contiguous split is used and every step is a full block.

Backward (`RingAttention`, an autograd.Function): the keys/values go around the ring again; each
rank computes its queries' share of each block's dQ/dK/dV (flash-attention backward from the final
output and LSE). dQ stays local, and so does the own block's dK/dV share. The other ranks' shares of
block j form one running sum that starts at rank j+1 (that first share travels as the kernel wrote
it, in the input dtype and only for the keys it touched: exact, half or a quarter of a float32
accumulator), grows by each rank's share on its way (float32) and reaches rank j after the last
step. For W = 2 that is a single hop of the other rank's share, the only communication of the
backward that compute does not hide.

Each block runs on one of these implementations (`select_kernel`, per call):
- "cudnn_cuda" / "flash_cuda" / "flash_cpu": torch's fused attention ops (cuDNN's, FlashAttention-2's,
  the CPU flash op). The forward returns the block's out and LSE with O(T_local) memory; the backward
  op takes the FINAL (merged) out and LSE of the queries and gives exactly this block's dQ/dK/dV
  share, the recomputation FlashAttention's backward does. They take fewer kv heads than query heads
  (GQA) as they are. CUDA needs fp16/bf16 and a head dim that is a multiple of 8 up to 256; CPU
  takes any float dtype. "auto" takes flash; with AUTO_CUDNN it takes cuDNN exactly where torch's
  own SDPA would pick it for these inputs (on Hopper with cuDNN >= 9.15 SDPA does: its kernel is
  much faster than FlashAttention-2 there: on 2x H100 at T = 36,864 the ring's step took 10.4 ms with
  cuDNN blocks vs 17.9 with FlashAttention-2 blocks, same errors; docs/benchmarks.md).
- "reference": the block math written out below, scores in float32 (float64 stays float64), O(T_local²)
  memory per step: the readable version and the one the fused kernels are tested against; used where
  no fused kernel applies (e.g. value head dim ≠ key head dim, fp32 on CUDA).
No window, softcap or doc_ids here: they raise. The ring's steps are labelled for the profiler
(`ring.block_forward`, `ring.merge`, `ring.wait`, `ring.block_backward`, `ring.grad_add`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.profiler import record_function

from lmforge.errors import ConfigError

# ----------------------------------------------------------------------------- sequence layout

def zigzag_indices(seq_len: int, rank: int, world: int) -> torch.Tensor:
    """Global positions held by `rank`: chunks r and 2W−1−r of 2W equal chunks."""
    if seq_len % (2 * world):
        raise ConfigError(f"context parallel zig-zag: sequence length {seq_len} must be a multiple of "
                          f"2 × cp size = {2 * world}")
    c = seq_len // (2 * world)
    first = torch.arange(rank * c, (rank + 1) * c)
    second = torch.arange((2 * world - 1 - rank) * c, (2 * world - rank) * c)
    return torch.cat([first, second])


def contiguous_indices(seq_len: int, rank: int, world: int) -> torch.Tensor:
    if seq_len % world:
        raise ConfigError(f"context parallel: sequence length {seq_len} must be a multiple of cp size {world}")
    c = seq_len // world
    return torch.arange(rank * c, (rank + 1) * c)


def shard_sequence(x: torch.Tensor, dim: int, rank: int, world: int, causal: bool = True) -> torch.Tensor:
    """This rank's part of `x` along `dim`: zig-zag chunks for causal attention, contiguous otherwise."""
    idx = (zigzag_indices if causal else contiguous_indices)(x.shape[dim], rank, world)
    return x.index_select(dim, idx.to(x.device))


def unshard_sequence(parts: list[torch.Tensor], dim: int, causal: bool = True) -> torch.Tensor:
    """Inverse of `shard_sequence` given every rank's part (e.g. from all_gather)."""
    world = len(parts)
    seq_len = sum(p.shape[dim] for p in parts)
    idx = torch.cat([(zigzag_indices if causal else contiguous_indices)(seq_len, r, world) for r in range(world)])
    inverse = torch.empty_like(idx)
    inverse[idx] = torch.arange(seq_len)
    return torch.cat(parts, dim).index_select(dim, inverse.to(parts[0].device))


# ----------------------------------------------------------------------------- one block, exact math

def _expand_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _reduce_kv(dx: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Sum the gradients of the query heads that shared one kv head (inverse of _expand_kv)."""
    if n_rep == 1:
        return dx
    B, H, S, D = dx.shape
    return dx.view(B, H // n_rep, n_rep, S, D).sum(2)


def _up(x: torch.Tensor) -> torch.Tensor:
    """Float32 for 16/32-bit inputs, float64 stays float64 (exact checks)."""
    return x if x.dtype == torch.float64 else x.float()


def _causal_mask(T: int, S: int, device) -> torch.Tensor:
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


def block_forward(q, k, v, scale: float, causal: bool):
    """Attention of q [B,H,T,D] to one kv block (heads already expanded): (out fp32, lse fp32 [B,H,T])."""
    s = (_up(q) @ _up(k).transpose(-2, -1)) * scale
    if causal:
        s = s.masked_fill(~_causal_mask(s.shape[-2], s.shape[-1], s.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    return p @ _up(v), lse


def block_backward(q, k, v, out, lse, dout, scale: float, causal: bool):
    """Flash-attention backward of one block, given the FINAL (merged) out and lse of these queries."""
    qf, kf, vf, do = _up(q), _up(k), _up(v), _up(dout)
    s = (qf @ kf.transpose(-2, -1)) * scale
    if causal:
        s = s.masked_fill(~_causal_mask(s.shape[-2], s.shape[-1], s.device), float("-inf"))
    p = torch.exp(s - lse.unsqueeze(-1))  # this block's share of the full softmax
    dv = p.transpose(-2, -1) @ do
    dp = do @ vf.transpose(-2, -1)
    delta = (do * out).sum(-1, keepdim=True)  # rowsum(dO ∘ O) = Σ_j P_ij dP_ij over ALL blocks
    ds = p * (dp - delta)
    return (ds @ kf) * scale, (ds.transpose(-2, -1) @ qf) * scale, dv


def merge(out, lse, blk_out, blk_lse):
    """Online-softmax merge of a block's partial (out, lse) into the running one."""
    new = torch.logaddexp(lse, blk_lse)
    out = out * torch.exp(lse - new).unsqueeze(-1) + blk_out * torch.exp(blk_lse - new).unsqueeze(-1)
    return out, new


def merge_(out, lse, blk_out, blk_lse) -> None:
    """`merge` in place on the running out/lse (or views of them): the block's share of the softmax
    mass is w = exp(blk_lse − lse_new) and the old one 1 − w, so out ← lerp(out, blk_out, w), one pass
    over out instead of five temporaries and a copy back."""
    new = torch.logaddexp(lse, blk_lse)
    out.lerp_(blk_out.to(out.dtype), torch.exp(blk_lse - new).unsqueeze(-1))
    lse.copy_(new)


# ----------------------------------------------------------------------------- one block, fused kernels

KERNELS = ("cudnn_cuda", "flash_cuda", "flash_cpu", "reference")  # "auto" takes the first that applies
AUTO_CUDNN = True  # "auto" follows SDPA onto cuDNN (measured: parallel_forms.py rows cp / cp_cudnn)
NATIVE_GQA = ("cudnn_cuda", "flash_cuda", "flash_cpu")  # take kv heads < query heads as they are


def kernel_problem(kernel: str, device_type: str, dtype: torch.dtype, head_dim: int, v_head_dim: int) -> str | None:
    """Why `kernel` cannot run a block of this device/dtype/head dims, or None if it can."""
    if kernel == "reference":
        return None
    if kernel not in KERNELS:
        return f"unknown kernel {kernel!r} (expected 'auto' or one of {', '.join(KERNELS)})"
    want = kernel.rsplit("_", 1)[1]
    if device_type != want:
        return f"{kernel} runs on {want} tensors, got {device_type}"
    if head_dim != v_head_dim:
        return f"{kernel} needs equal key and value head dims, got {head_dim} and {v_head_dim}"
    if want == "cuda":
        if dtype not in (torch.float16, torch.bfloat16):
            return f"{kernel} needs float16 or bfloat16, got {dtype}"
        if head_dim % 8 or head_dim > 256:
            return f"{kernel} needs a head dim that is a multiple of 8 up to 256, got {head_dim}"
    elif not dtype.is_floating_point:
        return f"{kernel} needs a floating dtype, got {dtype}"
    return None


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> str | None:
    """The backend torch's scaled_dot_product_attention would run for these inputs ("cudnn", "flash",
    "efficient", "math"), or None if this torch cannot say."""
    from torch.nn.attention import SDPBackend

    try:
        choice = torch._fused_sdp_choice(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    except (AttributeError, RuntimeError, TypeError):
        return None
    names = {SDPBackend.CUDNN_ATTENTION.value: "cudnn", SDPBackend.FLASH_ATTENTION.value: "flash",
             SDPBackend.EFFICIENT_ATTENTION.value: "efficient", SDPBackend.MATH.value: "math"}
    return names.get(int(choice))


def select_kernel(device_type: str, dtype: torch.dtype, head_dim: int, v_head_dim: int, kernel: str = "auto",
                  sdpa: str | None = None) -> str:
    """The block implementation for these inputs: a fused kernel where one applies, else the reference.
    `sdpa`: the backend torch's SDPA picks for the same inputs (`sdpa_backend`); "auto" takes cuDNN
    only where SDPA does (torch knows which cuDNN versions and shapes are sound and fast). An
    explicitly requested kernel that cannot run raises ConfigError."""
    if kernel == "auto":
        return next(k for k in KERNELS if kernel_problem(k, device_type, dtype, head_dim, v_head_dim) is None
                    and (k != "cudnn_cuda" or sdpa == "cudnn"))
    problem = kernel_problem(kernel, device_type, dtype, head_dim, v_head_dim)
    if problem:
        raise ConfigError(f"ring attention kernel: {problem}")
    return kernel


def resolve_kernel(q, k, v, causal: bool, kernel: str = "auto") -> str:
    """The block implementation `ring_attention` runs for these inputs."""
    sdpa = sdpa_backend(q, k, v, causal) if kernel == "auto" and AUTO_CUDNN and q.device.type == "cuda" else None
    return select_kernel(q.device.type, q.dtype, q.shape[-1], v.shape[-1], kernel, sdpa)


def kernel_block_forward(kernel: str, q, k, v, scale: float, causal: bool):
    """One block with a fused kernel: (out in q's dtype, lse [B,H,T] fp32, fp64 for fp64 inputs).
    k/v may have fewer heads than q (GQA)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # no-ops but for a zig-zag half
    if kernel == "cudnn_cuda":
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                      scale=scale)[:2]
        return out, lse.squeeze(-1)  # cuDNN's lse is [B, H, T, 1]
    if kernel == "flash_cuda":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse.contiguous()


def kernel_block_backward(kernel: str, q, k, v, out, lse, dout, scale: float, causal: bool):
    """The fused backward of one block given the FINAL out (q's dtype) and lse of these queries:
    the block's share of dQ, dK, dV (as `block_backward`; dK/dV with k's heads), in q's dtype."""
    q, k, v, out, dout = (t.contiguous() for t in (q, k, v, out, dout))
    lse = lse.contiguous()  # a zig-zag half of the merged lse is a strided view
    if kernel == "cudnn_cuda":
        # no dropout: the seed/offset are never read; no bias, no varlen (undefined tensors)
        rng = torch.zeros((), dtype=torch.int64, device=q.device)
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.unsqueeze(-1), rng, rng, None, None, None, q.shape[2], k.shape[2], 0.0, causal,
            scale=scale)
    if kernel == "flash_cuda":
        # no varlen (cum_seq None), no dropout (so no RNG state): the dense kernel recomputes P = exp(S − lse)
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, causal, None, None, scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale)


def attend_block(kernel: str, q, k, v, scale: float, causal: bool):
    """(out, lse) of q against one kv block with the chosen implementation (the reference wants the
    kv heads expanded, the fused kernels do not)."""
    if kernel == "reference":
        return block_forward(q, k, v, scale, causal)
    return kernel_block_forward(kernel, q, k, v, scale, causal)


def attend_block_backward(kernel: str, q, k, v, out, lse, dout, scale: float, causal: bool):
    if kernel == "reference":
        return block_backward(q, k, v, out, lse, dout, scale, causal)
    return kernel_block_backward(kernel, q, k, v, out, lse, dout, scale, causal)


# ----------------------------------------------------------------------------- the ring

class _Ring:
    """Send to rank+1 / receive from rank−1 of the group, asynchronously."""

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        nxt, prv = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        self.next = dist.get_global_rank(group, nxt) if group is not None else nxt
        self.prev = dist.get_global_rank(group, prv) if group is not None else prv

    def start(self, tensors: list[torch.Tensor], recv_like: list[tuple] | None = None):
        """Begin passing `tensors` on; returns (received buffers, handle for `wait`). The received
        ones are shaped like `tensors`, or as `recv_like` says: [(shape, dtype), ...]."""
        like = recv_like or [(t.shape, t.dtype) for t in tensors]
        recv = [torch.empty(shape, dtype=dtype, device=tensors[0].device) for shape, dtype in like]
        sent = [t.contiguous() for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in sent]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in recv]
        return recv, (dist.batch_isend_irecv(ops), sent)  # the sent tensors live until the wait

    @staticmethod
    def wait(handle) -> None:
        for r in handle[0]:
            r.wait()


def _step_slices(rank: int, src: int, T: int, S: int, causal: bool):
    """(query slice, key slice, causal mask?) for local queries vs the kv block from rank `src`."""
    full = slice(None)
    if not causal:
        return full, full, False
    if src == rank:
        return full, full, True
    if src < rank:
        return full, slice(0, S // 2), False
    return slice(T // 2, T), full, False


def _block_kv(kernel: str, k, v, ks: slice, n_rep: int):
    """The keys/values of one ring step: the fused kernels take the kv heads as they are (GQA), the
    reference repeats them per query head here, after the hop."""
    k, v = k[:, :, ks], v[:, :, ks]
    if kernel in NATIVE_GQA:
        return k, v
    return _expand_kv(k, n_rep), _expand_kv(v, n_rep)


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal: bool, scale: float, kernel: str):
        ring = _Ring(group)
        n_rep = q.shape[1] // k.shape[1]
        T = q.shape[2]
        # once here rather than per block: the model hands in transposed [B, H, T, D] views
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        kv, out, lse = [k, v], None, None
        with torch.autocast(q.device.type, enabled=False):  # dtypes are chosen here, per kernel
            for step in range(ring.world):
                if step < ring.world - 1:
                    nxt, handle = ring.start(kv)
                src = (ring.rank - step) % ring.world
                qs, ks, masked = _step_slices(ring.rank, src, T, k.shape[2], causal)
                kb, vb = _block_kv(kernel, kv[0], kv[1], ks, n_rep)
                with record_function("ring.block_forward"):
                    bo, bl = attend_block(kernel, q[:, :, qs], kb, vb, scale, masked)
                if out is None:  # step 0 is this rank's own block, all queries: nothing to merge yet
                    out, lse = _up(bo), bl
                else:
                    with record_function("ring.merge"):
                        merge_(out[:, :, qs], lse[:, :, qs], bo, bl)
                if step < ring.world - 1:
                    with record_function("ring.wait"):
                        ring.wait(handle)
                    kv = nxt
        result = out.to(q.dtype)
        # the fused backward takes out in q's dtype (as FlashAttention keeps it); the reference the fp32 one
        ctx.save_for_backward(q, k, v, out if kernel == "reference" else result, lse)
        ctx.group, ctx.causal, ctx.scale, ctx.kernel = group, causal, scale, kernel
        return result

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        W, prev = ring.world, (ring.rank - 1) % ring.world
        n_rep = q.shape[1] // k.shape[1]
        expanded = ctx.kernel not in NATIVE_GQA  # block dK/dV come per query head: sum them per kv head
        T, S = q.shape[2], k.shape[2]
        dout = dout.to(q.dtype).contiguous()
        share_dtype = q.dtype if ctx.kernel != "reference" else _up(q).dtype  # what the block kernel returns

        def keys_of(rank, block):  # the keys of `block` that `rank`'s queries reach
            return _step_slices(rank, block, T, S, ctx.causal)[1]

        def incoming(step):  # what the previous rank sends at `step`: block (rank − step − 1)'s running sum
            block = (ring.rank - step - 1) % W
            if step == 1:  # its first share, as the kernel wrote it, for the keys it reached
                n = len(range(S)[keys_of(prev, block)])
                return [((*k.shape[:2], n, k.shape[3]), share_dtype), ((*v.shape[:2], n, v.shape[3]), share_dtype)]
            return [(k.shape, _up(k).dtype), (v.shape, _up(v).dtype)]

        def grow(part, step, share, ks):  # add this rank's share (keys ks) to a block's running sum
            if step == 2:  # the first share, received as computed: into a float32 sum over all keys
                full = torch.zeros(share.shape[:2] + (S,) + share.shape[3:], dtype=_up(share).dtype,
                                   device=share.device)
                full[:, :, keys_of(prev, (ring.rank - step) % W)] = part
                part = full
            part[:, :, ks] += share
            return part

        k_cur, v_cur = k, v
        dq = dk = dv = part = handle = None
        with torch.autocast(q.device.type, enabled=False):
            for step in range(W):
                if step < W - 1:
                    (k_nxt, v_nxt), kv_handle = ring.start([k_cur, v_cur])
                src = (ring.rank - step) % W
                qs, ks, masked = _step_slices(ring.rank, src, T, S, ctx.causal)
                kb, vb = _block_kv(ctx.kernel, k_cur, v_cur, ks, n_rep)
                with record_function("ring.block_backward"):
                    bdq, bdk, bdv = attend_block_backward(ctx.kernel, q[:, :, qs], kb, vb, out[:, :, qs],
                                                          lse[:, :, qs], dout[:, :, qs], ctx.scale, masked)
                if expanded:
                    bdk, bdv = _reduce_kv(bdk, n_rep), _reduce_kv(bdv, n_rep)
                if step == 0:  # the own block, all queries and keys: dQ and this rank's dK/dV start here
                    dq, dk, dv = _up(bdq), _up(bdk), _up(bdv)
                else:
                    with record_function("ring.grad_add"):
                        dq[:, :, qs] += bdq
                        send = [bdk, bdv]  # step 1: the first share of block src after its own rank
                        if step > 1:
                            ring.wait(handle)  # block src's running sum, from the previous rank
                            send = [grow(part[0], step, bdk, ks), grow(part[1], step, bdv, ks)]
                    # on to the next rank (at the last step: block src's own rank); the sum of the next
                    # block comes in meanwhile
                    part, handle = ring.start(send, incoming(step))
                if step < W - 1:
                    with record_function("ring.wait"):
                        ring.wait(kv_handle)
                    k_cur, v_cur = k_nxt, v_nxt
            with record_function("ring.wait"):
                ring.wait(handle)  # this rank's own block: every other rank's share
            ks = keys_of(prev, ring.rank) if W == 2 else slice(None)
            dk[:, :, ks] += part[0]
            dv[:, :, ks] += part[1]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None, causal: bool = True,
                   scale: float | None = None, kernel: str = "auto") -> torch.Tensor:
    """Attention of this rank's sequence shard to the whole (sharded) sequence of the group.

    q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv]: this rank's part, in the `shard_sequence`
    layout (zig-zag for causal). Returns this rank's part of the output, same layout. Differentiable.
    `kernel`: "auto" (`select_kernel`: flash, or with AUTO_CUDNN cuDNN where torch's SDPA would take
    it; else the reference), or one of KERNELS to force it.
    """
    if q.shape[2] != k.shape[2] or k.shape[2] != v.shape[2]:
        raise ConfigError(f"ring attention needs equal local q/k/v lengths, got {q.shape[2]}, "
                          f"{k.shape[2]}, {v.shape[2]} (no kv cache under context parallelism)")
    if q.shape[1] % k.shape[1]:
        raise ConfigError(f"query heads {q.shape[1]} must be a multiple of kv heads {k.shape[1]}")
    if causal and q.shape[2] % 2:
        raise ConfigError(f"causal ring attention: local length {q.shape[2]} must be even (two zig-zag chunks)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kernel = resolve_kernel(q, k, v, causal, kernel)
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        n_rep = q.shape[1] // k.shape[1]
        k, v = _expand_kv(k, n_rep), _expand_kv(v, n_rep)
        if kernel == "reference":
            return block_forward(q, k, v, scale, causal)[0].to(q.dtype)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return RingAttention.apply(q, k, v, group, causal, scale, kernel)


def ring_backend(group=None, kernel: str = "auto"):
    """An `attend` backend (model/attention.py `register_backend`) running ring attention on `group`:
    lets a Transformer run context-parallel unchanged, given its zig-zag `positions`."""

    def backend(q, k, v, *, causal=True, window=None, softcap_value=None, scale=None, doc_ids=None):
        if window is not None or softcap_value is not None or doc_ids is not None:
            raise ConfigError("context parallelism (ring attention) does not support window, softcap or "
                              f"doc_ids (got window={window}, softcap={softcap_value}, "
                              f"doc_ids={'set' if doc_ids is not None else None})")
        return ring_attention(q, k, v, group=group, causal=causal, scale=scale, kernel=kernel)

    return backend


def apply_context_parallel(model: torch.nn.Module, group=None, kernel: str = "auto") -> torch.nn.Module:
    """Run every (GQA) attention layer of `model` as ring attention over `group`; returns the model.

    The caller feeds each rank its `shard_sequence` part of input_ids/targets and the matching global
    `positions` (so RoPE sees true positions), and sums `ce_sum` / `n_tokens` over the group for the
    loss (then averages gradients over the group as data parallelism does). Latent attention (MLA) is
    not supported yet. `kernel`: the block implementation (`ring_attention`).
    """
    from lmforge.model.attention import Attention, register_backend

    name = f"ring:{id(group)}:{kernel}"
    register_backend(name, ring_backend(group, kernel))
    found = 0
    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = name
            found += 1
        elif type(m).__name__ == "MultiHeadLatentAttention":
            raise ConfigError("context parallelism does not support MLA layers yet")
    if not found:
        raise ConfigError("apply_context_parallel: the model has no attention layers to parallelize")
    return model
