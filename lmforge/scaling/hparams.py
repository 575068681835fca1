"""Hyperparameter scaling: optimal learning rate and batch size as power laws in compute.

DeepSeek-LLM (2024, section 3.1) sweeps batch size and learning rate at several small compute
budgets, keeps per budget the "near-optimal" runs, whose loss is within 0.25% of that budget's
minimum, and fits η_opt = k_η·C^a_η and B_opt = k_B·C^a_B through all of them in log-log space.
`fit_hparams` does the same on a sweep table with columns flops, lr, batch_size, loss (batch size
in tokens), with bootstrap intervals (runs resampled within each budget, near-optimal sets
recomputed). `tol=0` keeps only the arg-min run of each budget.

`DEEPSEEK` holds the published fits (η_opt = 0.3118·C^−0.1250, B_opt = 0.2920·C^0.3271, C in
FLOPs counted as non-embedding FLOPs/token × tokens); the planner falls back to them, labelled
as such, when no sweep of your own is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmforge.errors import LMForgeError
from lmforge.scaling.fit import bootstrap, fit_loglinear
from lmforge.scaling.isoflop import group_budgets
from lmforge.scaling.powerlaw import PurePowerLaw

DEEPSEEK = {"lr": {"k": 0.3118, "a": -0.1250}, "batch_size": {"k": 0.2920, "a": 0.3271}}


@dataclass
class HparamFit:
    """lr(C) and batch_size(C) power laws, plus which runs were near-optimal (for plots)."""

    lr: PurePowerLaw
    batch_size: PurePowerLaw
    near_optimal: np.ndarray  # bool mask over the input runs
    source: str = "fit"
    kind: str = "hparams"

    def predict(self, flops) -> tuple:
        return self.lr.predict(flops), self.batch_size.predict(flops)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "source": self.source, "lr": self.lr.to_dict(),
                "batch_size": self.batch_size.to_dict(), "near_optimal": self.near_optimal.tolist()}

    @classmethod
    def from_dict(cls, d: dict, what: str = "hparam fit") -> HparamFit:
        if d.get("kind") != "hparams":
            raise LMForgeError(f"{what}: expected a saved hyperparameter fit (kind 'hparams'), got {d.get('kind')!r}")
        lr, bs = PurePowerLaw.from_dict(d["lr"], what), PurePowerLaw.from_dict(d["batch_size"], what)
        return cls(PurePowerLaw(lr.params, lr.samples, lr.level), PurePowerLaw(bs.params, bs.samples, bs.level),
                   np.asarray(d.get("near_optimal", []), dtype=bool), d.get("source", "fit"))


def published_deepseek() -> HparamFit:
    """DeepSeek-LLM's published laws (point estimates, no intervals)."""
    return HparamFit(PurePowerLaw(dict(DEEPSEEK["lr"])), PurePowerLaw(dict(DEEPSEEK["batch_size"])),
                     np.zeros(0, dtype=bool), source="published (DeepSeek-LLM 2024)")


def near_optimal_mask(flops: np.ndarray, loss: np.ndarray, tol: float, labels: np.ndarray | None = None) -> np.ndarray:
    """Runs whose loss is within (1 + tol) of the minimum of their budget."""
    labels = group_budgets(flops) if labels is None else labels
    mask = np.zeros(len(loss), dtype=bool)
    for g in np.unique(labels):
        m = labels == g
        mask[m] = loss[m] <= loss[m].min() * (1.0 + tol)
    return mask


def fit_hparams(flops, lr, batch_size, loss, *, tol: float = 0.0025, n_boot: int = 200, level: float = 0.95,
                seed: int = 0) -> HparamFit:
    """Fit lr_opt(C) and B_opt(C) through the near-optimal runs of each budget (≥ 2 budgets)."""
    flops, lr, bs, loss = (np.asarray(v, dtype=np.float64) for v in (flops, lr, batch_size, loss))
    if not (flops.shape == lr.shape == bs.shape == loss.shape):
        raise LMForgeError("hyperparameter fit: flops, lr, batch_size and loss must have equal lengths")
    labels = group_budgets(flops)
    if len(np.unique(labels)) < 2:
        raise LMForgeError(f"hyperparameter fit needs sweeps at 2 or more compute budgets, got {len(np.unique(labels))}")

    def fit(idx: np.ndarray) -> np.ndarray:
        m = near_optimal_mask(flops[idx], loss[idx], tol, labels[idx])
        c = flops[idx][m]
        return np.array([*fit_loglinear(c, lr[idx][m]), *fit_loglinear(c, bs[idx][m])])

    all_idx = np.arange(len(loss))
    point = fit(all_idx)
    samples_lr, samples_bs = {}, {}
    if n_boot > 0:
        boot = bootstrap(fit, len(loss), n_boot, seed, groups=labels)
        samples_lr = {"k": boot[:, 0], "a": boot[:, 1]}
        samples_bs = {"k": boot[:, 2], "a": boot[:, 3]}
    return HparamFit(PurePowerLaw({"k": point[0], "a": point[1]}, samples_lr, level),
                     PurePowerLaw({"k": point[2], "a": point[3]}, samples_bs, level),
                     near_optimal_mask(flops, loss, tol, labels))
