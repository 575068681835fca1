"""One-variable scaling laws with bootstrap intervals.

- `fit_power_law(x, loss)`: L(x) = E + A·x^(−α), the saturating law for loss against data,
  parameters or compute (Huber on log-loss, L-BFGS from a grid; see `fit.py`).
- `fit_pure_power_law(x, y)`: y = k·x^a, least squares in log-log; used for N_opt(C), D_opt(C),
  optimal learning rate and batch size against compute.

Both return a `FitResult` whose samples come from a percentile bootstrap over the data points.
"""

from __future__ import annotations

import numpy as np

from lmforge.errors import LMForgeError
from lmforge.scaling.fit import HUBER_DELTA, FitResult, bootstrap, fit_loglinear, fit_lse


class PowerLaw(FitResult):
    """L(x) = E + A·x^(−α); params E, A, alpha."""

    def predict(self, x, params: dict | None = None) -> np.ndarray:
        p = params or self.params
        return p["E"] + p["A"] * np.asarray(x, float) ** (-p["alpha"])

    def predict_ci(self, x) -> tuple[np.ndarray, np.ndarray]:
        s = self.samples
        if not s:
            raise LMForgeError("this power-law fit has no bootstrap samples (fit with n_boot > 0)")
        preds = s["E"][:, None] + s["A"][:, None] * np.asarray(x, float)[None, :] ** (-s["alpha"][:, None])
        q = 1 - self.level
        return np.quantile(preds, q / 2, axis=0), np.quantile(preds, 1 - q / 2, axis=0)


class PurePowerLaw(FitResult):
    """y = k·x^a; params k, a."""

    def predict(self, x, params: dict | None = None) -> np.ndarray:
        p = params or self.params
        return p["k"] * np.asarray(x, float) ** p["a"]

    def predict_samples(self, x: float) -> np.ndarray:
        """y at one x for every bootstrap sample (empty without samples)."""
        if not self.samples:
            return np.empty(0)
        return self.samples["k"] * float(x) ** self.samples["a"]

    def predict_ci(self, x) -> tuple[np.ndarray, np.ndarray]:
        s = self.samples
        if not s:
            raise LMForgeError("this power-law fit has no bootstrap samples (fit with n_boot > 0)")
        preds = s["k"][:, None] * np.asarray(x, float)[None, :] ** s["a"][:, None]
        q = 1 - self.level
        return np.quantile(preds, q / 2, axis=0), np.quantile(preds, 1 - q / 2, axis=0)


def _check_xy(x, y, what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1:
        raise LMForgeError(f"{what}: x and y must be 1-D of equal length, got {x.shape} and {y.shape}")
    if not (np.all(x > 0) and np.all(y > 0) and np.isfinite(x).all() and np.isfinite(y).all()):
        raise LMForgeError(f"{what}: all values must be positive and finite")
    return x, y


def fit_power_law(x, loss, *, n_boot: int = 200, level: float = 0.95, seed: int = 0,
                  delta: float = HUBER_DELTA, n_starts: int | None = 16) -> PowerLaw:
    """Fit L = E + A·x^(−α) to (x, loss); bootstrap refits start from the full-data optimum."""
    x, y = _check_xy(x, loss, "power-law fit")
    if len(np.unique(x)) < 4:
        raise LMForgeError(f"power-law fit: needs at least 4 distinct x values (3 parameters), got {len(np.unique(x))}")
    lx, ly = np.log(x)[:, None], np.log(y)
    # The grid of a_j ∈ {0..25} suits x ~ 1e6..1e12; rescaling x to a median of 1 makes one grid
    # fit every unit (tokens, parameters, FLOPs). A = A' · scale^α undoes it.
    shift = float(np.median(lx))
    lxs = lx - shift
    starts = np.array([[e, a, al] for e in (-1.0, -0.5, 0.0, 0.5, 1.0) for a in (-3.0, -1.5, 0.0, 1.0, 2.0)
                       for al in (0.05, 0.2, 0.5, 1.0, 2.0)])
    theta, _ = fit_lse(lxs, ly, starts=starts, n_starts=n_starts, delta=delta)

    def params_of(th: np.ndarray) -> np.ndarray:
        return np.array([np.exp(th[0]), np.exp(th[1] + th[2] * shift), th[2]])

    def refit(idx: np.ndarray) -> np.ndarray:
        if len(np.unique(x[idx])) < 4:
            raise LMForgeError("degenerate resample")
        th, _ = fit_lse(lxs[idx], ly[idx], starts=theta, n_starts=None, delta=delta)
        return params_of(th)

    p = params_of(theta)
    samples = {}
    if n_boot > 0:
        boot = bootstrap(refit, len(x), n_boot, seed)
        samples = {"E": boot[:, 0], "A": boot[:, 1], "alpha": boot[:, 2]}
    return PowerLaw({"E": float(p[0]), "A": float(p[1]), "alpha": float(p[2])}, samples, level)


def fit_pure_power_law(x, y, *, n_boot: int = 200, level: float = 0.95, seed: int = 0,
                       groups: np.ndarray | None = None) -> PurePowerLaw:
    """Fit y = k·x^a by least squares in log-log space, with a bootstrap over points."""
    x, y = _check_xy(x, y, "power-law fit")
    k, a = fit_loglinear(x, y)
    samples = {}
    if n_boot > 0:
        boot = bootstrap(lambda idx: np.array(fit_loglinear(x[idx], y[idx])), len(x), n_boot, seed, groups)
        samples = {"k": boot[:, 0], "a": boot[:, 1]}
    return PurePowerLaw({"k": k, "a": a}, samples, level)
