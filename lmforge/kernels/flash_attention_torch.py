"""FlashAttention-2 in plain PyTorch: the masked-softmax spec and the same tiled algorithm.

`attention_reference` is the specification: build the full (T x S) score matrix, mask, softmax.
`TiledAttention` is FlashAttention-2 written with torch ops on tiles, so the algorithm that the
Triton kernel runs can be read (and stepped through) here, and runs on any device:

- forward: for each query tile, walk the key tiles keeping a running max `m`, running sum `l` and
  an unnormalised output; save only O and the log-sum-exp L = m + log(l) per query row;
- backward: D = rowsum(dO * O) (preprocess), then per tile recompute P = exp(S - L) and
  accumulate dV += P^T dO, dP = dO V^T, dS = P * (dP - D), dQ += dS K, dK += dS^T Q.

Masking rules shared by all paths (query row i sits at key position p = S - T + i):
  causal: key j is visible iff j <= p; window w: additionally p - j < w (and j - p < w when not
  causal); doc_ids [B, S]: key j is visible only if doc_ids[j] == doc_ids[p]; softcap c: scores
  become c * tanh(score / c) after scaling. GQA: query head h reads key/value head h // (Hq / Hkv).

What this does not do: be fast. It is the readable twin of `flash_attention_triton`.
"""

from __future__ import annotations

import math

import torch


def visibility_mask(T: int, S: int, *, causal: bool, window: int | None, doc_ids: torch.Tensor | None,
                    device, q_start: int = 0, k_start: int = 0, tq: int | None = None,
                    tk: int | None = None) -> torch.Tensor | None:
    """Boolean mask [B or 1, 1, tq, tk] (True = visible) for query rows q_start.. and keys k_start..

    Returns None when everything is visible.
    """
    tq = T - q_start if tq is None else tq
    tk = S - k_start if tk is None else tk
    pos = torch.arange(q_start, q_start + tq, device=device) + (S - T)
    key = torch.arange(k_start, k_start + tk, device=device)
    mask = None
    if causal:
        mask = key[None, :] <= pos[:, None]
    if window is not None:
        near = (pos[:, None] - key[None, :]) < window
        if not causal:
            near &= (key[None, :] - pos[:, None]) < window
        mask = near if mask is None else mask & near
    if mask is not None:
        mask = mask[None, None]
    if doc_ids is not None:
        dq = doc_ids[:, S - T + q_start: S - T + q_start + tq]
        dk = doc_ids[:, k_start:k_start + tk]
        same = (dq[:, :, None] == dk[:, None, :])[:, None]
        mask = same if mask is None else mask & same
    return mask


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _cap(s: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return s if softcap is None else softcap * torch.tanh(s / softcap)


def attention_reference(q, k, v, *, causal=True, window=None, softcap=None, scale=None, doc_ids=None):
    """The spec: explicit scores, mask, softmax in fp32, output in q's dtype."""
    B, Hq, T, D = q.shape
    S = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    groups = Hq // k.shape[1]
    kf, vf = _expand_kv(k.float(), groups), _expand_kv(v.float(), groups)
    s = _cap(torch.einsum("bhtd,bhsd->bhts", q.float(), kf) * scale, softcap)
    mask = visibility_mask(T, S, causal=causal, window=window, doc_ids=doc_ids, device=q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bhsd->bhtd", torch.softmax(s, dim=-1), vf).to(q.dtype)


def tiled_forward(q, k, v, *, causal, window, softcap, scale, doc_ids, block_m=64, block_n=64):
    """FlashAttention-2 forward on tiles. Returns (out [B,Hq,T,Dv] in q.dtype, lse [B,Hq,T] fp32)."""
    B, Hq, T, _ = q.shape
    S = k.shape[2]
    groups = Hq // k.shape[1]
    kf, vf = _expand_kv(k, groups).float(), _expand_kv(v, groups).float()
    out = torch.empty(B, Hq, T, v.shape[-1], device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    for m0 in range(0, T, block_m):
        qt = q[:, :, m0:m0 + block_m].float()
        tq = qt.shape[2]
        m_i = torch.full((B, Hq, tq), float("-inf"), device=q.device)
        l_i = torch.zeros(B, Hq, tq, device=q.device)
        acc = torch.zeros(B, Hq, tq, v.shape[-1], device=q.device)
        for n0 in range(0, S, block_n):
            tk = min(block_n, S - n0)
            s = _cap(qt @ kf[:, :, n0:n0 + tk].transpose(-1, -2) * scale, softcap)
            mask = visibility_mask(T, S, causal=causal, window=window, doc_ids=doc_ids, device=q.device,
                                   q_start=m0, k_start=n0, tq=tq, tk=tk)
            if mask is not None:
                if not mask.any():
                    continue  # the kernel skips such tiles by computing its loop bounds
                s = s.masked_fill(~mask, float("-inf"))
            m_new = torch.maximum(m_i, s.amax(-1))
            # Rows with nothing visible yet keep m = -inf; exp(-inf - -inf) would be NaN.
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m_i - m_safe)
            l_i = l_i * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ vf[:, :, n0:n0 + tk]
            m_i = m_new
        out[:, :, m0:m0 + tq] = (acc / l_i[..., None]).to(q.dtype)
        lse[:, :, m0:m0 + tq] = m_i + torch.log(l_i)
    return out, lse


def tiled_backward(q, k, v, out, lse, dout, *, causal, window, softcap, scale, doc_ids,
                   block_m=64, block_n=64):
    """FlashAttention-2 backward on tiles, recomputing P from the saved log-sum-exp.

    Returns (dq, dk, dv) with dk/dv summed over the query heads that share each key/value head.
    """
    B, Hq, T, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    groups = Hq // Hkv
    qf, dof = q.float(), dout.float()
    kf, vf = _expand_kv(k, groups).float(), _expand_kv(v, groups).float()
    delta = (dof * out.float()).sum(-1)  # the preprocess: D_i = rowsum(dO_i * O_i)
    dq = torch.zeros_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    for n0 in range(0, S, block_n):
        tk = min(block_n, S - n0)
        kt, vt = kf[:, :, n0:n0 + tk], vf[:, :, n0:n0 + tk]
        for m0 in range(0, T, block_m):
            tq = min(block_m, T - m0)
            mask = visibility_mask(T, S, causal=causal, window=window, doc_ids=doc_ids, device=q.device,
                                   q_start=m0, k_start=n0, tq=tq, tk=tk)
            if mask is not None and not mask.any():
                continue
            qt, dot = qf[:, :, m0:m0 + tq], dof[:, :, m0:m0 + tq]
            raw = qt @ kt.transpose(-1, -2) * scale
            s = _cap(raw, softcap)
            p = torch.exp(s - lse[:, :, m0:m0 + tq, None])
            if mask is not None:
                p = p.masked_fill(~mask, 0.0)
            dv[:, :, n0:n0 + tk] += p.transpose(-1, -2) @ dot
            dp = dot @ vt.transpose(-1, -2)
            ds = p * (dp - delta[:, :, m0:m0 + tq, None])
            if softcap is not None:
                ds = ds * (1 - (s / softcap) ** 2)  # d/dx c*tanh(x/c) = 1 - tanh^2
            dq[:, :, m0:m0 + tq] += ds @ kt * scale
            dk[:, :, n0:n0 + tk] += ds.transpose(-1, -2) @ qt * scale
    if groups > 1:
        dk = dk.view(B, Hkv, groups, S, -1).sum(2)
        dv = dv.view(B, Hkv, groups, S, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class TiledAttention(torch.autograd.Function):
    """FlashAttention-2 (tiled torch) with the recomputing backward: saves only O and the LSE."""

    @staticmethod
    def forward(ctx, q, k, v, causal, window, softcap, scale, doc_ids):
        out, lse = tiled_forward(q, k, v, causal=causal, window=window, softcap=softcap, scale=scale,
                                 doc_ids=doc_ids)
        ctx.save_for_backward(q, k, v, out, lse, doc_ids)
        ctx.opts = dict(causal=causal, window=window, softcap=softcap, scale=scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, doc_ids = ctx.saved_tensors
        dq, dk, dv = tiled_backward(q, k, v, out, lse, dout.contiguous(), doc_ids=doc_ids, **ctx.opts)
        return dq, dk, dv, None, None, None, None, None
