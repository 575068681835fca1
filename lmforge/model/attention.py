"""Attention: the `attend` backend interface, its backends, and the (GQA) self-attention layer.

`attend(q, k, v, ...)` is the one function every attention layer calls (the MLA layer too):
    q [B, Hq, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] -> [B, Hq, T, Dv], Hq % Hkv == 0.
When S > T (decoding with a cache) query i sits at key position S - T + i.
Masking options: `causal`, `window` (a query attends to the last `window` keys, itself included),
`doc_ids` [B, S] (a query attends only to keys of its own document: packed sequences).
`softcap` applies cap·tanh(s/cap) to the scores; `scale` defaults to 1/sqrt(D).
`query_positions` [B, T] (for preallocated caches, where key slot s holds position s): query t of
row b sits at position query_positions[b, t] instead of S - T + t, and keys at later slots (stale
or empty) are masked; rows may then have different lengths. With it, `key_positions` [B, S] gives
each key slot's position instead (a ring buffer for sliding-window layers; -1 marks an empty slot).
Only the reference and SDPA backends take these ("triton" and "auto" run SDPA for them).

Backends (registry `BACKENDS`, extend with `register_backend`):
- "reference": explicit masked softmax, the spec;
- "sdpa": torch's scaled_dot_product_attention (flash / memory-efficient kernels on GPU; torch
  2.11 already picks cuDNN's kernel first on Hopper for plain causal calls);
  it has no soft-capping, so a softcap call runs the reference instead and logs why, once;
- "triton": `lmforge.kernels.flash_attention.flash_attention`, imported lazily;
- "auto" (the model default): per call, the fastest measured correct choice (docs/benchmarks.md,
  H200): SDPA for plain causal attention; on CUDA with 16-bit inputs, the Triton kernel when a
  window, doc_ids or softcap is set (SDPA would need a dense boolean mask or the reference); SDPA
  (or the reference for softcap) everywhere else.

This module does not own the KV cache format (see cache.py) nor latent attention (mla.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.model.layers import (
    Linear,
    PackedLinears,
    RMSNorm,
    cat_linears,
    dropout,
    run_packed,
    softcap,
    softmax,
    upcast,
)
from lmforge.model.positions import apply_rope

log = logging.getLogger(__name__)

_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
_SDPA_HAS_GQA = _TORCH_VERSION >= (2, 5)


def attention_mask(T: int, S: int, *, causal: bool, window: int | None, doc_ids: torch.Tensor | None,
                   device: torch.device, query_positions: torch.Tensor | None = None,
                   key_positions: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean mask [B or 1, 1, T, S], True where query t may attend to key s; None if all may."""
    if not causal and window is None and doc_ids is None and query_positions is None:
        return None
    if query_positions is not None:  # per-row query positions; key slot s holds position s
        if not causal:
            raise ConfigError("query_positions needs causal attention (later slots are not keys yet)")
        q_pos = query_positions[:, None, :, None]  # [B, 1, T, 1]
        if key_positions is None:
            k_pos = torch.arange(S, device=device).view(1, 1, 1, S)
            mask = k_pos <= q_pos
        else:
            k_pos = key_positions[:, None, None, :]  # [B, 1, 1, S]
            mask = (k_pos <= q_pos) & (k_pos >= 0)
        if window is not None:
            mask &= q_pos - k_pos < window
    else:
        q_pos = torch.arange(S - T, S, device=device).unsqueeze(1)  # [T, 1]
        k_pos = torch.arange(S, device=device).unsqueeze(0)  # [1, S]
        mask = torch.ones(T, S, dtype=torch.bool, device=device)
        if causal:
            mask &= k_pos <= q_pos
        if window is not None:
            mask &= (q_pos - k_pos < window) & (k_pos - q_pos < window)
        mask = mask[None, None]
    if doc_ids is not None:
        if doc_ids.shape[-1] != S:
            raise ConfigError(f"doc_ids has length {doc_ids.shape[-1]}, expected the key length {S}")
        same = doc_ids[:, S - T:, None] == doc_ids[:, None, :]  # [B, T, S]
        mask = mask & same[:, None]
    return mask


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attend expects 4-d q/k/v [B, H, T, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of kv heads {k.shape[1]} "
                         f"(v has {v.shape[1]})")
    if k.shape[2] < q.shape[2] or k.shape[2] != v.shape[2]:
        raise ValueError(f"key length {k.shape[2]} must be >= query length {q.shape[2]} and equal "
                         f"the value length {v.shape[2]}")


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv·n_rep, S, D]; query head h uses kv head h // n_rep."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def reference_attention(q, k, v, *, causal=True, window=None, softcap_value=None, scale=None,
                        doc_ids=None, query_positions=None, key_positions=None, attn_mask=None):
    """softmax(mask(softcap(q kᵀ · scale))) v, scores in float32: the spec other backends match."""
    _check_shapes(q, k, v)
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = softcap((upcast(q) @ upcast(k).transpose(-2, -1)) * scale, softcap_value)
    mask = attn_mask if attn_mask is not None else attention_mask(
        q.shape[2], k.shape[2], causal=causal, window=window, doc_ids=doc_ids, device=q.device,
        query_positions=query_positions, key_positions=key_positions)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (softmax(scores, dim=-1) @ upcast(v)).to(q.dtype)


_warned: set[str] = set()


def sdpa_attention(q, k, v, *, causal=True, window=None, softcap_value=None, scale=None, doc_ids=None,
                   query_positions=None, key_positions=None, attn_mask=None):
    """torch.nn.functional.scaled_dot_product_attention with our masking rules."""
    if softcap_value is not None:
        if "softcap" not in _warned:
            _warned.add("softcap")
            log.warning("attention softcap is not supported by SDPA: using the reference backend")
        return reference_attention(q, k, v, causal=causal, window=window, softcap_value=softcap_value,
                                   scale=scale, doc_ids=doc_ids, query_positions=query_positions,
                                   key_positions=key_positions, attn_mask=attn_mask)
    _check_shapes(q, k, v)
    T, S = q.shape[2], k.shape[2]
    n_rep = q.shape[1] // k.shape[1]
    kwargs = {}
    if n_rep > 1:
        if _SDPA_HAS_GQA:
            kwargs["enable_gqa"] = True
        else:
            k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    if causal and window is None and doc_ids is None and T == S and query_positions is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **kwargs)
    mask = attn_mask if attn_mask is not None else attention_mask(
        T, S, causal=causal, window=window, doc_ids=doc_ids, device=q.device,
        query_positions=query_positions, key_positions=key_positions)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **kwargs)


def triton_attention(q, k, v, *, causal=True, window=None, softcap_value=None, scale=None, doc_ids=None):
    """The Triton flash-attention kernel (lmforge/kernels/flash_attention.py), imported on first use."""
    try:
        from lmforge.kernels.flash_attention import flash_attention
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("lmforge"):
            raise ConfigError("attention_backend = 'triton' needs lmforge/kernels/flash_attention.py, "
                              "which is not in this checkout; use 'sdpa' or 'reference'") from None
        raise
    return flash_attention(q, k, v, causal=causal, window=window, softcap=softcap_value, scale=scale,
                           doc_ids=doc_ids)


def _positioned(q, k, v, *, causal, window, softcap_value, scale, doc_ids, query_positions, key_positions=None,
                attn_mask=None):
    """SDPA for a `query_positions` call, which the Triton kernel does not take (logged once)."""
    if "query_positions" not in _warned:
        _warned.add("query_positions")
        log.info("attention with query_positions (preallocated cache) runs on SDPA")
    return sdpa_attention(q, k, v, causal=causal, window=window, softcap_value=softcap_value, scale=scale,
                          doc_ids=doc_ids, query_positions=query_positions, key_positions=key_positions,
                          attn_mask=attn_mask)


def _triton_importable() -> bool:
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import lmforge.kernels.flash_attention  # noqa: F401
            _TRITON_OK = True
        except ImportError as e:
            log.info("attention backend 'auto' will not use Triton: %s", e)
            _TRITON_OK = False
    return _TRITON_OK


_TRITON_OK: bool | None = None


def pick_auto(device_type: str, dtype: torch.dtype, head_dim: int, masked: bool, triton_ok) -> str:
    """The rule behind "auto" ("triton" or "sdpa"); `triton_ok` is called only when it matters."""
    if (masked and device_type == "cuda" and dtype in (torch.float16, torch.bfloat16) and head_dim <= 256
            and triton_ok()):
        return "triton"
    return "sdpa"


def auto_choice(q: torch.Tensor, v: torch.Tensor, *, window=None, softcap_value=None, doc_ids=None) -> str:
    """The backend "auto" runs for these inputs (see the module docstring)."""
    masked = window is not None or doc_ids is not None or softcap_value is not None
    return pick_auto(q.device.type, q.dtype, max(q.shape[-1], v.shape[-1]), masked, _triton_importable)


def auto_attention(q, k, v, *, causal=True, window=None, softcap_value=None, scale=None, doc_ids=None):
    fn = BACKENDS[auto_choice(q, v, window=window, softcap_value=softcap_value, doc_ids=doc_ids)]
    return fn(q, k, v, causal=causal, window=window, softcap_value=softcap_value, scale=scale,
              doc_ids=doc_ids)


BACKENDS: dict[str, Callable] = {
    "reference": reference_attention,
    "sdpa": sdpa_attention,
    "triton": triton_attention,
    "auto": auto_attention,
}


def register_backend(name: str, fn: Callable) -> None:
    """Add an attention backend taking (q, k, v, *, causal, window, softcap_value, scale, doc_ids)."""
    BACKENDS[name] = fn


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
           window: int | None = None, softcap: float | None = None, scale: float | None = None,
           doc_ids: torch.Tensor | None = None, backend: str = "sdpa",
           query_positions: torch.Tensor | None = None, key_positions: torch.Tensor | None = None,
           attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention through the chosen backend (see the module docstring).
    `attn_mask` (with query_positions only): the mask `attention_mask` would build for these
    arguments, built once by the caller and shared by layers that attend alike."""
    try:
        fn = BACKENDS[backend]
    except KeyError:
        raise ConfigError(f"attention backend {backend!r} must be one of {sorted(BACKENDS)}") from None
    if key_positions is not None and query_positions is None:
        raise ConfigError("attend: key_positions needs query_positions")
    if query_positions is not None:
        if backend not in ("reference", "sdpa"):
            fn = _positioned
        kw = {} if key_positions is None else {"key_positions": key_positions}
        if attn_mask is not None:
            kw["attn_mask"] = attn_mask
        return fn(q, k, v, causal=causal, window=window, softcap_value=softcap, scale=scale, doc_ids=doc_ids,
                  query_positions=query_positions, **kw)
    return fn(q, k, v, causal=causal, window=window, softcap_value=softcap, scale=scale, doc_ids=doc_ids)


class Attention(nn.Module):
    """Causal self-attention with MHA/GQA/MQA heads, optional QK-norm, RoPE, window and softcap.

    forward(x [B, T, d_model], positions [B, T], doc_ids [B, T] | None, cache, rope) -> [B, T, d_model].
    `rope`: (cos, sin) = positions.rope_cos_sin(positions, head_dim, rope_theta, float32,
    rope_scaling), computed once per model forward for all layers (None: computed here).
    `cache` is a per-layer cache (cache.LayerCache) that appends this call's keys/values and returns
    all of them; with a cache, positions must continue from the cached length. A cache with
    `keys_at_positions = True` (inference's preallocated cache) returns its buffers, where slot s
    holds position s (or says where: `key_positions`, a ring buffer), and attention masks by
    `positions` per row (`attend(query_positions=..., key_positions=...)`); such a cache may offer
    `attention_mask(positions, S, window)`, the mask built once per forward for all layers alike.
    """

    def __init__(self, cfg, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q = Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.qkv_bias)
        self.k = Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, cfg.qkv_bias)
        self.v = Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, cfg.qkv_bias)
        self.o = Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, cfg.bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.rope_theta = cfg.rope_theta if cfg.layer_uses_rope(layer) else None
        self.rope_scaling = cfg.rope_scaling
        self.window = cfg.layer_window(layer)
        self.softcap = cfg.attn_softcap
        self.backend = cfg.attention_backend
        self.dropout = cfg.dropout
        self.packed: PackedLinears | None = None  # pack(): q, k, v in one buffer

    def pack(self) -> bool:
        """Store q, k and v as one buffer (layers.PackedLinears): one GEMM computes all three, in
        training and inference; parameter names and objects, checkpoints are unchanged. Idempotent."""
        self.packed = PackedLinears.pack(self.q, self.k, self.v, current=self.packed)
        return self.packed is not None

    def project_qkv(self, x):
        """x [B, T, d] -> q, k, v [B, T, heads·head_dim] each.

        One GEMM when packed (`pack()`). Unpacked, with gradients on and plain Linears (not
        quantized or otherwise swapped), one GEMM over the concatenated weights (the same numbers):
        the backward then has one input-gradient GEMM instead of three plus two adds. Parameter
        names, checkpoints and tensor-parallel sharding are unchanged. Unpacked inference keeps
        three GEMMs: concatenating would copy the weights for every token."""
        qkv = (self.q, self.k, self.v)
        out = run_packed(self, qkv, x)
        if out is None:
            out = cat_linears(qkv, x)
        return out if out is not None else (self.q(x), self.k(x), self.v(x))

    def forward(self, x, positions, doc_ids=None, cache=None, rope=None):
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_theta is not None:
            if rope is not None and rope[0].dtype != (torch.float64 if q.dtype == torch.float64 else torch.float32):
                rope = None  # apply_rope computes in float64 for float64 inputs
            q = apply_rope(q, positions, self.rope_theta, cos_sin=rope, scaling=self.rope_scaling)
            k = apply_rope(k, positions, self.rope_theta, cos_sin=rope, scaling=self.rope_scaling)
        qpos = kpos = mask = None
        if cache is not None:
            k, v = cache.update(k, v)
            if getattr(cache, "keys_at_positions", False):
                qpos, kpos = positions, getattr(cache, "key_positions", None)
                shared = getattr(cache, "attention_mask", None)  # built once per forward, if offered
                if shared is not None and doc_ids is None:
                    mask = shared(positions, k.shape[2], self.window)
        y = attend(q, k, v, causal=True, window=self.window, softcap=self.softcap, doc_ids=doc_ids,
                   backend=self.backend, query_positions=qpos, key_positions=kpos, attn_mask=mask)
        y = self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        return dropout(y, self.dropout, self.training)

    def extra_repr(self) -> str:
        return (f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                f"rope={self.rope_theta is not None}, window={self.window}, backend={self.backend}")
