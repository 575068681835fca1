"""RoPE, sinusoidal embeddings: against hand formulas and the relative-position property."""

import math

import torch

from lmforge.model.positions import apply_rope, rope_cos_sin, sinusoidal_embedding


def test_rope_relative_position_property():
    """<R(m) q, R(n) k> depends only on m - n."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 22, dtype=torch.float64), torch.randn(1, 1, 1, 22, dtype=torch.float64)

    def score(m, n):
        qm = apply_rope(q, torch.tensor([[m]]), theta=500.0)
        kn = apply_rope(k, torch.tensor([[n]]), theta=500.0)
        return (qm * kn).sum().item()

    base = score(7, 3)
    for shift in (1, 13, 250, 4091):
        assert math.isclose(score(7 + shift, 3 + shift), base, rel_tol=1e-9, abs_tol=1e-9)
    assert not math.isclose(score(8, 3), base, rel_tol=1e-3)


def test_rope_matches_complex_rotation():
    """Pair (x_i, x_{i+D/2}) as a complex number z, rotated: z · e^{i·pos·theta^(-2i/D)}."""
    torch.manual_seed(0)
    D = 10
    x = torch.randn(2, 3, 5, D, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2, 30, 4], [9, 8, 7, 6, 1000]])
    z = torch.complex(x[..., : D // 2], x[..., D // 2:])
    freqs = 1000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    rot = torch.polar(torch.ones(2, 5, D // 2, dtype=torch.float64), pos[..., None].double() * freqs)
    zr = z * rot[:, None]
    expected = torch.cat((zr.real, zr.imag), -1)
    torch.testing.assert_close(apply_rope(x, pos, theta=1000.0), expected, rtol=1e-5, atol=1e-5)


def test_rope_preserves_norm_position_zero_is_identity_and_3d_input():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 8)
    pos = torch.arange(6).expand(2, 6)
    y = apply_rope(x, pos)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])
    # a [B, T, D] input (the MLA rope key) rotates like a single head
    torch.testing.assert_close(apply_rope(x[:, 0], pos), y[:, 0])
    cos, sin = rope_cos_sin(pos, 8, 10000.0)
    torch.testing.assert_close(apply_rope(x, pos, cos_sin=(cos, sin)), y)


def test_sinusoidal_matches_vaswani_formula():
    pos = torch.tensor([0, 1, 5, 77])
    pe = sinusoidal_embedding(pos, 12)
    for p_i, p in enumerate(pos.tolist()):
        for i in range(6):
            angle = p / 10000 ** (2 * i / 12)
            assert math.isclose(pe[p_i, 2 * i].item(), math.sin(angle), abs_tol=1e-5)
            assert math.isclose(pe[p_i, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-5)
