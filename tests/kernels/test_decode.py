"""The fused decode-step kernels (lmforge/kernels/decode.py) against their torch references, and the
references against the model's own modules; under TRITON_INTERPRET=1, fp32, tiny odd shapes."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.kernels import decode as kd
from lmforge.model.attention import reference_attention
from lmforge.model.layers import MLP, RMSNorm
from lmforge.model.positions import apply_rope, rope_cos_sin


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def rand(*shape, g, scale=1.0):
    return scale * torch.randn(*shape, generator=g)


@pytest.mark.parametrize("M,Hq,Hkv", [(1, 3, 3), (3, 4, 2), (5, 6, 1)])
def test_norm_qkv_rope(M, Hq, Hkv):
    g = torch.Generator().manual_seed(M)
    d, D, S = 37, 10, 23
    x, nw = rand(M, d, g=g, scale=2), 1 + rand(d, g=g, scale=0.3)
    w = rand((Hq + 2 * Hkv) * D, d, g=g, scale=0.2)
    cos, sin = rope_cos_sin(torch.arange(S), D, 500.0)
    pos = torch.randint(0, S, (M,), generator=g)
    caches = [rand(M + 1, Hkv, S, D, g=g) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    q = kd.norm_qkv_rope(x, nw, 1e-5, w, cos, sin, pos, *caches, Hq, torch.full((M, Hq, D), float("nan")))
    q_ref = kd.norm_qkv_rope_ref(x, nw, 1e-5, w, cos, sin, pos, *ref_caches, Hq)
    assert rel(q, q_ref) < 1e-5
    for c, r in zip(caches, ref_caches):
        assert rel(c, r) < 1e-5
    # the reference is the model's math: RMSNorm module, linear, apply_rope at each row's position
    norm = RMSNorm(d, 1e-5)
    norm.weight.data.copy_(nw)
    qkv = F.linear(norm(x), w).view(M, Hq + 2 * Hkv, D)
    want_q = apply_rope(qkv[:, None, :Hq].transpose(1, 2), pos[:, None], 500.0)[:, :, 0]  # [M, Hq, D]
    want_k = apply_rope(qkv[:, None, Hq:Hq + Hkv].transpose(1, 2), pos[:, None], 500.0)[:, :, 0]
    assert rel(q_ref, want_q) < 1e-6
    for m in range(M):
        assert torch.allclose(ref_caches[0][m, :, pos[m]], want_k[m], atol=1e-6)
        assert torch.equal(ref_caches[1][m, :, pos[m]], qkv[m, Hq + Hkv:])
    untouched = torch.ones(M + 1, S, dtype=torch.bool)
    untouched[torch.arange(M), pos] = False
    assert torch.equal(caches[0].transpose(1, 2)[untouched], ref_caches[0].transpose(1, 2)[untouched])


@pytest.mark.parametrize("impl", ["head", "sum", "dot"])
@pytest.mark.parametrize("M,Hq,Hkv,splits", [(1, 3, 3, 1), (3, 6, 2, 1), (3, 6, 2, 4), (2, 5, 1, 2)])
def test_decode_attention(M, Hq, Hkv, splits, impl):
    g = torch.Generator().manual_seed(10 * M + splits)
    D, S = 12, 41
    q = rand(M, Hq, D, g=g)
    kc, vc = rand(M + 1, Hkv, S, D, g=g, scale=2), rand(M + 1, Hkv, S, D, g=g)
    pos = torch.tensor([40, 0, 17][:M], dtype=torch.long)
    scratch = kd.attention_scratch(M, Hq, D, "cpu")
    out = kd.decode_attention(q, kc, vc, pos, torch.full((M, Hq * D), float("nan")), S, scratch, impl, splits)
    ref = kd.decode_attention_ref(q, kc, vc, pos)
    assert rel(out, ref) < 1e-5
    assert torch.equal(scratch[2], torch.zeros_like(scratch[2]))  # the split counters are reset
    # a second call with the same scratch (as graph replays do), new queries
    q2 = rand(M, Hq, D, g=g)
    out2 = kd.decode_attention(q2, kc, vc, pos, torch.full((M, Hq * D), float("nan")), S, scratch, impl, splits)
    assert rel(out2, kd.decode_attention_ref(q2, kc, vc, pos)) < 1e-5
    # the reference is the model's attention with per-row query positions over the cache
    want = reference_attention(q[:, :, None], kc[:M], vc[:M], query_positions=pos[:, None])  # [M, Hq, 1, D]
    assert rel(ref, want.reshape(M, Hq * D)) < 1e-6


def test_attention_candidates():
    assert [kd.tuning_length(n) for n in (20, 64, 65, 160, 256)] == [64, 64, 128, 256, 256]
    c = kd.attention_candidates(1, 12, 12, 256)
    assert {x["impl"] for x in c} == {"head", "dot"}
    assert sorted({x["splits"] for x in c if x["impl"] == "head"}) == [1, 2, 4, 8]  # >= 32 keys per split
    assert kd.attention_candidates(8, 32, 4, 2048, impl="dot", splits=4) == [dict(impl="dot", splits=4, num_warps=4)]
    assert max(x["splits"] for x in kd.attention_candidates(8, 32, 4, 4096, impl="head")) == 2  # <= 4 programs/SM
    with pytest.raises(ValueError, match="impl='bad'"):
        kd.decode_attention(torch.zeros(1, 2, 4), torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4),
                            torch.zeros(1, dtype=torch.long), torch.zeros(1, 8), impl="bad")


def test_attention_splits_rule():
    assert kd.attention_splits(64, 12, 256) == 1  # enough programs already
    assert kd.attention_splits(1, 12, 256) == 4  # 48 programs, 64 keys per split
    assert kd.attention_splits(1, 4, 4096) == 32  # fills ~132 programs
    assert kd.attention_splits(1, 4, 100) == 1  # too few keys to split


@pytest.mark.parametrize("M", [1, 3])
def test_gemv_residual(M):
    g = torch.Generator().manual_seed(M)
    y, w, x = rand(M, 45, g=g), rand(29, 45, g=g, scale=0.3), rand(M, 29, g=g)
    out = kd.gemv_residual(y, w, x, torch.full_like(x, float("nan")))
    assert rel(out, kd.gemv_residual_ref(y, w, x)) < 1e-6
    assert rel(kd.gemv_residual_ref(y, w, x), x + y @ w.T) < 1e-6


@pytest.mark.parametrize("M", [1, 6])
def test_norm_swiglu(M):
    g = torch.Generator().manual_seed(M)
    d, f = 31, 19
    x, nw = rand(M, d, g=g, scale=3), 1 + rand(d, g=g, scale=0.3)
    w = rand(2 * f, d, g=g, scale=0.3)
    out = kd.norm_swiglu(x, nw, 1e-5, w, torch.full((M, f), float("nan")))
    ref = kd.norm_swiglu_ref(x, nw, 1e-5, w)
    assert rel(out, ref) < 1e-5
    mlp, norm = MLP(d, f), RMSNorm(d, 1e-5)
    mlp.gate.weight.data.copy_(w[:f])
    mlp.up.weight.data.copy_(w[f:])
    norm.weight.data.copy_(nw)
    h = norm(x)
    assert rel(ref, mlp.act(mlp.gate(h)) * mlp.up(h)) < 1e-6


@pytest.mark.parametrize("M", [1, 4])
def test_norm_gemv(M):
    g = torch.Generator().manual_seed(M)
    x, nw, w = rand(M, 33, g=g), 1 + rand(33, g=g, scale=0.3), rand(71, 33, g=g)
    out = kd.norm_gemv(x, nw, 1e-6, w, torch.full((M, 71), float("nan")))
    assert rel(out, kd.norm_gemv_ref(x, nw, 1e-6, w)) < 1e-6
    norm = RMSNorm(33, 1e-6)
    norm.weight.data.copy_(nw)
    assert rel(kd.norm_gemv_ref(x, nw, 1e-6, w), norm(x) @ w.T) < 1e-6


@pytest.mark.parametrize("M", [1, 3])
def test_norm_gemv_argmax(M):
    """The head kernel's argmax equals torch.argmax of the reference logits, ties included (a
    duplicated weight row: the first column wins) and all-negative / zero rows, over repeated
    calls with one scratch (the kernel resets it)."""
    g = torch.Generator().manual_seed(M)
    N, K = 203, 29
    scratch = kd.argmax_scratch(M, "cpu")
    for trial in range(3):
        x, nw, w = rand(M, K, g=g), 1 + rand(K, g=g, scale=0.3), rand(N, K, g=g)
        ref = kd.norm_gemv_ref(x, nw, 1e-6, w)
        top = ref.argmax(dim=-1)
        w[N - 1 - trial] = w[top[0]]  # a later column ties with row 0's winner
        if trial == 1:
            w[:] = -w.abs()[:, :1] * 0  # every logit is +-0: column 0 wins
        if trial == 2:
            x = x.abs()
            w = -w.abs()  # every logit negative: the one nearest zero wins
        ref = kd.norm_gemv_ref(x, nw, 1e-6, w)
        tokens = torch.full((M,), -1, dtype=torch.long)
        logits = torch.full((M, N), float("nan"))
        got = kd.norm_gemv(x, nw, 1e-6, w, logits, tokens, scratch)
        assert got is tokens and torch.equal(tokens, logits.argmax(dim=-1)), trial  # the same values' argmax
        assert torch.equal(tokens, ref.argmax(dim=-1)) and torch.allclose(logits, ref, rtol=1e-5, atol=1e-6)
        assert kd.norm_gemv(x, nw, 1e-6, w, None, torch.zeros(M, dtype=torch.long), scratch).tolist() == tokens.tolist()
        assert scratch[1].item() == 0 and (scratch[0] == -(2 ** 63 - 1)).all()
        assert tokens[0] == 0 or trial != 1


def test_norm_gemv_argmax_nan():
    """A NaN logit wins, whatever its sign bit, as in torch.argmax (the first NaN on ties)."""
    g = torch.Generator().manual_seed(5)
    x, nw, w = rand(2, 29, g=g), 1 + rand(29, g=g, scale=0.3), rand(41, 29, g=g)
    w[9, 0], w[18, 0] = -float("nan"), float("nan")
    tokens = torch.full((2,), -1, dtype=torch.long)
    kd.norm_gemv(x, nw, 1e-6, w, None, tokens, kd.argmax_scratch(2, "cpu"))
    assert tokens.tolist() == kd.norm_gemv_ref(x, nw, 1e-6, w).argmax(dim=-1).tolist() == [9, 9]
