"""Parameter and FLOP counts against published numbers, closed forms, real modules and torch's
FlopCounterMode."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lmforge.model import ModelConfig, Transformer, count_params, flops_per_token, get_preset, memory_estimate
from lmforge.model.accounting import attended_keys
from lmforge.model.mla import MLAConfig
from lmforge.model.moe import MoEConfig
from lmforge.model.presets import PRESETS


def numel(cfg):
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(cfg).parameters())


def test_gpt2_small_has_the_published_124_439_808_parameters():
    cfg = get_preset("gpt2-small")
    d, V, L, T = 768, 50257, 12, 1024
    # wte + wpe + per layer (2 LayerNorms, qkv + proj with biases, MLP 4d with biases) + final LN
    per_layer = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    closed = V * d + T * d + L * per_layer + 2 * d
    assert closed == 124_439_808
    counts = count_params(cfg)
    assert counts["total"] == numel(cfg) == 124_439_808
    assert counts["embedding"] == V * d + T * d and counts["lm_head"] == 0  # tied
    assert counts["non_embedding"] == 124_439_808 - V * d - T * d == 85_056_000


def test_llama_1b_shape_closed_form():
    cfg = get_preset("llama-1b")
    d, V, L, f, kv = 2048, 128256, 16, 8192, 8 * 64
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * f + 2 * d
    closed = V * d + L * per_layer + d
    assert closed == 1_235_814_400  # Llama-3.2-1B as published
    assert count_params(cfg)["total"] == numel(cfg) == closed
    assert count_params(cfg.replace(tie_embeddings=False))["total"] == closed + V * d


VARIANTS = [
    dict(),
    dict(bias=True, norm="layernorm", norm_bias=True, qk_norm=True),
    dict(qkv_bias=True, tie_embeddings=False, positions="learned"),
    dict(norm_placement="sandwich", n_kv_heads=1, glu=False, activation="relu2"),
    dict(norm_placement="post", parallel_block=True, positions="sinusoidal"),
    dict(mtp_depth=2, head_dim=20),
    dict(moe=MoEConfig(n_experts=5, top_k=2, n_shared_experts=1, d_expert=24), n_dense_layers=1, mtp_depth=1),
    dict(mla=MLAConfig(q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=6)),
    dict(mla=MLAConfig(kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=6),
         moe=MoEConfig(n_experts=4, top_k=1)),
]


@pytest.mark.parametrize("kw", VARIANTS)
def test_counts_match_real_modules(kw):
    cfg = ModelConfig(**{**dict(vocab_size=61, context_length=40, d_model=36, n_layers=3, n_heads=6,
                                n_kv_heads=2), **kw})
    c = count_params(cfg)
    assert c["total"] == numel(cfg)
    assert c["non_embedding"] == c["total"] - c["embedding"]
    if cfg.moe is None:
        assert c["active"] == c["total"]
    else:
        e, k, f, d = cfg.moe.n_experts, cfg.moe.top_k, cfg.moe.expert_width(36, True), 36
        n_moe = sum(cfg.layer_is_moe(i) for i in range(cfg.n_layers + cfg.mtp_depth))
        assert c["total"] - c["active"] == n_moe * (e - k) * 3 * d * f


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_count_equals_modules(name):
    cfg = get_preset(name)
    assert count_params(cfg)["total"] == numel(cfg)


def test_attended_keys_closed_forms():
    assert attended_keys(10, None) == 5.5
    assert attended_keys(10, 3) == sum(min(i + 1, 3) for i in range(10)) / 10
    assert attended_keys(10, 50) == 5.5


@pytest.mark.parametrize("kw", [dict(), dict(glu=False, bias=True), dict(mtp_depth=1, tie_embeddings=True),
                                dict(mla=MLAConfig(q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6,
                                                   qk_rope_head_dim=4, v_head_dim=6))])
def test_forward_flops_match_flop_counter(kw):
    """FlopCounterMode counts every matmul of a real forward (full T×T attention scores)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=53, context_length=16, d_model=24, n_layers=2, n_heads=4, n_kv_heads=2,
                      attention_backend="reference", **kw)
    model = Transformer(cfg).eval()
    B, T = 2, 13
    x = torch.randint(0, 53, (B, T))
    with FlopCounterMode(display=False) as fc:
        model(x, x) if cfg.mtp_depth else model(x)
    full = lambda c, t: flops_per_token(c, t, attention="full")["forward"]
    base = cfg.replace(mtp_depth=0)
    expected = full(base, T) * B * T
    if cfg.mtp_depth:  # the depth-1 module runs on the first T-1 positions
        expected += (full(cfg, T - 1) - full(base, T - 1)) * B * (T - 1)
    assert fc.get_total_flops() == pytest.approx(expected, rel=1e-9)


def test_moe_flops_count_router_shared_and_top_k_experts():
    """(The MoE's grouped matmul has no FlopCounterMode formula, so this one is a closed form.)"""
    moe = MoEConfig(n_experts=6, top_k=2, n_shared_experts=1, d_expert=20)
    cfg = ModelConfig(vocab_size=53, d_model=24, n_layers=3, n_heads=4, moe=moe, n_dense_layers=1)
    dense = cfg.replace(moe=None, n_dense_layers=0)
    per_moe_layer = 2 * (6 * 24 + (1 + 2) * 3 * 24 * 20)
    per_dense_mlp = 2 * 3 * 24 * cfg.d_ff
    got = flops_per_token(cfg, 13)["forward"] - flops_per_token(dense, 13)["forward"]
    assert got == 2 * (per_moe_layer - per_dense_mlp)


def test_causal_flops_closed_form_and_6n_rule():
    cfg = get_preset("gpt2-small")
    T = 1024
    f = flops_per_token(cfg, T)
    d, L, V = 768, 12, 50257
    matmul = L * (4 * d * d + 8 * d * d) + d * V  # qkv+o, MLP, head
    attn = L * 2 * 12 * (64 + 64) * (T + 1) / 2
    assert f["forward"] == 2 * matmul + attn
    assert f["total"] == 3 * f["forward"] and f["backward"] == 2 * f["forward"]
    # Kaplan's 6N (N non-embedding) + head: within the attention share of the exact count
    assert f["total"] == pytest.approx(6 * (85_056_000 + d * V) + 3 * attn, rel=1e-3)


def test_memory_estimate_parts():
    cfg = get_preset("tiny")
    m = memory_estimate(cfg, batch_size=8, seq_len=256)
    p = count_params(cfg)["total"]
    assert (m["weights"], m["grads"], m["optimizer"]) == (4 * p, 4 * p, 8 * p)
    per_layer = 3 * 128 + 2 * 128 + 2 * 64 + 4 * cfg.d_ff
    assert m["activations"] == 8 * 256 * (4 * per_layer * 2 + 8192 * 6)
    ckpt = memory_estimate(cfg, batch_size=8, seq_len=256, activation_checkpointing=True)
    assert ckpt["activations"] == 8 * 256 * ((4 * 128 + per_layer) * 2 + 8192 * 6)
    moe = ModelConfig(d_model=64, n_heads=4, moe=MoEConfig(n_experts=8, top_k=2, n_shared_experts=1, d_expert=32))
    from lmforge.model.accounting import activations_per_token
    assert activations_per_token(moe, 0) == 3 * 64 + 4 * 64 + 8 + 2 * 2 * 64 + 3 * 4 * 32
    assert m["total"] == sum(v for k, v in m.items() if k != "total")


def test_deepseek_v3_matches_published_totals():
    """DeepSeek-V3 report: 671B parameters in the main model, 37B activated per token; the MTP
    module adds 14B in the release, which stores its own copy of the embedding and head (2·0.93B)."""
    c = count_params(get_preset("deepseek-v3"))
    main = c["total"] - c["mtp"]
    assert main == pytest.approx(671e9, rel=2e-3)
    mtp_as_released = c["mtp"] + 2 * 129280 * 7168
    assert c["total"] + 2 * 129280 * 7168 == pytest.approx(685e9, rel=2e-3)
    assert mtp_as_released == pytest.approx(13.5e9, rel=0.05)
    mtp_active = c["mtp"] - 248 * 3 * 7168 * 2048  # 256 - 8 routed experts idle in the MTP block
    main_active_non_emb = c["active"] - mtp_active - 129280 * 7168
    assert main_active_non_emb == pytest.approx(37e9, rel=0.03)
