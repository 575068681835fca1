"""The whole model: causality, document masking, cached decoding, backends, MTP, losses, gradcheck."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import from_dict, load, save_toml, to_dict
from lmforge.errors import ConfigError
from lmforge.model import KVCache, ModelConfig, Transformer
from lmforge.model.layers import cross_entropy
from lmforge.model.mla import MLAConfig
from lmforge.model.moe import MoEConfig

BASE = dict(vocab_size=37, context_length=32, d_model=24, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=40)

VARIANTS = {
    "llama": {},
    "gpt2": dict(norm="layernorm", norm_bias=True, activation="gelu_tanh", glu=False, bias=True,
                 positions="learned", tie_embeddings=True),
    "sinusoidal-post-parallel": dict(positions="sinusoidal", norm_placement="post", parallel_block=True),
    "gemma-like": dict(norm_placement="sandwich", window=3, layer_pattern=["local", "global"],
                       attn_softcap=5.0, final_softcap=3.0, activation="gelu_tanh"),
    "nope-pattern-qknorm": dict(n_layers=4, window=4, qk_norm=True,
                                layer_pattern=["local", "local", "local", "global-nope"]),
    "parallel-mqa-nopos": dict(parallel_block=True, n_kv_heads=1, positions="none", activation="relu2",
                               glu=False),
    "mtp": dict(mtp_depth=2, z_loss=1e-3),
    "moe-mla": dict(mla=MLAConfig(kv_lora_rank=8, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5),
                    moe=MoEConfig(n_experts=4, top_k=2, n_shared_experts=1, d_expert=16), n_dense_layers=1),
}


def make(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**BASE, **kw})
    model = Transformer(cfg).to(dtype)
    # larger random weights than init so that every branch changes the output measurably
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model.eval()


def ids(B=2, T=11, V=37, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causality_future_tokens_never_change_past_logits(name):
    model = make(**VARIANTS[name])
    x = ids()
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 5) % 37
    a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=1e-5, atol=1e-5)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["llama", "gemma-like", "nope-pattern-qknorm", "gpt2", "moe-mla"])
def test_reference_and_sdpa_models_agree(name):
    ref = make(**VARIANTS[name], attention_backend="reference")
    sdpa = make(**VARIANTS[name], attention_backend="sdpa")
    x = ids()
    torch.testing.assert_close(ref(x).logits, sdpa(x).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma-like", "moe-mla"])
def test_packed_documents_equal_separate_sequences(name):
    """doc_ids + per-document positions: each document sees only itself, as if run alone."""
    model = make(**VARIANTS[name])
    a, b = ids(1, 5, seed=2), ids(1, 7, seed=3)
    packed = torch.cat((a, b), dim=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    positions = torch.tensor([list(range(5)) + list(range(7))])
    out = model(packed, doc_ids=doc_ids, positions=positions).logits
    torch.testing.assert_close(out[:, :5], model(a).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 5:], model(b).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma-like", "nope-pattern-qknorm", "moe-mla"])
def test_cached_decoding_equals_full_recomputation(name):
    model = make(**VARIANTS[name])
    x = ids(2, 12)
    full = model(x).logits
    cache = KVCache(model.cfg.n_layers)
    steps = [model(x[:, :5], kv_cache=cache).logits]  # prefill, then one token at a time
    for t in range(5, 12):
        steps.append(model(x[:, t:t + 1], kv_cache=cache).logits)
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_loss_is_mean_ce_over_valid_targets_plus_aux_and_z_loss_by_hand():
    model = make(z_loss=1e-2)
    x, t = ids(), ids(seed=5)
    t[0, :3] = -100
    out = model(x, t)
    logits = model(x).logits
    ce = F.cross_entropy(logits.reshape(-1, 37), t.reshape(-1), reduction="sum")
    n = (t != -100).sum()
    assert out.n_tokens.item() == 22 - 3
    torch.testing.assert_close(out.ce_sum, ce)
    lse = torch.logsumexp(logits, -1)
    z = 1e-2 * (lse[t != -100] ** 2).mean()
    torch.testing.assert_close(out.aux["z_loss"], z)
    torch.testing.assert_close(out.loss, ce / n + z)


def test_final_softcap_bounds_logits():
    model = make(final_softcap=2.5)
    assert model(ids()).logits.abs().max() <= 2.5


def test_tied_head_shares_the_embedding():
    model = make(tie_embeddings=True)
    assert model.lm_head is None
    names = [n for n, _ in model.named_parameters()]
    assert "tok_emb.weight" in names and not any(n.startswith("lm_head") for n in names)
    out = model(ids(), ids(seed=4))
    out.loss.backward()
    assert model.tok_emb.weight.grad.abs().sum() > 0


def test_mtp_loss_by_hand_and_gradient_flow():
    model = make(mtp_depth=2, mtp_loss_weight=0.5).train()
    x = ids(2, 9)
    t = torch.roll(x, -1, 1)
    t[:, -1] = -100
    out = model(x, t)
    assert out.loss.dim() == 0 and out.aux["mtp"].dim() == 0
    # by hand: depth k at position i embeds t_{i+k} = t[:, i+k-1] and predicts t[:, i+k]
    h = model.embed(x, torch.arange(9).expand(2, 9))
    for block in model.blocks:
        h = block(h, torch.arange(9).expand(2, 9))[0]
    ces = []
    for k, mod in enumerate(model.mtp, start=1):
        L = 9 - k
        h = mod(h[:, :L], model.tok_emb(t[:, k - 1:9 - 1].clamp_min(0)), torch.arange(L).expand(2, L))[0]
        tgt = t[:, k:]
        ce = cross_entropy(model.head(mod.norm_out(h)), tgt)
        ces.append(ce.sum() / (tgt != -100).sum())
    torch.testing.assert_close(out.aux["mtp"], 0.5 * (ces[0] + ces[1]) / 2)
    torch.testing.assert_close(out.loss, out.ce_sum / out.n_tokens + out.aux["mtp"])
    out.aux["mtp"].backward()
    for k in range(2):
        assert model.mtp[k].proj.weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.q.weight.grad.abs().sum() > 0  # MTP trains the trunk too
    assert model.tok_emb.weight.grad.abs().sum() > 0


def test_gradcheck_float64_tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=7, context_length=8, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1,
                      d_ff=12, qk_norm=True, attention_backend="reference", final_softcap=4.0)
    model = Transformer(cfg).double()
    names = ["blocks.0.attn.q.weight", "blocks.1.mlp.gate.weight", "blocks.0.norm1.weight", "tok_emb.weight"]
    params = dict(model.named_parameters())
    x, t = ids(2, 5, V=7), ids(2, 5, V=7, seed=9)

    def f(*tensors):
        state = {**params, **dict(zip(names, tensors))}
        return torch.func.functional_call(model, state, (x, t)).loss

    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


def test_init_weights_scales_residual_outputs_and_meta_build_matches():
    cfg = ModelConfig(**{**BASE, "d_model": 96, "n_heads": 4, "d_ff": 200, "n_layers": 8})
    torch.manual_seed(0)
    model = Transformer(cfg)
    std_out = model.blocks[3].attn.o.weight.std().item()
    std_in = model.blocks[3].attn.q.weight.std().item()
    assert abs(std_in - 0.02 * 0.9866) < 1.5e-3
    assert abs(std_out - 0.02 * 0.9866 / math.sqrt(16)) < 5e-4
    assert torch.equal(model.blocks[1].norm1.weight, torch.ones(96))
    with torch.device("meta"):
        meta = Transformer(cfg)
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.init_weights()
    for (n, p), (_, q) in zip(model.named_parameters(), meta.named_parameters()):
        assert torch.equal(p, q), n


def test_learned_positions_beyond_table_raise():
    model = make(**VARIANTS["gpt2"])
    with pytest.raises(ConfigError, match="context_length = 32"):
        model(ids(1, 33))


def test_derived_config_fields_and_conflicts(tmp_path):
    c = ModelConfig(d_model=768, n_heads=12)
    assert (c.head_dim, c.n_kv_heads, c.d_ff) == (64, 12, 2048)  # 8/3·768 = 2048
    assert ModelConfig(d_model=100, n_heads=5).d_ff == 320  # 266.7 rounded up to 64
    assert ModelConfig(d_model=768, n_heads=12, glu=False).d_ff == 3072
    assert ModelConfig(d_model=768, n_heads=12, head_dim=128).head_dim == 128  # not overwritten
    with pytest.raises(ConfigError, match="n_heads = 12 must be a multiple of n_kv_heads = 5"):
        ModelConfig(d_model=768, n_heads=12, n_kv_heads=5)
    with pytest.raises(ConfigError, match="d_model = 100 is not divisible by n_heads = 3"):
        ModelConfig(d_model=100, n_heads=3)
    with pytest.raises(ConfigError, match="norm_bias = true conflicts with norm = 'rmsnorm'"):
        ModelConfig(norm_bias=True)
    with pytest.raises(ConfigError, match="local layers but window is not set"):
        ModelConfig(layer_pattern=["local", "global"])
    with pytest.raises(ConfigError, match="parallel_block = true conflicts with norm_placement = 'sandwich'"):
        ModelConfig(parallel_block=True, norm_placement="sandwich")
    with pytest.raises(ConfigError, match="'sliding'"):
        ModelConfig(window=4, layer_pattern=["sliding"])
    c = ModelConfig(window=4, layer_pattern=["local", "global-nope"], mtp_depth=1)
    save_toml(c, tmp_path / "m.toml")
    assert load(ModelConfig, tmp_path / "m.toml") == c
    assert from_dict(ModelConfig, to_dict(c)) == c


def test_moe_layers_aux_losses_and_metrics_are_collected():
    model = make(**VARIANTS["moe-mla"], n_layers=3).train()
    moes = model.moe_layers()
    assert len(moes) == 2 and model.blocks[0].mlp not in moes  # first layer dense
    x, t = ids(), ids(seed=4)
    out = model(x, t)
    # each layer's own aux, recomputed layer by layer, sums to the model's
    h, pos, per_layer = model.embed(x, torch.arange(11).expand(2, 11)), torch.arange(11).expand(2, 11), []
    for block in model.blocks:
        h, aux, _ = block(h, pos)
        per_layer.append(aux.get("moe_balance"))
    torch.testing.assert_close(out.aux["moe_balance"], per_layer[1] + per_layer[2])
    assert set(out.metrics) >= {"expert_load/1", "expert_load/2", "dropped_fraction/1"}
    torch.testing.assert_close(out.metrics["expert_load/1"].sum(), torch.tensor(1.0))
    torch.testing.assert_close(out.loss, out.ce_sum / out.n_tokens + sum(out.aux.values()))


def test_meta_build_with_moe_and_mla_initialises_every_tensor():
    cfg = ModelConfig(**{**BASE, **VARIANTS["moe-mla"], "n_layers": 8})
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    moe = model.moe_layers()[0]
    assert torch.equal(moe.routing_bias, torch.zeros_like(moe.routing_bias))
    out_std = 0.02 * 0.9866 / math.sqrt(16)
    assert abs(moe.w_out.std().item() - out_std) < 5e-4
    assert abs(model.blocks[2].attn.o_proj.weight.std().item() - out_std) < 5e-4
    assert abs(moe.w_in.std().item() - 0.02 * 0.9866) < 1e-3
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.isfinite(t).all(), name


@pytest.mark.parametrize("kw", [dict(), dict(z_loss=1e-2, final_softcap=3.0, tie_embeddings=True),
                                dict(mtp_depth=1, z_loss=1e-3)])
def test_fused_loss_equals_unfused_in_value_and_gradient(kw):
    """The kernels' chunked linear+CE (torch twin on CPU) against the logits path."""
    x, t = ids(), ids(seed=6)
    t[1, :4] = -100
    results = []
    for fused in (False, True):
        model = make(**kw, fused_loss=fused).train()
        out = model(x, t)
        assert (out.logits is None) == fused
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.ce_sum, a.ce_sum, rtol=1e-5, atol=1e-5)
    assert a.n_tokens == b.n_tokens
    for k in a.aux:
        torch.testing.assert_close(b.aux[k], a.aux[k], rtol=1e-5, atol=1e-6)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["llama", "moe-mla", "gpt2"])
def test_bf16_autocast_forward_backward_is_close_to_fp32(name):
    model = make(**VARIANTS[name]).train()
    with torch.no_grad():  # init-scale weights: bf16 rounding then stays a small relative error
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(0.1)
    x, t = ids(), ids(seed=8)
    ref = model(x, t).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert out.logits.dtype == torch.bfloat16 and out.ce_sum.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref, rtol=2e-2, atol=2e-2)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_dropout_only_in_training():
    model = make(dropout=0.3)
    x = ids()
    torch.testing.assert_close(model(x).logits, model(x).logits)  # eval: deterministic
    model.train()
    torch.manual_seed(1)
    a = model(x).logits
    torch.manual_seed(2)
    b = model(x).logits
    assert (a - b).abs().max() > 1e-3


def _fused_vs_plain(impl: str) -> None:
    x, t = ids(1, 7), ids(1, 7, seed=2)
    grads = []
    for fused in (False, True):
        model = make(qk_norm=True, fused_ops=fused, n_layers=1).train()
        if fused:
            from lmforge.model.layers import MLP, RMSNorm

            mods = [m for m in model.modules() if isinstance(m, RMSNorm | MLP)]
            assert mods and all(m.fused == "auto" for m in mods)
            for m in mods:
                m.fused = impl
        import lmforge.kernels.rms_norm as k_rms
        import lmforge.kernels.swiglu as k_swiglu

        calls, orig = [], (k_rms.rms_norm, k_swiglu.swiglu)
        def counted(name, fn, calls=calls):
            return lambda *a, **kw: (calls.append(name), fn(*a, **kw))[1]

        k_rms.rms_norm, k_swiglu.swiglu = counted("rms_norm", orig[0]), counted("swiglu", orig[1])
        try:
            out = model(x, t)
        finally:
            k_rms.rms_norm, k_swiglu.swiglu = orig
        assert ({"rms_norm", "swiglu"} <= set(calls)) == fused
        out.loss.backward()
        grads.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-5)
    for n in grads[0][1]:
        torch.testing.assert_close(grads[1][1][n], grads[0][1][n], rtol=1e-4, atol=1e-5, msg=n)


def test_fused_ops_equal_plain_ops():
    """fused_ops routes RMSNorm/SwiGLU through lmforge.kernels ("auto": the torch reference on CPU)."""
    _fused_vs_plain("auto")


@pytest.mark.slow  # a fresh interpreter process (~10 s); the kernels' own tests cover the kernels
def test_fused_ops_triton_kernels_under_interpreter():
    """impl "triton" runs the Triton kernels themselves; TRITON_INTERPRET must be set before triton
    is imported, hence a fresh process."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = "from tests.model.test_transformer import _fused_vs_plain; _fused_vs_plain('triton'); print('ok')"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


@pytest.mark.parametrize("preset", ["deepseek-v3-style", "gemma2-style", "gpt2-small"])
def test_nested_configs_round_trip_through_toml(preset, tmp_path):
    from lmforge.model import get_preset
    from lmforge.model.positions import RopeScaling

    cfg = get_preset(preset)
    if preset == "gpt2-small":
        cfg = cfg.replace(positions="rope", rope_scaling=RopeScaling(factor=32.0))
    save_toml(cfg, tmp_path / "m.toml")
    assert load(ModelConfig, tmp_path / "m.toml") == cfg
    assert get_preset(str(tmp_path / "m.toml")) == cfg
