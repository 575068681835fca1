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


def test_llama3_rope_scaling_by_hand():
    """dim 8, theta 5e5: wavelengths 2π·[1, 26.6, 707, 18803]; with original context 16 the
    first (6.28, between 16/4 and 16/1) is interpolated, the rest (> 16) divided by the factor 8."""
    from lmforge.model.positions import RopeScaling, rope_inv_freq

    base = rope_inv_freq(8, 5e5, dtype=torch.float64)
    got = rope_inv_freq(8, 5e5, dtype=torch.float64, scaling=RopeScaling(factor=8.0, original_context_length=16))
    smooth = (16 / (2 * math.pi) - 1.0) / (4.0 - 1.0)
    assert math.isclose(got[0].item(), (1 - smooth) * 1.0 / 8 + smooth * 1.0, rel_tol=1e-12)
    torch.testing.assert_close(got[1:], base[1:] / 8)
    # with original context 32 the first wavelength (6.28 < 32/4) is untouched
    short = rope_inv_freq(8, 5e5, dtype=torch.float64, scaling=RopeScaling(factor=8.0, original_context_length=32))
    assert short[0].item() == 1.0 and math.isclose(short[1].item(), base[1].item() / 8, rel_tol=1e-12)
