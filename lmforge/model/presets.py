"""Named model presets: only the values that differ from `ModelConfig`'s defaults.

`get_preset(name)` also accepts a path to a TOML file (a `[model]`-less table of ModelConfig
fields), and `overrides` in the dotted form `["n_layers=2", "moe.n_experts=4"]`.
The shapes follow the published models they are named after; the "-style" presets borrow an
architecture's choices at a size of our picking.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.config import apply_overrides, from_dict, load_toml
from lmforge.errors import ConfigError
from lmforge.model.config import ModelConfig

PRESETS: dict[str, dict[str, Any]] = {
    # Trains on a laptop CPU in minutes: the default for tests and the quick-start.
    "tiny": dict(vocab_size=8192, context_length=256, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2),
    # GPT-2 small (Radford et al. 2019): 124,439,808 parameters.
    "gpt2-small": dict(vocab_size=50257, context_length=1024, d_model=768, n_layers=12, n_heads=12,
                       norm="layernorm", norm_bias=True, activation="gelu_tanh", glu=False, bias=True,
                       positions="learned", tie_embeddings=True),
    # Llama-3.2-1B shape: GQA 32/8, SwiGLU 8192, RoPE theta 5e5, tied head (1.24B parameters).
    "llama-1b": dict(vocab_size=128256, context_length=8192, d_model=2048, n_layers=16, n_heads=32,
                     n_kv_heads=8, head_dim=64, d_ff=8192, rope_theta=500000.0, tie_embeddings=True),
    # Gemma-2-2B-like: alternating 4096-token sliding-window and global layers, sandwich norms,
    # GeGLU, attention (50) and final (30) logit soft-capping, tied head.
    "gemma2-style": dict(vocab_size=256000, context_length=8192, d_model=2304, n_layers=26, n_heads=8,
                         n_kv_heads=4, head_dim=256, d_ff=9216, activation="gelu_tanh",
                         norm_eps=1e-6, norm_placement="sandwich", window=4096,
                         layer_pattern=["local", "global"], attn_softcap=50.0, final_softcap=30.0,
                         tie_embeddings=True),
    # "3 local RoPE layers then 1 global NoPE layer" (Command-A / Llama-4 style) with QK-norm.
    "hybrid-nope-small": dict(vocab_size=32768, context_length=4096, d_model=512, n_layers=8, n_heads=8,
                              n_kv_heads=2, window=512, qk_norm=True,
                              layer_pattern=["local", "local", "local", "global-nope"]),
    # A small Mixtral-style MoE: 8 experts, top-2 (softmax over the chosen 2), switch balance loss
    # and router z-loss.
    "moe-small": dict(vocab_size=32768, context_length=2048, d_model=512, n_layers=8, n_heads=8,
                      n_kv_heads=4, moe=dict(n_experts=8, top_k=2, routing="topk_softmax",
                                             balance_loss_coef=0.01, router_z_loss_coef=1e-3)),
    # DeepSeek-V3's choices at ~1/7 width: MLA, fine-grained sigmoid-routed experts + a shared
    # expert, aux-loss-free balancing with a small sequence-level loss, first layer dense, MTP depth 1.
    "deepseek-v3-style": dict(vocab_size=32768, context_length=4096, d_model=1024, n_layers=12, n_heads=16,
                              norm_eps=1e-6,
                              mla=dict(q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
                                       qk_rope_head_dim=32, v_head_dim=64),
                              moe=dict(n_experts=32, top_k=4, n_shared_experts=1, d_expert=256,
                                       routing="sigmoid_topk", normalize_topk=True, route_scale=2.5,
                                       balance_loss_coef=0.0, seq_balance_loss_coef=1e-4,
                                       aux_free_bias=True),
                              n_dense_layers=1, mtp_depth=1, mtp_loss_weight=0.3),
    # DeepSeek-V3 at its published shape (671B + 14B MTP, 37B active), for accounting.
    "deepseek-v3": dict(vocab_size=129280, context_length=4096, d_model=7168, n_layers=61, n_heads=128,
                        d_ff=18432, norm_eps=1e-6,
                        mla=dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                                 qk_rope_head_dim=64, v_head_dim=128),
                        moe=dict(n_experts=256, top_k=8, n_shared_experts=1, d_expert=2048,
                                 routing="sigmoid_topk", normalize_topk=True, route_scale=2.5,
                                 balance_loss_coef=0.0, seq_balance_loss_coef=1e-4, aux_free_bias=True),
                        n_dense_layers=3, mtp_depth=1, mtp_loss_weight=0.3),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str, overrides: list[str] | None = None) -> ModelConfig:
    """The preset called `name` (or the TOML file at that path), with dotted overrides applied."""
    if name in PRESETS:
        data, source = PRESETS[name], f"model preset '{name}'"
    elif name.endswith(".toml") or Path(name).is_file():
        data, source = load_toml(name), name
    else:
        raise ConfigError(f"unknown model preset {name!r} (known: {', '.join(preset_names())}; "
                          "or give a path to a .toml file)")
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + overrides"
    return from_dict(ModelConfig, data, source)
