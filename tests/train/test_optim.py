"""AdamW against torch.optim.AdamW, multi-tensor against the per-tensor spec, Muon's orthogonalisation
and the parameter grouping."""

import pytest
import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.train.optim import AdamW, Muon, build_optimizer, classify_parameters, newton_schulz


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 5, generator=g), torch.randn(13, generator=g), torch.randn(3, 11, 2, generator=g)]


def _run(opt_cls, params, steps=10, **kw):
    ps = [nn.Parameter(p.clone()) for p in params]
    opt = opt_cls([{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}], **kw)
    g = torch.Generator().manual_seed(123)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("foreach,fused", [(False, False), (True, False), (True, True)])
def test_adamw_matches_torch(foreach, fused):
    """10 steps on identical grads; fp32 rtol 1e-6: both compute the same formula in the same order.
    fused=True runs torch's fused kernel (the GPU default) here on CPU."""
    params = _params()
    ours, _ = _run(AdamW, params, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=foreach, fused=fused)
    ref, _ = _run(torch.optim.AdamW, params, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_adamw_first_step_by_hand():
    """Step 1: m_hat = g, v_hat = g^2, so p1 = p0 (1 - lr wd) - lr * g / (|g| + eps)."""
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = AdamW([p], lr=0.1, weight_decay=0.5, eps=1e-8)
    p.grad = torch.tensor([0.3, -0.4, 0.0])
    opt.step()
    expected = torch.tensor([1.0, -2.0, 0.5]) * (1 - 0.05) - 0.1 * torch.tensor([0.3, -0.4, 0.0]) / (
        torch.tensor([0.3, 0.4, 0.0]) + 1e-8)
    torch.testing.assert_close(p.detach(), expected)


def test_adamw_rejects_bad_hparams():
    with pytest.raises(ConfigError, match="betas"):
        AdamW([nn.Parameter(torch.zeros(2))], betas=(0.9, 1.5))


def test_newton_schulz_is_near_orthogonal():
    """The quintic iteration maps singular values into ~[0.7, 1.2] (not exactly 1 by design) and keeps
    the singular vectors: it is close to the exact polar factor U V^T."""
    g = torch.Generator().manual_seed(0)
    for shape in [(37, 23), (23, 37), (4, 19, 11)]:
        x = torch.randn(shape, generator=g, dtype=torch.float64).float()
        o = newton_schulz(x, steps=5)
        s = torch.linalg.svdvals(o)
        assert s.min() > 0.6 and s.max() < 1.25, (shape, s.min(), s.max())
        u, _, vh = torch.linalg.svd(x, full_matrices=False)
        polar = u @ vh
        cos = (o * polar).sum(dim=(-2, -1)) / (o.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
        assert (cos > 0.95).all(), cos  # the singular values spread over ~[0.7, 1.2]


def test_muon_update_matches_rule():
    """One Muon step with nesterov momentum: buf = g; update = NS(g + mu*buf); p -= lr * scale * update."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(9, 5))
    b = nn.Parameter(torch.randn(5))
    opt = Muon([{"params": [w], "use_muon": True}, {"params": [b], "use_muon": False, "lr": 0.01}],
               lr=0.05, momentum=0.9)
    w0, b0 = w.detach().clone(), b.detach().clone()
    gw, gb = torch.randn(9, 5), torch.randn(5)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    expected = w0 - 0.05 * (9 / 5) ** 0.5 * newton_schulz(gw + 0.9 * gw)
    torch.testing.assert_close(w.detach(), expected)
    ref_b = nn.Parameter(b0.clone())
    ref = torch.optim.AdamW([ref_b], lr=0.01, betas=(0.9, 0.95), weight_decay=0.0)
    ref_b.grad = gb.clone()
    ref.step()
    torch.testing.assert_close(b.detach(), ref_b.detach())


def test_muon_refuses_vectors():
    with pytest.raises(ConfigError, match="matrices only"):
        Muon([{"params": [nn.Parameter(torch.zeros(3))], "use_muon": True}])


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(11, 6)
        self.fc = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.tok.weight  # tied


def test_param_groups():
    m = _Tiny()
    kinds = classify_parameters(m, vocab_size=11)
    assert [tuple(p.shape) for p in kinds["matrix"]] == [(6, 6)]
    assert [tuple(p.shape) for p in kinds["embedding"]] == [(11, 6)]  # tied weight appears once
    assert sorted(tuple(p.shape) for p in kinds["vector"]) == [(6,), (6,), (6,)]
    opt = build_optimizer(m, "adamw", lr=1e-3, weight_decay=0.1, vocab_size=11)
    wd = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert wd == {"matrix": 0.1, "embedding": 0.0, "vector": 0.0}
    opt = build_optimizer(m, "muon", lr=1e-3, vocab_size=11)
    assert {g["name"]: g["use_muon"] for g in opt.param_groups} == {"matrix": True, "embedding": False,
                                                                    "vector": False}
    with pytest.raises(ConfigError, match="optimizer"):
        build_optimizer(m, "sgd", lr=1e-3)
