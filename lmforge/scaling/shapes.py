"""Concrete model shapes for a parameter target, and the IsoFLOP grid of a sweep.

`shape_for_params(target, ...)` picks (n_layers, d_model, n_heads) whose parameter count, as
`lmforge.model.accounting.count_params` computes it for the real modules, is closest to the target,
among shapes in sane ranges: aspect ratio d_model / n_layers in [32, 128] (Kaplan et al. 2020 find
loss flat across roughly 20..200; GPT-2 small is 64, Llama-2 7B 128), head size 64 or 128 at usual
widths (smaller only for toy widths), d_model a multiple of the head size. Ties in parameter
count go to the aspect ratio closest to 64.

`isoflop_grid(budgets, ...)` lays out a Chinchilla-style sweep: per FLOP budget, model sizes
log-spaced around a first guess of the optimum (20 tokens/parameter), each trained for the tokens
its budget buys, counted with `flops_per_token` (matmuls incl. attention and the LM head, forward
+ backward), in whole optimizer steps. `hparam_grid(budgets, ...)` lays out a DeepSeek-style
sweep instead: per budget one shape (at the same first guess) trained with every combination of
learning rate and batch size from the given lists, each spending the budget.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from lmforge.errors import ConfigError
from lmforge.model import ModelConfig, count_params, flops_per_token

PARAM_KINDS = ("non_embedding", "total")


def head_dim_for(d_model: int) -> int:
    """Head size by width: 128 from d_model 2048, 64 from 256, else 32 (toy widths: 16)."""
    if d_model >= 2048:
        return 128
    if d_model >= 256:
        return 64
    return 32 if d_model >= 64 else 16


@dataclass
class Shape:
    """One concrete model: its config and its counts."""

    config: ModelConfig
    params: dict[str, int]
    aspect: float

    def summary(self) -> str:
        c = self.config
        return (f"n_layers={c.n_layers} d_model={c.d_model} n_heads={c.n_heads} n_kv_heads={c.n_kv_heads} "
                f"head_dim={c.head_dim} d_ff={c.d_ff} (aspect {self.aspect:.0f})")


def _make(template: ModelConfig, n_layers: int, d_model: int, kv_ratio: int) -> ModelConfig:
    hd = head_dim_for(d_model)
    heads = d_model // hd
    kv = heads // kv_ratio if heads % kv_ratio == 0 else heads
    return template.replace(n_layers=n_layers, d_model=d_model, n_heads=heads, n_kv_heads=kv, head_dim=hd,
                            d_ff=None)


def shape_for_params(target: float, template: ModelConfig | None = None, *, param_kind: str = "non_embedding",
                     aspect_range: tuple[float, float] = (32.0, 128.0), preferred_aspect: float = 64.0,
                     kv_ratio: int = 1, max_layers: int = 256) -> Shape:
    """The shape in range whose `count_params(cfg)[param_kind]` is closest to `target` (log scale).

    `template` supplies everything but the shape (vocab, context, norm, MLP type, positions...).
    `kv_ratio` > 1 gives GQA with n_heads / kv_ratio KV heads where that divides.
    """
    if param_kind not in PARAM_KINDS:
        raise ConfigError(f"param_kind = {param_kind!r} must be one of {list(PARAM_KINDS)}")
    if not (target > 0 and math.isfinite(target)):
        raise ConfigError(f"target parameter count {target!r} must be a positive number")
    template = template or ModelConfig()
    lo, hi = aspect_range
    best, best_key = None, None
    for n_layers in range(1, max_layers + 1):
        d_lo, d_hi = lo * n_layers, hi * n_layers
        # widths on the head-size grid between the aspect limits (toy models: any multiple of 16)
        widths = [d for d in range(16, int(d_hi) + 1, 16) if d >= d_lo and d % head_dim_for(d) == 0]
        if not widths:
            continue
        def count(d: int, n_layers: int = n_layers) -> int:
            return count_params(_make(template, n_layers, d, kv_ratio))[param_kind]

        if count(widths[0]) > target * 4 and best is not None:
            break  # deeper only gets bigger
        # params grow with width: binary search for the first width at or above the target
        a, b = 0, len(widths) - 1
        while a < b:
            m = (a + b) // 2
            if count(widths[m]) < target:
                a = m + 1
            else:
                b = m
        for i in {max(a - 1, 0), a}:
            d = widths[i]
            p = count(d)
            key = (abs(math.log(p / target)) + 0.02 * abs(math.log(d / n_layers / preferred_aspect)))
            if best_key is None or key < best_key:
                best, best_key = (n_layers, d), key
    if best is None:
        raise ConfigError(f"no model shape with aspect ratio in {aspect_range} for {target:.3g} parameters")
    cfg = _make(template, best[0], best[1], kv_ratio)
    return Shape(cfg, count_params(cfg), cfg.d_model / cfg.n_layers)


@dataclass
class GridRun:
    """One run of a sweep: a shape, its budget and the optimizer steps that spend it."""

    budget: float
    config: ModelConfig
    steps: int
    batch_size: int  # sequences per step
    seq_len: int
    lr: float
    seed: int
    recipe: dict = field(default_factory=dict)  # training options that differ from the defaults

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    @property
    def flops_per_token(self) -> float:
        return float(flops_per_token(self.config, self.seq_len)["total"])

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.tokens

    @property
    def run_id(self) -> str:
        """Stable id from everything that determines the result (so resumes match runs exactly)."""
        key = {"model": asdict(self.config), "steps": self.steps, "batch": self.batch_size,
               "seq": self.seq_len, "lr": self.lr, "seed": self.seed}
        if self.recipe:  # only when set, so the ids of default-recipe runs stay what they were
            key["recipe"] = self.recipe
        key = json.dumps(key, sort_keys=True, default=str)
        c = self.config
        return f"L{c.n_layers}-d{c.d_model}-s{self.steps}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"

    def row(self) -> dict:
        counts = count_params(self.config)
        return {"run": self.run_id, "budget": self.budget, "params": counts["non_embedding"],
                "params_total": counts["total"], "tokens": self.tokens, "flops": self.flops,
                "flops_per_token": self.flops_per_token, "n_layers": self.config.n_layers,
                "d_model": self.config.d_model, "n_heads": self.config.n_heads, "steps": self.steps,
                "batch_size": self.batch_size * self.seq_len, "lr": self.lr}


def isoflop_grid(budgets: list[float], template: ModelConfig, *, sizes_per_budget: int = 5, span: float = 4.0,
                 tokens_per_param: float = 20.0, seq_len: int, batch_size: int, lr: float, seed: int = 0,
                 min_steps: int = 10, param_kind: str = "non_embedding",
                 aspect_range: tuple[float, float] = (32.0, 128.0)) -> list[GridRun]:
    """Runs for each budget: `sizes_per_budget` shapes from N_guess/span to N_guess·span (log-spaced),
    N_guess = sqrt(C / (6·tokens_per_param)); each trained for round(C / (flops/token · tokens/step))
    steps. Shapes that coincide after rounding, or get fewer than `min_steps` steps, are dropped."""
    if not budgets or any(not (b > 0) for b in budgets):
        raise ConfigError(f"sweep budgets must be positive FLOP counts, got {budgets}")
    if sizes_per_budget < 3:
        raise ConfigError(f"sizes_per_budget = {sizes_per_budget}: an IsoFLOP parabola needs at least 3")
    runs: list[GridRun] = []
    tokens_per_step = batch_size * seq_len
    for budget in sorted(budgets):
        guess = math.sqrt(budget / (6.0 * tokens_per_param))
        seen = set()
        for target in np.geomspace(guess / span, guess * span, sizes_per_budget):
            shape = shape_for_params(float(target), template, param_kind=param_kind, aspect_range=aspect_range)
            key = (shape.config.n_layers, shape.config.d_model)
            if key in seen:
                continue
            seen.add(key)
            fpt = flops_per_token(shape.config, seq_len)["total"]
            steps = round(budget / (fpt * tokens_per_step))
            if steps < min_steps:
                continue
            runs.append(GridRun(budget, shape.config, steps, batch_size, seq_len, lr, seed))
    return runs


def hparam_grid(budgets: list[float], template: ModelConfig, *, lrs: list[float], batch_sizes: list[int],
                seq_len: int, tokens_per_param: float = 20.0, seed: int = 0, min_steps: int = 10,
                param_kind: str = "non_embedding",
                aspect_range: tuple[float, float] = (32.0, 128.0)) -> list[GridRun]:
    """Per budget: the shape nearest N_guess = sqrt(C / (6·tokens_per_param)), trained with every
    (lr, batch size in sequences) pair for the steps that spend C; pairs under `min_steps` are dropped."""
    if not budgets or any(not (b > 0) for b in budgets):
        raise ConfigError(f"sweep budgets must be positive FLOP counts, got {budgets}")
    if not lrs or not batch_sizes or any(lr <= 0 for lr in lrs) or any(b < 1 for b in batch_sizes):
        raise ConfigError(f"a hyperparameter sweep needs positive lrs and batch sizes, got {lrs}, {batch_sizes}")
    runs = []
    for budget in sorted(budgets):
        guess = math.sqrt(budget / (6.0 * tokens_per_param))
        cfg = shape_for_params(guess, template, param_kind=param_kind, aspect_range=aspect_range).config
        fpt = flops_per_token(cfg, seq_len)["total"]
        for batch in batch_sizes:
            steps = round(budget / (fpt * batch * seq_len))
            if steps < min_steps:
                continue
            runs.extend(GridRun(budget, cfg, steps, batch, seq_len, lr, seed) for lr in lrs)
    return runs
