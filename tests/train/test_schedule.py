"""Schedule values at key steps (hand computed) and global-norm clipping against torch's."""

import math

import pytest
import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.train.schedule import clip_grad_norm, lr_factor


def test_cosine_key_steps():
    f = lambda s: lr_factor(s, "cosine", total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(1 / 11)
    assert f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)  # stays at the floor
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 25 / 100)))


def test_wsd_and_constant():
    f = lambda s: lr_factor(s, "wsd", total_steps=100, warmup_steps=5, min_lr_ratio=0.0, decay_fraction=0.2)
    assert f(4) == pytest.approx(5 / 6)
    assert f(5) == f(79) == 1.0
    assert f(80) == pytest.approx(1.0)
    assert f(90) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0)
    assert lr_factor(3, "constant", 100, warmup_steps=0) == 1.0
    with pytest.raises(ConfigError, match="schedule"):
        lr_factor(0, "linear", 10)


def test_clip_matches_torch():
    torch.manual_seed(0)
    a = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7))]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn(p.shape) * 3
        q.grad = p.grad.clone()
    n1 = clip_grad_norm(a, 1.0)
    n2 = torch.nn.utils.clip_grad_norm_(b, 1.0)
    torch.testing.assert_close(n1, n2)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in a))
    assert total.item() == pytest.approx(1.0, rel=1e-5)
    # under the limit: unchanged
    g = [p.grad.clone() for p in a]
    clip_grad_norm(a, 10.0)
    for p, q in zip(a, g):
        assert torch.equal(p.grad, q)


@pytest.mark.parametrize("max_norm", [0.5, 1e6, 0.0])
def test_clip_with_divide_by_equals_dividing_first(max_norm):
    """The trainer folds the division by the token count into the clipping pass."""
    torch.manual_seed(1)
    grads = [torch.randn(5, 3) * 40, torch.randn(7) * 40]
    a = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    b = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, q, g in zip(a, b, grads):
        p.grad, q.grad = g.clone(), g / 37.0
    n1 = clip_grad_norm(a, max_norm, divide_by=torch.tensor(37))
    n2 = clip_grad_norm(b, max_norm)
    torch.testing.assert_close(n1, n2)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
