"""Fitting machinery shared by every scaling law: sums of power laws fitted on log-loss, and bootstrap.

The laws lmforge fits are all of one family, a constant plus power-law terms:

    L = E + A_1 / x_1^α_1 + A_2 / x_2^α_2 + ...

Hoffmann et al. (2022, appendix D.2) fit it in log space with the log-sum-exp parametrisation
`log L̂ = LSE(e, a_1 − α_1·log x_1, ...)` (E = exp e, A_j = exp a_j), a Huber loss (δ = 1e-3) on
`log L̂ − log L`, and L-BFGS started from a grid of initialisations, keeping the best. `fit_lse` does
exactly that (with an analytic gradient and tolerances small enough for the tiny Huber values: the
Epoch AI replication found the original fit stopped early). A pure power law `y = k·x^a` (no
constant) is linear in log-log and is fitted by least squares (`fit_loglinear`).

Uncertainty is a nonparametric percentile bootstrap: resample the data with replacement, refit,
take quantiles (`bootstrap`, `FitResult.ci`). This module knows nothing about N, D or C; the named
laws live in `powerlaw.py`, `chinchilla.py` and `hparams.py`.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from lmforge.errors import LMForgeError, require

HUBER_DELTA = 1e-3


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def lse_predict(theta: np.ndarray, logx: np.ndarray, constant: bool = True) -> np.ndarray:
    """log L̂ for parameters theta = [e?, a_1, α_1, a_2, α_2, ...] and logx [n, k]."""
    terms = _terms(theta, logx, constant)
    m = terms.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(terms - m).sum(axis=1, keepdims=True)))[:, 0]


def _terms(theta: np.ndarray, logx: np.ndarray, constant: bool) -> np.ndarray:
    k = logx.shape[1]
    off = 1 if constant else 0
    a = theta[off:off + 2 * k:2]
    alpha = theta[off + 1:off + 2 * k:2]
    cols = a[None, :] - alpha[None, :] * logx
    if constant:
        cols = np.concatenate([np.full((logx.shape[0], 1), theta[0]), cols], axis=1)
    return cols


def lse_objective(theta: np.ndarray, logx: np.ndarray, logy: np.ndarray, delta: float,
                  constant: bool = True, weights: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Σ w·Huber_δ(log L̂ − log L) / δ and its gradient.

    Dividing by δ keeps the objective O(n·|residual|) instead of O(n·δ·|residual|) so that L-BFGS's
    absolute tolerances mean something; the minimiser is unchanged.
    """
    terms = _terms(theta, logx, constant)
    m = terms.max(axis=1, keepdims=True)
    ex = np.exp(terms - m)
    s = ex.sum(axis=1, keepdims=True)
    pred = (m + np.log(s))[:, 0]
    soft = ex / s  # d pred / d term_j
    r = pred - logy
    w = np.ones_like(r) if weights is None else weights
    value = float((w * huber(r, delta)).sum() / delta)
    dr = w * np.clip(r, -delta, delta) / delta  # d objective / d pred
    g_terms = soft * dr[:, None]
    k = logx.shape[1]
    grad = np.empty_like(theta)
    off = 0
    if constant:
        grad[0] = g_terms[:, 0].sum()
        off = 1
    gt = g_terms[:, off:]
    grad[off:off + 2 * k:2] = gt.sum(axis=0)
    grad[off + 1:off + 2 * k:2] = -(gt * logx).sum(axis=0)
    return value, grad


def _score_starts(starts, logx, logy, delta, constant, weights) -> np.ndarray:
    """The objective at every start in one vectorised pass (chunked to bound memory)."""
    out = []
    w = np.ones_like(logy) if weights is None else weights
    for chunk in np.array_split(starts, max(1, len(starts) * len(logy) // 500_000 + 1)):
        terms = np.stack([_terms(t, logx, constant) for t in chunk])  # [S, n, k(+1)]
        m = terms.max(axis=2, keepdims=True)
        pred = (m + np.log(np.exp(terms - m).sum(axis=2, keepdims=True)))[..., 0]
        out.append((w * huber(pred - logy, delta)).sum(axis=1) / delta)
    return np.concatenate(out)


def hoffmann_grid(n_terms: int, constant: bool = True) -> np.ndarray:
    """The initialisation grid of Hoffmann et al.: e ∈ {-1,-.5,..,1}, a_j ∈ {0,5,..,25}, α_j ∈ {0,.5,..,2}."""
    axes: list[np.ndarray] = []
    if constant:
        axes.append(np.arange(-1.0, 1.01, 0.5))
    for _ in range(n_terms):
        axes.append(np.arange(0.0, 25.1, 5.0))
        axes.append(np.arange(0.0, 2.01, 0.5))
    return np.array(list(itertools.product(*axes)), dtype=np.float64)


def _one_blas_thread():
    """Limit BLAS to one thread: L-BFGS-B's tiny matrix products are ~100x slower when OpenBLAS
    spins up threads on a busy machine (measured 78 ms vs 0.8 ms per 5-parameter solve)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def fit_lse(logx: np.ndarray, logy: np.ndarray, *, constant: bool = True, delta: float = HUBER_DELTA,
            starts: np.ndarray | None = None, n_starts: int | None = 64,
            weights: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Minimise the Huber objective from many starts with L-BFGS; return (best theta, its objective).

    `starts` defaults to the Hoffmann grid. With `n_starts` set, all starts are scored first (one
    vectorised pass) and L-BFGS runs from the `n_starts` best; `n_starts=None` runs from every one
    (4,500 for two terms: the literal procedure; 44-180x slower on benchmarks/scaling_fit.py and
    reaching the same optimum there).
    """
    minimize = require("scipy.optimize", "scaling-law fits", extra="scaling", package="scipy").minimize
    logx = np.asarray(logx, dtype=np.float64)
    if logx.ndim == 1:
        logx = logx[:, None]
    logy = np.asarray(logy, dtype=np.float64)
    if not (np.isfinite(logx).all() and np.isfinite(logy).all()):
        raise LMForgeError("scaling fit: inputs must be positive and finite (log of a non-positive value)")
    if starts is None:
        starts = hoffmann_grid(logx.shape[1], constant)
    starts = np.atleast_2d(np.asarray(starts, dtype=np.float64))
    if n_starts is not None and len(starts) > n_starts:
        scores = _score_starts(starts, logx, logy, delta, constant, weights)
        starts = starts[np.argsort(scores, kind="stable")[:n_starts]]
    best, best_f = None, np.inf
    with _one_blas_thread():
        for s in starts:
            res = minimize(lse_objective, s, args=(logx, logy, delta, constant, weights), jac=True,
                           method="L-BFGS-B", options={"maxiter": 3000, "ftol": 1e-15, "gtol": 1e-10})
            if np.isfinite(res.fun) and res.fun < best_f:
                best, best_f = res.x, float(res.fun)
    if best is None:
        raise LMForgeError("scaling fit: L-BFGS failed from every starting point (check the data)")
    return best, best_f


def fit_loglinear(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares of log y = log k + a·log x; returns (k, a)."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    if len(lx) < 2 or np.ptp(lx) == 0:
        raise LMForgeError(f"power-law fit needs at least 2 distinct x values, got {len(set(lx.tolist()))}")
    a, logk = np.polyfit(lx, ly, 1)
    return float(np.exp(logk)), float(a)


def bootstrap(fit: Callable[[np.ndarray], np.ndarray], n: int, n_boot: int, seed: int = 0,
              groups: np.ndarray | None = None) -> np.ndarray:
    """Refit on `n_boot` resamples of the n data points; returns samples [n_boot, n_params].

    `fit(idx)` fits on the rows `idx` (with repeats). With `groups`, rows are resampled within
    each group (e.g. within each IsoFLOP profile) so every group keeps its size. A resample whose
    fit fails (too few distinct points) is drawn again, up to 10x n_boot tries.
    """
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    tries = 0
    if groups is not None:
        members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    while len(out) < n_boot:
        tries += 1
        if tries > 10 * n_boot + 10:
            raise LMForgeError(f"bootstrap: only {len(out)} of {n_boot} resamples could be fitted")
        if groups is None:
            idx = rng.integers(0, n, size=n)
        else:
            idx = np.concatenate([m[rng.integers(0, len(m), size=len(m))] for m in members])
        try:
            out.append(np.asarray(fit(idx), dtype=np.float64))
        except LMForgeError:
            continue
    return np.stack(out)


@dataclass
class FitResult:
    """Named point estimates plus bootstrap samples of the same names (for intervals)."""

    params: dict[str, float]
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    level: float = 0.95

    def ci(self, name: str, level: float | None = None) -> tuple[float, float]:
        """Percentile bootstrap interval; (nan, nan) when the fit was made without a bootstrap."""
        s = self.samples.get(name)
        if s is None or len(s) == 0:
            return (float("nan"), float("nan"))
        q = 1.0 - (level or self.level)
        lo, hi = np.quantile(s, [q / 2, 1 - q / 2])
        return float(lo), float(hi)

    def describe(self, names: Sequence[str] | None = None) -> list[str]:
        lines = []
        for name in names or self.params:
            v = self.params[name]
            lo, hi = self.ci(name)
            ci = "" if np.isnan(lo) else f"  [{lo:.4g}, {hi:.4g}]"
            lines.append(f"{name:>14} = {v:.4g}{ci}")
        return lines

    def to_dict(self) -> dict:
        return {"params": dict(self.params), "level": self.level,
                "samples": {k: np.asarray(v).tolist() for k, v in self.samples.items()}}

    @classmethod
    def from_dict(cls, d: dict, what: str = "fit") -> FitResult:
        try:
            return cls(params={k: float(v) for k, v in d["params"].items()},
                       samples={k: np.asarray(v, dtype=np.float64) for k, v in d.get("samples", {}).items()},
                       level=float(d.get("level", 0.95)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LMForgeError(f"{what}: not a saved fit (expected 'params' and 'samples'): {e}") from None
