"""Fitters recover known parameters from synthetic data drawn from the law itself (with noise)."""

import numpy as np
import pytest

from lmforge.errors import LMForgeError
from lmforge.scaling.fit import HUBER_DELTA, fit_loglinear, huber, lse_objective, lse_predict
from lmforge.scaling.isoflop import fit_envelope, fit_isoflop, parabola_vertex
from lmforge.scaling.parametric import CHINCHILLA, ParametricFit, fit_parametric, published_chinchilla
from lmforge.scaling.powerlaw import fit_power_law, fit_pure_power_law

TRUTH = ParametricFit(dict(CHINCHILLA))
A_TRUE = CHINCHILLA["beta"] / (CHINCHILLA["alpha"] + CHINCHILLA["beta"])  # 0.4516


def test_huber_and_objective_by_hand():
    r = np.array([0.0005, -0.002, 0.01])
    # quadratic inside δ, linear outside: 0.5·r², δ(|r| − δ/2)
    expected = np.array([0.5 * 0.0005**2, 1e-3 * (0.002 - 0.0005), 1e-3 * (0.01 - 0.0005)])
    np.testing.assert_allclose(huber(r, 1e-3), expected, rtol=1e-12)
    # one point, L = E + A/x^α with E=1, A=2, α=0.5 at x=4: L = 2
    theta = np.array([0.0, np.log(2.0), 0.5])
    logx = np.log(np.array([[4.0]]))
    np.testing.assert_allclose(lse_predict(theta, logx), [np.log(2.0)], rtol=1e-12)
    value, _ = lse_objective(theta, logx, np.log([2.5]), HUBER_DELTA)
    assert value == pytest.approx(huber(np.array([np.log(2 / 2.5)]), HUBER_DELTA)[0] / HUBER_DELTA)


def test_objective_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    logx = np.log(rng.uniform(1e7, 1e10, size=(23, 2)))
    logy = np.log(rng.uniform(2.0, 3.0, size=23))
    theta = np.array([0.4, 6.0, 0.35, 6.2, 0.3])
    for delta in (HUBER_DELTA, 10.0):  # linear and quadratic regime of the Huber loss
        _, g = lse_objective(theta, logx, logy, delta)
        eps = 1e-6
        num = [(lse_objective(theta + eps * e, logx, logy, delta)[0]
                - lse_objective(theta - eps * e, logx, logy, delta)[0]) / (2 * eps) for e in np.eye(5)]
        np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-6)


def test_loglinear_exact_and_errors():
    x = np.geomspace(1e17, 1e22, 7)
    k, a = fit_loglinear(x, 0.29 * x**0.327)
    assert k == pytest.approx(0.29, rel=1e-9) and a == pytest.approx(0.327, rel=1e-12)
    with pytest.raises(LMForgeError, match="2 distinct"):
        fit_loglinear([5.0, 5.0], [1.0, 2.0])


def test_power_law_recovers_parameters():
    rng = np.random.default_rng(0)
    x = np.geomspace(1e6, 1e11, 30)
    y = (1.8 + 400.0 * x**-0.3) * np.exp(rng.normal(0, 0.003, x.size))
    fit = fit_power_law(x, y, n_boot=40)
    assert fit.params["E"] == pytest.approx(1.8, abs=0.05)
    assert fit.params["alpha"] == pytest.approx(0.3, abs=0.015)
    assert fit.params["A"] == pytest.approx(400.0, rel=0.25)
    lo, hi = fit.ci("alpha")
    assert lo < fit.params["alpha"] < hi and lo <= 0.3 <= hi
    with pytest.raises(LMForgeError, match="positive"):
        fit_power_law(x, -y)


def test_parametric_recovers_published_chinchilla_noiseless():
    n = np.repeat(np.geomspace(7e7, 1.6e10, 8), 8)
    d = np.tile(np.geomspace(5e9, 5e11, 8), 8)
    fit = fit_parametric(n, d, TRUTH.predict(n, d), n_boot=0, n_starts=16)
    for name, value in CHINCHILLA.items():
        assert fit.params[name] == pytest.approx(value, rel=2e-3), name


def test_parametric_recovers_chinchilla_with_noise_and_interval():
    rng = np.random.default_rng(1)
    n = np.repeat(np.geomspace(7e7, 1.6e10, 9), 9)
    d = np.tile(np.geomspace(5e9, 5e11, 9), 9)
    loss = TRUTH.predict(n, d) * np.exp(rng.normal(0, 0.003, n.size))
    fit = fit_parametric(n, d, loss, n_boot=15, n_starts=8)
    assert fit.params["alpha"] == pytest.approx(0.34, abs=0.02)
    assert fit.params["beta"] == pytest.approx(0.28, abs=0.02)
    assert fit.params["E"] == pytest.approx(1.69, abs=0.05)
    assert fit.params["a"] == pytest.approx(A_TRUE, abs=0.02)
    lo, hi = fit.ci("beta")
    assert lo < hi and lo < fit.params["beta"] < hi


def test_compute_optimal_closed_form_minimises_loss_on_the_isoflop_line():
    fit = published_chinchilla()
    for c in (1e19, 5.76e23):
        n_opt, d_opt = fit.compute_optimal(c)
        assert 6 * n_opt * d_opt == pytest.approx(c, rel=1e-12)
        grid = np.geomspace(n_opt / 30, n_opt * 30, 200001)  # brute force along 6ND = C
        best = grid[np.argmin(fit.predict(grid, c / (6 * grid)))]
        assert best == pytest.approx(n_opt, rel=1e-3)
    assert fit.params["a"] == pytest.approx(0.28 / 0.62) and fit.params["b"] == pytest.approx(0.34 / 0.62)


def _isoflop_grid(rng, noise):
    budgets = np.geomspace(1e18, 1e21, 6)
    n, c = [], []
    for b in budgets:
        n0, _ = TRUTH.compute_optimal(b)
        n += list(n0 * np.geomspace(1 / 6, 6, 9))
        c += [b] * 9
    n, c = np.array(n), np.array(c)
    return n, c, TRUTH.predict(n, c / (6 * n)) * np.exp(rng.normal(0, noise, n.size))


def test_parabola_vertex_exact():
    x = np.linspace(17, 22, 7)
    x0, lmin, coef = parabola_vertex(x, 0.3 * (x - 19.7) ** 2 + 2.5)
    assert x0 == pytest.approx(19.7, rel=1e-10) and lmin == pytest.approx(2.5, rel=1e-10)
    x0, _, _ = parabola_vertex(x, -(x - 19.7) ** 2)  # concave: no minimum
    assert np.isnan(x0)


def test_isoflop_recovers_exponents():
    fit = fit_isoflop(*_isoflop_grid(np.random.default_rng(2), 0.002), n_boot=30)
    a = fit.n_opt["parabola"].params["a"]
    assert a == pytest.approx(A_TRUE, abs=0.01)
    assert fit.d_opt["parabola"].params["a"] == pytest.approx(1 - A_TRUE, abs=0.01)
    assert fit.n_opt["argmin"].params["a"] == pytest.approx(A_TRUE, abs=0.06)
    lo, hi = fit.n_opt["parabola"].ci("a")
    assert lo <= A_TRUE <= hi
    # D_opt = C/(6 N_opt) holds per bootstrap sample too
    s_n, s_d = fit.n_opt["parabola"].samples, fit.d_opt["parabola"].samples
    np.testing.assert_allclose(s_n["a"] + s_d["a"], 1.0)
    assert all(p.interior for p in fit.profiles)
    assert fit.frontier is not None and fit.frontier.params["E"] == pytest.approx(1.69, abs=0.2)


def test_isoflop_needs_two_budgets():
    n, c, loss = _isoflop_grid(np.random.default_rng(0), 0.0)
    one = c == c.min()
    with pytest.raises(LMForgeError, match="2 or more FLOP budgets"):
        fit_isoflop(n[one], c[one], loss[one], n_boot=0)


def test_envelope_recovers_exponent():
    rng = np.random.default_rng(4)
    run, n, c, loss = [], [], [], []
    for i, size in enumerate(np.geomspace(1e7, 1e9, 30)):
        d = np.geomspace(1e8, 1e11, 120)
        run += [f"r{i}"] * d.size
        n += [size] * d.size
        c += list(6 * size * d)
        loss += list(TRUTH.predict(size, d) * np.exp(rng.normal(0, 0.001, d.size)))
    fit = fit_envelope(run, n, c, loss, flops_range=(3e16, 1e20), smooth=5, n_boot=20)
    assert fit.n_opt.params["a"] == pytest.approx(A_TRUE, abs=0.02)
    assert fit.d_opt.params["a"] == pytest.approx(1 - A_TRUE, abs=0.02)
    np.testing.assert_allclose(6 * fit.n_best * fit.d_best, fit.flops, rtol=1e-12)


def test_bootstrap_intervals_cover_at_roughly_nominal_rate():
    """Monte Carlo: 120 data sets from y = k·x^a with log-normal noise; the 90% percentile-bootstrap
    interval of a should contain the true a in about 90% of them (percentile intervals run a bit
    narrow at n = 16, hence the lower bound; 120 draws give a standard error of ~0.03)."""
    rng = np.random.default_rng(0)
    x = np.geomspace(1e18, 1e21, 16)
    hits = 0
    m = 120
    for i in range(m):
        y = 0.5 * x**0.45 * np.exp(rng.normal(0, 0.05, x.size))
        lo, hi = fit_pure_power_law(x, y, n_boot=100, level=0.9, seed=i).ci("a")
        hits += lo <= 0.45 <= hi
    assert 0.78 <= hits / m <= 0.97


@pytest.mark.slow
def test_power_law_bootstrap_coverage_monte_carlo_slow():
    rng = np.random.default_rng(5)
    x = np.geomspace(1e7, 1e10, 20)
    hits, m = 0, 40
    for i in range(m):
        y = (1.8 + 400 * x**-0.3) * np.exp(rng.normal(0, 0.01, x.size))
        lo, hi = fit_power_law(x, y, n_boot=100, level=0.9, seed=i).ci("alpha")
        hits += lo <= 0.3 <= hi
    assert 0.72 <= hits / m <= 1.0
