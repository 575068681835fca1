"""Ring attention (context parallelism) equals full attention, forward and backward, on 2 gloo ranks,
with the reference block math and with torch's fused flash kernel (CPU); the fused block functions
equal the reference block math, and the CUDA kernel's call is checked on meta tensors."""

import pytest
import torch
import torch.distributed as dist

from lmforge.distributed.ring_attention import (
    _expand_kv,
    _reduce_kv,
    apply_context_parallel,
    block_backward,
    block_forward,
    kernel_block_backward,
    kernel_block_forward,
    merge,
    merge_,
    ring_attention,
    sdpa_backend,
    select_kernel,
    shard_sequence,
    unshard_sequence,
    zigzag_indices,
)
from lmforge.errors import ConfigError
from lmforge.model.attention import reference_attention
from tests.distributed.parallel_workers import max_err, shared_results

MOD = "tests.distributed.test_ring_attention"


def _gather(x):
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return parts


def check_ring(rank, world, causal, hq, hkv, T=12, B=2, D=5, Dv=7, kernel="auto"):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, hq, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, hkv, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, hkv, T, Dv, generator=g, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(B, hq, T, Dv, generator=g, dtype=torch.float64)
    ref = reference_attention(q, k, v, causal=causal)
    ref.backward(dout)
    ql, kl, vl = (shard_sequence(t.detach(), 2, rank, world, causal).requires_grad_() for t in (q, k, v))
    out = ring_attention(ql, kl, vl, causal=causal, kernel=kernel)
    out.backward(shard_sequence(dout, 2, rank, world, causal))
    full = lambda x: unshard_sequence(_gather(x), 2, causal)  # noqa: E731
    return {"out": max_err(full(out.detach()), ref), "dq": max_err(full(ql.grad), q.grad),
            "dk": max_err(full(kl.grad), k.grad), "dv": max_err(full(vl.grad), v.grad)}


def _both_kernels(rank, world, **kw):
    """Reference block math (Dv ≠ D: auto picks it) and the fused CPU flash kernel (D = Dv = 6)."""
    ref = check_ring(rank, world, **kw)
    fused = check_ring(rank, world, D=6, Dv=6, kernel="flash_cpu", **kw)
    return {**ref, **{f"flash_cpu:{key}": err for key, err in fused.items()}}


def ring_causal_gqa(rank, world):
    return _both_kernels(rank, world, causal=True, hq=4, hkv=2)


def ring_full_mha(rank, world):
    return _both_kernels(rank, world, causal=False, hq=3, hkv=3, T=10)


def ring_four_ranks(rank, world):
    """W = 4 (4-rank spawn): the running dK/dV sums that pass through ranks (steps 2 and 3)."""
    causal = _both_kernels(rank, world, causal=True, hq=4, hkv=2, T=16)
    full = check_ring(rank, world, causal=False, hq=3, hkv=1, T=12, D=6, Dv=6, kernel="flash_cpu")
    return {**causal, **{f"full:{key}": err for key, err in full.items()}}


def ring_transformer(rank, world):
    """A whole Transformer with its attention layers on the ring: logits and gradients."""
    from lmforge.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=37, context_length=16, d_model=24, n_layers=2, n_heads=3, n_kv_heads=1,
                      d_ff=40, attention_backend="reference")
    model = Transformer(cfg).double()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 37, (2, 13), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    ref = model(x, y)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    errors = {}
    for kernel in ("auto", "reference"):  # auto: the CPU flash kernel (head dim 8)
        model.zero_grad()
        apply_context_parallel(model, kernel=kernel)
        pos = zigzag_indices(12, rank, world).expand(2, -1)
        out = model(shard_sequence(x, 1, rank, world), shard_sequence(y, 1, rank, world), positions=pos)
        ce, n = out.ce_sum.clone(), out.n_tokens.clone().double()
        dist.all_reduce(n)
        (out.ce_sum / n).backward()  # the global mean CE's share of this rank
        dist.all_reduce(ce)
        grad_err = 0.0
        for name, p in model.named_parameters():
            dist.all_reduce(p.grad)
            grad_err = max(grad_err, max_err(p.grad, ref_grads[name]))
        logits = unshard_sequence(_gather(out.logits.detach()), 1)
        errors[kernel] = {"logits": max_err(logits, ref.logits), "loss": abs((ce / n).item() - ref.loss.item()),
                          "grads": grad_err}
    return errors


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return shared_results(tmp_path_factory)


@pytest.mark.parametrize("check", ["ring_causal_gqa", "ring_full_mha"])
def test_ring_matches_full_attention(results, check):
    for r in results[f"{MOD}:{check}"]:
        for key, err in r.items():
            assert err < 1e-10, (check, key, err)


def test_ring_of_four_matches_full_attention(tmp_path_factory):
    per_rank = shared_results(tmp_path_factory, world=4)[f"{MOD}:ring_four_ranks"]
    assert len(per_rank) == 4 and len(per_rank[0]) == 12
    for r in per_rank:
        for key, err in r.items():
            assert err < 1e-10, (key, err)


def test_context_parallel_transformer_matches_single_process(results):
    for per_kernel in results[f"{MOD}:ring_transformer"]:
        assert set(per_kernel) == {"auto", "reference"}
        for r in per_kernel.values():
            assert r["logits"] < 1e-10 and r["loss"] < 1e-10 and r["grads"] < 1e-10, per_kernel


def test_zigzag_layout_and_merge():
    assert zigzag_indices(12, 0, 2).tolist() == [0, 1, 2, 9, 10, 11]
    assert zigzag_indices(12, 1, 2).tolist() == [3, 4, 5, 6, 7, 8]
    x = torch.arange(24).view(2, 12)
    parts = [shard_sequence(x, 1, r, 3) for r in range(3)]
    assert torch.equal(unshard_sequence(parts, 1), x)
    with pytest.raises(ConfigError, match="multiple of 2 × cp size"):
        zigzag_indices(10, 0, 3)
    # merging two halves of the keys by LSE equals softmax over all keys
    torch.manual_seed(0)
    s, v = torch.randn(3, 9, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    part = lambda a, b: (torch.softmax(s[:, a:b], -1) @ v[a:b], torch.logsumexp(s[:, a:b], -1))  # noqa: E731
    out, _ = merge(*part(0, 4), *part(4, 9))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v)


def test_in_place_merge_equals_merge_on_strided_views():
    """merge_ (lerp in place, as the ring merges into a zig-zag half of its running out/lse) = merge."""
    g = torch.Generator().manual_seed(4)
    out, blk = torch.randn(2, 3, 8, 5, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 5, generator=g)
    lse, blk_lse = torch.randn(2, 3, 8, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, generator=g)
    blk_lse[0, 0, 0] = float("-inf")  # a row without keys in this block keeps its out and lse
    want_out, want_lse = merge(out[:, :, 4:], lse[:, :, 4:], blk.double(), blk_lse.double())
    got_out, got_lse = out.clone(), lse.clone()
    merge_(got_out[:, :, 4:], got_lse[:, :, 4:], blk, blk_lse)
    torch.testing.assert_close(got_out[:, :, 4:], want_out, atol=1e-15, rtol=0)
    torch.testing.assert_close(got_lse[:, :, 4:], want_lse, atol=1e-15, rtol=0)
    assert torch.equal(got_out[:, :, :4], out[:, :, :4]) and torch.equal(got_out[0, 0, 4], out[0, 0, 4])


def test_kernel_selection():
    bf16, f32, f64 = torch.bfloat16, torch.float32, torch.float64
    assert select_kernel("cuda", bf16, 128, 128) == "flash_cuda"
    # cuDNN only where torch's SDPA would take it for the same inputs
    assert select_kernel("cuda", bf16, 128, 128, sdpa="cudnn") == "cudnn_cuda"
    assert select_kernel("cuda", bf16, 128, 128, sdpa="flash") == "flash_cuda"
    assert select_kernel("cuda", f32, 128, 128, sdpa="cudnn") == "reference"
    assert select_kernel("cpu", f64, 6, 6, sdpa="cudnn") == "flash_cpu"
    assert select_kernel("cuda", bf16, 64, 64, "cudnn_cuda") == "cudnn_cuda"
    assert select_kernel("cuda", torch.float16, 64, 64) == "flash_cuda"
    assert select_kernel("cuda", f32, 128, 128) == "reference"  # no fp32 flash kernel on CUDA
    assert select_kernel("cuda", bf16, 100, 100) == "reference"  # not a multiple of 8
    assert select_kernel("cuda", bf16, 264, 264) == "reference"  # over 256
    assert select_kernel("cuda", bf16, 128, 64) == "reference"  # Dv ≠ D
    assert select_kernel("cpu", f64, 6, 6) == "flash_cpu"
    assert select_kernel("cpu", bf16, 100, 100) == "flash_cpu"
    assert select_kernel("cpu", f64, 5, 7) == "reference"
    assert select_kernel("cpu", bf16, 8, 8, "reference") == "reference"
    with pytest.raises(ConfigError, match="flash_cuda runs on cuda tensors, got cpu"):
        select_kernel("cpu", bf16, 128, 128, "flash_cuda")
    with pytest.raises(ConfigError, match="flash_cuda needs float16 or bfloat16, got torch.float32"):
        select_kernel("cuda", f32, 128, 128, "flash_cuda")
    with pytest.raises(ConfigError, match="equal key and value head dims, got 5 and 7"):
        select_kernel("cpu", f64, 5, 7, "flash_cpu")
    with pytest.raises(ConfigError, match="unknown kernel 'flash'"):
        select_kernel("cpu", f64, 8, 8, "flash")
    with pytest.raises(ConfigError, match="cudnn_cuda runs on cuda tensors, got cpu"):
        select_kernel("cpu", bf16, 128, 128, "cudnn_cuda")
    with pytest.raises(ConfigError, match="cudnn_cuda needs a head dim that is a multiple of 8 up to 256, got 12"):
        select_kernel("cuda", bf16, 12, 12, "cudnn_cuda")
    # on CPU torch's SDPA takes its flash kernel for plain float inputs
    q = torch.randn(1, 4, 10, 8)
    assert sdpa_backend(q, q[:, :2], q[:, :2], causal=True) == "flash"


def _blocks(dtype, B=2, H=3, T=6, S=10, D=6, seed=0):
    """Queries, a full kv block of S keys and a diagonal (causal) block of T keys, and a dout."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return r(B, H, T, D), r(B, H, S, D), r(B, H, S, D), r(B, H, T, D), r(B, H, T, D), r(B, H, T, D)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_flash_cpu_block_matches_reference_block(dtype, tol):
    q, k1, v1, k2, v2, dout = _blocks(dtype)
    scale = 0.37
    ref1, ref2 = block_forward(q, k1, v1, scale, False), block_forward(q, k2, v2, scale, True)
    got1, got2 = kernel_block_forward("flash_cpu", q, k1, v1, scale, False), \
        kernel_block_forward("flash_cpu", q, k2, v2, scale, True)
    for (ro, rl), (go, gl) in ((ref1, got1), (ref2, got2)):
        assert go.dtype == dtype and gl.shape == rl.shape
        torch.testing.assert_close(go, ro.to(dtype), atol=tol, rtol=0)
        torch.testing.assert_close(gl, rl.to(gl.dtype), atol=tol, rtol=0)
    # backward of each block given the GLOBAL out/lse (both blocks merged): each block's share
    out, lse = merge(*ref1, *ref2)
    for kb, vb, causal in ((k1, v1, False), (k2, v2, True)):
        want = block_backward(q, kb, vb, out, lse, dout, scale, causal)
        got = kernel_block_backward("flash_cpu", q, kb, vb, out.to(dtype), lse, dout, scale, causal)
        for name, w, gr in zip(("dq", "dk", "dv"), want, got):
            torch.testing.assert_close(gr, w.to(dtype), atol=tol, rtol=0, msg=name)
    # the two shares add up to the gradient of softmax attention over both blocks (autograd)
    qa, ka, va = (t.detach().double().requires_grad_() for t in (q, torch.cat([k1, k2], 2), torch.cat([v1, v2], 2)))
    mask = torch.cat([torch.ones(6, 10, dtype=torch.bool), torch.ones(6, 6, dtype=torch.bool).tril()], 1)
    s = (qa @ ka.transpose(-2, -1) * scale).masked_fill(~mask, float("-inf"))
    (torch.softmax(s, -1) @ va).backward(dout.double())
    g1 = kernel_block_backward("flash_cpu", q, k1, v1, out.to(dtype), lse, dout, scale, False)
    g2 = kernel_block_backward("flash_cpu", q, k2, v2, out.to(dtype), lse, dout, scale, True)
    torch.testing.assert_close((g1[0] + g2[0]).double(), qa.grad, atol=100 * tol, rtol=0)
    torch.testing.assert_close(torch.cat([g1[1], g2[1]], 2).double(), ka.grad, atol=100 * tol, rtol=0)


@pytest.mark.parametrize("kernel", ["flash_cuda", "cudnn_cuda"])
@pytest.mark.parametrize("hkv", [4, 2])
def test_cuda_kernel_call_signature_on_meta_tensors(kernel, hkv):
    """The CUDA kernels' forward/backward calls (argument order, None for varlen/RNG/bias) as this
    torch declares them, run on meta tensors (shapes and dtypes only: no GPU here), with as many kv
    heads as query heads and with fewer (GQA: dK/dV come back with the kv heads)."""
    B, H, T, S, D = 2, 4, 6, 10, 16
    m = dict(device="meta", dtype=torch.bfloat16)
    q, k, v = torch.empty(B, H, T, D, **m), torch.empty(B, hkv, S, D, **m), torch.empty(B, hkv, S, D, **m)
    out, lse = kernel_block_forward(kernel, q, k, v, 0.25, False)
    assert out.shape == (B, H, T, D) and out.dtype == torch.bfloat16
    assert lse.shape == (B, H, T) and lse.dtype == torch.float32
    dq, dk, dv = kernel_block_backward(kernel, q, k, v, out, lse.float(), out, 0.25, False)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape and dq.dtype == torch.bfloat16


@pytest.mark.parametrize("causal", [False, True])
def test_flash_cpu_block_takes_gqa_kv_heads_as_they_are(causal):
    """Fewer kv heads than query heads, not repeated: the same out/lse and, for dK/dV, the sum over
    the query heads of each group, as the reference block on repeated kv heads."""
    g = torch.Generator().manual_seed(2)
    q, dout = (torch.randn(2, 6, 9, 8, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, 2, 9 if causal else 13, 8, generator=g, dtype=torch.float64) for _ in range(2))
    ref_out, ref_lse = block_forward(q, _expand_kv(k, 3), _expand_kv(v, 3), 0.3, causal)
    out, lse = kernel_block_forward("flash_cpu", q, k, v, 0.3, causal)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=0)
    want = block_backward(q, _expand_kv(k, 3), _expand_kv(v, 3), ref_out, ref_lse, dout, 0.3, causal)
    got = kernel_block_backward("flash_cpu", q, k, v, out, lse, dout, 0.3, causal)
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(got[1], _reduce_kv(want[1], 3), atol=1e-12, rtol=0)
    torch.testing.assert_close(got[2], _reduce_kv(want[2], 3), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kernel", ["reference", "flash_cpu"])
def test_single_process_ring_is_attention(kernel):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 10, 6, generator=g, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    torch.testing.assert_close(ring_attention(q, k, v, causal=True, kernel=kernel),
                               reference_attention(q, k, v, causal=True), atol=1e-12, rtol=0)
