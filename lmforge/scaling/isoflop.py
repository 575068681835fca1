"""Chinchilla approaches 1 and 2: compute-optimal N and D read off runs, then power laws in C.

Approach 2 (IsoFLOP profiles, `fit_isoflop`): runs are grouped by FLOP budget (C values within 5%
of each other are one budget). In each group the loss-minimising model size is taken two ways: the
arg-min run, and the vertex of a parabola fitted to loss against log N (Hoffmann et al., fig. 3).
Then N_opt = k·C^a is fitted in log-log space, and D_opt = C / (6·N_opt) gives D_opt = k'·C^b.
The minimum loss per budget (the parabola's value at its vertex) is the loss-vs-compute frontier,
fitted as L(C) = E + A·C^(−α) when there are at least 4 budgets.

Approach 1 (`fit_envelope`): each run contributes a training curve (rows sharing a `run` id, C
growing along the curve). Curves are interpolated in log-log space; at many log-spaced C values
the run with the lowest loss is found; its N and D = C/(6N) at those points are fitted with power
laws in C. (Hoffmann et al. also vary the learning-rate schedule per size; that is up to the runs.)

Intervals: approach 2 resamples runs within each budget; approach 1 resamples whole curves.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from lmforge.errors import LMForgeError
from lmforge.scaling.fit import FitResult, bootstrap, fit_loglinear
from lmforge.scaling.powerlaw import PowerLaw, PurePowerLaw, fit_power_law


def group_budgets(flops: np.ndarray, rel_tol: float = 0.05) -> np.ndarray:
    """Label each run with its budget group: sorted C values within `rel_tol` of a group's first member."""
    order = np.argsort(flops, kind="stable")
    labels = np.empty(len(flops), dtype=np.int64)
    g, first = -1, None
    for i in order:
        if first is None or flops[i] > first * (1 + rel_tol):
            g, first = g + 1, flops[i]
        labels[i] = g
    return labels


def parabola_vertex(log_n: np.ndarray, loss: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Fit loss = p0·x² + p1·x + p2 in x = log N; return (x at the minimum, loss there, coefficients).

    Returns nan for the vertex when the profile is not convex (p0 ≤ 0): it has no interior minimum.
    """
    if len(np.unique(log_n)) < 3:
        raise LMForgeError(f"IsoFLOP profile needs at least 3 distinct model sizes, got {len(np.unique(log_n))}")
    coef = np.polyfit(log_n, loss, 2)
    if coef[0] <= 0:
        return float("nan"), float("nan"), coef
    x = -coef[1] / (2 * coef[0])
    return float(x), float(np.polyval(coef, x)), coef


@dataclass
class Profile:
    """One IsoFLOP profile: the runs of one budget and where their loss is lowest."""

    flops: float
    n: np.ndarray
    loss: np.ndarray
    n_argmin: float
    n_parabola: float  # nan when the profile is not convex
    loss_parabola: float
    coef: np.ndarray
    interior: bool  # the parabola's vertex lies inside the sampled N range


def _profiles(n, flops, loss, labels) -> list[Profile]:
    out = []
    for g in np.unique(labels):
        m = labels == g
        c = float(np.exp(np.mean(np.log(flops[m]))))
        ln = np.log(n[m])
        try:
            x, lmin, coef = parabola_vertex(ln, loss[m])
        except LMForgeError as e:
            raise LMForgeError(f"budget C={c:.3g}: {e}") from None
        order = np.argsort(n[m])
        out.append(Profile(c, n[m][order], loss[m][order], float(n[m][np.argmin(loss[m])]),
                           float(np.exp(x)), lmin, coef, bool(ln.min() <= x <= ln.max())))
    return out


@dataclass
class IsoFLOPFit:
    """Approach 2: profiles plus N_opt(C), D_opt(C) fits by arg-min and by parabola, and the frontier."""

    profiles: list[Profile]
    n_opt: dict[str, PurePowerLaw]  # method ("parabola", "argmin") -> N_opt = k·C^a
    d_opt: dict[str, PurePowerLaw]
    frontier: PowerLaw | None
    kind: str = "isoflop"

    def compute_optimal(self, flops, method: str = "parabola") -> tuple:
        n = self.n_opt[method].predict(flops)
        return n, np.asarray(flops, float) / (6.0 * n)

    def to_dict(self) -> dict:
        return {"kind": self.kind,
                "n_opt": {k: v.to_dict() for k, v in self.n_opt.items()},
                "d_opt": {k: v.to_dict() for k, v in self.d_opt.items()},
                "frontier": self.frontier.to_dict() if self.frontier else None,
                "profiles": [{"flops": p.flops, "n": p.n.tolist(), "loss": p.loss.tolist(),
                              "n_argmin": p.n_argmin, "n_parabola": p.n_parabola,
                              "loss_parabola": p.loss_parabola, "coef": p.coef.tolist(),
                              "interior": p.interior} for p in self.profiles]}


def _opt_points(profiles: list[Profile], method: str) -> tuple[np.ndarray, np.ndarray]:
    c = np.array([p.flops for p in profiles])
    n = np.array([p.n_parabola if method == "parabola" else p.n_argmin for p in profiles])
    ok = np.isfinite(n)
    return c[ok], n[ok]


def fit_isoflop(n, flops, loss, *, n_boot: int = 200, level: float = 0.95, seed: int = 0,
                rel_tol: float = 0.05) -> IsoFLOPFit:
    """Approach 2 on runs (N, C, final loss); needs ≥ 2 budgets with ≥ 3 model sizes each."""
    n, flops, loss = (np.asarray(v, dtype=np.float64) for v in (n, flops, loss))
    labels = group_budgets(flops, rel_tol)
    profiles = _profiles(n, flops, loss, labels)
    if len(profiles) < 2:
        raise LMForgeError(f"IsoFLOP fit needs runs at 2 or more FLOP budgets, got {len(profiles)}")
    for p in profiles:
        if not p.interior:
            warnings.warn(f"IsoFLOP profile at C={p.flops:.3g}: the loss minimum is not inside the sampled "
                          f"model sizes ({p.n.min():.3g}..{p.n.max():.3g}); widen the grid", stacklevel=2)

    def fits(profs: list[Profile]) -> dict[str, tuple[float, float]]:
        out = {}
        for method in ("parabola", "argmin"):
            c, nn = _opt_points(profs, method)
            out[method] = fit_loglinear(c, nn) if len(np.unique(c)) >= 2 else (float("nan"), float("nan"))
        return out

    point = fits(profiles)
    boot = None
    if n_boot > 0:
        def refit(idx: np.ndarray) -> np.ndarray:
            profs = _profiles(n[idx], flops[idx], loss[idx], labels[idx])
            f = fits(profs)
            return np.array([*f["parabola"], *f["argmin"]])

        boot = bootstrap(refit, len(n), n_boot, seed, groups=labels)
    n_opt, d_opt = {}, {}
    for j, method in enumerate(("parabola", "argmin")):
        k, a = point[method]
        s_n = s_d = {}
        if boot is not None:
            kb, ab = boot[:, 2 * j], boot[:, 2 * j + 1]
            ok = np.isfinite(kb)
            s_n = {"k": kb[ok], "a": ab[ok]}
            # D_opt = C / (6·k·C^a) = (1 / 6k)·C^(1 − a)
            s_d = {"k": 1.0 / (6.0 * kb[ok]), "a": 1.0 - ab[ok]}
        n_opt[method] = PurePowerLaw({"k": k, "a": a}, s_n, level)
        d_opt[method] = PurePowerLaw({"k": 1.0 / (6.0 * k), "a": 1.0 - a}, s_d, level)
    frontier = None
    pts = [(p.flops, p.loss_parabola) for p in profiles if np.isfinite(p.loss_parabola)]
    if len(pts) >= 4:
        c, lmin = map(np.array, zip(*pts))
        try:
            frontier = fit_power_law(c, lmin, n_boot=n_boot, level=level, seed=seed)
        except LMForgeError:
            frontier = None
    return IsoFLOPFit(profiles, n_opt, d_opt, frontier)


@dataclass
class EnvelopeFit:
    """Approach 1: the minimum-loss envelope over training curves and power laws fitted to it."""

    flops: np.ndarray
    n_best: np.ndarray
    d_best: np.ndarray
    loss_best: np.ndarray
    n_opt: PurePowerLaw
    d_opt: PurePowerLaw
    kind: str = "envelope"

    def compute_optimal(self, flops) -> tuple:
        return self.n_opt.predict(flops), self.d_opt.predict(flops)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "n_opt": self.n_opt.to_dict(), "d_opt": self.d_opt.to_dict(),
                "envelope": {"flops": self.flops.tolist(), "n": self.n_best.tolist(),
                             "d": self.d_best.tolist(), "loss": self.loss_best.tolist()}}


def _envelope(curves: list[tuple[float, np.ndarray, np.ndarray]], grid: np.ndarray):
    """For each grid C: (N, loss) of the curve with the lowest interpolated loss among those covering C."""
    losses = np.full((len(curves), len(grid)), np.inf)
    for i, (_, lc, ll) in enumerate(curves):
        inside = (np.log(grid) >= lc[0]) & (np.log(grid) <= lc[-1])
        losses[i, inside] = np.exp(np.interp(np.log(grid[inside]), lc, ll))
    best = np.argmin(losses, axis=0)
    lbest = losses[best, np.arange(len(grid))]
    ok = np.isfinite(lbest)
    nbest = np.array([curves[b][0] for b in best])
    return ok, nbest, lbest


def fit_envelope(run, n, flops, loss, *, n_grid: int = 1500, flops_range: tuple[float, float] | None = None,
                 smooth: int = 1, n_boot: int = 200, level: float = 0.95, seed: int = 0) -> EnvelopeFit:
    """Approach 1 on training curves: rows (run id, N, C so far, loss so far).

    `smooth` > 1 averages log-loss over that many neighbouring points of each curve first.
    `flops_range` limits the fit to C within it (the envelope's ends are seen by few runs).
    """
    run = np.asarray(run, dtype=object)
    n, flops, loss = (np.asarray(v, dtype=np.float64) for v in (n, flops, loss))
    curves = []
    for r in dict.fromkeys(run.tolist()):
        m = run == r
        if len(np.unique(n[m])) != 1:
            raise LMForgeError(f"approach 1: run '{r}' has more than one parameter count {np.unique(n[m])[:3]}")
        order = np.argsort(flops[m])
        lc, ll = np.log(flops[m][order]), np.log(loss[m][order])
        if smooth > 1 and len(ll) >= smooth:
            ll = np.convolve(ll, np.ones(smooth) / smooth, mode="same")
            half = smooth // 2  # the ends of a 'same' convolution are biased: drop them
            lc, ll = lc[half:len(lc) - half], ll[half:len(ll) - half]
        if len(lc) >= 2:
            curves.append((float(n[m][0]), lc, ll))
    if len({c[0] for c in curves}) < 2:
        raise LMForgeError(f"approach 1 needs training curves (≥ 2 points each) of ≥ 2 model sizes, got {len(curves)}")
    lo = min(c[1][0] for c in curves) if flops_range is None else np.log(flops_range[0])
    hi = max(c[1][-1] for c in curves) if flops_range is None else np.log(flops_range[1])
    grid = np.exp(np.linspace(lo, hi, n_grid))

    def run_fit(cs):
        ok, nb, lb = _envelope(cs, grid)
        if ok.sum() < 2 or len(np.unique(nb[ok])) < 2:
            raise LMForgeError("approach 1: the envelope touches fewer than 2 model sizes")
        return ok, nb, lb, fit_loglinear(grid[ok], nb[ok])

    ok, nb, lb, (k, a) = run_fit(curves)
    samples: dict[str, np.ndarray] = {}
    if n_boot > 0:
        def refit(idx: np.ndarray) -> np.ndarray:
            return np.array(run_fit([curves[i] for i in idx])[3])

        boot = bootstrap(refit, len(curves), n_boot, seed)
        samples = {"k": boot[:, 0], "a": boot[:, 1]}
    n_fit = PurePowerLaw({"k": k, "a": a}, samples, level)
    d_samples = {"k": 1.0 / (6.0 * samples["k"]), "a": 1.0 - samples["a"]} if samples else {}
    d_fit = PurePowerLaw({"k": 1.0 / (6.0 * k), "a": 1.0 - a}, d_samples, level)
    c = grid[ok]
    return EnvelopeFit(c, nb[ok], c / (6.0 * nb[ok]), lb[ok], n_fit, d_fit)


__all__ = ["EnvelopeFit", "FitResult", "IsoFLOPFit", "Profile", "fit_envelope", "fit_isoflop",
           "group_budgets", "parabola_vertex"]
