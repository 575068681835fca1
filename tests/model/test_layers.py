"""Building blocks against torch's own ops (the references) at odd shapes."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError
from lmforge.model.layers import (
    MLP,
    Embedding,
    LayerNorm,
    Linear,
    RMSNorm,
    cross_entropy,
    dropout,
    get_activation,
    logsumexp,
    make_norm,
    softcap,
    softmax,
)


def test_linear_and_embedding_match_torch():
    torch.manual_seed(0)
    lin = Linear(13, 7, bias=True)
    lin.reset_parameters(0.5)
    lin.bias.data.normal_()
    x = torch.randn(3, 5, 13)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
    emb = Embedding(11, 6)
    emb.reset_parameters(0.02)
    ids = torch.tensor([[0, 10, 3], [3, 3, 9]])
    torch.testing.assert_close(emb(ids), F.embedding(ids, emb.weight))


def test_truncated_normal_init_is_bounded_with_the_truncated_std():
    torch.manual_seed(0)
    lin = Linear(300, 301)
    lin.reset_parameters(0.02)
    assert lin.weight.abs().max() <= 0.06 + 1e-7
    # a standard normal truncated at ±3 has std sqrt(1 - 2·3·φ(3)/(2Φ(3)-1)) = 0.98658
    assert abs(lin.weight.std().item() - 0.02 * 0.98658) < 2e-4


def test_rmsnorm_matches_formula_and_torch():
    torch.manual_seed(0)
    norm = RMSNorm(23, eps=1e-6)
    norm.reset_parameters()
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 23)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    if hasattr(F, "rms_norm"):
        torch.testing.assert_close(norm(x), F.rms_norm(x, (23,), norm.weight, 1e-6))


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_torch(bias):
    torch.manual_seed(0)
    norm = LayerNorm(19, eps=1e-5, bias=bias)
    norm.reset_parameters()
    norm.weight.data.normal_()
    if bias:
        norm.bias.data.normal_()
    x = torch.randn(2, 7, 19) * 3 + 1
    torch.testing.assert_close(norm(x), F.layer_norm(x, (19,), norm.weight, norm.bias, 1e-5))


def test_make_norm_rejects_unknown():
    with pytest.raises(ConfigError, match="batchnorm"):
        make_norm("batchnorm", 8)


@pytest.mark.parametrize("name,ref", [
    ("silu", F.silu), ("gelu", F.gelu), ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh")),
    ("relu", F.relu), ("relu2", lambda x: F.relu(x) ** 2)])
def test_activations_match_torch(name, ref):
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    torch.testing.assert_close(get_activation(name)(x), ref(x))


def test_unknown_activation_names_choices():
    with pytest.raises(ConfigError, match="swish"):
        get_activation("swish")


@pytest.mark.parametrize("glu", [True, False])
def test_mlp_matches_hand_computation(glu):
    torch.manual_seed(0)
    mlp = MLP(10, 14, "silu", glu=glu, bias=True)
    for m in mlp.modules():
        if isinstance(m, Linear):
            m.reset_parameters(0.3)
            m.bias.data.normal_()
    x = torch.randn(3, 10)
    up = F.linear(x, mlp.up.weight, mlp.up.bias)
    h = F.silu(F.linear(x, mlp.gate.weight, mlp.gate.bias)) * up if glu else F.silu(up)
    torch.testing.assert_close(mlp(x), F.linear(h, mlp.down.weight, mlp.down.bias))


def test_softmax_is_stable_and_matches_torch():
    x = torch.tensor([[1000.0, 1001.0, 999.0], [-1e4, 0.0, 3.0]])
    torch.testing.assert_close(softmax(x), torch.softmax(x, -1))
    masked = torch.full((2, 5), float("-inf"))
    assert torch.equal(softmax(masked), torch.zeros(2, 5))  # fully masked rows: zeros, not NaN
    torch.testing.assert_close(logsumexp(x), torch.logsumexp(x, -1))


def test_cross_entropy_reference_and_fast_match_torch():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 17) * 4
    targets = torch.randint(0, 17, (3, 5))
    targets[0, 1] = -100
    targets[2, 4] = -100
    expected = F.cross_entropy(logits.view(-1, 17), targets.view(-1), reduction="none").view(3, 5)
    for fast in (True, False):
        got = cross_entropy(logits, targets, fast=fast)
        torch.testing.assert_close(got, expected)
        assert got[0, 1] == 0 and got[2, 4] == 0
    # hand value: uniform logits give log V
    assert math.isclose(cross_entropy(torch.zeros(1, 17), torch.tensor([3]), fast=False).item(),
                        math.log(17), rel_tol=1e-6)


def test_dropout_keeps_expectation_and_is_identity_in_eval():
    torch.manual_seed(0)
    x = torch.ones(200_003)
    y = dropout(x, 0.3, training=True)
    assert torch.all((y == 0) | torch.isclose(y, torch.tensor(1 / 0.7)))
    assert abs((y == 0).float().mean().item() - 0.3) < 0.01
    assert torch.equal(dropout(x, 0.3, training=False), x)


def test_softcap():
    x = torch.tensor([-1e6, -3.0, 0.0, 2.0, 1e6])
    torch.testing.assert_close(softcap(x, 5.0), 5.0 * torch.tanh(x / 5.0))
    assert softcap(x, 5.0).abs().max() <= 5.0
    assert softcap(x, None) is x
