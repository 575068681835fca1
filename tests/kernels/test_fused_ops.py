"""Fused RMSNorm, SwiGLU and chunked linear + cross-entropy against their torch specs (fp64)."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.kernels.linear_cross_entropy import (
    ce_chunk_reference,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from lmforge.kernels.rms_norm import FusedRMSNorm, rms_norm, rms_norm_reference
from lmforge.kernels.runtime import KernelInputError
from lmforge.kernels.swiglu import swiglu, swiglu_reference


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def grads(f, inputs, dy):
    out = f(*inputs)
    return [out, *torch.autograd.grad(out, inputs, dy)]


TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_rms_norm(dtype, with_weight, impl):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(3, 7, 45, generator=g)).to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(45, generator=g)).to(dtype).requires_grad_() if with_weight else None
    dy = torch.randn(3, 7, 45, generator=g).to(dtype)
    inputs = (x, w) if with_weight else (x,)
    got = grads(lambda *t: rms_norm(t[0], t[1] if with_weight else None, 1e-5, impl=impl), inputs, dy)
    want = grads(lambda *t: rms_norm_reference(t[0], t[1] if with_weight else None, 1e-5),
                 tuple(t.detach().double().requires_grad_() for t in inputs), dy.double())
    for a, b in zip(got, want):
        assert rel(a, b) < TOL[dtype]


def test_rms_norm_module_and_errors():
    m = FusedRMSNorm(10)
    x = torch.randn(4, 10)
    torch.testing.assert_close(m(x), rms_norm_reference(x, m.weight, 1e-6))
    with pytest.raises(KernelInputError, match="weight shape"):
        rms_norm(x, torch.ones(9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_swiglu(dtype, impl):
    g = torch.Generator().manual_seed(1)
    a, b = ((2 * torch.randn(5, 301, generator=g)).to(dtype).requires_grad_() for _ in range(2))
    dy = torch.randn(5, 301, generator=g).to(dtype)
    got = grads(lambda a, b: swiglu(a, b, impl=impl), (a, b), dy)
    want = grads(swiglu_reference, (a.detach().double().requires_grad_(), b.detach().double().requires_grad_()),
                 dy.double())
    for x, y in zip(got, want):
        assert rel(x, y) < TOL[dtype]
    with pytest.raises(KernelInputError, match="same shape"):
        swiglu(a, b[:, :3])


def ce_case(seed=0, n=29, h=24, v=301, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (0.5 * torch.randn(v, h, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[[1, 8, 9]] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("softcap, z_loss, chunk, v", [(None, 0.0, 7, 301), (4.0, 1e-3, 5, 301),
                                                       (None, 1e-2, 64, 301), (None, 0.0, 11, 256)])
def test_linear_cross_entropy(impl, softcap, z_loss, chunk, v):
    """v=301 runs on the zero-padded weight (VOCAB_ALIGN), v=256 on the weight itself."""
    hidden, weight, targets = ce_case(v=v)
    res = linear_cross_entropy(hidden, weight, targets, softcap=softcap, z_loss=z_loss, chunk_rows=chunk,
                               impl=impl)
    got = [res.loss_sum, *torch.autograd.grad(res.loss_sum * 1.5, (hidden, weight))]
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = linear_cross_entropy_reference(h64, w64, targets, softcap=softcap, z_loss=z_loss)
    want = [ref.loss_sum, *torch.autograd.grad(ref.loss_sum * 1.5, (h64, w64))]
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-5
    assert rel(res.ce_sum, ref.ce_sum) < 1e-5 and rel(res.z_sum, ref.z_sum) < 1e-5
    assert int(res.n_tokens) == 26


def test_linear_cross_entropy_equals_torch_cross_entropy():
    hidden, weight, targets = ce_case(seed=3)
    res = linear_cross_entropy(hidden, weight, targets, chunk_rows=8)
    want = F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(res.loss_sum, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab_split", [0, 100])
def test_ce_chunk_kernel_matches_torch_twin(monkeypatch, vocab_split):
    """One program per row, and rows split into slices of 100 columns (4 slices of 64-column tiles)."""
    from lmforge.kernels import linear_cross_entropy_triton as kt

    monkeypatch.setattr(kt, "VOCAB_SPLIT", vocab_split)
    g = torch.Generator().manual_seed(4)
    logits = 4 * torch.randn(6, 333, generator=g)
    targets = torch.tensor([0, 332, -100, 17, 5, 200])
    a, b = logits.clone(), logits.clone()
    ce_a, z_a = ce_chunk_reference(a, targets, -100, 3.0, 1e-2)
    ce_b, z_b = kt.ce_chunk(b, targets, -100, 3.0, 1e-2)
    torch.testing.assert_close(ce_b, ce_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_b, z_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert (b[2] == 0).all()  # ignored row: zero gradient


def test_linear_cross_entropy_bad_target():
    hidden, weight, targets = ce_case()
    targets[0] = 301
    with pytest.raises(KernelInputError, match="target 301 outside"):
        linear_cross_entropy(hidden, weight, targets)


def test_choose_impl_rejects_unknown_impl():
    from lmforge.kernels.runtime import choose_impl

    with pytest.raises(KernelInputError, match="impl='fast'"):
        choose_impl("rms_norm", "fast", torch.zeros(1))
