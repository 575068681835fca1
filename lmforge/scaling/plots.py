"""Plots a person can check a scaling fit by eye with (matplotlib, PNG or SVG by file suffix).

- `plot_isoflop`: loss against N per budget, with each profile's fitted parabola and its vertex;
- `plot_optimal`: N_opt and D_opt against C with the power-law lines (and their bootstrap bands);
- `plot_frontier`: loss against compute for every run, the per-budget minimum and the fitted frontier;
- `plot_parametric`: contours of L(N, D) from approach 3 with the iso-FLOP lines and the
  compute-optimal path, and the runs on top.

Plotting only: every number drawn comes from a fit object; nothing is fitted here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge.errors import require


def _plt():
    mpl = require("matplotlib", "scaling plots", extra="scaling")
    mpl.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        from lmforge.errors import ConfigError

        raise ConfigError(f"plot file {path}: expected a .png, .svg or .pdf suffix")
    path.parent.mkdir(parents=True, exist_ok=True)
    from lmforge.io import atomic_file

    with atomic_file(path, "wb") as f:
        fig.savefig(f, format=path.suffix[1:].lower(), dpi=130, bbox_inches="tight")
    _plt().close(fig)
    return path


def plot_isoflop(fit, path: str | Path) -> Path:
    """IsoFLOP profiles (approach 2) with parabolas in log N and their minima."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("viridis")
    for i, p in enumerate(fit.profiles):
        color = cmap(i / max(1, len(fit.profiles) - 1))
        ax.scatter(p.n, p.loss, color=color, s=18, label=f"C = {p.flops:.2g}")
        x = np.linspace(np.log(p.n.min()) - 0.3, np.log(p.n.max()) + 0.3, 100)
        ax.plot(np.exp(x), np.polyval(p.coef, x), color=color, lw=1)
        if np.isfinite(p.n_parabola):
            ax.plot([p.n_parabola], [p.loss_parabola], marker="*", color=color, ms=11, mec="k", mew=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("final loss")
    ax.set_title("IsoFLOP profiles (stars: parabola minima)")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_optimal(flops_points, n_points, fit_n, fit_d, path: str | Path, title: str = "") -> Path:
    """N_opt and D_opt (D = C/6N) against C, with the fitted power laws and 95% bootstrap bands."""
    plt = _plt()
    c = np.asarray(flops_points, float)
    n = np.asarray(n_points, float)
    grid = np.geomspace(c.min() / 3, c.max() * 3, 100)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, pts, law, name in ((axes[0], n, fit_n, "N_opt"), (axes[1], c / (6 * n), fit_d, "D_opt")):
        ax.scatter(c, pts, s=16, color="k", zorder=3)
        ax.plot(grid, law.predict(grid), color="C1", label=f"{name} ∝ C^{law.params['a']:.3f}")
        if law.samples:
            lo, hi = law.predict_ci(grid)
            ax.fill_between(grid, lo, hi, color="C1", alpha=0.2, lw=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute C (FLOPs)")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
    fig.suptitle(title or "compute-optimal allocation")
    return _save(fig, path)


def plot_frontier(flops, loss, path: str | Path, frontier=None, minima=None) -> Path:
    """All runs' loss against compute, per-budget minima and the fitted L(C) = E + A·C^(−α)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(flops, loss, s=12, color="0.6", label="runs")
    if minima is not None:
        ax.scatter(*minima, s=30, color="C3", marker="*", label="per-budget minimum", zorder=3)
    if frontier is not None:
        grid = np.geomspace(np.min(flops) / 3, np.max(flops) * 10, 100)
        p = frontier.params
        ax.plot(grid, frontier.predict(grid), color="C0",
                label=f"L = {p['E']:.3g} + {p['A']:.3g}·C^-{p['alpha']:.3f}")
        if frontier.samples:
            lo, hi = frontier.predict_ci(grid)
            ax.fill_between(grid, lo, hi, color="C0", alpha=0.2, lw=0)
    ax.set_xscale("log")
    ax.set_xlabel("compute C (FLOPs)")
    ax.set_ylabel("loss")
    ax.set_title("loss vs compute")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_parametric(fit, path: str | Path, n=None, d=None) -> Path:
    """Contours of the approach-3 L(N, D), iso-FLOP lines and the compute-optimal frontier."""
    plt = _plt()
    if n is not None and len(n):
        n_lo, n_hi = np.min(n) / 10, np.max(n) * 10
        d_lo, d_hi = np.min(d) / 10, np.max(d) * 10
    else:
        n_lo, n_hi, d_lo, d_hi = 1e7, 1e11, 1e9, 1e13
    N, D = np.meshgrid(np.geomspace(n_lo, n_hi, 200), np.geomspace(d_lo, d_hi, 200))
    L = fit.predict(N, D)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    cs = ax.contourf(N, D, np.log(L - fit.params["E"] + 1e-12), levels=20, cmap="viridis")
    fig.colorbar(cs, ax=ax, label="log(L − E)")
    ax.contour(N, D, L, levels=12, colors="w", linewidths=0.4)
    for c in np.geomspace(6 * n_lo * d_lo, 6 * n_hi * d_hi, 9)[1:-1]:
        nn = np.geomspace(n_lo, n_hi, 50)
        ax.plot(nn, c / (6 * nn), color="w", ls=":", lw=0.8)
    cc = np.geomspace(6 * n_lo * d_lo, 6 * n_hi * d_hi, 100)
    no, do = fit.compute_optimal(cc)
    ax.plot(no, do, color="C3", lw=2, label=f"compute-optimal (a={fit.params['a']:.3f}, b={fit.params['b']:.3f})")
    if n is not None:
        ax.scatter(n, d, s=10, color="k", label="runs")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(n_lo, n_hi)
    ax.set_ylim(d_lo, d_hi)
    ax.set_xlabel("parameters N")
    ax.set_ylabel("tokens D")
    ax.set_title("L(N, D) = E + A/N^α + B/D^β")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)
