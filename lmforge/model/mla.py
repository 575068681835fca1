"""Multi-head latent attention (DeepSeek-V2/V3): attention whose KV cache is a small latent.

Each token's keys and values come from one compressed latent c = RMSNorm(x W_DKV) of width
`kv_lora_rank` (r), up-projected per head (W_UK, W_UV stacked in `kv_b_proj`). RoPE cannot act on
keys that are re-derived from c, so position lives in a separate `qk_rope_head_dim` part: one rope
key per token shared by all heads (MQA-style), concatenated to every head's no-position key.
Queries come from x directly or through a low-rank bottleneck (`q_lora_rank`). Scores use the
scale 1/sqrt(qk_nope_head_dim + qk_rope_head_dim).

The cache keeps only c [B, S, r] and the rope key [B, S, rope_dim] per layer: (r + rope_dim)
numbers per token instead of 2·H·head_dim.

Two equal forms of the same function:
- explicit (training): up-project c to per-head k_nope and v, then ordinary attention;
- absorbed (decoding): q_nope·k_nope = (q_nope W_UK)·c, and Σ p·v = (Σ p·c) W_UV, so the query is
  mapped into latent space and attention runs as MQA over the cached latents themselves (one
  kv "head" with key [c, k_rope] and value c); W_UV is applied after. No per-head keys or values
  are ever materialised for the cached tokens.
Both go through `attention.attend`, so every backend and mask (causal, window, doc_ids) applies.

Parameter names follow Hugging Face's DeepseekV3Attention (q_a_proj, q_a_layernorm, q_b_proj,
kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj). RoPE uses this package's "rotate half"
layout (positions.py); HF checkpoints with `rope_interleave` would need their rope rows permuted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.model.attention import attend
from lmforge.model.layers import Linear, RMSNorm, dropout
from lmforge.model.positions import apply_rope


@dataclass
class MLAConfig:
    q_lora_rank: int | None = None  # None: full-rank query projection (DeepSeek-V2-Lite); V3: 1536
    kv_lora_rank: int = 512  # width r of the cached latent
    qk_nope_head_dim: int = 128  # per-head query/key part without positions
    qk_rope_head_dim: int = 64  # rotary part (one key shared by all heads)
    v_head_dim: int = 128

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"MLAConfig: {name} = {getattr(self, name)} must be >= 1")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise ConfigError(f"MLAConfig: q_lora_rank = {self.q_lora_rank} must be >= 1 (or unset)")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"MLAConfig: qk_rope_head_dim = {self.qk_rope_head_dim} must be even "
                              "(RoPE rotates pairs)")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def param_count(self, d_model: int, n_heads: int) -> int:
        """Parameters of one MLA layer (norm weights included), matching the module's shapes."""
        q = (d_model * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * n_heads * self.qk_head_dim
             if self.q_lora_rank else d_model * n_heads * self.qk_head_dim)
        kv = (d_model * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
              + self.kv_lora_rank * n_heads * (self.qk_nope_head_dim + self.v_head_dim))
        return q + kv + n_heads * self.v_head_dim * d_model

    def cache_width(self) -> int:
        """Numbers cached per token per layer: the latent and the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


class MultiHeadLatentAttention(nn.Module):
    """forward(x [B, T, D], positions [B, T], doc_ids [B, S] | None, cache) -> [B, T, D].

    `cache` is a cache.LayerCache (anything with `update(latent, rope_key) -> (all latents, all
    rope keys)` concatenating along the sequence); with it, positions continue from the cached
    length and `doc_ids`, if given, cover all S = cached + new tokens. `absorbed` picks the form
    (default: absorbed when decoding with a cache, explicit otherwise).
    """

    def __init__(self, d_model: int, n_heads: int, cfg: MLAConfig, rope_theta: float | None = 10000.0,
                 backend: str = "sdpa", *, window: int | None = None, norm_eps: float = 1e-5,
                 dropout: float = 0.0, init_std: float = 0.02):
        super().__init__()
        self.cfg, self.n_heads = cfg, n_heads
        self.rope_theta, self.backend, self.window, self.dropout = rope_theta, backend, window, dropout
        qk, r = cfg.qk_head_dim, cfg.kv_lora_rank
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(d_model, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, n_heads * qk)
        else:
            self.q_proj = Linear(d_model, n_heads * qk)
        self.kv_a_proj_with_mqa = Linear(d_model, r + cfg.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(r, norm_eps)
        self.kv_b_proj = Linear(r, n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.o_proj = Linear(n_heads * cfg.v_head_dim, d_model)
        self.scale = 1.0 / math.sqrt(qk)
        self.reset_parameters(init_std)

    def reset_parameters(self, std: float = 0.02) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters(std)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.q_lora_rank:
            return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return self.q_proj(x)

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, r] and W_UV [H, v, r], views of kv_b_proj.weight."""
        c = self.cfg
        w = self.kv_b_proj.weight.view(self.n_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        return w[:, :c.qk_nope_head_dim], w[:, c.qk_nope_head_dim:]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor | None = None,
                cache=None, absorbed: bool | None = None) -> torch.Tensor:
        c, H = self.cfg, self.n_heads
        B, T, _ = x.shape
        q = self._query(x).view(B, T, H, c.qk_head_dim).transpose(1, 2)  # [B, H, T, nope+rope]
        q_nope, q_rope = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [B, T, r]
        if self.rope_theta is not None:
            q_rope = apply_rope(q_rope, positions, self.rope_theta)
            k_rope = apply_rope(k_rope, positions, self.rope_theta)  # [B, T, rope]: one key for all heads
        qpos = kpos = None
        if cache is not None:
            latent, k_rope = cache.update(latent, k_rope)  # [B, S, r], [B, S, rope]
            if getattr(cache, "keys_at_positions", False):  # see Attention
                qpos, kpos = positions, getattr(cache, "key_positions", None)
        S = latent.shape[1]
        w_uk, w_uv = self._up_weights()
        if absorbed if absorbed is not None else cache is not None:
            q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)
            k = torch.cat((latent, k_rope), dim=-1).unsqueeze(1)  # [B, 1, S, r+rope]
            o_latent = attend(torch.cat((q_latent, q_rope), dim=-1), k, latent.unsqueeze(1), causal=True,
                              window=self.window, scale=self.scale, doc_ids=doc_ids, backend=self.backend,
                              query_positions=qpos, key_positions=kpos)
            y = torch.einsum("bhtr,hvr->bhtv", o_latent, w_uv)  # [B, H, T, v]
        else:
            kv = self.kv_b_proj(latent).view(B, S, H, c.qk_nope_head_dim + c.v_head_dim).transpose(1, 2)
            k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
            k = torch.cat((k_nope, k_rope.unsqueeze(1).expand(B, H, S, c.qk_rope_head_dim)), dim=-1)
            y = attend(torch.cat((q_nope, q_rope), dim=-1), k, v, causal=True, window=self.window,
                       scale=self.scale, doc_ids=doc_ids, backend=self.backend, query_positions=qpos,
                       key_positions=kpos)
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, H * c.v_head_dim))
        return dropout(y, self.dropout, self.training)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"heads={self.n_heads}, q_lora_rank={c.q_lora_rank}, kv_lora_rank={c.kv_lora_rank}, "
                f"nope={c.qk_nope_head_dim}, rope={c.qk_rope_head_dim}, v={c.v_head_dim}, "
                f"window={self.window}, backend={self.backend}")
