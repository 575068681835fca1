"""The model's training fast paths equal the plain computation they replace: one fused q/k/v GEMM,
F.linear, F.layer_norm, the sliced position table, and the fused AdamW path (test_optim.py)."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import Transformer
from lmforge.model.attention import Attention
from lmforge.model.config import ModelConfig
from lmforge.model.layers import LayerNorm, Linear


def _attention(n_heads, n_kv_heads, bias, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=31, context_length=16, d_model=36, n_layers=1, n_heads=n_heads,
                      n_kv_heads=n_kv_heads, qkv_bias=bias)
    attn = Attention(cfg, 0)
    for lin in (attn.q, attn.k, attn.v, attn.o):
        lin.reset_parameters(0.3)
        if lin.bias is not None:
            lin.bias.data.normal_()
    return attn


@pytest.mark.parametrize("n_heads,n_kv_heads,bias", [(6, 6, True), (6, 2, False), (3, 1, True)])
def test_fused_qkv_projection_equals_three_linears(n_heads, n_kv_heads, bias):
    attn = _attention(n_heads, n_kv_heads, bias)
    x = torch.randn(2, 7, 36, requires_grad=True)
    fused = attn.project_qkv(x)  # grad enabled: one GEMM over the concatenated weights
    plain = (attn.q(x), attn.k(x), attn.v(x))
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b)
    g = [torch.randn_like(t) for t in plain]
    grads_fused = torch.autograd.grad(fused, [x, attn.q.weight, attn.k.weight, attn.v.weight], g)
    grads_plain = torch.autograd.grad(plain, [x, attn.q.weight, attn.k.weight, attn.v.weight], g)
    for a, b in zip(grads_fused, grads_plain):
        torch.testing.assert_close(a, b)
    # the whole layer too, against the three-GEMM path that inference (no grad) takes
    pos = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        expected = attn(x, pos)
    torch.testing.assert_close(attn(x, pos), expected)


def test_swapped_projection_modules_are_called_not_bypassed():
    """A projection swapped for another module (quantized, adapters) must run as that module."""
    attn = _attention(6, 2, False)

    class Doubled(Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    swapped = Doubled(36, attn.k.weight.shape[0])
    swapped.weight = attn.k.weight
    attn.k = swapped
    x = torch.randn(1, 5, 36)
    _, k, _ = attn.project_qkv(x)
    torch.testing.assert_close(k, 2 * F.linear(x, attn.k.weight))


def test_linear_keeps_the_autocast_dtype_with_a_bias():
    """x @ W.t() + b would promote to float32 under autocast; F.linear stays bfloat16."""
    torch.manual_seed(0)
    lin = Linear(13, 7, bias=True)
    lin.reset_parameters(0.5)
    lin.bias.data.normal_()
    x = torch.randn(3, 13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x @ lin.weight.t() + lin.bias, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layernorm_equals_the_written_out_formula(dtype):
    """Normalise in float32, cast to the input dtype, then scale and shift in that dtype."""
    torch.manual_seed(0)
    norm = LayerNorm(19, eps=1e-5).to(dtype)
    norm.weight.data.normal_()
    norm.bias.data.normal_()
    x = (torch.randn(2, 7, 19) * 3 + 1).to(dtype)
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    expected = ((xf - mean) * torch.rsqrt(var + 1e-5)).to(dtype) * norm.weight + norm.bias
    torch.testing.assert_close(norm(x), expected, rtol=0 if dtype == torch.bfloat16 else 1e-5,
                               atol=0 if dtype == torch.bfloat16 else 1e-5)


def test_default_positions_read_one_slice_of_the_learned_table():
    """positions=None (a slice broadcast over the batch) equals explicit positions (a gather),
    in the logits and in the position table's gradient (summed over the batch either way)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=37, context_length=12, d_model=18, n_layers=1, n_heads=3, n_kv_heads=3,
                      positions="learned", norm="layernorm", norm_bias=True, glu=False, bias=True,
                      activation="gelu_tanh")
    model = Transformer(cfg)
    ids = torch.randint(0, 37, (3, 9))
    out_slice = model(ids, ids)
    (g_slice,) = torch.autograd.grad(out_slice.loss, model.pos_emb.weight)
    out_gather = model(ids, ids, positions=torch.arange(9).expand(3, 9))
    (g_gather,) = torch.autograd.grad(out_gather.loss, model.pos_emb.weight)
    torch.testing.assert_close(out_slice.logits, out_gather.logits)
    torch.testing.assert_close(g_slice, g_gather)
    assert g_slice[9:].abs().sum() == 0 and g_slice[:9].abs().sum() > 0

