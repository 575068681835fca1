"""The Gluon (Hopper, warp-specialised) FlashAttention backward: GPU checks and the CPU fallback.

The `gpu` tests compare dQ, dK, dV of the Gluon kernel (dK/dV only, and with atomic dQ) with the
fp32 spec (autograd through `attention_reference`) and the Triton backward, on ragged T, GQA/MQA,
causal and not, S > T; and check that the dispatcher runs it where switched on. They run with
TRITON_INTERPRET=0 on a Hopper GPU (`-m gpu`). The CPU tests check the logged fallback.
"""

import logging

import pytest
import torch

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
    "causal_d128_prefill_s_gt_t": (1, 4, 2, 77, 700, 128, True),
    "causal_d128_long": (1, 2, 1, 2051, 2051, 128, True),
}


def setup(B, Hq, Hkv, T, S, D, causal, dtype, seed=0):
    """Inputs, dO, the spec's (out, dq, dk, dv) in fp32, and the forward's (out, lse) from the Triton path."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Hq, T, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype, generator=g)
    do = torch.randn(B, Hq, T, D, device="cuda", dtype=dtype, generator=g)
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    ref = attention_reference(qf, kf, vf, causal=causal)
    spec = torch.autograd.grad(ref, (qf, kf, vf), do.float())
    out, lse = fa.forward(q, k, v, causal=causal, window=None, softcap=None, scale=None, doc_ids=None)
    return q, k, v, do, out, lse, spec


def delta_of(out, do):
    return (out.float() * do.float()).sum(-1)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("atomic", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CASES))
def test_gluon_backward_matches_spec(name, dtype, atomic):
    from lmforge.kernels import flash_attention_gluon_bwd as gbwd

    B, Hq, Hkv, T, S, D, causal = CASES[name]
    q, k, v, do, out, lse, spec = setup(B, Hq, Hkv, T, S, D, causal, dtype)
    assert gbwd.unusable_reason(q, k, v, do) is None
    dq, dk, dv = gbwd.dkdv(q, k, v, do, lse, delta_of(out, do), causal=causal, scale=D ** -0.5, atomic_dq=atomic)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-2
    assert rel(dk, spec[1]) < tol and rel(dv, spec[2]) < tol
    if atomic:
        assert rel(dq, spec[0]) < tol
    else:
        assert dq is None
    # the Triton backward (the reference implementation of the same algorithm) agrees
    tq, tk, tv = fa.backward(q, k, v, out, lse, do, causal=causal, window=None, softcap=None, scale=None,
                             doc_ids=None)
    assert rel(dk, tk) < tol and rel(dv, tv) < tol
    if atomic:
        assert rel(dq, tq) < tol


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("config", [(64, 2, 2, 1, 1, 0), (64, 3, 2, 2, 1, 0), (64, 2, 1, 2, 1, 0), (64, 2, 2, 2, 0, 0),
                                    (64, 2, 2, 2, 1, 1), (64, 3, 2, 2, 1, 1)])
@pytest.mark.parametrize("name", ["causal_d128_gqa_tiny", "noncausal_d128_mqa", "causal_d64_gqa"])
def test_gluon_backward_configs(name, config):
    """Every variant (stages, one or two consumers, dQ in one or two halves, TMA reduce-add or atomics, dS^T
    shared between the consumers) agrees."""
    from lmforge.kernels import flash_attention_gluon_bwd as gbwd

    B, Hq, Hkv, T, S, D, causal = CASES[name]
    if D == 64:  # one dQ column block; the shared-dS form is D 128 only
        config = config[:3] + (1, config[4], 0)
    q, k, v, do, out, lse, spec = setup(B, Hq, Hkv, T, S, D, causal, torch.bfloat16, seed=3)
    from triton.runtime.errors import OutOfResources

    try:
        dq, dk, dv = gbwd.dkdv(q, k, v, do, lse, delta_of(out, do), causal=causal, scale=D ** -0.5,
                               atomic_dq=True, config=config)
    except OutOfResources as e:  # 3 stages + the fp32 dQ staging exceed shared memory at D = 128
        pytest.skip(f"config {config} does not fit: {str(e)[:200]}")
    for g, r in zip((dq, dk, dv), spec):
        assert rel(g, r) < 3e-2


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("name", ["causal_d128", "causal_d64_gqa", "noncausal_d128_mqa"])
def test_dispatch_runs_gluon_backward(name, deterministic, monkeypatch):
    """Switched on, flash_attention's backward runs the Gluon kernel and gives the spec's gradients."""
    from lmforge.kernels import flash_attention_gluon_bwd as gbwd

    monkeypatch.setattr(fa, "GLUON_BWD_HEAD_DIMS", {64, 128})
    monkeypatch.setattr(fa, "GLUON_BWD_ATOMIC_HEAD_DIMS", {64, 128})
    calls = []
    real = gbwd.dkdv
    monkeypatch.setattr(gbwd, "dkdv", lambda *a, **kw: calls.append(kw["atomic_dq"]) or real(*a, **kw))
    B, Hq, Hkv, T, S, D, causal = CASES[name]
    q, k, v, do, _, _, spec = setup(B, Hq, Hkv, T, S, D, causal, torch.bfloat16, seed=5)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = flash_attention(q, k, v, causal=causal, impl="triton", deterministic=deterministic)
    grads = torch.autograd.grad(out, (q, k, v), do)
    assert calls == [not deterministic]
    for g, r in zip(grads, spec):
        assert rel(g, r) < 3e-2


def test_cpu_backward_falls_back_with_logged_reason(caplog, monkeypatch):
    """Without a Hopper GPU (here: the interpreter on CPU tensors) the Triton backward runs, and says why."""
    monkeypatch.setattr(fa, "_gluon_logged", set())
    monkeypatch.setattr(fa, "GLUON_BWD_HEAD_DIMS", {64, 128})
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 21, 64, generator=g, dtype=torch.float64).float().requires_grad_() for _ in range(3))
    do = torch.randn(1, 2, 21, 64, generator=g)
    with caplog.at_level(logging.INFO, logger="lmforge.kernels"):
        grads = torch.autograd.grad(flash_attention(q, k, v, impl="triton"), (q, k, v), do)
    assert "backward: Triton kernels instead of the Gluon kernel because" in caplog.text
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad(attention_reference(qd, kd, vd), (qd, kd, vd), do.double())
    for a, b in zip(grads, ref):
        assert rel(a, b) < 1e-4


def test_gluon_backward_reason_names_the_switch():
    """Head dims outside the switch sets are a reason naming the switch (no GPU needed)."""
    q = torch.randn(1, 1, 4, 96)
    assert "GLUON_BWD_HEAD_DIMS" in fa.gluon_bwd_reason(q, q, q, q, False)
    assert "GLUON_BWD_ATOMIC_HEAD_DIMS" in fa.gluon_bwd_reason(q, q, q, q, True)
