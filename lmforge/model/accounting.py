"""Parameter, FLOP and training-memory accounting, from the config alone (no weights allocated).

- `count_params(cfg)`: total, embedding (token + learned position tables), non_embedding
  (total - embedding, Kaplan et al.), lm_head, mtp, and active (per token, for MoE).
- `flops_per_token(cfg, seq_len)`: matmul FLOPs of one token's forward pass (2 per multiply-add),
  backward = 2x forward, total = 3x. Attention scores and weighted values are counted over the
  key positions each query actually attends to (causal: on average (T+1)/2; sliding window:
  min(i+1, W)); `attention="full"` counts all T keys, as dense kernels and FlopCounterMode do.
  Norms, activations, softmax and biases (O(d) per token) are not counted.
- `memory_estimate(cfg, batch, seq_len)`: bytes for weights, grads, optimizer state and
  activations of a training step; activations are an estimate (see its docstring).

Dense layers use closed forms; tests check them against `sum(p.numel())` of the real modules.
MoE and MLA layers use the counts their configs give (`MoEConfig.param_counts`,
`MLAConfig.param_count`), which the tests also check against the real modules.
"""

from __future__ import annotations

from lmforge.model.config import ModelConfig


def _norm_params(cfg: ModelConfig) -> int:
    return cfg.d_model * (2 if cfg.norm == "layernorm" and cfg.norm_bias else 1)


def _attention_params(cfg: ModelConfig) -> int:
    d, hq, hkv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    n = d * hq * hd + 2 * d * hkv * hd + hq * hd * d
    if cfg.qkv_bias:
        n += hq * hd + 2 * hkv * hd
    if cfg.bias:
        n += d
    if cfg.qk_norm:
        n += 2 * hd
    return n


def _mlp_params(cfg: ModelConfig) -> int:
    d, f = cfg.d_model, cfg.d_ff
    n_in = 2 if cfg.glu else 1
    return n_in * d * f + f * d + ((n_in * f + d) if cfg.bias else 0)


def _mla_params(cfg: ModelConfig) -> tuple[int, int]:
    """(all, matmul-only) parameters of one MLA layer (the difference: its two RMSNorm weights)."""
    m = cfg.mla
    total = m.param_count(cfg.d_model, cfg.n_heads)
    return total, total - m.kv_lora_rank - (m.q_lora_rank or 0)


def _block_params(cfg: ModelConfig, layer: int) -> tuple[int, int]:
    """(total, active) parameters of block `layer`."""
    n_norms = 1 if cfg.parallel_block else 2
    if cfg.norm_placement == "sandwich":
        n_norms += 2
    norms = n_norms * _norm_params(cfg)
    attn = _attention_params(cfg) if cfg.mla is None else _mla_params(cfg)[0]
    if cfg.layer_is_moe(layer):
        counts = cfg.moe.param_counts(cfg.d_model, cfg.glu)
        ff_total, ff_active = counts["total"], counts["active"]
    else:
        ff_total = ff_active = _mlp_params(cfg)
    return norms + attn + ff_total, norms + attn + ff_active


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts; `total` equals sum(p.numel() for p in Transformer(cfg).parameters())."""
    d, V = cfg.d_model, cfg.vocab_size
    embedding = V * d + (cfg.context_length * d if cfg.positions == "learned" else 0)
    blocks = [_block_params(cfg, i) for i in range(cfg.n_layers)]
    final_norm = 0 if cfg.norm_placement == "post" else _norm_params(cfg)
    lm_head = 0 if cfg.tie_embeddings else V * d
    mtp_blocks = [_block_params(cfg, cfg.n_layers + k) for k in range(cfg.mtp_depth)]
    mtp_extra = 3 * _norm_params(cfg) + 2 * d * d
    mtp_total = sum(t for t, _ in mtp_blocks) + cfg.mtp_depth * mtp_extra
    total = embedding + sum(t for t, _ in blocks) + final_norm + lm_head + mtp_total
    active = embedding + sum(a for _, a in blocks) + final_norm + lm_head + \
        sum(a for _, a in mtp_blocks) + cfg.mtp_depth * mtp_extra
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding,
            "lm_head": lm_head, "mtp": mtp_total, "active": active,
            "active_non_embedding": active - embedding}


def attended_keys(seq_len: int, window: int | None, causal: bool = True) -> float:
    """Average number of keys a query attends to in a sequence of length seq_len."""
    T = seq_len
    if not causal:
        return float(T if window is None else sum(min(T, i + window) - max(0, i - window + 1)
                                                  for i in range(T)) / T)
    if window is None or window >= T:
        return (T + 1) / 2
    # queries 0..W-1 see i+1 keys, the rest see W
    return (window * (window + 1) / 2 + (T - window) * window) / T


def _attention_dims(cfg: ModelConfig) -> tuple[int, int, int]:
    """(query heads, q·k dim, value dim) of the score and value matmuls."""
    if cfg.mla is None:
        return cfg.n_heads, cfg.head_dim, cfg.head_dim
    m = cfg.mla
    return cfg.n_heads, m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim


def flops_per_token(cfg: ModelConfig, seq_len: int, attention: str = "causal") -> dict[str, float]:
    """Forward, backward and total training FLOPs per token at sequence length `seq_len`."""
    if attention not in ("causal", "full"):
        raise ValueError(f"attention must be 'causal' or 'full', got {attention!r}")
    d, V = cfg.d_model, cfg.vocab_size
    heads, dqk, dv = _attention_dims(cfg)

    def layer_flops(layer: int) -> float:
        if cfg.mla is None:
            proj = d * cfg.n_heads * cfg.head_dim * 2 + 2 * d * cfg.n_kv_heads * cfg.head_dim
        else:
            proj = _mla_params(cfg)[1]
        if cfg.layer_is_moe(layer):  # router, shared experts and top_k routed experts: all matmuls
            ff = cfg.moe.param_counts(d, cfg.glu)["active"]
        else:
            ff = (3 if cfg.glu else 2) * d * cfg.d_ff
        keys = (attended_keys(seq_len, cfg.layer_window(layer)) if attention == "causal"
                else float(seq_len))
        return 2 * (proj + ff) + 2 * heads * (dqk + dv) * keys

    attn_layers = sum(layer_flops(i) for i in range(cfg.n_layers))
    head = 2 * d * V
    mtp = sum(layer_flops(cfg.n_layers + k) + 2 * 2 * d * d + head for k in range(cfg.mtp_depth))
    forward = attn_layers + head + mtp
    return {"forward": forward, "backward": 2 * forward, "total": 3 * forward,
            "attention_fraction": sum(2 * heads * (dqk + dv) * (attended_keys(seq_len, cfg.layer_window(i))
                                                                if attention == "causal" else seq_len)
                                      for i in range(cfg.n_layers)) / forward}


def activations_per_token(cfg: ModelConfig, layer: int) -> int:
    """Numbers one block saves for backward per token (flash-style attention: no T×T matrix)."""
    d = cfg.d_model
    n = 3 * d  # block input and the two normed inputs
    if cfg.mla is None:
        n += 2 * cfg.n_heads * cfg.head_dim + 2 * cfg.n_kv_heads * cfg.head_dim  # q, k, v, output
    else:
        m, h = cfg.mla, cfg.n_heads
        n += 2 * (m.q_lora_rank or 0) + 2 * (m.kv_lora_rank + m.qk_rope_head_dim)  # low-rank + normed
        n += 2 * h * m.qk_head_dim + h * (m.qk_nope_head_dim + m.v_head_dim) + h * m.v_head_dim
    hidden = 4 if cfg.glu else 2  # gate and up outputs, activation, product (plain: up, activation)
    if cfg.layer_is_moe(layer):
        moe, f = cfg.moe, cfg.moe.expert_width(d, cfg.glu)
        n += moe.n_experts + 2 * moe.top_k * d + (moe.top_k + moe.n_shared_experts) * hidden * f
    else:
        n += hidden * cfg.d_ff
    return n


def memory_estimate(cfg: ModelConfig, batch_size: int, seq_len: int, *, weight_bytes: int = 4,
                    grad_bytes: int = 4, optimizer_bytes: int = 8, activation_bytes: int = 2,
                    activation_checkpointing: bool = False) -> dict[str, float]:
    """Bytes of GPU memory for one training step (AdamW in fp32 with bf16 autocast by default).

    weights/grads/optimizer: per parameter (fp32 master weights, fp32 grads, two AdamW moments).
    activations: what each block saves for backward (`activations_per_token`: block input and
    normed inputs, q/k/v and attention output or MLA's latents, the MLP's or chosen experts'
    hidden tensors), in `activation_bytes` each, plus the logits in 16-bit and the float32 copy
    the loss takes. With activation checkpointing only each block's input is kept, plus one
    block's activations during its recomputation. An estimate: allocator overhead, temporary
    buffers and fused-kernel savings are not modelled.
    """
    p = count_params(cfg)["total"]
    tokens = batch_size * seq_len
    layers = list(range(cfg.n_layers + cfg.mtp_depth))
    per_layer = [activations_per_token(cfg, i) for i in layers]
    if activation_checkpointing:
        acts = tokens * (len(layers) * cfg.d_model + max(per_layer)) * activation_bytes
    else:
        acts = tokens * sum(per_layer) * activation_bytes
    acts += tokens * cfg.vocab_size * (activation_bytes + 4) * (1 + cfg.mtp_depth)
    out = {"weights": p * weight_bytes, "grads": p * grad_bytes, "optimizer": p * optimizer_bytes,
           "activations": acts}
    out["total"] = sum(out.values())
    return out
