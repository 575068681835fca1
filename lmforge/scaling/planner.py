"""The compute-optimal planner: from a FLOP budget to a model, a token count, hyperparameters and a
predicted loss; plus saving and loading fits as JSON (the artifact between `fit` and `plan`).

`plan(flops, fit, hparams, template)`:
1. N_opt(C) from the fit (approach 3 in closed form; approaches 1/2 from their N_opt = k·C^a law).
2. A concrete shape whose parameter count (the kind the fit counted: non-embedding or total) is
   closest to N_opt (`shapes.shape_for_params`).
3. D = C / (6·N) for that shape's N, so 6·N·D is the budget exactly (the convention the fits use;
   FLOPs counted with attention and the LM head are reported next to it).
4. Batch size and learning rate from the hyperparameter laws at C (a fit of your sweep, or the
   published DeepSeek-LLM laws), the batch rounded to whole sequences.
5. Predicted loss L(N, D) with a bootstrap interval (approach 3), or the loss-vs-compute frontier
   (approach 2); fits without samples (published values) give no interval, and say so.

`gpu_hours_to_flops(hours, peak, mfu)` turns a GPU budget into FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.errors import ConfigError, LMForgeError
from lmforge.io import read_json, write_json
from lmforge.scaling.fit import FitResult
from lmforge.scaling.hparams import HparamFit, published_deepseek
from lmforge.scaling.parametric import ParametricFit, published_chinchilla
from lmforge.scaling.powerlaw import PowerLaw, PurePowerLaw
from lmforge.scaling.shapes import Shape, shape_for_params


@dataclass
class LoadedFit:
    """A fit ready for planning: how to get N_opt(C) and, if it can, the loss and its samples."""

    kind: str  # parametric | isoflop | envelope
    param_kind: str  # which parameter count N means: non_embedding | total
    source: str
    parametric: ParametricFit | None = None
    n_opt: PurePowerLaw | None = None
    frontier: PowerLaw | None = None

    def n_opt_at(self, flops: float) -> tuple[float, tuple[float, float]]:
        if self.parametric is not None:
            n, _ = self.parametric.compute_optimal(flops)
            return float(n), self.parametric.compute_optimal_ci(flops)["N_opt"]
        n = float(self.n_opt.predict(flops))
        if self.n_opt.samples:
            lo, hi = self.n_opt.predict_ci(np.array([flops]))
            return n, (float(lo[0]), float(hi[0]))
        return n, (math.nan, math.nan)

    def loss_at(self, n: float, d: float, flops: float) -> tuple[float, tuple[float, float]]:
        if self.parametric is not None:
            value = float(self.parametric.predict(n, d))
            s = self.parametric.predict_samples(n, d)
            q = 1 - self.parametric.level
            ci = tuple(float(v) for v in np.quantile(s, [q / 2, 1 - q / 2])) if len(s) else (math.nan, math.nan)
            return value, ci
        if self.frontier is not None:
            value = float(self.frontier.predict(flops))
            if self.frontier.samples:
                lo, hi = self.frontier.predict_ci(np.array([flops]))
                return value, (float(lo[0]), float(hi[0]))
            return value, (math.nan, math.nan)
        return math.nan, (math.nan, math.nan)


def save_fit(path: str | Path, fit, meta: dict | None = None) -> None:
    """Write a fit (any of the fitters' results) as JSON with its bootstrap samples."""
    data = fit.to_dict() if hasattr(fit, "to_dict") else dict(fit)
    if isinstance(fit, ParametricFit):
        data["kind"] = "parametric"
    elif isinstance(fit, PowerLaw):
        data["kind"] = "power_law"
    data["meta"] = dict(meta or {})
    write_json(path, data, indent=None)


def load_fit(path: str | Path) -> LoadedFit | HparamFit:
    """Read a fit written by `save_fit` / `lmforge scaling fit`."""
    data = read_json(path, "scaling fit")
    if not isinstance(data, dict) or "kind" not in data:
        raise LMForgeError(f"{path}: not a saved scaling fit (no 'kind')")
    kind, meta = data["kind"], data.get("meta", {})
    param_kind = meta.get("param_kind", "non_embedding")
    src = f"fit {path}"
    if kind == "hparams":
        return HparamFit.from_dict(data, str(path))
    if kind == "parametric":
        f = FitResult.from_dict(data, str(path))
        return LoadedFit(kind, param_kind, src, parametric=ParametricFit(f.params, f.samples, f.level))
    if kind in ("isoflop", "envelope"):
        raw = data["n_opt"]["parabola"] if kind == "isoflop" else data["n_opt"]
        n = FitResult.from_dict(raw, str(path))
        frontier = None
        if kind == "isoflop" and data.get("frontier"):
            fr = FitResult.from_dict(data["frontier"], str(path))
            frontier = PowerLaw(fr.params, fr.samples, fr.level)
        return LoadedFit(kind, param_kind, src, n_opt=PurePowerLaw(n.params, n.samples, n.level), frontier=frontier)
    raise LMForgeError(f"{path}: a '{kind}' fit cannot plan (need parametric, isoflop, envelope or hparams)")


def chinchilla_fit() -> LoadedFit:
    """Hoffmann et al.'s published approach-3 law; they counted all parameters, embeddings included."""
    return LoadedFit("parametric", "total", "published (Hoffmann et al. 2022, approach 3)",
                     parametric=published_chinchilla())


def gpu_hours_to_flops(hours: float, peak_flops: float, mfu: float) -> float:
    if hours <= 0 or peak_flops <= 0 or not 0 < mfu <= 1:
        raise ConfigError(f"gpu-hours {hours}, peak {peak_flops} FLOP/s and MFU {mfu}: need hours > 0, "
                          "peak > 0 and 0 < MFU <= 1")
    return hours * 3600.0 * peak_flops * mfu


@dataclass
class Plan:
    flops: float
    n_opt: float
    n_opt_ci: tuple[float, float]
    shape: Shape
    params: float  # N of the shape, of the fit's kind
    tokens: float  # D = C / (6·N)
    batch_tokens: int
    batch_sequences: int
    lr: float
    steps: int
    loss: float
    loss_ci: tuple[float, float]
    accounted_flops_per_token: float
    fit_source: str
    hparam_source: str
    param_kind: str

    def to_dict(self) -> dict:
        from lmforge.config import to_dict

        return {"flops": self.flops, "n_opt": self.n_opt, "n_opt_ci": list(self.n_opt_ci),
                "params": self.params, "param_kind": self.param_kind, "tokens": self.tokens,
                "tokens_per_param": self.tokens / self.params, "six_n_d": 6 * self.params * self.tokens,
                "batch_tokens": self.batch_tokens, "batch_sequences": self.batch_sequences, "lr": self.lr,
                "steps": self.steps, "loss": self.loss, "loss_ci": list(self.loss_ci),
                "accounted_flops_per_token": self.accounted_flops_per_token,
                "model": to_dict(self.shape.config), "param_counts": self.shape.params,
                "fit_source": self.fit_source, "hparam_source": self.hparam_source}

    def describe(self) -> str:
        def ci(pair, fmt="{:.4g}"):
            return "" if math.isnan(pair[0]) else f"  [{fmt.format(pair[0])}, {fmt.format(pair[1])}]"

        c = self.shape.config
        lines = [
            f"budget C            {self.flops:.4g} FLOPs",
            f"N_opt (fit)         {self.n_opt:.4g} params{ci(self.n_opt_ci)}   ({self.param_kind})",
            f"model               {self.shape.summary()}",
            f"  N                 {self.params:.4g} ({self.param_kind}); total {self.shape.params['total']:,}",
            f"D = C / 6N          {self.tokens:.4g} tokens ({self.tokens / self.params:.1f} tokens/param); "
            f"6·N·D = {6 * self.params * self.tokens:.4g}",
            f"  full accounting   {self.accounted_flops_per_token:.4g} FLOPs/token (attention, head) -> "
            f"{self.flops / self.accounted_flops_per_token:.4g} tokens for the same C",
            f"batch size          {self.batch_tokens:,} tokens = {self.batch_sequences} x {c.context_length}",
            f"learning rate       {self.lr:.3g}",
            f"steps               {self.steps:,}",
            f"predicted loss      {self.loss:.4f}{ci(self.loss_ci, '{:.4f}')}" if not math.isnan(self.loss)
            else "predicted loss      (this fit has no loss model; use approach 2 with ≥4 budgets or approach 3)",
            f"from                {self.fit_source}; hyperparameters: {self.hparam_source}",
        ]
        if math.isnan(self.loss_ci[0]) and not math.isnan(self.loss):
            lines.append("                    (no interval: the fit has no bootstrap samples)")
        return "\n".join(lines)


def plan(flops: float, fit: LoadedFit | None = None, hparams: HparamFit | None = None, template=None, *,
         kv_ratio: int = 1) -> Plan:
    """Plan a run for `flops` (see module docstring). `template` is a ModelConfig giving the vocab,
    context length and architecture; its shape fields are replaced."""
    from lmforge.model import ModelConfig, flops_per_token

    if not (flops > 0 and math.isfinite(flops)):
        raise ConfigError(f"--flops {flops!r} must be a positive number")
    fit = fit or chinchilla_fit()
    hparams = hparams or published_deepseek()
    template = template or ModelConfig()
    n_opt, n_ci = fit.n_opt_at(flops)
    shape = shape_for_params(n_opt, template, param_kind=fit.param_kind, kv_ratio=kv_ratio)
    n = float(shape.params[fit.param_kind])
    d = flops / (6.0 * n)
    lr, batch = (float(v) for v in hparams.predict(flops))
    seq = template.context_length
    batch_seqs = max(1, round(batch / seq))
    steps = max(1, round(d / (batch_seqs * seq)))
    loss, loss_ci = fit.loss_at(n, d, flops)
    return Plan(flops, n_opt, n_ci, shape, n, d, batch_seqs * seq, batch_seqs, lr, steps, loss, loss_ci,
                float(flops_per_token(shape.config, seq)["total"]), fit.source, hparams.source, fit.param_kind)
