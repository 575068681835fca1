"""`attend` backends against an explicit per-query loop, each other, and MHA; the GQA layer."""

import logging
import math

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.model.attention import Attention, attend
from lmforge.model.config import ModelConfig


def loop_attention(q, k, v, *, causal=True, window=None, softcap=None, doc_ids=None):
    """The definition, one query at a time, in float64."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    out = torch.zeros(B, Hq, T, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            for t in range(T):
                qpos = S - T + t
                allowed = [s for s in range(S)
                           if (not causal or s <= qpos)
                           and (window is None or abs(qpos - s) < window)
                           and (doc_ids is None or doc_ids[b, s] == doc_ids[b, qpos])]
                scores = []
                for s in allowed:
                    x = (q[b, h, t].double() @ k[b, kh, s].double()).item() / math.sqrt(D)
                    scores.append(softcap * math.tanh(x / softcap) if softcap else x)
                m = max(scores)
                w = [math.exp(x - m) for x in scores]
                for s, wi in zip(allowed, w):
                    out[b, h, t] += wi / sum(w) * v[b, kh, s].double()
    return out


def qkv(B, Hq, Hkv, T, S, D, Dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, T, D, generator=g), torch.randn(B, Hkv, S, D, generator=g),
            torch.randn(B, Hkv, S, Dv or D, generator=g))


CASES = [
    dict(Hq=3, Hkv=3, T=7, S=7),
    dict(Hq=6, Hkv=2, T=7, S=7, window=3),
    dict(Hq=4, Hkv=1, T=5, S=5, doc=True),
    dict(Hq=6, Hkv=3, T=3, S=9),  # decoding: queries are the last 3 positions
    dict(Hq=2, Hkv=2, T=1, S=6, window=2),
    dict(Hq=4, Hkv=2, T=6, S=6, causal=False),
    dict(Hq=4, Hkv=2, T=6, S=6, causal=False, window=2, doc=True),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["reference", "sdpa", "auto"])
def test_backends_match_the_definition(case, backend):
    q, k, v = qkv(2, case["Hq"], case["Hkv"], case["T"], case["S"], 6, Dv=5)
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2, 2][: case["S"]],
                            [0, 1, 1, 1, 1, 1, 3, 3, 3][: case["S"]]]) if case.get("doc") else None
    kw = dict(causal=case.get("causal", True), window=case.get("window"), doc_ids=doc_ids)
    got = attend(q, k, v, backend=backend, **kw)
    torch.testing.assert_close(got.double(), loop_attention(q, k, v, **kw), rtol=1e-5, atol=1e-5)


def test_softcap_reference_matches_definition_and_sdpa_falls_back(caplog):
    q, k, v = qkv(1, 4, 2, 5, 5, 6)
    q = q * 10  # large scores so the cap matters
    expected = loop_attention(q, k, v, softcap=2.0)
    ref = attend(q, k, v, softcap=2.0, backend="reference")
    torch.testing.assert_close(ref.double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref, attend(q, k, v, backend="reference"), atol=1e-3)
    import lmforge.model.attention as A
    A._warned.discard("softcap")
    with caplog.at_level(logging.WARNING):
        got = attend(q, k, v, softcap=2.0, backend="sdpa")
    assert "softcap is not supported by SDPA" in caplog.text
    torch.testing.assert_close(got, ref)


def test_gqa_with_equal_heads_is_mha():
    """Hkv = Hq is plain multi-head attention: softmax(q kᵀ/√D) v per head."""
    q, k, v = qkv(2, 5, 5, 7, 7, 6)
    mask = torch.ones(7, 7).tril().bool()
    scores = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(6)
    mha = torch.einsum("bhts,bhsd->bhtd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)
    for backend in ("reference", "sdpa"):
        torch.testing.assert_close(attend(q, k, v, backend=backend), mha, rtol=1e-5, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    q, k, v = qkv(2, 6, 2, 7, 7, 4)
    rep = lambda x: x.repeat_interleave(3, dim=1)
    for backend in ("reference", "sdpa"):
        torch.testing.assert_close(attend(q, k, v, backend=backend),
                                   attend(q, rep(k), rep(v), backend="reference"), rtol=1e-5, atol=1e-5)


def test_gqa_layer_equals_mha_layer_with_duplicated_kv_weights():
    torch.manual_seed(0)
    gqa_cfg = ModelConfig(vocab_size=11, d_model=24, n_heads=6, n_kv_heads=2, qk_norm=True)
    mha_cfg = gqa_cfg.replace(n_kv_heads=6)
    gqa, mha = Attention(gqa_cfg, 0), Attention(mha_cfg, 0)
    for m in (gqa, mha):
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.3)
    D = gqa_cfg.head_dim
    dup = lambda w: w.view(2, D, 24).repeat_interleave(3, dim=0).reshape(6 * D, 24)
    with torch.no_grad():
        mha.q.weight.copy_(gqa.q.weight)
        mha.o.weight.copy_(gqa.o.weight)
        mha.k.weight.copy_(dup(gqa.k.weight))
        mha.v.weight.copy_(dup(gqa.v.weight))
        mha.q_norm.weight.copy_(gqa.q_norm.weight)
        mha.k_norm.weight.copy_(gqa.k_norm.weight)
    x = torch.randn(2, 9, 24)
    pos = torch.arange(9).expand(2, 9)
    torch.testing.assert_close(gqa(x, pos), mha(x, pos), rtol=1e-5, atol=1e-5)


def test_bad_backend_and_shapes():
    q, k, v = qkv(1, 4, 2, 3, 3, 4)
    with pytest.raises(ConfigError, match="flash9"):
        attend(q, k, v, backend="flash9")
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attend(q, k[:, :1].expand(1, 3, 3, 4), v[:, :1].expand(1, 3, 3, 4), backend="reference")
    with pytest.raises(ConfigError, match="doc_ids"):
        attend(q, k, v, doc_ids=torch.zeros(1, 5, dtype=torch.long), backend="reference")


def test_auto_picks_triton_only_for_masked_16bit_cuda_attention():
    from lmforge.model.attention import pick_auto

    yes = lambda: True
    bf16, fp32 = torch.bfloat16, torch.float32
    assert pick_auto("cuda", bf16, 64, masked=True, triton_ok=yes) == "triton"
    assert pick_auto("cuda", bf16, 64, masked=False, triton_ok=yes) == "sdpa"  # flash is fastest
    assert pick_auto("cuda", fp32, 64, masked=True, triton_ok=yes) == "sdpa"
    assert pick_auto("cuda", bf16, 512, masked=True, triton_ok=yes) == "sdpa"
    assert pick_auto("cpu", bf16, 64, masked=True, triton_ok=yes) == "sdpa"
    assert pick_auto("cuda", bf16, 64, masked=True, triton_ok=lambda: False) == "sdpa"
