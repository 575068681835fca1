"""FlashAttention-2: the Triton kernels (interpreted) and the tiled torch twin against the spec.

Tolerances: inputs are fp32 and the spec runs in fp64, so fp32 paths agree to ~1e-6 relative
(we allow 1e-5); fp16 inputs round q/k/v/p to 11 bits, so 2e-3.
"""

import logging

import pytest
import torch

from lmforge.kernels import flash_attention_triton as fa
from lmforge.kernels import runtime
from lmforge.kernels.flash_attention import attention_reference, flash_attention
from lmforge.kernels.runtime import KernelInputError


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run(impl, B, Hq, Hkv, T, S, D, Dv=None, dtype=torch.float32, seed=0, **opts):
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    q = torch.randn(B, Hq, T, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, S, Dv, generator=g).to(dtype).requires_grad_()
    do = torch.randn(B, Hq, T, Dv, generator=g).to(dtype)
    deterministic = opts.pop("deterministic", True)
    out = flash_attention(q, k, v, impl=impl, deterministic=deterministic, **opts)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, **opts)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    return [rel(a, b) for a, b in zip((out, *grads), (ref, *ref_grads))]


DOCS = torch.tensor([[0] * 9 + [1] * 21 + [2] * 11, [5] * 41])
CASES = {
    "causal": dict(B=2, Hq=3, Hkv=3, T=37, S=37, D=24),
    "gqa": dict(B=1, Hq=4, Hkv=2, T=29, S=29, D=16),
    "mqa_noncausal_s_gt_t": dict(B=1, Hq=3, Hkv=1, T=19, S=33, D=16, causal=False),
    "noncausal_s_lt_t": dict(B=1, Hq=2, Hkv=1, T=30, S=21, D=16, causal=False),
    "window": dict(B=1, Hq=2, Hkv=1, T=45, S=45, D=16, window=7),
    "window_noncausal": dict(B=1, Hq=2, Hkv=2, T=20, S=38, D=16, causal=False, window=6),
    "doc_ids": dict(B=2, Hq=2, Hkv=1, T=41, S=41, D=16, doc_ids=DOCS),
    "softcap_scale": dict(B=1, Hq=2, Hkv=2, T=33, S=33, D=16, softcap=2.0, scale=0.7),
    "decode": dict(B=2, Hq=4, Hkv=2, T=3, S=40, D=16, window=20),
    "value_dim": dict(B=1, Hq=2, Hkv=1, T=21, S=21, D=24, Dv=40),
}


def pointer_kernels(monkeypatch):
    """The pointer kernels of flash_attention_triton, which run where strides do not suit descriptors."""
    monkeypatch.setattr(fa, "USE_TMA", False)
    monkeypatch.setattr(fa, "USE_TMA_BWD", False)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("impl", ["triton", "triton_pointer", "torch"])
def test_matches_reference_fp32(name, impl, monkeypatch):
    """"triton": the kernels through tensor descriptors (flash_attention_tma); "triton_pointer":
    the pointer kernels."""
    if impl == "triton_pointer":
        pointer_kernels(monkeypatch)
    errs = run(impl.removesuffix("_pointer"), **CASES[name])
    assert max(errs) < 1e-5, errs


def test_forward_path_follows_strides(monkeypatch):
    """Descriptor-friendly tensors take the TMA kernel; a row of 20 fp16 (40 bytes, not a multiple
    of 16) cannot be described, so that input takes the pointer kernel and still matches."""
    from lmforge.kernels import flash_attention_tma as tma

    calls = []
    monkeypatch.setattr(tma, "forward", lambda *a, _f=tma.forward, **k: calls.append(1) or _f(*a, **k))
    assert max(run("triton", B=1, Hq=2, Hkv=1, T=19, S=19, D=16, dtype=torch.float16)) < 2e-3
    assert len(calls) == 1
    q = torch.randn(1, 2, 5, 20).half()
    assert tma.usable(q[..., :16]) is False  # sliced view: row stride 40 bytes
    assert max(run("triton", B=1, Hq=2, Hkv=1, T=19, S=19, D=20, dtype=torch.float16)) < 2e-3
    assert len(calls) == 1
    # 48-byte row strides are fine, but outputs of 20 fp16 per row (O, dQ, dK, dV) are not
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 19, 24, generator=g).half()[..., :20] for _ in range(3))
    assert tma.usable(q) is False
    out = flash_attention(q, k, v, impl="triton")
    ref = attention_reference(*(t.detach().double() for t in (q, k, v)))
    assert len(calls) == 1 and rel(out, ref) < 2e-3


@pytest.mark.parametrize("impl", ["triton", "triton_pointer"])
def test_head_interleaved_layout(impl, monkeypatch):
    """q/k/v as the model makes them: [B, T, H, D] storage viewed as [B, H, T, D] (row stride H*D),
    which the 4-D descriptors take with their strides as they are."""
    if impl == "triton_pointer":
        pointer_kernels(monkeypatch)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 23, 4, 16, generator=g).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(2, 23, 2, 16, generator=g).transpose(1, 2).requires_grad_() for _ in range(2))
    do = torch.randn(2, 4, 23, 16, generator=g)
    out = flash_attention(q, k, v, window=9, impl="triton")
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, window=9)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    assert max(rel(a, b) for a, b in zip((out, *grads), (ref, *ref_grads))) < 1e-5


@pytest.mark.parametrize("blocks", [(32, 16), (16, 32)])
@pytest.mark.parametrize("name", ["causal", "window", "doc_ids", "noncausal_s_lt_t"])
def test_unequal_tile_sizes(monkeypatch, blocks, name):
    """The masked/unmasked loop split must hold when query and key tiles differ in size."""
    from lmforge.kernels.flash_attention_tma import FWD_TMA

    for tunable in (fa.FWD, FWD_TMA, fa.DKDV, fa.DQ):
        monkeypatch.setattr(tunable, "fixed", dict(BLOCK_M=blocks[0], BLOCK_N=blocks[1]))
    case = dict(CASES[name], T=53, S=53, B=1) if name != "noncausal_s_lt_t" else CASES[name]
    if name == "doc_ids":
        case["B"] = 2  # two rows of documents
    if name == "doc_ids":
        case["doc_ids"] = torch.tensor([[0] * 10 + [1] * 30 + [2] * 13, [3] * 53])
    assert max(run("triton", **case)) < 1e-5


@pytest.mark.parametrize("kernels", ["descriptor", "pointer"])
@pytest.mark.parametrize("name", ["gqa", "softcap_scale", "decode", "value_dim"])
def test_atomic_dq_backward(name, kernels, monkeypatch):
    """deterministic=False: dQ accumulated with atomics inside the dK/dV kernel (no dQ kernel)."""
    if kernels == "pointer":
        pointer_kernels(monkeypatch)
    assert max(run("triton", deterministic=False, **CASES[name])) < 1e-5


def test_fp16_triton():
    errs = run("triton", B=1, Hq=2, Hkv=1, T=35, S=35, D=32, dtype=torch.float16)
    assert max(errs) < 2e-3, errs


def test_auto_on_cpu_takes_torch_path_with_reason(caplog, monkeypatch):
    monkeypatch.setattr(runtime, "_logged", set())
    with caplog.at_level(logging.INFO, logger="lmforge.kernels"):
        errs = run("auto", B=1, Hq=2, Hkv=2, T=17, S=17, D=16, dtype=torch.float32)
    assert max(errs) < 1e-5, errs
    assert "flash_attention: using the torch path because tensors are not on a GPU" in caplog.text


def test_bf16_under_interpreter_is_refused_for_explicit_triton():
    with pytest.raises(KernelInputError, match="bf16 tl.dot"):
        run("triton", B=1, Hq=2, Hkv=2, T=17, S=17, D=16, dtype=torch.bfloat16)


def test_cpu_without_interpreter_uses_torch_or_refuses(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(KernelInputError, match="TRITON_INTERPRET"):
        flash_attention(q, q, q, impl="triton")
    out = flash_attention(q, q, q)  # auto: the tiled torch path
    assert torch.allclose(out, attention_reference(q, q, q), atol=1e-6)


def test_lse_matches_logsumexp():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 23, 16, generator=g) for _ in range(3))
    _, lse2 = fa.forward(q, k, v, causal=True, window=None, softcap=None, scale=0.25, doc_ids=None)
    s = (q @ k.transpose(-1, -2) * 0.25).masked_fill(torch.ones(23, 23).triu(1).bool(), float("-inf"))
    torch.testing.assert_close(lse2 * torch.log(torch.tensor(2.0)), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (dict(k=torch.randn(1, 3, 8, 16), v=torch.randn(1, 3, 8, 16)), "multiple of key/value heads"),
    (dict(doc_ids=torch.zeros(1, 7, dtype=torch.long)), "doc_ids must be"),
    (dict(k=torch.randn(1, 2, 4, 16), v=torch.randn(1, 2, 4, 16)), "S >= T"),
    (dict(window=0), "window=0"),
    (dict(q=torch.randn(1, 2, 8, 16).half()), "share one dtype"),
])
def test_bad_inputs_raise(bad, match):
    args = dict(q=torch.randn(1, 2, 8, 16), k=torch.randn(1, 2, 8, 16), v=torch.randn(1, 2, 8, 16))
    args.update({k: v for k, v in bad.items() if k in args})
    opts = {k: v for k, v in bad.items() if k not in args}
    with pytest.raises(KernelInputError, match=match):
        flash_attention(args["q"], args["k"], args["v"], **opts)


def test_model_backend_uses_kernel():
    attention = pytest.importorskip("lmforge.model.attention")
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 13, 16, generator=g)
    k, v = torch.randn(2, 2, 13, 16, generator=g), torch.randn(2, 2, 13, 16, generator=g)
    docs = torch.tensor([[0] * 6 + [1] * 7, [0] * 13])
    got = attention.attend(q, k, v, causal=True, window=5, doc_ids=docs, backend="triton")
    want = attention.attend(q, k, v, causal=True, window=5, doc_ids=docs, backend="reference")
    assert rel(got, want) < 1e-5
