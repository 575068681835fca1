"""Multi-head latent attention: absorbed == explicit, cached decode == full forward, against a
per-head attention written out in the test, causality, RoPE relativity, and the cache's contents."""

import math

import pytest
import torch

from lmforge.config import from_dict, to_dict
from lmforge.errors import ConfigError
from lmforge.model.cache import LayerCache
from lmforge.model.mla import MLAConfig, MultiHeadLatentAttention
from lmforge.model.positions import apply_rope


@pytest.fixture(autouse=True)
def _one_thread():
    """These shapes are tiny: a second intra-op thread only adds barrier waits (seen 3x slower on
    the shared 2-core CI machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


D, H = 26, 3
CONFIGS = {
    "full-q": MLAConfig(q_lora_rank=None, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5),
    "lora-q": MLAConfig(q_lora_rank=14, kv_lora_rank=9, qk_nope_head_dim=7, qk_rope_head_dim=6, v_head_dim=3),
}


def _layer(name: str, backend: str = "sdpa", window=None) -> MultiHeadLatentAttention:
    torch.manual_seed(0)
    m = MultiHeadLatentAttention(D, H, CONFIGS[name], rope_theta=500.0, backend=backend, window=window,
                                 init_std=0.3).double()
    with torch.no_grad():  # non-trivial norm gains, so a skipped norm would show
        for norm in (m.kv_a_layernorm, getattr(m, "q_a_layernorm", None)):
            if norm is not None:
                norm.weight.uniform_(0.5, 1.5)
    return m


def _inputs(B=2, T=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    return x, torch.arange(T).expand(B, T)


def naive_mla(m: MultiHeadLatentAttention, x, positions):
    """The DeepSeek-V2 equations written head by head with explicit causal softmax."""
    c = m.cfg
    B, T, _ = x.shape
    q = m._query(x).view(B, T, H, c.qk_head_dim)
    ckv = m.kv_a_proj_with_mqa(x)
    latent = m.kv_a_layernorm(ckv[..., :c.kv_lora_rank])
    k_rope = apply_rope(ckv[..., c.kv_lora_rank:], positions, m.rope_theta)
    kv = m.kv_b_proj(latent).view(B, T, H, c.qk_nope_head_dim + c.v_head_dim)
    outs = []
    for h in range(H):
        q_h = torch.cat((q[:, :, h, :c.qk_nope_head_dim],
                         apply_rope(q[:, :, h, c.qk_nope_head_dim:], positions, m.rope_theta)), -1)
        k_h = torch.cat((kv[:, :, h, :c.qk_nope_head_dim], k_rope), -1)
        v_h = kv[:, :, h, c.qk_nope_head_dim:]
        s = q_h @ k_h.transpose(1, 2) / math.sqrt(c.qk_nope_head_dim + c.qk_rope_head_dim)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(torch.softmax(s, -1) @ v_h)
    return m.o_proj(torch.cat(outs, -1))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_explicit_matches_naive_equations(name):
    m = _layer(name)
    x, pos = _inputs()
    torch.testing.assert_close(m(x, pos, absorbed=False), naive_mla(m, x, pos), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_absorbed_equals_explicit_with_gradients(name, backend):
    m = _layer(name, backend)
    x, pos = _inputs()
    x.requires_grad_(True)
    # the reference backend scores in float32, so it agrees to float32 precision only
    tol = dict(rtol=1e-10, atol=1e-12) if backend == "sdpa" else dict(rtol=1e-5, atol=1e-6)
    outs, grads = [], []
    for absorbed in (False, True):
        y = m(x, pos, absorbed=absorbed)
        outs.append(y)
        grads.append(torch.autograd.grad(y.square().sum(), [x, *m.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], **tol)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_absorbed_equals_explicit_with_window_and_documents(name):
    m = _layer(name, window=4)
    x, pos = _inputs(T=13)
    doc_ids = torch.tensor([[0] * 5 + [1] * 8, [0] * 9 + [1] * 4])
    a = m(x, pos, doc_ids=doc_ids, absorbed=False)
    torch.testing.assert_close(m(x, pos, doc_ids=doc_ids, absorbed=True), a, rtol=1e-10, atol=1e-12)
    # a document restarting at token 5 of row 0 sees nothing before it: same as running it alone
    alone = m(x[:1, 5:], pos[:1, :8], absorbed=False)
    torch.testing.assert_close(m(x[:1], torch.cat((pos[:1, :5], pos[:1, :8]), 1), doc_ids=doc_ids[:1])[:, 5:],
                               alone, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("absorbed", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decode_equals_full_forward(name, absorbed):
    m = _layer(name)
    x, pos = _inputs(T=12)
    full = m(x, pos, absorbed=False)
    cache = LayerCache()
    steps = [m(x[:, :5], pos[:, :5], cache=cache, absorbed=absorbed)]  # prefill 5
    steps.append(m(x[:, 5:8], pos[:, 5:8], cache=cache, absorbed=absorbed))  # a chunk of 3
    for t in range(8, 12):  # then one token at a time
        steps.append(m(x[:, t:t + 1], pos[:, t:t + 1], cache=cache, absorbed=absorbed))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-12)
    # the cache holds only the latent and the shared rope key: (r + rope) numbers per token
    latent, k_rope = cache.tensors
    c = m.cfg
    assert latent.shape == (2, 12, c.kv_lora_rank) and k_rope.shape == (2, 12, c.qk_rope_head_dim)
    assert c.cache_width() == c.kv_lora_rank + c.qk_rope_head_dim


def test_causal_future_tokens_do_not_change_the_past():
    m = _layer("lora-q")
    x, pos = _inputs(T=10)
    x2 = x.clone()
    x2[:, 6:] = torch.randn_like(x2[:, 6:])
    for absorbed in (False, True):
        a, b = m(x, pos, absorbed=absorbed), m(x2, pos, absorbed=absorbed)
        torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-12)
        assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3


def test_rope_makes_scores_depend_on_relative_positions_only():
    m = _layer("full-q")
    x, pos = _inputs()
    torch.testing.assert_close(m(x, pos + 37), m(x, pos), rtol=1e-9, atol=1e-11)
    # but positions do matter: reversing them changes the output
    assert (m(x, pos.flip(-1)) - m(x, pos)).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_param_count_matches_module(name):
    m = MultiHeadLatentAttention(D, H, CONFIGS[name])
    assert CONFIGS[name].param_count(D, H) == sum(p.numel() for p in m.parameters())


def test_config_validation_and_round_trip():
    with pytest.raises(ConfigError, match="qk_rope_head_dim = 5 must be even"):
        MLAConfig(qk_rope_head_dim=5)
    with pytest.raises(ConfigError, match="kv_lora_rank = 0"):
        MLAConfig(kv_lora_rank=0)
    cfg = MLAConfig(q_lora_rank=96, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    assert from_dict(MLAConfig, to_dict(cfg)) == cfg
    assert from_dict(MLAConfig, to_dict(MLAConfig())) == MLAConfig()  # q_lora_rank None survives TOML


def test_triton_backend_matches_sdpa_in_both_forms(monkeypatch):
    """The absorbed form is MQA with value width r != key width: the Triton kernel must take it too."""
    import sys

    pytest.importorskip("triton")
    from lmforge.kernels.runtime import interpreting

    if torch.cuda.is_available() or ("lmforge.kernels.flash_attention_triton" in sys.modules
                                     and not interpreting()):
        pytest.skip("this test runs the kernel through the CPU interpreter; not on a GPU machine")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernel module is first imported
    torch.manual_seed(3)
    cfg = MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    m = MultiHeadLatentAttention(32, 2, cfg, init_std=0.3)
    x, pos = torch.randn(1, 7, 32), torch.arange(7)[None]
    ref = m(x, pos, absorbed=False)
    m.backend = "triton"
    for absorbed in (False, True):
        torch.testing.assert_close(m(x, pos, absorbed=absorbed), ref, rtol=1e-4, atol=1e-5)
