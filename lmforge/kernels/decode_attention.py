"""Decode attention for the fused decode step (lmforge/kernels/decode.py re-exports it): each row's
query heads over its cached keys 0..position, one kernel per layer.

The key axis may be split (flash-decoding) so that a batch of one row still fills the GPU; the
splits are combined inside the same kernel: every split stores its unnormalised partial and its
(max, sum), bumps an atomic counter per (row, head group), and the last split to arrive combines
them (reading the partials past L1) and resets the counter, so there is no second launch and the
kernel is idempotent (autotuning, warm-up before CUDA-graph capture). Variants (`ATTN_IMPLS`):
  "head"  one query head per program, 2-D [keys, dim] tiles (GQA: a kv head's keys are read by
          each of its query heads' programs, from L2);
  "dot"   a kv head's query group per program, `tl.dot` on the group padded to 16 rows;
  "sum"   the group by broadcast and `tl.sum` over [group, keys, dim] (the first version: many
          shuffles and barriers per key block).
Variant, splits and warps are timed once per shape on the GPU (`decode_attention`, fields left
None) and the fastest kept; the interpreter runs the first candidate. `decode_attention_ref` is
the torch spec. Not here: sliding windows, soft-capping, MLA, paged caches.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from lmforge.kernels.runtime import log


def decode_attention_ref(q, k_cache, v_cache, pos) -> torch.Tensor:
    """q [M, Hq, D]: row m attends to its cache slots 0..pos[m] -> [M, Hq·D] in q's dtype."""
    M, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    out = torch.empty(M, Hq, D, dtype=q.dtype, device=q.device)
    for m in range(M):
        n = int(pos[m]) + 1
        k = k_cache[m, :, :n].float().repeat_interleave(Hq // Hkv, dim=0)  # [Hq, n, D]
        v = v_cache[m, :, :n].float().repeat_interleave(Hq // Hkv, dim=0)
        p = torch.softmax(q[m].float()[:, None] @ k.transpose(1, 2) / math.sqrt(D), dim=-1)  # [Hq, 1, n]
        out[m] = (p @ v)[:, 0].to(q.dtype)
    return out.view(M, Hq * D)


# -- 2. decode attention (optionally split over keys, the splits combined in the same kernel) -------


@triton.jit
def _attention_kernel(Q, KC, VC, POS, OUT, PART, ML, CNT, scale, HQ, HKV, D, length, stride_cb, stride_ch,
                      stride_cs, GROUP, IMPL: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_S: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr):
    """Program (pid, split). IMPL 0 ("sum") and 1 ("dot"): pid = row m · kv head, the GROUP query
    heads of that kv head (keys read once); IMPL 2 ("head"): pid = row m · query head, one head per
    program (2-D tiles only; the kv head's keys are read by each of its GROUP programs, from L2).
    Keys [split·L, ...) ∩ [0, pos[m]], L = ceil(length / SPLITS) (the last split runs to pos[m]).
    Online softmax in fp32. SPLITS > 1: each split stores its unnormalised partial and (max, sum);
    the last split of a pid to finish (an atomic counter per pid) combines them and resets the
    counter, so no second kernel runs."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    if IMPL == 2:
        m = pid // HQ
        h0 = pid % HQ
        kvh = h0 // GROUP
        ng = 1
    else:
        m = pid // HKV
        kvh = pid % HKV
        h0 = kvh * GROUP
        ng = GROUP
    n_keys = tl.load(POS + m).to(tl.int32) + 1
    split_len = tl.cdiv(length, SPLITS)
    start = split * split_len
    stop = tl.where(split == SPLITS - 1, n_keys, tl.minimum(start + split_len, n_keys))
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask, dmask = g < ng, d < D
    heads = h0 + g
    qmask = gmask[:, None] & dmask[None, :]
    base = m.to(tl.int64) * stride_cb + kvh * stride_ch
    if IMPL == 2:
        qv = tl.load(Q + (m * HQ + h0) * D + d, mask=dmask, other=0.0).to(tl.float32) * scale
        m_1 = tl.full([1], float("-inf"), dtype=tl.float32)
        l_1 = tl.zeros([1], dtype=tl.float32)
        acc_1 = tl.zeros([BLOCK_D], dtype=tl.float32)
        for s0 in range(start, stop, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            smask = s < stop
            kvmask = smask[:, None] & dmask[None, :]
            k = tl.load(KC + base + s[:, None] * stride_cs + d[None, :], mask=kvmask, other=0.0).to(tl.float32)
            v = tl.load(VC + base + s[:, None] * stride_cs + d[None, :], mask=kvmask, other=0.0).to(tl.float32)
            scores = tl.where(smask, tl.sum(k * qv[None, :], axis=1), float("-inf"))  # [S]
            m_new = tl.maximum(m_1, tl.max(scores, axis=0))
            alpha = tl.exp(m_1 - m_new)
            p = tl.exp(scores - m_new)
            l_1 = l_1 * alpha + tl.sum(p, axis=0)
            acc_1 = acc_1 * alpha + tl.sum(p[:, None] * v, axis=0)
            m_1 = m_new
        acc = acc_1[None, :]  # [1, D]: the group shapes below with BLOCK_G = 1
        m_i = m_1
        l_i = l_1
    else:
        q = tl.load(Q + (m * HQ + heads[:, None]) * D + d[None, :], mask=qmask, other=0.0)
        if IMPL == 0:
            q = q.to(tl.float32) * scale
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for s0 in range(start, stop, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            smask = s < stop
            kvmask = smask[:, None] & dmask[None, :]
            k = tl.load(KC + base + s[:, None] * stride_cs + d[None, :], mask=kvmask, other=0.0)
            v = tl.load(VC + base + s[:, None] * stride_cs + d[None, :], mask=kvmask, other=0.0)
            if IMPL == 0:  # products by broadcast and tl.sum over [G, S, D]
                scores = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
            else:  # tl.dot on query heads padded to BLOCK_G >= 16 rows (padded rows load zeros)
                scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            scores = tl.where(smask[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IMPL == 0:
                acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
            else:  # the probabilities in the cache's dtype for the second product (as flash attention)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    dst = OUT + (m * HQ + heads[:, None]) * D + d[None, :]
    if SPLITS == 1:
        tl.store(dst, (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=qmask)
    else:
        rows = (m * HQ + heads) * SPLITS  # PART [M, HQ, SPLITS, D], ML [M, HQ, SPLITS, 2]
        tl.store(PART + (rows + split)[:, None] * D + d[None, :], acc, mask=qmask)
        tl.store(ML + (rows + split) * 2, m_i, mask=gmask)
        tl.store(ML + (rows + split) * 2 + 1, l_i, mask=gmask)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        done = tl.atomic_add(CNT + pid, 1, sem="acq_rel")
        if done == SPLITS - 1:  # the last split: out = sum_s e^(m_s - max) acc_s / sum_s e^(m_s - max) l_s
            mx = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
            for sp in range(SPLITS):  # ".cg": past L1, which may hold an earlier step's partials
                mx = tl.maximum(mx, tl.load(ML + (rows + sp) * 2, mask=gmask, other=0.0, cache_modifier=".cg"))
            num = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
            den = tl.zeros([BLOCK_G], dtype=tl.float32)
            for sp in range(SPLITS):  # split 0 always has keys, so the max is finite
                w = tl.exp(tl.load(ML + (rows + sp) * 2, mask=gmask, other=0.0, cache_modifier=".cg") - mx)
                den += w * tl.load(ML + (rows + sp) * 2 + 1, mask=gmask, other=1.0, cache_modifier=".cg")
                num += w[:, None] * tl.load(PART + (rows + sp)[:, None] * D + d[None, :], mask=qmask, other=0.0,
                                            cache_modifier=".cg")
            tl.store(dst, (num / den[:, None]).to(OUT.dtype.element_ty), mask=qmask)
            tl.atomic_xchg(CNT + pid, 0)  # ready for the next call (and for CUDA-graph replays)


# -- launchers -----------------------------------------------------------------------------------


def attention_splits(rows: int, kv_heads: int, length: int, programs: int = 132, min_keys: int = 64) -> int:
    """Key-axis splits (a power of two) so that rows x kv heads x splits roughly fills `programs`
    SMs, each split keeping at least `min_keys` of the `length` attended slots; 1 = no split."""
    s = 1
    while rows * kv_heads * s * 2 <= programs and length // (s * 2) >= min_keys:
        s *= 2
    return s


ATTN_IMPLS = {"sum": 0, "dot": 1, "head": 2}
MAX_SPLITS = 32  # the most key splits a scratch from `attention_scratch` holds
attention_choices: dict[tuple, dict] = {}  # tuned attention configs by shape key (see decode_attention)


def tuning_length(length: int) -> int:
    """The planned length a tuned choice is kept for: the next power of two (>= 64), so an eager
    engine, whose length grows every step, tunes once per doubling rather than per step."""
    return max(64, triton.next_power_of_2(length))


def attention_scratch(rows: int, q_heads: int, head_dim: int, device) -> tuple[torch.Tensor, ...]:
    """Work buffers of `decode_attention` for up to `rows` rows and MAX_SPLITS splits: partials,
    (max, sum) pairs (fp32) and one int32 counter per (row, head), zero (the kernel leaves them so)."""
    n = rows * q_heads
    return (torch.empty(n * MAX_SPLITS * head_dim, dtype=torch.float32, device=device),
            torch.empty(n * MAX_SPLITS * 2, dtype=torch.float32, device=device),
            torch.zeros(n, dtype=torch.int32, device=device))


def attention_candidates(rows: int, q_heads: int, kv_heads: int, length: int, impl: str | None = None,
                         splits: int | None = None, num_warps: int | None = None) -> list[dict]:
    """The attention configs tuned for a shape (the given fields fixed): "head" (one query head per
    program, 2 or 4 warps) and "dot" (a kv head's query group per program), each with 1, 2, 4, ...
    key splits while a split keeps >= 32 of the `length` slots and programs stay <= 4 per SM."""
    out = []
    for im in [impl] if impl else ["head", "dot"]:
        progs = rows * (q_heads if im == "head" else kv_heads)
        ss = [splits] if splits else [s for s in (1, 2, 4, 8, 16, 32)
                                      if s == 1 or (length // s >= 32 and progs * s <= 4 * 132)]
        ws = [num_warps] if num_warps else ([2, 4] if im == "head" else [4])
        out += [dict(impl=im, splits=s, num_warps=w) for s in ss for w in ws]
    return out


def _attention_launch(cfg: dict, q, k_cache, v_cache, pos, out, length: int, scratch) -> None:
    M, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    im, splits = ATTN_IMPLS[cfg["impl"]], cfg["splits"]
    if splits > MAX_SPLITS or splits & (splits - 1):
        raise ValueError(f"decode_attention: splits={splits}; expected a power of two <= {MAX_SPLITS}")
    BG, BD = triton.next_power_of_2(Hq // Hkv), triton.next_power_of_2(D)
    span = triton.next_power_of_2(triton.cdiv(length, splits))  # no key block longer than a split
    if im == 2:
        BG, BS = 1, max(16, min(64, 4096 // BD, span))
    elif im == 1:
        BG, BD, BS = max(16, BG), max(16, BD), max(16, min(64, span))
    else:
        BS = max(16, min(64, 4096 // (BG * BD)))  # keeps the [G, S, D] product tile near 4K elements
    precision = "ieee" if q.dtype == torch.float32 else None  # fp32 tl.dot exact, not tf32
    grid = (M * (Hq if im == 2 else Hkv), splits)
    _attention_kernel[grid](q, k_cache, v_cache, pos, out, *scratch, 1.0 / math.sqrt(D), Hq, Hkv, D, length,
                            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), Hq // Hkv, IMPL=im, BLOCK_G=BG,
                            BLOCK_D=BD, BLOCK_S=BS, SPLITS=splits, PRECISION=precision, num_warps=cfg["num_warps"])


def _attention_tune(cands: list[dict], q, k_cache, v_cache, pos, out, length: int, scratch) -> dict:
    """The fastest candidate (median GPU time, L2 flushed between runs) with every row at position
    length/2 (the middle of the lengths a graph for `length` slots serves; attention reads only)."""
    from triton.runtime.errors import OutOfResources
    from triton.testing import do_bench

    mid = torch.full_like(pos, max(0, min(length, k_cache.shape[2]) // 2 - 1))
    best, best_t = None, float("inf")
    for c in cands:
        run = lambda c=c: _attention_launch(c, q, k_cache, v_cache, mid, out, length, scratch)
        try:
            t = do_bench(run, warmup=5, rep=20, return_mode="median")
        except OutOfResources:
            continue
        if t < best_t:
            best, best_t = c, t
    log.info("decode attention for M=%d Hq=%d Hkv=%d D=%d length=%d: %s (%.1f us)", q.shape[0], q.shape[1],
             k_cache.shape[1], q.shape[2], length, best, best_t * 1e3)
    return best


def decode_attention(q, k_cache, v_cache, pos, out, length: int | None = None, scratch=None, impl: str | None = None,
                     splits: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """The kernel of `decode_attention_ref` into out [M, Hq·D]. With splits > 1 (a power of two),
    split s covers slots [s·L, (s+1)·L), L = ceil(length / splits) (the last split: to the row's
    position), combined inside the same kernel. impl "head" (one query head per program), "dot"
    (`tl.dot` on a kv head's query group padded to 16 rows) or "sum" (the group by broadcast and
    `tl.sum`, the first version). Fields left None are chosen per shape by timing the candidates
    (`attention_candidates`) once per `tuning_length(length)` on the GPU (not during a CUDA-graph
    capture: the warm-up run tunes); under the interpreter the first candidate runs. `scratch`: `attention_scratch(...)`
    for at least M rows (allocated when not given)."""
    M, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    length = length or k_cache.shape[2]
    if impl is not None and impl not in ATTN_IMPLS:
        raise ValueError(f"decode_attention: impl={impl!r}; expected one of {sorted(ATTN_IMPLS)}")
    scratch = scratch if scratch is not None else attention_scratch(M, Hq, D, q.device)
    bucket = tuning_length(length)
    cands = attention_candidates(M, Hq, Hkv, bucket, impl, splits, num_warps)
    if len(cands) == 1 or q.device.type != "cuda":
        cfg = cands[0]
    else:
        key = (M, Hq, Hkv, D, bucket, q.dtype, impl, splits, num_warps, q.device)
        cfg = attention_choices.get(key)
        if cfg is None:
            if torch.cuda.is_current_stream_capturing() or os.environ.get("LMFORGE_KERNEL_TUNE", "1") == "0":
                # no timing inside a capture (or when tuning is off, as for the GEMVs): the rule's pick
                im = impl or "head"
                cfg = dict(impl=im, splits=splits or attention_splits(M, Hq if im == "head" else Hkv, length),
                           num_warps=4)
            else:
                cfg = attention_choices[key] = _attention_tune(cands, q, k_cache, v_cache, pos, out, bucket, scratch)
    _attention_launch(cfg, q, k_cache, v_cache, pos, out, length, scratch)
    return out
