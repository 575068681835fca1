"""FlashAttention-2 behind one interface: `flash_attention(q, k, v, ...)`.

This is the model's "triton" attention backend (`lmforge.model.attention.attend(..., backend="triton")`
imports it lazily). It checks the inputs, then runs either the Triton kernels
(`flash_attention_triton`, on CUDA tensors or under TRITON_INTERPRET=1) or the tiled PyTorch version
of the same algorithm (`flash_attention_torch.TiledAttention`, anywhere else), logging why it fell
back. Both are `torch.autograd.Function`s with a recomputing backward that saves only O and the
log-sum-exp. Masking semantics (causal, window, doc_ids, softcap, GQA) are documented in
`flash_attention_torch`.

Supported: fp32/fp16/bf16; any head dim up to 256 (64 and 128 are the tuned ones); value head dim
may differ from the query/key head dim; Hq % Hkv == 0; S >= T when causal (decoding with a cache).
"""

from __future__ import annotations

import torch

from lmforge.kernels.flash_attention_torch import TiledAttention, attention_reference
from lmforge.kernels.runtime import KernelInputError, choose_impl

__all__ = ["flash_attention", "attention_reference"]

MAX_HEAD_DIM = 256


class FlashAttentionTriton(torch.autograd.Function):
    """The Triton kernels as an autograd op (forward saves O and the base-2 LSE)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, window, softcap, scale, doc_ids, deterministic):
        from lmforge.kernels import flash_attention_triton as fa

        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        opts = dict(causal=causal, window=window, softcap=softcap, scale=scale, doc_ids=doc_ids)
        out, lse = fa.forward(q, k, v, **opts)
        ctx.save_for_backward(q, k, v, out, lse, doc_ids)
        ctx.opts, ctx.deterministic = opts, deterministic
        return out

    @staticmethod
    def backward(ctx, dout):
        from lmforge.kernels import flash_attention_triton as fa

        q, k, v, out, lse, doc_ids = ctx.saved_tensors
        opts = dict(ctx.opts, doc_ids=doc_ids)
        dq, dk, dv = fa.backward(q, k, v, out, lse, dout.contiguous(), deterministic=ctx.deterministic, **opts)
        return dq, dk, dv, None, None, None, None, None, None


def _check(q, k, v, causal, window, softcap, scale, doc_ids):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise KernelInputError(f"flash_attention: q, k, v must be 4-D [B, H, T, D]; got shapes "
                               f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, T, D = q.shape
    Bk, Hkv, S, Dk = k.shape
    if k.shape[:3] != v.shape[:3] or Bk != B or Dk != D:
        raise KernelInputError(f"flash_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must match "
                               f"q {tuple(q.shape)} in batch and (k) head dim, and each other in [B, H, S]")
    if Hq % Hkv:
        raise KernelInputError(f"flash_attention: query heads {Hq} must be a multiple of key/value heads {Hkv}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise KernelInputError(f"flash_attention: q, k, v must share one dtype of float32/float16/bfloat16; "
                               f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if max(D, v.shape[-1]) > MAX_HEAD_DIM:
        raise KernelInputError(f"flash_attention: head dim {max(D, v.shape[-1])} > {MAX_HEAD_DIM} is not supported")
    if T == 0 or S == 0:
        raise KernelInputError(f"flash_attention: empty sequence (T={T}, S={S})")
    if S < T and (causal or window is not None or doc_ids is not None):
        raise KernelInputError(f"flash_attention: S={S} keys < T={T} queries; queries are the last T key "
                               f"positions, so S >= T is required with causal/window/doc_ids")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise KernelInputError(f"flash_attention: window={window!r}; expected a positive int or None")
    if softcap is not None and not softcap > 0:
        raise KernelInputError(f"flash_attention: softcap={softcap!r}; expected a positive float or None")
    if scale is not None and not scale > 0:
        raise KernelInputError(f"flash_attention: scale={scale!r}; expected a positive float or None")
    if doc_ids is not None:
        if tuple(doc_ids.shape) != (B, S) or doc_ids.dtype.is_floating_point or doc_ids.device != q.device:
            raise KernelInputError(f"flash_attention: doc_ids must be an integer tensor [B, S] = [{B}, {S}] on "
                                   f"{q.device}; got {doc_ids.dtype} {tuple(doc_ids.shape)} on {doc_ids.device}")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    window: int | None = None, softcap: float | None = None, scale: float | None = None,
                    doc_ids: torch.Tensor | None = None, deterministic: bool = True,
                    impl: str = "auto") -> torch.Tensor:
    """Attention of q [B,Hq,T,D] over k [B,Hkv,S,D], v [B,Hkv,S,Dv] -> [B,Hq,T,Dv].

    When S > T the queries are the last T key positions. `impl`: "auto" (Triton when it can run,
    else the tiled torch path with a logged reason), "triton" (raise if it cannot run) or "torch".
    `deterministic=False` lets the Triton backward add dQ with atomics (fewer matmuls, run-to-run
    differences in the last bits); the torch path is deterministic either way.
    """
    _check(q, k, v, causal, window, softcap, scale, doc_ids)
    if doc_ids is not None:
        doc_ids = doc_ids.to(torch.int32).contiguous()
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    path = choose_impl("flash_attention", impl, q, k, v, uses_bf16_dot=True)
    if path == "torch":
        return TiledAttention.apply(q, k, v, causal, window, softcap, scale, doc_ids)
    return FlashAttentionTriton.apply(q, k, v, causal, window, softcap, scale, doc_ids, bool(deterministic))
