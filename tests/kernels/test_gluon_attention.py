"""The Gluon (Hopper, warp-specialised) FlashAttention forward: GPU checks and the CPU fallback.

The `gpu` tests compare the Gluon forward with the fp32 spec, SDPA and the Triton descriptor
forward (O and the base-2 LSE), and check that the Triton backward, fed its LSE, gives the
spec's gradients. They run with TRITON_INTERPRET=0 on a Hopper GPU (`-m gpu`). The CPU test checks
that the dispatcher falls back to the Triton kernels with a logged reason when Gluon cannot run.
"""

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.kernels import flash_attention_triton as fa
from lmforge.kernels.flash_attention import attention_reference, flash_attention
from lmforge.kernels.runtime import interpreting


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def hopper():
    return torch.cuda.is_available() and not interpreting() and torch.cuda.get_device_capability() == (9, 0)


needs_hopper = pytest.mark.skipif(not hopper(), reason="needs a Hopper GPU with TRITON_INTERPRET unset or 0")

# (B, Hq, Hkv, T, S, D, causal): ragged T and S, GQA/MQA, queries = the last T of S keys
CASES = {
    "causal_d128": (2, 4, 4, 1000, 1000, 128, True),
    "causal_d64_gqa": (2, 8, 2, 777, 777, 64, True),
    "causal_d128_gqa_tiny": (1, 6, 3, 45, 45, 128, True),
    "noncausal_d128_mqa": (1, 6, 1, 500, 613, 128, False),
    "noncausal_d64_s_lt_t": (2, 4, 2, 300, 129, 64, False),
    "causal_d64_decode_s_gt_t": (2, 8, 2, 17, 900, 64, True),
    "causal_d128_long": (1, 2, 1, 4099, 4099, 128, True),
    "causal_d128_prefill_s_gt_t": (1, 4, 2, 5, 4700, 128, True),  # added after the last GPU call (not yet run)
}


def inputs(B, Hq, Hkv, T, S, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Hq, T, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype, generator=g)
    return q, k, v


def lse_spec(q, k, causal):
    """Base-2 log-sum-exp of the scaled scores of each query (fp32 spec, queries = last T keys)."""
    Hq, T, D, S = q.shape[1], q.shape[2], q.shape[3], k.shape[2]
    kf = k.float().repeat_interleave(Hq // k.shape[1], dim=1)
    s = q.float() @ kf.transpose(-1, -2) / math.sqrt(D)
    if causal:
        keep = torch.arange(S, device=q.device)[None, :] <= torch.arange(T, device=q.device)[:, None] + (S - T)
        s = s.masked_fill(~keep, float("-inf"))
    return torch.logsumexp(s, dim=-1) / math.log(2.0)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CASES))
def test_gluon_forward_matches_spec(name, dtype):
    from lmforge.kernels import flash_attention_gluon as gluon
    from lmforge.kernels import flash_attention_tma as tma

    B, Hq, Hkv, T, S, D, causal = CASES[name]
    q, k, v = inputs(B, Hq, Hkv, T, S, D, dtype)
    assert gluon.unusable_reason(q, k, v) is None
    out, lse = gluon.forward(q, k, v, causal=causal, scale=D ** -0.5)
    ref = attention_reference(q.float(), k.float(), v.float(), causal=causal)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert rel(out, ref) < tol
    assert torch.allclose(lse, lse_spec(q, k, causal), atol=2e-2, rtol=0)
    tma_out, tma_lse = tma.forward(q, k, v, causal=causal, window=None, softcap=None, scale=None, doc_ids=None)
    assert rel(out, tma_out) < tol  # the same algorithm in another kernel: O and LSE agree
    assert torch.allclose(lse, tma_lse, atol=2e-2, rtol=0)
    if Hq == Hkv and S >= T:  # SDPA's causal mask is top-left aligned: compare only where they agree
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal and S == T)
        if S == T or not causal:
            assert rel(out, sdpa) < tol


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("config", [(128, 128, 2, 1, 0), (128, 128, 2, 2, 0), (128, 128, 2, 2, 1), (128, 128, 3, 2, 1),
                                    (192, 64, 3, 3, 0), (128, 64, 3, 2, 1)])
@pytest.mark.parametrize("name", ["causal_d64_gqa", "noncausal_d128_mqa", "causal_d128_gqa_tiny"])
def test_gluon_configs_match_spec(name, config):
    """Every variant (one 8-warp consumer; two or three 4-warp consumers; ping-pong) computes the same."""
    from lmforge.kernels import flash_attention_gluon as gluon

    B, Hq, Hkv, T, S, D, causal = CASES[name]
    q, k, v = inputs(B, Hq, Hkv, T, S, D, torch.bfloat16, seed=2)
    out, lse = gluon.forward(q, k, v, causal=causal, scale=D ** -0.5, config=config)
    assert rel(out, attention_reference(q.float(), k.float(), v.float(), causal=causal)) < 2e-2
    assert torch.allclose(lse, lse_spec(q, k, causal), atol=2e-2, rtol=0)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("name", ["causal_d128", "causal_d64_gqa", "noncausal_d128_mqa"])
def test_gluon_forward_feeds_triton_backward(name, monkeypatch):
    """flash_attention runs the Gluon forward on Hopper; the Triton backward uses its LSE."""
    from lmforge.kernels import flash_attention_gluon as gluon

    monkeypatch.setattr(fa, "GLUON_HEAD_DIMS", {64, 128})
    calls = []
    real = gluon.forward
    monkeypatch.setattr(gluon, "forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    B, Hq, Hkv, T, S, D, causal = CASES[name]
    q, k, v = (t.requires_grad_() for t in inputs(B, Hq, Hkv, T, S, D, torch.bfloat16, seed=1))
    do = torch.randn_like(q)
    out = flash_attention(q, k, v, causal=causal, impl="triton")
    grads = torch.autograd.grad(out, (q, k, v), do)
    assert calls, "the Gluon forward did not run"
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attention_reference(qf, kf, vf, causal=causal)
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), do.float())
    assert rel(out, ref) < 2e-2
    for g, r in zip(grads, ref_grads):
        assert rel(g, r) < 3e-2


@pytest.mark.gpu
@needs_hopper
def test_gluon_head_interleaved_layout():
    """q, k, v as [B, H, T, D] views of [B, T, H, D] tensors (the model's layout): descriptors take the strides.
    Added after the last GPU call of 2026-11-26 (not yet run on a GPU)."""
    from lmforge.kernels import flash_attention_gluon as gluon

    g = torch.Generator(device="cuda").manual_seed(4)
    q = torch.randn(2, 333, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    k, v = (torch.randn(2, 333, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
            for _ in range(2))
    assert gluon.unusable_reason(q, k, v) is None
    out, lse = gluon.forward(q, k, v, causal=True, scale=128 ** -0.5)
    assert rel(out, attention_reference(q.float(), k.float(), v.float())) < 2e-2
    assert torch.allclose(lse, lse_spec(q, k, True), atol=2e-2, rtol=0)


@pytest.mark.gpu
@needs_hopper
def test_default_dispatch(monkeypatch):
    """As shipped: the Gluon forward for D = 128 (measured faster), the Triton forward for D = 64."""
    from lmforge.kernels import flash_attention_gluon as gluon

    calls = []
    real = gluon.forward
    monkeypatch.setattr(gluon, "forward", lambda *a, **kw: calls.append(a[0].shape[-1]) or real(*a, **kw))
    for D in (64, 128):
        q, k, v = inputs(1, 2, 2, 300, 300, D, torch.bfloat16)
        out = flash_attention(q, k, v, impl="triton")
        assert rel(out, attention_reference(q.float(), k.float(), v.float())) < 2e-2
    assert calls == [128]


@pytest.mark.gpu
@needs_hopper
def test_unsupported_options_take_triton_path(monkeypatch):
    from lmforge.kernels import flash_attention_gluon as gluon

    q, k, v = inputs(1, 2, 2, 100, 100, 128, torch.bfloat16)
    assert "window" in gluon.unusable_reason(q, k, v, window=16)
    assert "dtype" in gluon.unusable_reason(q.float(), k.float(), v.float())
    monkeypatch.setattr(fa, "GLUON_HEAD_DIMS", {64, 128})
    monkeypatch.setattr(gluon, "forward", lambda *a, **kw: pytest.fail("Gluon ran with a window"))
    out = flash_attention(q, k, v, window=16, impl="triton")
    ref = attention_reference(q.float(), k.float(), v.float(), window=16)
    assert rel(out, ref) < 2e-2


def test_cpu_falls_back_with_logged_reason(caplog, monkeypatch):
    """Without a Hopper GPU (here: the interpreter on CPU tensors) the Triton forward runs, and says why."""
    monkeypatch.setattr(fa, "_gluon_logged", set())
    monkeypatch.setattr(fa, "GLUON_HEAD_DIMS", {64, 128})
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 21, 64, generator=g) for _ in range(3))
    with caplog.at_level(logging.INFO, logger="lmforge.kernels"):
        out = flash_attention(q, k, v, impl="triton")
    assert "Triton kernels instead of the Gluon kernel because" in caplog.text
    assert rel(out, attention_reference(q.double(), k.double(), v.double())) < 1e-5


def test_missing_gluon_module_falls_back(caplog, monkeypatch):
    """A Gluon that fails to import (another Triton version) is a logged reason, not an error."""
    import sys

    import lmforge.kernels

    monkeypatch.setitem(sys.modules, "lmforge.kernels.flash_attention_gluon", None)
    monkeypatch.delattr(lmforge.kernels, "flash_attention_gluon", raising=False)
    monkeypatch.setattr(fa, "_gluon_logged", set())
    monkeypatch.setattr(fa, "GLUON_HEAD_DIMS", {64, 128})
    q = torch.randn(1, 1, 5, 64)
    with caplog.at_level(logging.INFO, logger="lmforge.kernels"):
        reason = fa.gluon_reason(q, q, q)
    assert reason.startswith("lmforge.kernels.flash_attention_gluon failed to import")
    assert reason in caplog.text
    assert fa.gluon_reason(torch.randn(1, 1, 5, 24), q[..., :24], q[..., :24]).startswith("head dim 24")


def test_gluon_compile_failure_switches_it_off_once(caplog, monkeypatch):
    """A Gluon kernel that fails on the host (e.g. a Triton whose Gluon API differs, as 3.5's
    warp_specialize does) is logged once and the Triton kernels compute the result, then and after."""
    from lmforge.kernels import flash_attention_gluon as gluon

    calls = []

    def broken(*a, **kw):
        calls.append(1)
        raise TypeError("warp_specialize() missing 3 required positional arguments")

    monkeypatch.setattr(fa, "_gluon_failed", {})
    monkeypatch.setattr(fa, "GLUON_HEAD_DIMS", {64, 128})
    monkeypatch.setattr(fa, "interpreting", lambda: False)  # pretend Gluon could run here ...
    monkeypatch.setattr(gluon, "unusable_reason", lambda *a, **kw: None)
    monkeypatch.setattr(gluon, "forward", broken)  # ... and fails to compile
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 19, 64, generator=g) for _ in range(3))
    ref = attention_reference(q.double(), k.double(), v.double())
    with caplog.at_level(logging.INFO, logger="lmforge.kernels"):
        first = fa.forward(q, k, v, causal=True, window=None, softcap=None, scale=None, doc_ids=None)[0]
        second = fa.forward(q, k, v, causal=True, window=None, softcap=None, scale=None, doc_ids=None)[0]
    assert len(calls) == 1 and caplog.text.count("Gluon kernel switched off") == 1
    assert "warp_specialize" in fa.gluon_reason(q, k, v)
    assert rel(first, ref) < 1e-5 and rel(second, ref) < 1e-5


def test_causal_with_fewer_keys_than_queries_is_refused():
    """The loader would stall if a causal query tile saw no key tile: such inputs never reach the kernel."""
    from lmforge.kernels import flash_attention_gluon as gluon

    if gluon.IMPORT_ERROR is not None:
        pytest.skip(gluon.IMPORT_ERROR)
    q, k = torch.randn(1, 1, 512, 128), torch.randn(1, 1, 256, 128)
    assert "fewer keys (256) than queries (512)" in gluon.unusable_reason(q, k, k, causal=True)
    assert "fewer keys" not in gluon.unusable_reason(q, k, k, causal=False)
    assert "fewer keys" not in gluon.unusable_reason(k, q, q, causal=True)
